"""Cached decoding (prefill + one token per step) gives the full forward pass's logits."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding_testlib

from t5x_lite import config as config_lib
from t5x_lite.decoding import cache as cache_lib
from t5x_lite.decoding import steps
from t5x_lite.models import build_model

TINY = dict(vocab_size=128, d_model=32, num_heads=2, head_dim=16, d_ff=48, num_layers=2)


def _params(cfg, seed=0):
    return decoding_testlib.random_params(cfg, seed)


def _forced_steps(step, cache, forced_BxT):
    """Logits of feeding `forced` one token per step (a scan keeps the compile small)."""
    def one(cache, tok_B):
        logits, cache = step(tok_B[:, None], cache)
        return cache, logits[:, 0]
    _, logits_TxBxV = jax.lax.scan(one, cache, forced_BxT.T)
    return jnp.swapaxes(logits_TxBxV, 0, 1)


@pytest.mark.parametrize("preset,scan", [("gpt2", False), ("gpt_modern", True)])
def test_gpt_cached_matches_full_forward_with_left_padding(preset, scan):
    cfg = config_lib.from_preset(preset, **TINY, max_len=32, scan_layers=scan)
    params = _params(cfg)
    rng = np.random.default_rng(0)
    lengths = np.array([5, 2, 8])
    p, extra = 8, 4
    seqs = [rng.integers(2, 128, n + extra) for n in lengths]  # prompt + forced continuation
    prompt = np.zeros((3, p), np.int32)
    for r, (s, n) in enumerate(zip(seqs, lengths)):
        prompt[r, p - n:] = s[:n]

    @jax.jit
    def cached(params, prompt, lengths, forced):
        logits0, cache, step = steps.gpt_prefill(cfg, params, prompt, lengths, p + extra)
        rest = _forced_steps(step, cache, forced[:, :-1])
        return jnp.concatenate([logits0[:, None], rest], 1)

    forced = np.stack([s[n:n + extra] for s, n in zip(seqs, lengths)]).astype(np.int32)
    got = np.asarray(cached(params, prompt, lengths, forced))
    # Reference: each row unpadded from position 0. Right padding after a row cannot change
    # its logits (causal attention), so one batched forward pass serves all rows.
    full_in = np.zeros((3, p + extra - 1), np.int32)
    for r, (s, n) in enumerate(zip(seqs, lengths)):
        full_in[r, :n + extra - 1] = s[:-1]
    full = jax.jit(build_model(cfg).logits)(params, {"decoder_input_tokens": full_in})
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(got[r], full[r, n - 1:n - 1 + extra], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_gpt_prefill_runs_the_head_for_the_last_position_only(prefix_lm):
    """The prefill's logits are the last prompt position's (the full forward's, above); the
    head, a small model's largest product, runs for that position alone."""
    cfg = config_lib.from_preset("gpt2", **TINY, max_len=32)
    params = _params(cfg)
    b, p, v = 3, 8, cfg.vocab_size
    prompt = jnp.asarray(np.random.default_rng(4).integers(2, 128, (b, p)), jnp.int32)
    run = jax.jit(lambda params: steps.gpt_prefill(cfg, params, prompt, jnp.full((b,), p), 12,
                                                   prefix_lm)[0])
    hlo = run.lower(params).as_text()
    assert f"tensor<{b}x1x{v}xf32>" in hlo and f"tensor<{b}x{p}x{v}xf32>" not in hlo
    full = build_model(cfg).logits(params, {"decoder_input_tokens": prompt, **(
        {"decoder_causal_attention": jnp.ones((b, p), jnp.bool_)} if prefix_lm else {})})
    np.testing.assert_allclose(run(params), full[:, -1], atol=2e-4, rtol=1e-4)


def test_t5_cached_matches_full_forward():
    # Scanned here; the unscanned decoder is checked against HF in decoding_generate_test.
    cfg = config_lib.t5_1_1(**TINY, scan_layers=True)
    params = _params(cfg)
    rng = np.random.default_rng(1)
    enc = np.zeros((2, 8), np.int32)
    enc[0, :7], enc[1, :3] = rng.integers(2, 128, 7), rng.integers(2, 128, 3)
    targets = rng.integers(2, 128, (2, 6)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], 1)

    @jax.jit
    def cached(params, enc, dec_in):
        logits0, cache, mask = steps.t5_prefill(cfg, params, enc, dec_in.shape[1])
        rest = _forced_steps(steps.t5_step_fn(cfg, params, mask), cache, dec_in[:, 1:])
        return jnp.concatenate([logits0[:, None], rest], 1)

    full = jax.jit(build_model(cfg).logits)(params, {"encoder_input_tokens": enc,
                                            "decoder_input_tokens": dec_in})
    np.testing.assert_allclose(cached(params, enc, dec_in), full, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["gpt_modern", "t5_1_1"])
def test_prefill_decodes_a_scanned_model_unrolled(preset):
    """A scanned stack's caches would be copied by the layer scan at every step: `prefill`
    decodes scan_layers models with per-layer caches, with the logits of the scanned model."""
    cfg = config_lib.from_preset(preset, **TINY, **({"max_len": 32} if preset.startswith("gpt")
                                                     else {}), scan_layers=True)
    params = _params(cfg)
    gpt = cfg.family == "gpt"
    # GPT prompts are left-padded, T5's (encoder inputs) right-padded.
    prompt = np.array([[0, 0, 5, 6, 7] if gpt else [5, 6, 7, 0, 0], [7, 8, 9, 10, 11]], np.int32)
    forced = np.array([[3, 4], [5, 6]], np.int32)

    @jax.jit
    def decode(params):
        logits0, cache, step = steps.prefill(cfg, params, prompt, np.array([3, 5]), 8)
        return jnp.concatenate([logits0[:, None], _forced_steps(step, cache, forced)], 1), cache

    got, cache = decode(params)
    assert sorted(cache["decoder"]) == ["layers_0", "layers_1"]  # one cache buffer per layer
    # Reference: the full forward pass of the scanned model itself.
    logits = jax.jit(build_model(cfg).logits)
    if gpt:
        full = logits(params, {"decoder_input_tokens": np.array(
            [[5, 6, 7, 3, 4, 0, 0], [7, 8, 9, 10, 11, 5, 6]], np.int32)})
        want = np.stack([full[0, 2:5], full[1, 4:7]])
    else:
        want = logits(params, {"encoder_input_tokens": prompt, "decoder_input_tokens":
                               np.concatenate([np.zeros((2, 1), np.int32), forced], 1)})
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_take_rows_and_rollback_helpers():
    cfg = dataclasses.replace(config_lib.gpt2(**TINY, max_len=32), scan_layers=True)
    params = _params(cfg)
    prompt = np.array([[0, 0, 5, 6], [7, 8, 9, 10]], np.int32)
    cache = jax.jit(lambda params: steps.gpt_prefill(cfg, params, prompt, np.array([2, 4]), 8)[1])(
        params)
    np.testing.assert_array_equal(cache_lib.valid_before_cursor(cache), [2, 4])
    swapped = cache_lib.take_rows(cache, jnp.array([1, 0, 1]))
    np.testing.assert_array_equal(cache_lib.valid_before_cursor(swapped), [4, 2, 4])
    key = swapped["decoder"]["layers"]["block"]["self_attention"]["cached_key"]
    orig = cache["decoder"]["layers"]["block"]["self_attention"]["cached_key"]
    h = cfg.num_heads
    assert key.shape[1] == 3 * h  # rows x heads, after the scanned layer axis
    np.testing.assert_array_equal(key[:, :h], orig[:, h:2 * h])  # new row 0 = old row 1
    np.testing.assert_array_equal(key[:, 2 * h:], orig[:, h:2 * h])
    np.testing.assert_array_equal(key[:, h:2 * h], orig[:, :h])
    rolled = cache_lib.set_index(cache, 3)  # slot 3 no longer counts
    np.testing.assert_array_equal(cache_lib.valid_before_cursor(rolled), [1, 3])


@pytest.mark.parametrize("preset,scan", [("gpt2", False), ("gpt_modern", True), ("t5_1_1", True),
                                         ("t5_1_0", False)])
def test_cpu_weights_fuse_inputs_keep_kernels_give_a_dv_head_and_keep_the_logits(preset, scan):
    """The CPU decode layout: kernels stay [in, out]; self-attention q/k/v become one `qkv`
    kernel and a gated MLP's wi_0/wi_1 one `wi_fused`; the head is one [D, V] kernel (a tied
    embedding gets a transposed copy beside the table); every other weight is passed as it is,
    and the logits do not change."""
    cfg = config_lib.from_preset(preset, **TINY, **({"max_len": 32} if preset.startswith("gpt")
                                                     else {}), scan_layers=scan)
    params = _params(cfg)
    leaves = lambda tree: {jax.tree_util.keystr(k): v for k, v in
                           jax.tree_util.tree_flatten_with_path(tree)[0]}
    split = steps.cpu_weights(cfg, params)
    before, after = leaves(params), leaves(split)
    name = lambda k: k.split("'")[-2]
    names = {name(k) for k in after if "cross_attention" not in k}
    gated = len(config_lib.MLP_ACTIVATIONS[cfg.mlp]) > 1
    fused = {"query", "key", "value", *(("wi_0", "wi_1") if gated else ())}
    assert "qkv" in names and not names & fused
    assert ("wi_fused" in names) == gated
    kept = {k for k in before if "cross_attention" in k or name(k) not in fused}
    assert kept <= set(after) and all(after[k] is before[k] for k in kept)
    if cfg.tie_embeddings:
        added = set(after) - set(before) - {k for k in after if name(k) in ("qkv", "wi_fused")}
        assert added == {"['token_embedder']['embedding_transposed']"}, added
        np.testing.assert_array_equal(after["['token_embedder']['embedding_transposed']"],
                                      before["['token_embedder']['embedding']"].T)
    else:
        assert "embedding_transposed" not in names
        assert after["['lm_head']"].shape == (cfg.d_model, cfg.vocab_size)
    if cfg.family == "t5":  # cross-attention keeps its separate kernels (q from the decoder)
        assert any("cross_attention']['query" in k for k in after)
    rng = np.random.default_rng(2)
    prompt = jnp.asarray(rng.integers(2, 128, (2, 5)), jnp.int32)
    if cfg.family == "gpt":
        lengths = jnp.asarray([5, 2])
        run = lambda p: steps.gpt_prefill(cfg, p, prompt, lengths, 8)[:2]
        step = lambda p: steps.gpt_step_fn(cfg, p)
    else:
        run = lambda p: steps.t5_prefill(cfg, p, prompt, 8)
        step = lambda p: steps.t5_step_fn(cfg, p, prompt > 0)
    (a, cache_a, *_), (b, cache_b, *_) = jax.jit(run)(params), jax.jit(run)(split)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    tok = jnp.argmax(a, -1)[:, None].astype(jnp.int32)
    np.testing.assert_allclose(jax.jit(step(params))(tok, cache_a)[0],
                               jax.jit(step(split))(tok, cache_b)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["gpt2", "t5_1_1"])
def test_decode_layout_is_idempotent(preset):
    """Laid out once, the weights go through `prefill`'s own `decode_layout` untouched: the same
    config, the same tree, the very same arrays (no second copy of anything)."""
    extra = {"max_len": 32} if preset.startswith("gpt") else {}
    cfg = config_lib.from_preset(preset, **TINY, **extra, scan_layers=True)
    cfg1, once = steps.decode_layout(cfg, _params(cfg))
    assert not cfg1.scan_layers
    cfg2, twice = steps.decode_layout(cfg1, once)
    assert cfg2 == cfg1
    assert jax.tree_util.tree_structure(twice) == jax.tree_util.tree_structure(once)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(twice),
                                      jax.tree_util.tree_leaves(once)))


@pytest.mark.parametrize("preset", ["gpt2", "t5_1_1"])
def test_decode_weights_are_laid_out_once_per_params_and_decode_as_before(preset, monkeypatch):
    """On CPU `decode_weights` lays the weights out once and keeps them on the model while its
    params are the same arrays; new params are laid out anew. Decoding from the kept layout
    gives the ids and scores of the layout made inside the decode program."""
    from t5x_lite.decoding import generate as gen
    extra = {"max_len": 32} if preset.startswith("gpt") else {}
    cfg = config_lib.from_preset(preset, **TINY, **extra, scan_layers=True)
    model = decoding_testlib.loaded(cfg, seed=3)
    model.params = jax.tree_util.tree_map(jnp.asarray, model.params)  # as `load` gives them
    calls = []
    layout = gen._layout_jit
    monkeypatch.setattr(gen, "_layout_jit", lambda p, *, cfg: calls.append(1) or layout(p, cfg=cfg))
    prompts = [[5, 6, 7], [9, 10]]
    tokens, lengths = gen.pack_prompts(cfg, prompts, 2)
    opts = gen.DecodeOptions(max_new_tokens=6, batch_size=2)

    def decode(m):
        out = gen.decode_batch(m, tokens, lengths, opts)
        return np.asarray(out.tokens_BxN), np.asarray(out.logprob_B)

    def in_program(m):  # the weights as stored: the program lays them out itself
        with monkeypatch.context() as patch:
            patch.setattr(gen, "decode_weights", lambda loaded, c: (c, loaded.params))
            return decode(m)

    first, again = decode(model), decode(model)
    assert len(calls) == 1
    kept_cfg, kept = gen.decode_weights(model, cfg)
    assert len(calls) == 1 and not kept_cfg.scan_layers and "qkv" in str(
        jax.tree_util.tree_structure(kept))
    reference = in_program(model)
    for got in (first, again):
        np.testing.assert_array_equal(got[0], reference[0])
        np.testing.assert_allclose(got[1], reference[1], rtol=1e-5, atol=1e-5)
    model.params = jax.tree_util.tree_map(jnp.asarray, decoding_testlib.random_params(cfg, 4))
    fresh = decode(model)
    assert len(calls) == 2
    np.testing.assert_array_equal(fresh[0], in_program(model)[0])
    assert not np.array_equal(fresh[0], first[0])
    # numpy params can change in place, so they are laid out at every call, never kept
    model.params = decoding_testlib.random_params(cfg, 4)
    before = decode(model)
    for leaf in jax.tree_util.tree_leaves(model.params):
        leaf *= -1.5
    after = decode(model)
    np.testing.assert_array_equal(after[0], in_program(model)[0])
    assert not np.array_equal(after[0], before[0])
