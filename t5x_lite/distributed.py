"""Multi-process start-up: `maybe_initialize()` before any JAX computation, plus barriers.

One JAX process per host (TPU VM worker, GPU node) or several local CPU processes
(`launch/cpu_local.sh`, gloo collectives over loopback). Settings come from, in order: the
arguments of `maybe_initialize`, the entry point's absl flags of the same name when it defines
them (`t5x_lite.train` does), environment variables:

    distributed          T5X_LITE_DISTRIBUTED          auto (default) | on (1) | off (0)
    coordinator_address  T5X_LITE_COORDINATOR          host:port of process 0
    num_processes        T5X_LITE_NUM_PROCESSES
    process_id           T5X_LITE_PROCESS_ID
    initialization_timeout  T5X_LITE_INIT_TIMEOUT      seconds to wait for all (jax: 300)
    heartbeat_timeout    T5X_LITE_HEARTBEAT_TIMEOUT    seconds of silence = dead (jax: 100)

`auto` initializes when all three of address / count / id are given, or when a cluster
environment is visible (multi-worker TPU slice, Slurm, Open MPI); `on` always initializes and
lets JAX detect the cluster (what `launch/tpu_vm.sh` uses on TPU VMs); `off` never does.

A process that dies takes the job down: the coordination service stops hearing its heartbeats
and, after the heartbeat timeout, terminates the others with "the JAX distributed service
detected fatal errors ... another task died" instead of letting them wait in a collective.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Callable, Iterator

import jax
from absl import flags, logging

from t5x_lite.errors import UserError

MODES = ("auto", "on", "off")

# Environment variables that mean "this process is one of several" (so `auto` initializes).
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
                "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")

_barrier_counter = itertools.count()


class DistributedError(RuntimeError):
    """Multi-process settings that cannot work, or a peer that did not show up in time."""


class Process0Failed(UserError):
    """What process 0 did for every process failed (process 0 itself raises the cause)."""


def _flag(name: str):
    """The value of absl flag `name` if an entry point defined it and it was set, else None."""
    if name in flags.FLAGS and flags.FLAGS.is_parsed():
        flag = flags.FLAGS[name]
        if name == "distributed" and isinstance(flag.value, bool):  # train.py: --distributed bool
            # --nodistributed on the command line means off; the default defers to the env.
            return "on" if flag.value else ("off" if flag.present else None)
        return flag.value
    return None


def _setting(arg, flag_name: str | None, env: str, cast=str):
    if arg is not None:
        return arg
    if flag_name is not None and _flag(flag_name) is not None:
        return _flag(flag_name)
    value = os.environ.get(env, "").strip()
    if not value:
        return None
    try:
        return cast(value)
    except ValueError:
        raise DistributedError(f"${env}={value!r} is not a valid {cast.__name__}") from None


def _cluster_visible() -> bool:
    for name in _CLUSTER_ENV:
        value = os.environ.get(name, "")
        if name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
            if value.isdigit() and int(value) > 1:
                return True
        elif name.startswith("TPU_") and "," in value:
            return True
        elif name.startswith("MEGASCALE") and value:
            return True
    return False


def maybe_initialize(*, mode: str | None = None, coordinator_address: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None,
                     initialization_timeout: int | None = None,
                     heartbeat_timeout: int | None = None) -> bool:
    """Calls `jax.distributed.initialize` when this run is multi-process; safe to call twice.

    Must run before anything touches a JAX device (jax.devices(), an array, a jit call).

    Returns:
      True if the distributed system is initialized (now or by an earlier call).
    Raises:
      DistributedError: partial or inconsistent settings, or JAX already started single-process.
    """
    if jax.distributed.is_initialized():
        return True
    mode = str(_setting(mode, "distributed", "T5X_LITE_DISTRIBUTED") or "auto").lower()
    mode = {"1": "on", "true": "on", "0": "off", "false": "off"}.get(mode, mode)
    if mode not in MODES:
        raise DistributedError(f"distributed mode must be one of {MODES}, got {mode!r}")
    address = _setting(coordinator_address, "coordinator_address", "T5X_LITE_COORDINATOR")
    count = _setting(num_processes, "num_processes", "T5X_LITE_NUM_PROCESSES", int)
    index = _setting(process_id, "process_id", "T5X_LITE_PROCESS_ID", int)
    timeouts = {}
    init_timeout = _setting(initialization_timeout, None, "T5X_LITE_INIT_TIMEOUT", int)
    beat_timeout = _setting(heartbeat_timeout, None, "T5X_LITE_HEARTBEAT_TIMEOUT", int)
    for what, value in (("initialization_timeout", init_timeout),
                        ("heartbeat_timeout", beat_timeout)):
        if value is not None and value < 1:
            raise DistributedError(f"{what} must be >= 1 second, got {value}")
    if init_timeout is not None:
        timeouts["initialization_timeout"] = init_timeout
    if beat_timeout is not None:
        timeouts["heartbeat_timeout_seconds"] = beat_timeout
        # A survivor waits this long at exit for the others; keep it in the same range.
        timeouts["shutdown_timeout_seconds"] = max(beat_timeout, 10)

    given = {"coordinator_address": address, "num_processes": count, "process_id": index}
    explicit = all(v is not None for v in given.values())
    if mode == "off":
        return False
    if any(v is not None for v in given.values()) and not explicit:
        missing = sorted(k for k, v in given.items() if v is None)
        raise DistributedError(f"Multi-process run needs coordinator_address, num_processes and "
                               f"process_id together; missing {missing}")
    if explicit:
        if count < 1:
            raise DistributedError(f"num_processes must be >= 1, got {count}")
        if not 0 <= index < count:
            raise DistributedError(f"process_id must be in [0, {count}), got {index}")
        host, _, port = str(address).rpartition(":")
        # jax fails on a missing port with an IndexError traceback, and on one outside 1-65535
        # with an abort (a C++ trace, "another task died") after the whole init timeout
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise DistributedError(f"coordinator_address must be host:port with a port in "
                                   f"1-65535, got {address!r}")
        if count == 1 and mode == "auto":
            return False
    elif mode == "auto" and not _cluster_visible():
        return False

    if _backends_started():
        raise DistributedError("maybe_initialize() must run before any JAX computation (this "
                               "process already created its devices); call it first in main()")
    # Collectives between CPU processes need gloo; the setting does nothing to TPU/GPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**(given if explicit else {}), **timeouts)
    except (ValueError, RuntimeError) as e:  # e.g. mode `on` where JAX finds no cluster
        reason = (str(e) or type(e).__name__).splitlines()[0]
        raise DistributedError(
            f"jax.distributed.initialize() failed: {reason} (outside a TPU pod, Slurm or Open "
            "MPI job, give coordinator_address, num_processes and process_id)") from None
    logging.info("JAX distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public "are devices created yet?" query

    return xla_bridge.backends_are_initialized()


def is_coordinator() -> bool:
    """True on the process that writes logs, summaries and config files (process 0)."""
    return jax.process_index() == 0


def _one_process() -> bool:
    # Asked before the process count, which would start the backends (and so forbid a later
    # `maybe_initialize`) when called early, e.g. from a config's get_config().
    return not jax.distributed.is_initialized() or jax.process_count() == 1


def agree(value: int) -> int:
    """Process 0's `value` on every process (file listings may differ between hosts)."""
    if _one_process():
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def every_process(value: int) -> list[int]:
    """Each process's `value`, in process order, on every process (to compare what each
    process found where they must all find the same)."""
    if _one_process():
        return [value]
    import numpy as np
    from jax.experimental import multihost_utils

    return [int(v) for v in np.ravel(multihost_utils.process_allgather(np.int64(value)))]


def on_process_0(fn: Callable[[], object], what: str) -> None:
    """Runs `fn` on process 0 alone (e.g. writing what all processes then read) while the
    others wait, and tells them whether it worked: on failure process 0 re-raises its error
    and the others raise Process0Failed naming `what`, so every process stops with one line.
    (Waiting in a plain barrier instead, they hung until a heartbeat timeout, and process 0,
    exiting, waited for them at JAX's shutdown barrier.) With one process: just `fn()`."""
    if _one_process():
        fn()
        return
    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- every failure must reach the other processes
            error = e
    if agree(int(error is not None)):
        if error is not None:
            raise error
        raise Process0Failed(f"process 0 could not {what}; its log says why")


def host_array(x):
    """A jax.Array as a numpy array on every process, also one whose rows lie on other
    processes' devices (there `np.asarray` raises)."""
    import numpy as np

    if not _one_process() and not getattr(x, "is_fully_addressable", True):
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def agree_list(values: list[int]) -> list[int]:
    """Process 0's list of ints on every process (e.g. the checkpoint steps it lists, while a
    trainer may save one between two processes' listings)."""
    if _one_process():
        return list(values)
    import numpy as np
    from jax.experimental import multihost_utils

    n = agree(len(values))
    mine = np.zeros(n, np.int64)
    mine[:min(n, len(values))] = values[:n]
    return [int(v) for v in multihost_utils.broadcast_one_to_all(mine)]


@contextlib.contextmanager
def exclusive(path, refusal: Callable[[str], Exception], *, lease: bool = False
              ) -> Iterator[Callable[[], str | None]]:
    """One run at a time on `path` (a workdir, an output file): process 0 holds
    `files.host_lock` (this host) and, with `lease`, the workdir's `lease.hold` (other hosts);
    if another run holds either, every process raises `refusal(holder)` (holder: its host, pid
    and command line as process 0 read them). Yields `lost()`, which every process calls at the
    same points: None while the lease is ours, else (on every process) who took it."""
    from t5x_lite import files
    from t5x_lite import lease as leases

    files.check_remote(path)  # on every process: gs:// without gcsfs stops them all alike
    holder, held = None, None
    with contextlib.ExitStack() as stack:
        if is_coordinator():
            try:
                stack.enter_context(files.host_lock(files.real(path), wait=False))
                if lease:
                    held = stack.enter_context(leases.hold(path))
            except (files.LockHeld, leases.LeaseHeld) as e:
                holder = e.holder
        if agree(int(holder is not None)):
            raise refusal(holder or "as process 0 found")

        def lost() -> str | None:
            by = held.lost() if held is not None else None
            return (by or "as process 0 found") if agree(int(by is not None)) else None

        yield lost


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Blocks until every process reaches the barrier; DistributedError after `timeout_s`.

    All processes must call barriers in the same order (the id gets a running counter).
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client has no public accessor

    client = jax_distributed.global_state.client
    barrier_id = f"t5x_lite/{name}/{next(_barrier_counter)}"
    try:
        client.wait_at_barrier(barrier_id, int(timeout_s * 1000))
    except Exception as e:  # the client raises XlaRuntimeError (DEADLINE_EXCEEDED, ...)
        raise DistributedError(f"Barrier {name!r} failed on process {jax.process_index()} after "
                               f"waiting up to {timeout_s:g}s (a process may have died or hung): "
                               f"{str(e).splitlines()[0]}") from None
