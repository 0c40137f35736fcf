"""benchmarks/decode_speed.py's roofline: the bytes it counts per token are the params a cached
decode step actually reads (found by a liveness walk over the traced step's jaxpr) plus the
float32 KV cache the step attends over."""
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding_testlib

from t5x_lite import config as config_lib
from t5x_lite.decoding import steps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import decode_speed  # noqa: E402

TINY = dict(vocab_size=128, d_model=32, num_heads=2, head_dim=16, d_ff=48, num_layers=2)


def _used_inputs(jaxpr) -> list[bool]:
    """Which inputs the outputs depend on: an equation is live when one of its outputs is, and
    then so are all its inputs (nested jaxprs count whole)."""
    live = {v for v in jaxpr.outvars if not hasattr(v, "val")}  # Literals have .val
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if not hasattr(v, "val"))
    return [v in live for v in jaxpr.invars]


def _step_reads(cfg, params, prompt_len, cache_len):
    """(paths of the params the cached decode step uses, float bytes of its cache)."""
    ucfg, uparams = steps.unrolled(cfg, params)
    prompt = jnp.asarray(np.arange(2, 2 + prompt_len, dtype=np.int32)[None])
    ids = jnp.zeros((1, 1), jnp.int32)
    if cfg.family == "t5":
        _, cache, mask = steps.t5_prefill(ucfg, uparams, prompt, cache_len)

        def step(params, cache):
            c, p = steps.unrolled(cfg, params)
            return steps.t5_step_fn(c, p, mask)(ids, cache)[0]
    else:
        _, cache, _ = steps.gpt_prefill(ucfg, uparams, prompt, jnp.array([prompt_len]),
                                        cache_len)

        def step(params, cache):
            c, p = steps.unrolled(cfg, params)
            return steps.gpt_step_fn(c, p)(ids, cache)[0]

    used = _used_inputs(jax.make_jaxpr(step)(params, cache).jaxpr)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    used_paths = {jax.tree_util.keystr(path) for (path, _), u in zip(flat, used) if u}
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache)
                      if jnp.issubdtype(x.dtype, jnp.floating))
    return used_paths, cache_bytes


@pytest.mark.parametrize("preset,scan,gathered", [
    ("t5_1_1", False, "['token_embedder']['embedding']"),  # untied: one row read
    ("t5_1_1", True, "['token_embedder']['embedding']"),
    ("t5_1_0", False, None),  # tied: the embedding is the head, read in full
    ("gpt2", False, "['position_embedder']['embedding']"),
    ("gpt2", True, "['position_embedder']['embedding']"),
])
def test_bytes_per_token_are_the_params_and_cache_a_decode_step_reads(preset, scan, gathered):
    extra = dict(num_decoder_layers=3) if preset.startswith("t5") else dict(max_len=32)
    cfg = config_lib.from_preset(preset, **TINY, **extra, scan_layers=scan)
    loaded = decoding_testlib.loaded(cfg)
    prompt_len, cache_len = 5, 12
    used, cache_bytes = _step_reads(cfg, loaded.params, prompt_len, cache_len)
    counted = decode_speed.step_weights(cfg, loaded.params)
    # Every param the step uses is counted, except the table it reads one row of.
    assert set(counted) == used - {gathered}
    if gathered:
        assert gathered in used
    if cfg.family == "t5":  # the encoder and the cross-attention K/V kernels are not read
        assert not any("encoder" in p for p in counted)
        assert not any("cross_attention" in p and ("key" in p or "value" in p)
                       for p in counted)
        assert any("cross_attention']['query" in p for p in counted)
    # By hand: all params, less the encoder, cross-attention K/V and the one-row table.
    flat = jax.tree_util.tree_flatten_with_path(loaded.params)[0]
    by_hand = sum(x.size for path, x in flat
                  if not any(s in jax.tree_util.keystr(path) for s in (
                      "['encoder", "['cross_attention']['key']",
                      "['cross_attention']['value']", gathered or "-")))
    assert sum(x.size for x in counted.values()) == by_hand
    got = decode_speed.bytes_per_token(loaded, cache_len, prompt_len)
    assert got == 4 * by_hand + cache_bytes


def test_hf_is_timed_like_ours(monkeypatch):
    """Per torch thread count: a full-length warm-up, then --repeats timed full-length runs."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(decode_speed, "_REPEATS", types.SimpleNamespace(value=3))
    calls = []

    class FakeHF:
        def generate(self, ids, **kw):
            calls.append((torch.get_num_threads(), kw.get("max_new_tokens")))

    threads = torch.get_num_threads()
    decode_speed.time_hf(FakeHF(), np.zeros((1, 4), np.int32), 8)
    assert calls == [(t, 8) for t in sorted({1, threads}) for _ in range(1 + 3)]
    assert torch.get_num_threads() == threads


def test_train_throughput_peak_dtype_matches_or_is_warned_about():
    # Its own process: train_throughput defines absl flags of the same names as decode_speed.
    code = """
import sys
sys.path.insert(0, "benchmarks")
from absl import flags
import train_throughput as t
flags.FLAGS(["x"])
assert t.compute_dtype() == "float32", t.compute_dtype()  # CPU default: the measured f32 peak
assert t.peak_warning("measured", "float32") is None
assert t.peak_warning("table", "bfloat16") is None
assert "WARNING" in t.peak_warning("table", "float32")
assert "WARNING" in t.peak_warning("measured", "bfloat16")
flags.FLAGS(["x", "--dtype=bfloat16"])
assert t.model_setup("tiny_gpt", False)[0].dtype == "bfloat16"
"""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
