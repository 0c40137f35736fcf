"""The decode programs' compiler options: which hosts get them, and that they reach the compile."""
import decoding_testlib
import numpy as np
import pytest

from t5x_lite import config as config_lib
from t5x_lite.decoding import compiler
from t5x_lite.decoding import generate as gen

AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
AVX512 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw\n"
OFF = {compiler.LIBRARY_FUSIONS: ""}


@pytest.mark.parametrize("backend, machine, cpuinfo, xla_flags, want", [
    ("cpu", "x86_64", AVX2, "", OFF),
    ("cpu", "AMD64", AVX2, "--xla_force_host_platform_device_count=8", OFF),
    ("cpu", "x86_64", AVX512, "", {}),  # where the library's decode numbers were measured
    ("cpu", "x86_64", "", "", {}),  # flags unknown: the compiler's choice
    ("cpu", "aarch64", AVX2, "", {}),
    ("gpu", "x86_64", AVX2, "", {}),
    ("tpu", "x86_64", AVX2, "", {}),
    ("cpu", "x86_64", AVX2, f"--{compiler.LIBRARY_FUSIONS}=", {}),  # the user's own setting
])
def test_options_only_for_x86_cpus_without_avx512(backend, machine, cpuinfo, xla_flags, want):
    assert compiler.decode_compiler_options(backend, machine, cpuinfo, xla_flags) == want


def test_options_reach_the_compiled_decode_program_and_keep_its_outputs(monkeypatch):
    """A 4-row greedy decode: with the options, no library (ynn) fusion is left in the compiled
    program; without them, its matmuls go to the library (jax 0.10's XLA:CPU default). The
    generated ids are the same and the scores close (another matmul summation order)."""
    cfg = config_lib.gpt2(vocab_size=64, d_model=32, num_heads=2, head_dim=16, d_ff=48,
                          num_layers=1, max_len=40)
    model = decoding_testlib.loaded(cfg, seed=3)
    tokens, lengths = gen.pack_prompts(cfg, [[5, 6, 7], [9], [10, 11, 12, 13], [3, 3]], 4)
    args = (model.params, tokens, lengths, np.uint32(0), np.arange(4, dtype=np.int32))
    static = dict(cfg=cfg, n=6, sampling=gen.SamplingConfig(0.0), samples=1)
    results = {}
    for name, options in (("off", OFF), ("default", {})):
        monkeypatch.setattr(compiler, "decode_compiler_options", lambda opts=options: opts)
        program = compiler.DecodeJit(gen._sample_jit.__wrapped__,
                                     static_argnames=tuple(static)).lower(*args, **static)
        compiled = program.compile()
        results[name] = (compiled.as_text(), compiled(*args))
    assert "__ynn_fusion" not in results["off"][0]
    assert "__ynn_fusion" in results["default"][0]
    off, default = results["off"][1], results["default"][1]
    np.testing.assert_array_equal(np.asarray(off[0]), np.asarray(default[0]))
    np.testing.assert_allclose(np.asarray(off[2]), np.asarray(default[2]), rtol=1e-5)
