"""A heartbeat lease on a training workdir, for runs that share no host.

`files.host_lock` stops a second run on the same host. A workdir on a bucket or a shared file
system can also be reached from another host -- a job relaunched on a new VM while the old one
still runs -- where no lock is shared, and the two runs would overwrite each other's
checkpoints. So process 0 of a training run also writes WORKDIR/run.lease.json:

    {"host", "pid", "command", "token", "started", "heartbeat"}

and rewrites its heartbeat every `HEARTBEAT_S` seconds from a daemon thread, and removes it when
the run ends. A run that finds a lease

- of another host, with a heartbeat younger than `STALE_S`: refuses (LeaseHeld);
- of another host, older: takes it over with a warning (that host died or was preempted);
- of this host: takes it over if that process is gone (a kill -9 leaves its lease behind; the
  host lock already said no run of this user holds the workdir), else refuses (another user's).

A run on a fresh workdir writes its lease as soon as it makes the workdir, and a first write
never replaces another run's live lease (`Lease.lost` then names that run). Two hosts starting
in the same second can both take the lease; the one whose token is not in the file at its next
check (`Lease.lost`, before every checkpoint save) stops without saving.
A lease file removed by hand is written again at the next heartbeat; file-system errors
(writing, reading) are logged and never stop a run. Heartbeats compare wall clocks of different
hosts: a skew far below `STALE_S` is assumed.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Iterator

from absl import logging
from etils import epath

from t5x_lite import files

LEASE_FILE = "run.lease.json"
HEARTBEAT_S = 20.0
STALE_S = 90.0


class LeaseHeld(Exception):
    """The workdir is leased by another live run; `holder` describes it (one line)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def _read(path: epath.Path) -> dict | None:
    try:
        lease = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # no lease (or a --workdir that is a file)
        return None
    except (OSError, ValueError) as e:  # a torn or foreign file: nobody's lease
        logging.warning("ignoring unreadable lease %s (%s)", path, e)
        return None
    return lease if isinstance(lease, dict) else None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, TypeError):
        return True  # another user's process (or a pid we cannot read): assume it runs
    return True


def _age(lease: dict, now: float) -> float:
    """Seconds since the lease's heartbeat (infinite for a lease without a readable one)."""
    try:
        return now - float(lease.get("heartbeat"))
    except (TypeError, ValueError):
        return float("inf")


def _holds(lease: dict, now: float) -> bool:
    """Whether the run that wrote `lease` (not this process) still holds it."""
    if lease.get("host") == socket.gethostname():
        return lease.get("pid") != os.getpid() and _alive(lease.get("pid"))
    return _age(lease, now) < STALE_S


def live(workdir) -> bool:
    """Whether a training run holds WORKDIR's lease now (`evaluate --follow` waits for it)."""
    lease = _read(epath.Path(workdir) / LEASE_FILE)
    return lease is not None and _holds(lease, time.time())


def _live_holder(lease: dict | None, path: epath.Path, now: float) -> str | None:
    """Who holds `lease` (read from `path`), if another run that still holds it, else None."""
    if lease is None or not _holds(lease, now):
        return None
    return _describe(lease, _age(lease, now), path)


def _describe(lease: dict, age: float, path: epath.Path) -> str:
    return (f"host {lease.get('host')}, pid {lease.get('pid')}: "
            f"{str(lease.get('command', ''))[:200]}; its heartbeat is {age:.0f} s old. If that "
            f"run is gone, delete {path}" + (
                f" or start again in {STALE_S - age:.0f} s" if age < STALE_S and lease.get(
                    "host") != socket.gethostname() else ""))


class Lease:
    """A held lease. Written once the workdir is a directory (a run that fails on its config
    before it makes the workdir leaves nothing behind), renewed by `beat`; `lost()` says who
    took the workdir since, or None."""

    def __init__(self, path: epath.Path, record: dict):
        self.path, self.record = path, record
        self._written = False
        self._refused = None  # who held it when this run first came to write it
        self._lock = threading.Lock()

    def beat(self) -> None:
        """Writes the lease with a fresh heartbeat, unless another run holds it: one that took
        it over since, or one that wrote it first (both started on a fresh workdir)."""
        with self._lock:
            if self._refused is not None:
                return
            if self._written and self._taken_by() is not None:
                return  # never overwrite the run that took it over
            if not self.path.parent.is_dir():
                return
            if not self._written:
                self._refused = _live_holder(_read(self.path), self.path, time.time())
                if self._refused is not None:
                    return
            files.write_atomic(self.path, json.dumps({**self.record, "heartbeat": time.time()}))
            self._written = True

    def lost(self) -> str | None:
        if not self._written:
            self.try_beat()
            if not self._written:
                return self._refused
        return self._taken_by()

    def try_beat(self) -> None:
        """`beat`, with a file-system error logged instead of raised: a run goes on without its
        lease (as it would on a file system that cannot hold one) rather than fail."""
        try:
            self.beat()
        except OSError as e:
            logging.warning("could not write the lease %s (%s): a run on another host using "
                            "this workdir would not be detected", self.path, e)

    def _taken_by(self) -> str | None:
        """Who holds the lease file now if not this run. A removed file is not taken (the
        next beat writes it again); an unreadable one is assumed to be still ours."""
        lease = _read(self.path)
        if lease is None or lease.get("token") == self.record["token"]:
            return None
        return _describe(lease, _age(lease, time.time()), self.path)

    def release(self) -> None:
        with self._lock:
            if self._written and self._taken_by() is None:
                self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(workdir) -> Iterator[Lease]:
    """Takes WORKDIR's lease for the duration (see module docstring); LeaseHeld if it is live."""
    path = epath.Path(workdir) / LEASE_FILE
    other, now, host = _read(path), time.time(), socket.gethostname()
    held = _live_holder(other, path, now)
    if held is not None:
        raise LeaseHeld(held)
    if other is not None and other.get("host") != host:
        logging.warning("taking over the lease of %s: its run on host %s (pid %s) was last "
                        "seen %.0f s ago", workdir, other.get("host"), other.get("pid"),
                        _age(other, now))
    lease = Lease(path, {"host": host, "pid": os.getpid(), "command": " ".join(sys.argv)[:300],
                         "token": uuid.uuid4().hex, "started": now})
    lease.try_beat()
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            lease.try_beat()  # a blip of the file system: the next beat tries again

    thread = threading.Thread(target=beat, name="t5x_lite-lease", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError):
            lease.release()
