"""tests/conftest.py: a worker that dies in native code is reported with its crashing thread,
or with the test's thread when the crashing thread ran no Python; a test that runs out of time
ends its worker the same way; a test whose worker died in jax's compiler runs once more."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

CRASHING_TEST = '''
import ctypes
import os
import threading
import time


def test_passes():
    pass


def test_dies_in_native_code():
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # an idle other thread
    time.sleep(float(os.environ.get("CRASH_AFTER_S", "0")))
    ctypes.string_at(0)  # SIGSEGV


def test_dies_in_a_native_thread():
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    libc = ctypes.CDLL(None)  # a thread without Python that aborts, as an XLA pool thread might
    libc.pthread_create(ctypes.byref(ctypes.c_ulong()), None,
                        ctypes.cast(libc.abort, ctypes.c_void_p), None)
    time.sleep(30)


def test_hangs():
    time.sleep(float(os.environ.get("HANG_S", "60")))


def test_dies_in_jax_compiler_once():
    import importlib.util
    import pathlib
    time.sleep(float(os.environ.get("CRASH_AFTER_S", "0")))
    path = pathlib.Path(__file__).parent / "site" / "jax" / "_src" / "compiler.py"
    spec = importlib.util.spec_from_file_location("fake_jax_compiler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.backend_compile_and_load()
'''

FAKE_COMPILER = '''
import ctypes
import pathlib
import time

FIRST = pathlib.Path(__file__).parent / "first_run_done"


def backend_compile_and_load():
    if not FIRST.exists():  # the first run crashes (or hangs), the rerun passes
        FIRST.write_text("")
        if {hang}:
            time.sleep(60)
        ctypes.memset(0, 1, 1)  # SIGSEGV in native code called from here, as XLA's compile
'''


def _run_pytest(tmp_path, *tests, restarts=3, **env):
    """pytest -n 2 as README runs it, on tests of CRASHING_TEST (or other files) in tmp_path,
    with this conftest."""
    shutil.copy(pathlib.Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "crash_test.py").write_text(CRASHING_TEST)
    # not this run's own options (PYTEST_ADDOPTS="--durations=25" pushed the crash summary out
    # of the tail these tests read) nor colours
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS", "PYTEST_PLUGINS",
                           "FORCE_COLOR")}, **env}
    env.update(TMPDIR=str(tmp_path), PY_COLORS="0")  # TMPDIR: where the session's directories
    # are made (and removed)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist=loadfile",
         f"--max-worker-restart={restarts}", "-o", "addopts=", "-p", "no:cacheprovider",
         *(t if ".py" in t else f"crash_test.py::{t}" for t in tests)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("test, fatal, what, frames", [
    ("test_dies_in_native_code", "Segmentation fault", "the crashing thread",
     ["in string_at", 'crash_test.py", line 15 in test_dies_in_native_code']),
    ("test_dies_in_a_native_thread", "Aborted",
     "no Python ran on the crashing thread (native code); the test's thread",
     ['crash_test.py", line 23 in test_dies_in_a_native_thread']),
    ("test_hangs", "Timeout (0:00:05)!", "the test ran out of time; its thread",
     ['crash_test.py", line 27 in test_hangs'])])
def test_a_worker_crash_ends_with_the_crashing_threads_frames(tmp_path, test, fatal, what,
                                                              frames):
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "gw0-1.txt").write_text("Fatal Python error: an earlier session's")
    out = _run_pytest(tmp_path, test, T5X_LITE_TEST_CRASH_DIR=str(tmp_path / "stale"),
                      T5X_LITE_TEST_TIME_LIMIT_S="5")  # the stale directory is not used
    assert out.returncode == 1, out.stdout + out.stderr
    assert "an earlier session's" not in out.stdout
    tail = out.stdout.splitlines()[-20:]
    head = next(i for i, line in enumerate(tail) if f": {what}, innermost first -" in line)
    assert tail[head + 1] in (f"Fatal Python error: {fatal}", fatal)
    assert tail[head + 2].startswith(("Current thread", "Thread 0x"))
    for line, want in zip(tail[head + 3:], frames):
        assert want in line, tail[head:]
    assert f"FAILED crash_test.py::{test}" in "\n".join(tail[head:])
    made = [p.name for p in tmp_path.iterdir() if p.name.startswith("t5x_lite_test_crashes_")]
    assert made == []  # removed at the end


def _fake_compiler(tmp_path, hang=False, always=False):
    """A jax/_src/compiler.py whose backend_compile_and_load crashes (or hangs) the first time,
    or `always`."""
    text = FAKE_COMPILER.format(hang=hang)
    if always:
        text = text.replace("if not FIRST.exists()", "if True")
    compiler = tmp_path / "site" / "jax" / "_src" / "compiler.py"
    compiler.parent.mkdir(parents=True)
    compiler.write_text(text)


@pytest.mark.parametrize("hang", [False, True])
def test_a_crash_or_hang_in_jax_compiler_runs_the_test_once_more(tmp_path, hang):
    """jaxlib's CPU compiler segfaulted now and then in a long-lived worker (5 of 8 full runs);
    such a test runs again on the replacement worker and its first run counts as a rerun."""
    _fake_compiler(tmp_path, hang=hang)
    out = _run_pytest(tmp_path, "test_dies_in_jax_compiler_once", T5X_LITE_TEST_TIME_LIMIT_S="5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 1 rerun" in out.stdout.splitlines()[-1]
    died = ("Timeout (0:00:05)!" if hang else "Fatal Python error: Segmentation fault")
    assert died in out.stdout
    assert "RERUN crash_test.py::test_dies_in_jax_compiler_once: worker gw" in out.stdout


def test_a_second_crash_in_jax_compiler_fails(tmp_path):
    _fake_compiler(tmp_path, always=True)
    out = _run_pytest(tmp_path, "test_dies_in_jax_compiler_once")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 failed, 1 rerun" in out.stdout.splitlines()[-1], out.stdout[-3000:]


def test_a_crashed_test_that_xdist_does_not_run_again_fails(tmp_path):
    """No worker left to rerun it (--max-worker-restart=0, or the last restart used up): its
    first run must not pass unseen as a rerun."""
    _fake_compiler(tmp_path)
    out = _run_pytest(tmp_path, "test_dies_in_jax_compiler_once", restarts=0)
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"RERUN crash_test.py::test_dies_in_jax_compiler_once: worker gw\d died in "
                     r"jax's compiler; it did not run again: FAILED", out.stdout), out.stdout


def test_a_run_where_no_test_ends_for_long_stops_with_what_still_runs(tmp_path):
    """Past a worker's time limit, a controller that no test reaches (xdist waiting on a work
    unit that no worker runs; a CI run once sat 60 minutes so) ends the run, with the
    failures so far (pytest's summary never comes)."""
    (tmp_path / "a_test.py").write_text("def test_fails():\n    assert 1 == 2, 'one is not two'\n")
    out = _run_pytest(tmp_path, "a_test.py", "test_hangs", T5X_LITE_TEST_TIME_LIMIT_S="100",
                      T5X_LITE_TEST_SILENCE_LIMIT_S="4", HANG_S="15")
    assert out.returncode == 1, out.stdout + out.stderr
    tail = out.stdout[out.stdout.index(" a_test.py::test_fails "):]
    assert "AssertionError: one is not two" in tail
    assert ("FAILED a_test.py::test_fails\nno test ended for 4 s; still running: "
            "crash_test.py::test_hangs; the run is stopped") in tail


@pytest.mark.parametrize("in_compiler", [True, False])
def test_a_late_crash_runs_the_files_tests_left_and_ends(tmp_path, in_compiler):
    """The worker dies last, after the other has run out of work and stopped, and after it had
    finished a file: xdist 3.8 gave the replacement that finished file (no test to run), or a
    file with one test left (a worker holds its last test until told to stop), and the run
    waited forever (a CI run sat 60+ minutes so)."""
    _fake_compiler(tmp_path)
    (tmp_path / "b_test.py").write_text("def test_1():\n    pass\n\n\ndef test_2():\n    pass\n"
                                        "\n\ndef test_3():\n    pass\n")
    for i in range(3):
        (tmp_path / f"a{i}_test.py").write_text("def test_a():\n    pass\n")
    crash = "test_dies_in_jax_compiler_once" if in_compiler else "test_dies_in_native_code"
    out = _run_pytest(tmp_path, "b_test.py", "test_passes", crash, "a0_test.py", "a1_test.py",
                      "a2_test.py", CRASH_AFTER_S="6", T5X_LITE_TEST_SILENCE_LIMIT_S="30")
    assert "no test ended" not in out.stdout, out.stdout + out.stderr
    last = out.stdout.splitlines()[-1]
    assert ("8 passed, 1 rerun" if in_compiler else "1 failed, 7 passed") in last, out.stdout
