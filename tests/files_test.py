"""t5x_lite.files: atomic writes."""
import os

import pytest

from t5x_lite import files


def test_write_atomic_syncs_the_new_file_before_it_takes_the_name(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text("old")
    synced = []
    real_fsync = os.fsync

    def fsync(fd):  # what is synced, and what the name still holds at that moment
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), path.read_text()))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    files.write_atomic(path, "new")
    assert path.read_text() == "new" and not (tmp_path / "config.json.tmp").exists()
    assert synced == [(str(tmp_path / "config.json.tmp"), "old")]


def test_a_file_system_without_fsync_still_gets_the_write(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(22, "Invalid argument")  # what some FUSE mounts answer
    monkeypatch.setattr(os, "fsync", fsync)
    files.write_atomic(tmp_path / "config.json", "new")
    assert (tmp_path / "config.json").read_text() == "new"


def test_write_atomic_leaves_the_old_file_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old")

    def fsync(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        files.write_atomic(path, b"new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.jsonl"]
