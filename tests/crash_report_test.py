"""tests/conftest.py: a worker that dies in native code is reported with its crashing thread,
or with the test's thread when the crashing thread ran no Python."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

CRASHING_TEST = '''
import ctypes
import threading
import time


def test_passes():
    pass


def test_dies_in_native_code():
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # an idle other thread
    ctypes.string_at(0)  # SIGSEGV


def test_dies_in_a_native_thread():
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    libc = ctypes.CDLL(None)  # a thread without Python that aborts, as an XLA pool thread might
    libc.pthread_create(ctypes.byref(ctypes.c_ulong()), None,
                        ctypes.cast(libc.abort, ctypes.c_void_p), None)
    time.sleep(30)
'''


@pytest.mark.parametrize("test, fatal, what, frames", [
    ("test_dies_in_native_code", "Segmentation fault", "the crashing thread",
     ["in string_at", 'crash_test.py", line 13 in test_dies_in_native_code']),
    ("test_dies_in_a_native_thread", "Aborted",
     "no Python ran on the crashing thread (native code); the test's thread",
     ['crash_test.py", line 21 in test_dies_in_a_native_thread'])])
def test_a_worker_crash_ends_with_the_crashing_threads_frames(tmp_path, test, fatal, what,
                                                              frames):
    shutil.copy(pathlib.Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "crash_test.py").write_text(CRASHING_TEST)
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "gw0-1.txt").write_text("Fatal Python error: an earlier session's")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    env["T5X_LITE_TEST_CRASH_DIR"] = str(tmp_path / "stale")  # left by an earlier run: unused
    env["TMPDIR"] = str(tmp_path)  # where the session directories are made (and removed)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--max-worker-restart=0", "-o", "addopts=",
         "-p", "no:cacheprovider", f"crash_test.py::{test}"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "an earlier session's" not in out.stdout
    tail = out.stdout.splitlines()[-20:]
    head = next(i for i, line in enumerate(tail) if f": {what}, innermost first -" in line)
    assert tail[head + 1] == f"Fatal Python error: {fatal}"
    assert tail[head + 2].startswith(("Current thread", "Thread 0x"))
    for line, want in zip(tail[head + 3:], frames):
        assert want in line, tail[head:]
    assert f"FAILED crash_test.py::{test}" in "\n".join(tail[head:])
    made = [p.name for p in tmp_path.iterdir() if p.name.startswith("t5x_lite_test_crashes_")]
    assert made == []  # removed at the end
