"""XLA compiler options of the jitted decode programs, and the jit that applies them lazily.

On an x86 CPU without AVX-512, XLA:CPU's matmul library (YNNPACK, its "ynn fusions") runs the
few-row matmuls of a decode step slower than XLA's own dot (Eigen). On a 2-core AMD EPYC (Zen 3,
AVX2): a [16, 512] x [512, 32128] head 6.3 -> 4.7 ms; whole decode steps, in-process A/B, three
alternating rounds of 128 new tokens, ms per token min / median: GPT-36M batch 16 21.9 / 24.4
-> 18.2 / 19.9, T5 ~70M batch 16 23.2 / 25.4 -> 18.0 / 18.8; batch 1 (already Eigen dots)
GPT 5.37 / 5.40 -> 5.30 / 5.56, T5 6.50 / 6.74 -> 6.13 / 6.53; beam search, 4 x 4 beams, 64
new tokens: GPT 29.1 / 30.3 -> 24.0 / 24.3, T5 29.6 / 30.8 -> 24.6 / 24.7. Keeping the library
for reductions only was in between (batch 16: GPT 18.7, T5 20.1). So there the decode
programs compile with the library fusions off (`xla_cpu_experimental_ynn_fusion_type` empty);
training keeps them (a jitted 2048^3 matmul: 146 GFLOP/s with, 128 without). Elsewhere
(AVX-512 hosts, where every backend gave the same 16-row product time on a Xeon, and the
library was the faster on a Zen 4 EPYC: GPT-36M batch 16 15.7 ms per token with it, 17.6
without, T5 15.9 against 17.5, batch 1 alike; other CPUs; GPU, TPU) and when XLA_FLAGS sets that
option itself, decode programs compile as every other program does.

The options are chosen at a program's first call, not at import: nothing here may touch the
backend before `distributed.maybe_initialize` has run.
"""
from __future__ import annotations

import functools
import os
import platform

import jax

LIBRARY_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def decode_compiler_options(backend: str | None = None, machine: str | None = None,
                            cpuinfo: str | None = None,
                            xla_flags: str | None = None) -> dict[str, str]:
    """{option: value} for the decode programs (see the module docstring); {} for none. The
    arguments default to this process's backend, `platform.machine()`, /proc/cpuinfo and
    XLA_FLAGS."""
    backend = jax.default_backend() if backend is None else backend
    machine = platform.machine() if machine is None else machine
    xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    if backend != "cpu" or machine.lower() not in ("x86_64", "amd64") or (
            LIBRARY_FUSIONS in xla_flags):
        return {}
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return {}  # unknown CPU: leave the compiler's choice
    flags = _cpu_flags(cpuinfo)
    if not flags or "avx512f" in flags:
        return {}
    return {LIBRARY_FUSIONS: ""}


class DecodeJit:
    """`jax.jit(fn, **jit_kwargs)` with `decode_compiler_options()`, built at the first call
    (or `lower`)."""

    def __init__(self, fn, **jit_kwargs):
        functools.update_wrapper(self, fn)
        self._fn, self._jit_kwargs, self._jitted = fn, jit_kwargs, None

    def jitted(self):
        if self._jitted is None:
            self._jitted = jax.jit(self._fn, **self._jit_kwargs,
                                   compiler_options=decode_compiler_options() or None)
        return self._jitted

    def __call__(self, *args, **kwargs):
        return self.jitted()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.jitted().lower(*args, **kwargs)


def decode_jit(**jit_kwargs):
    """Decorator: `DecodeJit(fn, **jit_kwargs)`."""
    return functools.partial(DecodeJit, **jit_kwargs)
