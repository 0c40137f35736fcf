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

Time limit: a test (setup, call and teardown) that runs longer than T5X_LITE_TEST_TIME_LIMIT_S
seconds (default 600; the slowest test takes ~70 s on 2 cores) ends its worker with
faulthandler's dump of all its threads, reported as above, and xdist replaces the worker. (A CI
run once sat past its 90 minutes with no word of where.)

Scheduler: xdist 3.8's loadfile scheduler waited forever after a worker crash (a CI run hung
60+ minutes); _LoadFileScheduling gives the dead worker's unfinished files to the others. As a
backstop, a run in which no test ends for T5X_LITE_TEST_SILENCE_LIMIT_S (default the time limit
+ 300 s) ends, exit status 1, after printing the failures so far, the crash reports and the tests
still running.

Reruns: a test whose worker died in jax's compiler (the innermost frame of the crashing thread,
or of the test's thread at a time-out, in jax/_src/compiler.py or compilation_cache.py) runs once
more on the replacement worker, and its first run counts as "rerun", not failed. Any other crash,
or a second one, fails the test.
"""
import faulthandler
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

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
_TIME_LIMIT_S = float(os.environ.get("T5X_LITE_TEST_TIME_LIMIT_S", "600"))
_SILENCE_LIMIT_S = float(os.environ.get("T5X_LITE_TEST_SILENCE_LIMIT_S", _TIME_LIMIT_S + 300))
_COMPILER_FILES = ("jax/_src/compiler.py", "jax/_src/compilation_cache.py")
_rerun = {}  # test -> worker, of crashes in jax's compiler (each test once)
_ran_again = set()  # those tests whose next run reported


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler plugin enabled it on stderr
def pytest_configure(config):
    if hasattr(config, "workerinput"):
        name = f"{config.workerinput['workerid']}-{os.getpid()}.txt"
        config._crash_report = open(pathlib.Path(os.environ["T5X_LITE_TEST_CRASH_DIR"]) / name,
                                    "w")
        faulthandler.enable(config._crash_report, all_threads=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    report = getattr(item.config, "_crash_report", None)
    if report is not None:  # an xdist worker
        faulthandler.dump_traceback_later(_TIME_LIMIT_S, exit=True, file=report)
    try:
        yield
    finally:
        if report is not None:
            faulthandler.cancel_dump_traceback_later()


def _dumps(worker: str = "*") -> list[tuple[str, str]]:
    """(name, dump) of the workers' crash files that hold a dump (a worker writes one when it
    dies)."""
    paths = sorted(pathlib.Path(os.environ["T5X_LITE_TEST_CRASH_DIR"]).glob(f"{worker}-*.txt"))
    dumps = [(p.stem, p.read_text(errors="replace").strip()) for p in paths]
    return [(name, dump) for name, dump in dumps if dump]


def _compiler_crash(worker: str) -> bool:
    """Whether the dump of the dead `worker` shows it died (or hung) in jax's compiler."""
    dumps = _dumps(worker)
    if not dumps:  # killed without a dump (SIGKILL: out of memory)
        return False
    _, lines = crash_summary(dumps[-1][1])
    innermost = next((line for line in lines if line.startswith("  File")), "")
    return any(f'{name}"' in innermost for name in _COMPILER_FILES)


try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # no xdist: no workers to replace
    LoadFileScheduling = None
else:
    class _LoadFileScheduling(LoadFileScheduling):
        """xdist's --dist=loadfile, with a dead worker's work given to the others, or to its
        replacement, so that it runs (pytest-xdist 3.8 could wait forever)."""

        def remove_node(self, node):
            """A worker is gone. xdist (3.8) queued again every file it had ever been given,
            finished ones too: a worker then handed a finished file got no test and never asked
            for more, and the run waited forever (it did, after a crash, 60+ min). Queue the
            files with tests still to run, and the test it died in only if it is run again
            (_compiler_crash, once per test); returns that test (None: none was running)."""
            work = self.assigned_work.pop(node)
            todo = [(f, t) for f, tests in work.items() for t, done in tests.items() if not done]
            if not todo:
                return None
            unit, crashed = todo[0]
            if crashed not in _rerun and _compiler_crash(node.gateway.id):
                _rerun[crashed] = node.gateway.id
            else:
                work[unit][crashed] = True  # failed: not run again
            self.workqueue.update((f, tests) for f, tests in work.items()
                                  if not all(tests.values()))
            for other in self.assigned_work:
                self._reschedule(other)
            return crashed

        def _reschedule(self, node):
            """xdist gives a worker one more file when it has <= 2 tests left to run. A worker
            holds its last test until it is given another or told to stop (it needs the next
            one to tear fixtures down right), so a replacement worker given one file with one
            test left waited forever: give files until 2 tests are pending, and stop the
            worker once the queue is empty."""
            if node.shutting_down:
                return
            if self.workqueue and self._pending_of(self.assigned_work[node]) <= 2:
                self._assign_work_unit(node)
            while self.workqueue and self._pending_of(self.assigned_work[node]) < 2:
                self._assign_work_unit(node)
            if not self.workqueue:
                node.shutdown()


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # before xdist's own
def pytest_xdist_make_scheduler(config, log):
    if LoadFileScheduling is not None and config.getvalue("dist") == "loadfile":
        return _LoadFileScheduling(config, log)
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """xdist (controller): a worker died running `crashitem`; its first run counts as "rerun"
    if the scheduler queued it again."""
    if _rerun.get(crashitem) == report.node.gateway.id:
        report.outcome = "rerun"


_running = {}  # controller: the tests that workers run now (a dict as an ordered set)
_last_end = [time.monotonic()]


_failed = []  # controller: (test, the end of its failure's text), as they come


def _watch_silence():
    """Controller: ends the run, exit status 1, when no test has ended for _SILENCE_LIMIT_S
    (longer than a worker's time limit: xdist waiting for work that no worker will run), after
    printing what pytest's summary would have: the failures so far, the crash reports, the
    tests still running and the controller's threads. (Interrupting pytest instead ended in an
    error of xdist's teardown before its summary.)"""
    while True:
        time.sleep(min(30.0, _SILENCE_LIMIT_S / 5))
        if time.monotonic() - _last_end[0] > _SILENCE_LIMIT_S:
            def write(line):
                print(line, file=sys.__stdout__, flush=True)

            for test, text in _failed:
                write(_sep("_", test))
                write(text)
            _report_crashes(write)
            for test, _ in _failed:
                write(f"FAILED {test}")
            write(f"no test ended for {_SILENCE_LIMIT_S:.0f} s; still running: "
                  f"{', '.join(_running) or 'none'}; the run is stopped")
            faulthandler.dump_traceback(sys.__stdout__)
            os._exit(1)


def _sep(char: str, title: str) -> str:
    side = char * max(3, (78 - len(title)) // 2)
    return f"{side} {title} {side}"


def _report_crashes(write):
    """Each dead worker's dump and, last, the fatal line and innermost frames of each; `write`
    writes a line."""
    summaries = []
    for name, dump in _dumps():
        write(_sep("=", f"native crash of xdist worker {name}"))
        write(dump)
        summaries.append((name, *crash_summary(dump)))
    for worker, what, lines in summaries:
        write(_sep("-", f"worker {worker}: {what}"))
        for line in lines:
            write(line)
    for test, worker in _rerun.items():
        again = "" if test in _ran_again else "; it did not run again: FAILED"
        write(f"RERUN {test}: worker {worker} died in jax's compiler{again}")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    if not any(t.name == "t5x_lite_silence_watch" for t in threading.enumerate()):
        threading.Thread(target=_watch_silence, name="t5x_lite_silence_watch",
                         daemon=True).start()


def pytest_runtest_logstart(nodeid, location):
    _running[nodeid] = None


def pytest_runtest_logreport(report):
    if report.failed:
        _failed.append((report.nodeid, "\n".join(report.longreprtext.splitlines()[-30:])))
    if report.nodeid in _rerun and report.outcome != "rerun":
        _ran_again.add(report.nodeid)
    if report.when in ("teardown", "???"):  # "???": xdist's report of a crashed worker's test
        _running.pop(report.nodeid, None)
        _last_end[0] = time.monotonic()


def pytest_sessionfinish(session):
    if set(_rerun) - _ran_again:  # queued again, but no worker was left to run it
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_report_teststatus(report, config):
    if report.outcome == "rerun":
        return "rerun", "R", "RERUN"


def crash_summary(dump: str) -> tuple[str, list[str]]:
    """(what is shown, lines): the fatal line of a faulthandler dump (or its time-out line) and
    the innermost frames of the crashing thread, or of the test's thread when the signal came on
    a thread that ran no Python (XLA's or another native thread pool's: the dump has no "Current
    thread") or the test ran out of time."""
    lines = dump.splitlines()
    fatal = [line for line in lines if line.startswith(("Fatal Python error", "Timeout ("))][:1]
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
        what = ("the test ran out of time; its thread" if fatal and fatal[0].startswith("Timeout")
                else "no Python ran on the crashing thread (native code); the test's thread")
        header, frames = next((t for t in threads if any("_pytest/runner.py" in f for f in t[1])),
                              threads[0] if threads else ("(no Python threads)", []))
    return f"{what}, innermost first", fatal + [header] + frames[:_FRAMES_SHOWN]


def pytest_terminal_summary(terminalreporter, config):
    if not hasattr(config, "workerinput"):
        _report_crashes(terminalreporter.write_line)


def pytest_unconfigure(config):
    if hasattr(config, "_crash_report"):
        faulthandler.disable()
        config._crash_report.close()
    if _OWN_CRASHES:  # the process that made it (not a worker)
        shutil.rmtree(os.environ["T5X_LITE_TEST_CRASH_DIR"], ignore_errors=True)
