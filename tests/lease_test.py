"""The workdir lease: a training run on another host (a shared or remote workdir) is refused
while its heartbeat is fresh, taken over once stale; a run whose lease was taken stops before
its next save."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from t5x_lite import checkpoints, lease
from t5x_lite.training import TrainingError, testing, train


def _write(workdir, **fields):
    record = {"host": "other-vm", "pid": 4242, "command": "python -m t5x_lite.train --x",
              "token": "theirs", "started": time.time(), "heartbeat": time.time(), **fields}
    (workdir / lease.LEASE_FILE).write_text(json.dumps(record))
    return record


def _read(workdir):
    return json.loads((workdir / lease.LEASE_FILE).read_text())


def test_held_renewed_and_released(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    with lease.hold(tmp_path) as held:
        first = _read(tmp_path)
        assert (first["host"], first["pid"]) == (socket.gethostname(), os.getpid())
        deadline = time.time() + 10
        while _read(tmp_path)["heartbeat"] <= first["heartbeat"]:
            assert time.time() < deadline, "the heartbeat was never renewed"
            time.sleep(0.02)
        assert _read(tmp_path)["token"] == first["token"] and held.lost() is None
    assert not (tmp_path / lease.LEASE_FILE).exists()


def test_another_hosts_live_lease_refuses_a_stale_one_is_taken_over(tmp_path, caplog):
    _write(tmp_path, heartbeat=time.time() - 5)
    with pytest.raises(lease.LeaseHeld, match=(
            r"^host other-vm, pid 4242: python -m t5x_lite.train --x; its heartbeat is 5 s old. "
            r"If that run is gone, delete \S+/run.lease.json or start again in 85 s$")):
        with lease.hold(tmp_path):
            pass
    assert _read(tmp_path)["token"] == "theirs"  # untouched
    _write(tmp_path, heartbeat=time.time() - lease.STALE_S - 1)
    with caplog.at_level("WARNING"), lease.hold(tmp_path):
        assert _read(tmp_path)["host"] == socket.gethostname()
    assert "its run on host other-vm (pid 4242) was last seen 91 s ago" in caplog.text


def test_this_hosts_lease_is_taken_over_only_when_its_process_is_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write(tmp_path, host=socket.gethostname(), pid=dead.pid)  # a kill -9 leaves it behind
    with lease.hold(tmp_path):
        assert _read(tmp_path)["pid"] == os.getpid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # e.g. another user's run on this host: the per-user host lock does not see it
        _write(tmp_path, host=socket.gethostname(), pid=alive.pid)
        with pytest.raises(lease.LeaseHeld, match=rf"pid {alive.pid}: "):
            with lease.hold(tmp_path):
                pass
    finally:
        alive.kill()
        alive.wait()


def test_a_taken_lease_is_lost_and_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.02)
    with lease.hold(tmp_path) as held:
        _write(tmp_path)
        time.sleep(0.2)  # several beats
        assert _read(tmp_path)["token"] == "theirs"
        assert held.lost().startswith("host other-vm, pid 4242: ")
    assert _read(tmp_path)["token"] == "theirs"  # not removed at the end either


def test_removed_garbled_and_unwritable_leases_never_stop_a_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.02)
    with lease.hold(tmp_path) as held:
        (tmp_path / lease.LEASE_FILE).unlink()  # removed by hand: written again
        deadline = time.time() + 10
        while not (tmp_path / lease.LEASE_FILE).exists():
            assert time.time() < deadline, "the lease was not written again"
            time.sleep(0.02)
        assert held.lost() is None
    _write(tmp_path, heartbeat="soon")  # no readable heartbeat: stale
    assert not lease.live(tmp_path)
    with lease.hold(tmp_path):
        pass

    def fail(*_):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(lease.files, "write_atomic", fail)
    workdir = tmp_path / "ro"
    workdir.mkdir()
    with caplog.at_level("WARNING"), lease.hold(workdir) as held:
        assert held.lost() is None
    assert "could not write the lease" in caplog.text and "read-only file system" in caplog.text


def test_no_file_until_the_workdir_exists(tmp_path, caplog):
    workdir = tmp_path / "new"
    with lease.hold(workdir) as held:
        assert held.lost() is None and not workdir.exists()  # a failing run leaves nothing
        workdir.mkdir()
        assert held.lost() is None and _read(workdir)["pid"] == os.getpid()
    assert list(workdir.iterdir()) == []
    afile = tmp_path / "afile"  # a --workdir that is a file: the trainer says so, not the lease
    afile.write_text("x")
    with caplog.at_level("WARNING"), lease.hold(afile) as held:
        assert held.lost() is None
    assert caplog.text == "" and afile.read_text() == "x"


def test_a_first_write_never_replaces_another_runs_live_lease(tmp_path):
    """Two runs on one fresh workdir: the one that makes it and writes its lease first holds
    it; the other, whose lease had no directory to go into yet, finds that and never writes."""
    workdir = tmp_path / "new"
    with lease.hold(workdir) as held:
        workdir.mkdir()
        _write(workdir)  # the other host's run got there first
        assert held.lost().startswith("host other-vm, pid 4242: ")
        held.try_beat()
        assert _read(workdir)["token"] == "theirs"
    assert _read(workdir)["token"] == "theirs"  # not removed at the end either


def test_training_on_a_fresh_workdir_another_host_leased_first_writes_nothing(
        tmp_path, monkeypatch):
    cfg = testing.tiny_config("gpt")
    workdir = tmp_path / "wd"
    make_manager = checkpoints.make_train_manager

    def other_host_starts_meanwhile(*args, **kwargs):  # this run has just made the workdir
        workdir.mkdir(exist_ok=True)
        _write(workdir)
        return make_manager(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "make_train_manager", other_host_starts_meanwhile)
    with pytest.raises(TrainingError, match=r"^--workdir \S+ is in use by another training run "
                                            r"\(host other-vm, pid 4242: .*\); wait for it"):
        train(cfg, workdir)
    assert not (workdir / "config.json").exists() and _read(workdir)["token"] == "theirs"


def test_training_is_refused_by_a_live_lease_and_stops_when_its_lease_is_taken(
        tmp_path, monkeypatch):
    cfg = testing.tiny_config("gpt")
    cfg.train.num_steps, cfg.checkpoint.save_every = 4, 2
    cfg.checkpoint.async_save = False
    workdir = tmp_path / "wd"
    workdir.mkdir()
    _write(workdir)
    with pytest.raises(TrainingError, match=r"^--workdir \S+ is in use by another training run "
                                            r"\(host other-vm, pid 4242: .*\); wait for it"):
        train(cfg, workdir)
    assert sorted(p.name for p in workdir.iterdir()) == [lease.LEASE_FILE]  # nothing written
    (workdir / lease.LEASE_FILE).unlink()

    # Another host takes the workdir over after the first checkpoint: no second one is saved.
    save = checkpoints.save_train_state

    def save_then_lose(mngr, step, *args, **kwargs):
        save(mngr, step, *args, **kwargs)
        _write(workdir)

    monkeypatch.setattr(checkpoints, "save_train_state", save_then_lose)
    with pytest.raises(TrainingError, match=r"^--workdir \S+ was taken over by another "
                                            r"training run \(host other-vm, pid 4242: .*\); "
                                            r"stopped at step 4 without saving$"):
        train(cfg, workdir)
    assert checkpoints.all_steps(workdir) == [2]
    assert _read(workdir)["token"] == "theirs"
