"""tests/conftest.py: a worker that dies in native code is reported with its crashing thread."""
import os
import pathlib
import shutil
import subprocess
import sys

CRASHING_TEST = '''
import ctypes
import threading
import time


def test_passes():
    pass


def test_dies_in_native_code():
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # an idle other thread
    ctypes.string_at(0)  # SIGSEGV
'''


def test_a_worker_crash_ends_with_the_crashing_threads_frames(tmp_path):
    shutil.copy(pathlib.Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "crash_test.py").write_text(CRASHING_TEST)
    env = {k: v for k, v in os.environ.items()
           if k not in ("T5X_LITE_TEST_CRASH_DIR", "PYTEST_XDIST_WORKER")}
    env["TMPDIR"] = str(tmp_path)  # where the session directories are made (and removed)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--max-worker-restart=0", "-o", "addopts=",
         "-p", "no:cacheprovider", "crash_test.py"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    tail = out.stdout.splitlines()[-20:]
    head = next(i for i, line in enumerate(tail) if "the crashing thread, innermost first" in line)
    assert tail[head + 1] == "Fatal Python error: Segmentation fault"
    assert tail[head + 2].startswith("Current thread")
    assert "in string_at" in tail[head + 3]
    assert "crash_test.py\", line 13 in test_dies_in_native_code" in tail[head + 4]
    assert "FAILED crash_test.py::test_dies_in_native_code" in "\n".join(tail[head:])
    made = [p.name for p in tmp_path.iterdir() if p.name.startswith("t5x_lite_test_crashes_")]
    assert made == []  # removed at the end
