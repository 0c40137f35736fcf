"""Shared pytest setup, done before jax is imported anywhere: 8 fake CPU devices, and crash
reports of xdist workers.

No persistent compilation cache: the suite had one per session (shared by the xdist workers and
the CLI subprocesses), and 2 of 4 full runs lost a worker in
`tests/evaluate_finetune_test.py::test_init_from_recipe_fine_tunes_from_the_trained_params`;
the crash report of the second (below) shows a segfault in jax 0.10.2's CPU
`executable.serialize()`, called to write the train step's cache entry
(`compilation_cache.put_executable_and_time`). A JAX_COMPILATION_CACHE_DIR set by the user is
still honoured. Without the cache a later run still lost a worker, segfaulting in XLA's compile
itself (`backend_compile_and_load`, tests/bert_test.py): jaxlib's CPU compiler crashes now and
then in a long-lived worker, wherever it is; the cache only held one of the places.

Crash reports: a worker that dies in native code (a fatal signal) leaves Python's faulthandler
dump of all its threads in a file of a directory made for the session; the controller prints
each dump at the end of the run and, last, where the tail of a CI log shows it, the fatal line
and the innermost frames of the crashing thread, or of the test's thread when the signal came
on a thread that ran no Python (an XLA or BLAS pool thread). (On the worker's stderr the dump
came out amid the other worker's output and ended in the main thread's outermost frames.)
"""
import faulthandler
import os
import pathlib
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# A new crash directory per session, never one an earlier session left in the environment;
# xdist workers inherit their controller's.
_OWN_CRASHES = "PYTEST_XDIST_WORKER" not in os.environ
if _OWN_CRASHES:
    os.environ["T5X_LITE_TEST_CRASH_DIR"] = tempfile.mkdtemp(prefix="t5x_lite_test_crashes_")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


_FRAMES_SHOWN = 12  # innermost frames of the crashing thread repeated at the very end


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler plugin enabled it on stderr
def pytest_configure(config):
    if hasattr(config, "workerinput"):
        name = f"{config.workerinput['workerid']}-{os.getpid()}.txt"
        config._crash_report = open(pathlib.Path(os.environ["T5X_LITE_TEST_CRASH_DIR"]) / name,
                                    "w")
        faulthandler.enable(config._crash_report, all_threads=True)


def crash_summary(dump: str) -> tuple[str, list[str]]:
    """(what is shown, lines): the fatal line of a faulthandler dump and the innermost frames
    of the crashing thread, or, when the signal came on a thread that ran no Python (XLA's or
    another native thread pool's: the dump has no "Current thread"), of the test's thread."""
    lines = dump.splitlines()
    fatal = [line for line in lines if line.startswith("Fatal Python error")][:1]
    threads = []  # (header, frames), in the dump's order
    for line in lines:
        if line.startswith(("Current thread", "Thread 0x")):
            threads.append((line, []))
        elif line.startswith("  File") and threads:
            threads[-1][1].append(line)
    current = [t for t in threads if t[0].startswith("Current thread")]
    if current:
        what, (header, frames) = "the crashing thread", current[0]
    else:
        what = "no Python ran on the crashing thread (native code); the test's thread"
        header, frames = next((t for t in threads if any("_pytest/runner.py" in f for f in t[1])),
                              threads[0] if threads else ("(no Python threads)", []))
    return f"{what}, innermost first", fatal + [header] + frames[:_FRAMES_SHOWN]


def pytest_terminal_summary(terminalreporter, config):
    if hasattr(config, "workerinput"):
        return
    summaries = []
    for path in sorted(pathlib.Path(os.environ["T5X_LITE_TEST_CRASH_DIR"]).glob("*.txt")):
        dump = path.read_text(errors="replace").strip()
        if dump:
            terminalreporter.write_sep("=", f"native crash of xdist worker {path.stem}")
            terminalreporter.write_line(dump)
            summaries.append((path.stem, *crash_summary(dump)))
    for worker, what, lines in summaries:
        terminalreporter.write_sep("-", f"worker {worker}: {what}")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_unconfigure(config):
    if hasattr(config, "_crash_report"):
        faulthandler.disable()
        config._crash_report.close()
    if _OWN_CRASHES:  # the process that made it (not a worker)
        shutil.rmtree(os.environ["T5X_LITE_TEST_CRASH_DIR"], ignore_errors=True)
