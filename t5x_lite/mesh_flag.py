"""`--mesh=data,fsdp,tensor` for the command-line tools that take a mesh outside a run config
(`t5x_lite.estimate`, `t5x_lite.infer`, `t5x_lite.evaluate`): defined once, so they can live in
one process (tests).
Parse it with `partitioning.parse_mesh`."""
from absl import flags

MESH = flags.DEFINE_string(
    "mesh", None, "data,fsdp,tensor mesh sizes; one may be -1 (fills the devices). Default: "
    "estimate, evaluate: the config's mesh section; infer: -1,1,1 (every device, "
    "data-parallel).")
