"""Re-exec with transparent huge pages for host buffers (t5x_lite.host_memory)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from t5x_lite import host_memory


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert host_memory.thp_mode(str(f)) == "always"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("env, mode, glibc_ok", [
    ({}, "never", True),  # kernel has THP off: nothing to gain
    ({}, "always", True),  # already on for every mapping
    ({}, None, True),  # no THP at all
    ({}, "madvise", False),  # glibc too old (or not glibc) for the tunable
    ({"T5X_LITE_HUGE_PAGES": "0"}, "madvise", True),  # opted out
    ({"T5X_LITE_HUGE_PAGES": "false"}, "madvise", True),  # ... in any of the usual spellings
    ({"T5X_LITE_HUGE_PAGES": "Off"}, "madvise", True),
    ({"T5X_LITE_HUGE_PAGES": "no"}, "madvise", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", True),  # the user chose
])
def test_no_reexec_when_nothing_to_gain(env, mode, glibc_ok):
    assert host_memory.environment_with_huge_pages(env, mode, glibc_ok) is None


def test_reexec_environment_keeps_other_tunables_and_variables():
    env = host_memory.environment_with_huge_pages({"A": "1"}, "madvise", True)
    assert env == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = host_memory.environment_with_huge_pages(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", True)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # The re-executed process sees the tunable and does not loop.
    assert host_memory.environment_with_huge_pages(env, "madvise", True) is None


_PROBE = textwrap.dedent("""
    import json, os, sys
    from t5x_lite import host_memory
    first_pid = os.environ.get("PROBE_PID")
    os.environ["PROBE_PID"] = str(os.getpid())
    host_memory.reexec_with_huge_pages()
    import numpy as np
    x = np.ones(64 << 20, np.uint8)  # 64 MiB, mmap'd by glibc: huge pages when madvised
    with open("/proc/self/smaps_rollup") as f:
        huge_kb = next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages:"))
    print(json.dumps({"pid": os.getpid(), "first_pid": first_pid, "argv": sys.argv[1:],
                      "tunables": os.environ.get("GLIBC_TUNABLES"), "huge_kb": huge_kb,
                      "status": host_memory.status()}))
""")


@pytest.mark.skipif(host_memory.thp_mode() != "madvise" or
                    not host_memory._glibc_has_hugetlb_tunable(),
                    reason="needs THP mode madvise and glibc >= 2.35")
def test_reexec_keeps_pid_and_argv_and_gets_huge_pages(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "T5X_LITE_HUGE_PAGES", "PROBE_PID")}
    out = subprocess.run([sys.executable, str(script), "--a=1", "b c"], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["first_pid"] == str(r["pid"])  # exec'd in place: same process
    assert r["argv"] == ["--a=1", "b c"]
    assert r["tunables"] == "glibc.malloc.hugetlb=1"
    assert r["huge_kb"] >= 2048, r
    assert r["status"].startswith("host huge pages: on")

    out = subprocess.run([sys.executable, str(script)], env={**env, "T5X_LITE_HUGE_PAGES": "0"},
                         check=True, capture_output=True, text=True, timeout=120).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["first_pid"] is None and r["tunables"] is None
    assert r["status"].startswith("host huge pages: off")
