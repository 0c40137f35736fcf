"""Train or fine-tune a model; re-running the same command resumes from the latest checkpoint.

    python -m t5x_lite.train --config=configs/tiny_t5.py --workdir=/tmp/tiny_t5 \\
        [--config.train.num_steps=1000 --config.mesh.fsdp=4 ...]

Multi-process (TPU VM pods, or N local CPU processes): pass --distributed (or set
T5X_LITE_DISTRIBUTED=1) on every process; coordinator / process ids come from the flags below or
jax's cluster auto-detection. See README.md.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from t5x_lite import cli  # light: no jax

cli.check_flagfiles("train")  # config_flags reads them when a flag is defined
_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://).", required=True)
_OVERRIDE = flags.DEFINE_bool("override_config", False,
                              "Replace a workdir's saved config even if the model shape differs.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-process runs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index.")


def main(argv):
    if len(argv) > 1:
        cli.exit_with("train", f"unexpected arguments {argv[1:]}")
    cli.quiet_console()
    from t5x_lite import distributed  # after absl parsed flags, before any device is touched

    # Reads --distributed / --coordinator_address / --num_processes / --process_id above, else
    # T5X_LITE_* env (launch/cpu_local.sh, launch/tpu_vm.sh); gloo for CPU processes; timeouts.
    try:
        distributed.maybe_initialize()
    except distributed.DistributedError as e:
        cli.exit_with("train", e)
    if _CONFIG.value is None:
        cli.exit_with("train", "--config is required (e.g. --config=configs/tiny_t5.py)")
    from t5x_lite.training import train

    try:
        result = train(_CONFIG.value, _WORKDIR.value, override_config=_OVERRIDE.value)
    except cli.ERRORS as e:
        cli.exit_with("train", e)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped without saving this step
        cli.exit_with("train", "interrupted; re-run the same command to resume from the last "
                      "checkpoint")
    logging.info("Done at step %d%s", result.step,
                 " (stopped by a signal; re-run to resume)" if result.preempted else "")


if __name__ == "__main__":
    from t5x_lite import host_memory
    host_memory.reexec_with_huge_pages()
    app.run(main, flags_parser=cli.flags_parser("train"))
