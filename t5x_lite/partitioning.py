"""Device mesh, logical->mesh axis rules and shardings.

One mesh with axes (data, fsdp, tensor). Data parallelism, FSDP (ZeRO-3-like: params and
optimizer state sharded on `fsdp`) and tensor parallelism are the same code with different mesh
shapes. We use the classic Auto axis type on purpose: flax linen's logical partitioning
(`with_logical_partitioning`, `with_logical_constraint`) is built on it, and XLA's propagation
then fills in every intermediate sharding.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from t5x_lite.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Priority order matters: a mesh axis used by an earlier rule is skipped by later ones, so
# activations [batch, length, embed] put fsdp on batch, while params [embed, ...] use it for embed.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # key / value heads (fewer than heads under grouped-query attention)
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
    ("max_len", None),
    ("layers", None),
)

LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)  # every name the models' params use


class MeshError(UserError):
    """A mesh shape that does not fit the devices."""


def parse_mesh(text: str) -> tuple[int, int, int]:
    """'data,fsdp,tensor' (a --mesh flag) -> three ints; sizes are checked by `mesh_shape`."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise MeshError(f"--mesh must be three integers data,fsdp,tensor (one may be -1), got "
                        f"{text!r}")
    return sizes


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves one -1 entry to fill the devices; checks the product."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise MeshError(f"At most one mesh axis may be -1, got (data, fsdp, tensor)={tuple(sizes)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"Mesh sizes must be positive or -1, got {tuple(sizes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"Cannot fill mesh {tuple(sizes)} on {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(f"Mesh (data, fsdp, tensor)={tuple(sizes)} needs {math.prod(sizes)} "
                        f"devices but {num_devices} are available")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def rules_from_config(rules) -> tuple[tuple[str, object], ...]:
    """Config rules (list of [logical_axis, mesh_axis | [mesh_axes] | None]) -> hashable tuple;
    None -> defaults. A logical axis the models do not use (a typo would silently replicate
    what it meant to shard) or a mesh axis other than data / fsdp / tensor is a MeshError."""
    if rules is None:
        return DEFAULT_RULES
    if not isinstance(rules, (list, tuple)):
        raise MeshError(f"mesh.rules is a list of (logical_axis, mesh_axis | (mesh_axes) | None) "
                        f"pairs, got {rules!r}")
    out = []
    for rule in rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise MeshError(f"mesh.rules entries are (logical_axis, mesh_axis | (mesh_axes) | "
                            f"None) pairs, got {rule!r}")
        name, axes = rule[0], tuple(rule[1]) if isinstance(rule[1], (list, tuple)) else rule[1]
        if name not in LOGICAL_AXES:
            raise MeshError(f"mesh.rules: unknown logical axis {name!r}; the models use "
                            f"{', '.join(LOGICAL_AXES)}")
        used = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if not isinstance(used, tuple) or not all(
                isinstance(a, str) and a in MESH_AXES for a in used) or len(set(used)) < len(used):
            raise MeshError(f"mesh.rules: {name!r} -> {rule[1]!r}; map it to None, one of "
                            f"{', '.join(MESH_AXES)}, or a tuple of distinct ones")
        out.append((name, axes))
    return tuple(out)


def logical_specs(boxed_tree):
    """PartitionSpecs of logical axis names for a tree of nn.Partitioned leaves."""
    return nn.get_partition_spec(boxed_tree)


def shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a (possibly abstract) tree of nn.Partitioned leaves.

    Raises:
      MeshError: a dimension its mesh axes do not divide (jit, device_put and checkpoint
        restores would fail on it later, with a long traceback or as a 'damaged checkpoint').
    """
    logical = logical_specs(boxed_tree)
    out = nn.logical_to_mesh_sharding(logical, mesh, rules)
    check_divisible(nn.meta.unbox(boxed_tree), out, mesh, logical)
    return out


def check_divisible(tree, shardings_tree, mesh, logical_tree) -> None:
    """Every dimension of every (possibly abstract) array divisible by its mesh axes' size;
    `logical_tree` (PartitionSpecs of logical names) lets the error name the rule to change."""
    sizes = dict(mesh.shape)
    logical_leaves = jax.tree.leaves(logical_tree, is_leaf=lambda x: isinstance(x, P))
    for (path, x), sh, logical in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                      jax.tree.leaves(shardings_tree), logical_leaves):
        for dim, axes, name in zip(x.shape, tuple(sh.spec), tuple(logical)):
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            n = math.prod(sizes[a] for a in names)
            if dim % n:
                shape = ", ".join(str(sizes.get(a, 1)) for a in MESH_AXES)
                rule = (f", or mesh.rules with ({name!r}, None) to keep its {name!r} dim whole "
                        "(a mesh.rules list replaces the default rules whole: copy "
                        "partitioning.DEFAULT_RULES and change that entry)"
                        ) if isinstance(name, str) else ""
                raise MeshError(
                    f"{jax.tree_util.keystr(path)} has a dimension of {dim} split over mesh axes "
                    f"{axes} of size {n}, which does not divide it; pick another mesh (data, "
                    f"fsdp, tensor)=({shape}){rule}")


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch's rows are split: data x fsdp."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def _process_of(device) -> int:
    return device.process_index


def check_process_rows(mesh: Mesh) -> None:
    """Raises MeshError when a batch shard (rows split over data x fsdp) lies on devices of
    several processes, i.e. the tensor axis crosses processes: each process loads rows of its
    own (`data.make_global_batch`), so the processes would feed different rows to one shard
    and XLA would train and evaluate on half-matched batches without a word."""
    owners: dict[int, set] = {}
    shards = batch_shards(mesh)
    for device, index in data_sharding(mesh).devices_indices_map((shards,)).items():
        owners.setdefault(index[0].start or 0, set()).add(_process_of(device))
    if all(len(p) == 1 for p in owners.values()):
        return
    processes = len(set().union(*owners.values()))
    shape = ", ".join(str(mesh.shape[a]) for a in mesh.axis_names)
    raise MeshError(f"mesh ({', '.join(mesh.axis_names)})=({shape}) puts each batch shard on "
                    f"devices of several processes, but every process loads rows of its own: "
                    f"make data*fsdp={shards} a multiple of the {processes} processes (so that "
                    f"tensor stays within a process's devices)")


def place_rows(mesh: Mesh, tree):
    """Host arrays with a leading row dim, padded to a multiple of `batch_shards(mesh)` by
    repeating the last row (a valid input, unlike zeros) and split over the batch axes, so each
    device computes its own rows. Callers drop the rows past their own."""
    def place(x):
        x = np.asarray(x)
        pad = -len(x) % batch_shards(mesh)
        return jax.device_put(np.concatenate([x, np.repeat(x[-1:], pad, 0)]),
                              data_sharding(mesh))

    return jax.tree.map(place, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
    """Mesh and axis rules in force while tracing, so activation constraints resolve."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
