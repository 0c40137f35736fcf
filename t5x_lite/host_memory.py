"""Transparent huge pages for host buffers, so XLA:CPU does not page-fault its way through them.

XLA:CPU allocates each large intermediate fresh (glibc serves it with mmap), and with the kernel's
usual 4 KiB pages the first write to every page is a fault: a jitted `x * 1.5` over a 526 MB
array (a GPT batch's [B*T, V] logits) takes ~250 ms fresh against ~30 ms in place, on the 2-core
development CPU. glibc >= 2.35 asks the kernel for transparent huge pages on its mmap'd chunks
when started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (70 ms for the same op), but reads the
tunable only at process start. So the entry points (`python -m t5x_lite.train`, `.infer`,
`.evaluate`, the benchmarks) re-execute themselves once with it set, before anything heavy is
imported. Nothing else changes: same PID, argv, environment otherwise, open files.

Skipped when the kernel's THP mode is `never` or `always` (nothing to gain), on non-glibc or
non-Linux systems, when the tunable is already set, or with T5X_LITE_HUGE_PAGES=0 (or
false / off / no).
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "T5X_LITE_HUGE_PAGES"
OFF = ("0", "false", "off", "no")  # values of OPT_OUT that turn the re-exec off
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode (`always` / `madvise` / `never`), None if unknown."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _glibc_has_hugetlb_tunable() -> bool:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return False
    major, minor = (int(x) for x in version.split(".")[:2])
    return (major, minor) >= (2, 35)


def environment_with_huge_pages(env: dict[str, str], mode: str | None,
                                glibc_ok: bool) -> dict[str, str] | None:
    """The environment to re-execute with, or None when a re-exec would gain nothing."""
    if env.get(OPT_OUT, "1").strip().lower() in OFF or mode != "madvise" or not glibc_ok:
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with the huge-page tunable set (see module doc).

    Call it first thing under `if __name__ == "__main__":`; it returns when nothing is to be done.
    """
    if not sys.platform.startswith("linux") or not getattr(sys, "orig_argv", None):
        return
    env = environment_with_huge_pages(dict(os.environ), thp_mode(), _glibc_has_hugetlb_tunable())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # e.g. a sandbox that forbids exec: run on with 4 KiB pages
        return


def status() -> str:
    """One line for benchmark headers: whether this process runs with huge-page host buffers."""
    mode = thp_mode()
    if mode == "always":
        return "host huge pages: on (kernel THP mode always)"
    if "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "") and mode == "madvise":
        return f"host huge pages: on ({TUNABLE})"
    return f"host huge pages: off (kernel THP mode {mode}; {OPT_OUT}={os.environ.get(OPT_OUT, '')})"
