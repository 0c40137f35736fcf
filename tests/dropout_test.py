"""Dropout masks shared along the sequence (`model.dropout_broadcast`, T5X's layout).

The sites and mask shapes below are read off T5X's T5.1.1 network (t5x/examples/t5/network.py
and layers.py): `nn.Dropout(broadcast_dims=(-2,))` after the embeddings, on every residual
branch, on the MLP hidden and after the decoder's final norm; a per-element mask after the
encoder's final norm; attention probabilities [B, H, T, S] with one [B, H, 1, S] mask for all
queries (`dropout_shape[-2] = 1`)."""
import collections
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import config as mc
from t5x_lite.layers import Attention
from t5x_lite.models import build_model

B, S, T, D, H, K, F, L = 2, 8, 4, 16, 2, 8, 24, 2
SMALL = dict(vocab_size=64, d_model=D, num_heads=H, head_dim=K, d_ff=F, num_layers=L,
             dropout_rate=0.1)


def _mask_shapes(cfg, batch):
    """Counter of the mask shapes our model draws in a training forward pass: each Dropout
    call's input shape with its broadcast dims set to 1 (read while tracing: nothing runs)."""
    model = build_model(cfg)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), batch)["params"])
    shapes = []

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, nn.Dropout) and context.method_name == "__call__":
            if kwargs.get("deterministic", m.deterministic) is False and m.rate > 0:
                shape = list(args[0].shape)
                for axis in m.broadcast_dims:
                    shape[axis] = 1
                shapes.append(tuple(shape))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: model.logits(p, batch, rng=jax.random.key(1),
                                              deterministic=False), params)
    return collections.Counter(shapes)


def _t5_batch():
    ids = np.random.default_rng(0).integers(2, 64, (B, S))
    return {"encoder_input_tokens": jnp.asarray(ids), "decoder_input_tokens": jnp.asarray(ids[:, :T]),
            "decoder_target_tokens": jnp.asarray(ids[:, :T])}


@pytest.mark.parametrize("causal_blocks", [1, 2])
def test_t5_draws_t5x_masks_at_t5x_sites(causal_blocks):
    cfg = mc.t5_1_1(**SMALL, dropout_broadcast=True, causal_blocks=causal_blocks)
    row = (B, 1, D)
    want = collections.Counter({
        row: 2 + L * 2 + L * 3 + 1,  # embeddings; residual branches; decoder final norm
        (B, 1, F): 2 * L,  # MLP hidden
        (B, H, 1, S): L + L,  # encoder self- and decoder cross-attention probabilities
        (B, H, 1, T): L,  # decoder self-attention probabilities, whatever the query blocks
        (B, S, D): 1,  # encoder final norm: per element in T5X too
    })
    assert _mask_shapes(cfg, _t5_batch()) == want
    # Without the flag every mask is per element (the HF layout, tested against HF elsewhere).
    per_element = _mask_shapes(dataclasses.replace(cfg, dropout_broadcast=False), _t5_batch())
    assert all(1 not in shape for shape in per_element)


def test_gpt_and_bert_share_their_masks_along_the_sequence():
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 64, (B, S)))
    gpt = mc.gpt2(**SMALL, max_len=S, dropout_broadcast=True)
    assert _mask_shapes(gpt, {"decoder_input_tokens": ids, "decoder_target_tokens": ids}) == {
        (B, 1, D): 1 + 2 * L, (B, H, 1, S): L}
    bert = mc.bert(**SMALL, max_len=S, dropout_broadcast=True)
    assert _mask_shapes(bert, {"encoder_input_tokens": ids}) == {
        (B, 1, D): 1 + 2 * L, (B, H, 1, S): L}


def _probe_attention(causal: bool, broadcast: bool, causal_blocks: int = 1, rate: float = 0.5):
    """An attention layer whose output row t is probs[t, :] * dropout multiplier[t, :]: a zero
    query kernel makes the probabilities uniform over the keys a query may see, and identity
    value / output kernels on one-hot inputs (d_model = S) turn key s into coordinate s."""
    n = 64  # batch rows: 64 * S key draws
    cfg = mc.t5_1_1(vocab_size=64, d_model=S, num_heads=1, head_dim=S, d_ff=8, num_layers=1,
                    dropout_rate=rate, dropout_broadcast=broadcast, causal_blocks=causal_blocks)
    x = jnp.broadcast_to(jnp.eye(S), (n, S, S))
    bias = jnp.where(jnp.tril(jnp.ones((S, S))) > 0, 0.0, -1e10)[None, None] if causal else \
        jnp.zeros((1, 1, S, S))
    eye = jnp.eye(S)[:, None, :]
    params = {"query": jnp.zeros((S, 1, S)), "key": eye, "value": eye, "out": jnp.eye(S)[None]}
    out = jax.jit(lambda p: Attention(cfg, causal=causal).apply(
        {"params": p}, x, x, bias, deterministic=False, rngs={"dropout": jax.random.key(3)}))(params)
    seen = np.arange(1, S + 1)[:, None] if causal else S  # keys query t averages over
    return np.asarray(out) * seen * (1 - rate)  # the multiplier: 1 where kept, 0 where dropped


@pytest.mark.parametrize("causal,causal_blocks", [(False, 1), (True, 1), (True, 4)])
def test_attention_mask_is_one_per_key_for_all_queries(causal, causal_blocks):
    kept = _probe_attention(causal, True, causal_blocks)
    visible = np.tril(np.ones((S, S), bool)) if causal else np.ones((S, S), bool)
    assert np.allclose(kept[:, ~visible], 0)
    np.testing.assert_allclose(np.where(kept > 0.5, 1.0, 0.0)[:, visible], kept[:, visible], atol=1e-5)
    # Each key's draw is the same for every query that sees it (the last row sees them all).
    np.testing.assert_array_equal(kept > 0.5, (kept[:, -1:, :] > 0.5) & visible)
    assert 0.4 < kept[:, -1].mean() < 0.6  # 512 draws at rate 0.5
    # Per element, the queries draw their own masks.
    per_query = _probe_attention(causal, False, causal_blocks) > 0.5
    assert (per_query != (per_query[:, -1:, :] & visible)).any()


def test_query_blocks_keep_the_shared_masks_of_the_full_square():
    """Causal query blocks slice one [B, H, 1, T] mask: loss and gradients equal the full
    square's under the same dropout key (per-element masks are drawn per block)."""
    cfg = mc.t5_1_1(**SMALL, dropout_broadcast=True, causal_blocks=1)
    batch = {**_t5_batch(), "decoder_input_tokens": _t5_batch()["encoder_input_tokens"],
             "decoder_target_tokens": _t5_batch()["encoder_input_tokens"]}
    model = build_model(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])

    def loss_and_grads(blocks):
        m = build_model(dataclasses.replace(cfg, causal_blocks=blocks))
        return jax.jit(jax.value_and_grad(lambda p: m.loss_fn(p, batch, jax.random.key(5))[0]))(
            params)

    (l1, g1), (l4, g4) = loss_and_grads(1), loss_and_grads(4)
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g4, g1)


def test_scanned_remat_model_shares_masks_and_the_flag_is_free_between_runs():
    base = mc.t5_1_1(**SMALL, dropout_broadcast=True)
    scanned = dataclasses.replace(base, scan_layers=True, remat="full")
    batch = _t5_batch()
    model = build_model(scanned)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: model.loss_fn(p, batch, jax.random.key(2))[0]))(params)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    # The scanned layer body (traced once) draws the unscanned layers' shared mask shapes.
    assert set(_mask_shapes(scanned, batch)) == set(_mask_shapes(base, batch))
    # Fine-tuning or evaluating with the other layout computes the same function of the weights.
    assert base.differences(dataclasses.replace(base, dropout_broadcast=False)) == []
    assert mc.ModelConfig.from_dict(base.to_dict()).dropout_broadcast is True
