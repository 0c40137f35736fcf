"""Shared transformer parts: embedding, norms, attention (with KV cache), positions, MLP.

Shape legend: B batch, T query length, S key length, D d_model, H heads, K head dim,
F MLP width, V vocab, R relative-position buckets.

Params are float32 and carry one logical axis name per dimension; compute runs in
`config.dtype`; norms, softmax and logits run in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite.config import MLP_ACTIVATIONS, ModelConfig

NEG_INF = -1e10  # additive mask value; finite so fully-masked rows stay NaN-free

ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}


def param(module: nn.Module, name: str, init, shape, axes):
    """A float32 parameter annotated with one logical axis name per dimension."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def fused_kernel(module: nn.Module, name: str):
    """A kernel that exists only when decoding on CPU fused several (decoding.steps.fuse_qkv,
    fuse_gated_mlp), or None when the module has separate kernels."""
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return None


def constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


def dense_init(fan_in: int, scale: float = 1.0):
    return nn.initializers.normal(stddev=scale / math.sqrt(fan_in))


class Embed(nn.Module):
    """Token embedding; `attend` gives tied logits in float32."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    stddev: float = 1.0

    def setup(self):
        self.embedding = param(self, "embedding", nn.initializers.normal(stddev=self.stddev),
                               (self.num_embeddings, self.features), ("vocab", "embed"))

    def __call__(self, ids_BxT):
        return jnp.take(self.embedding, ids_BxT, axis=0).astype(self.dtype)

    def attend(self, x_BxTxD):
        # decoding on CPU reads a [D, V] copy (decoding.steps.transposed_embedding)
        if self.has_variable("params", "embedding_transposed"):
            return vocab_logits(x_BxTxD, self.get_variable("params", "embedding_transposed")
                                .astype(self.dtype), "dv")
        return vocab_logits(x_BxTxD, self.embedding.astype(self.dtype), "vd")


def dense(x, w, n_in: int = 1):
    """x [..., *in] @ w [*in, *out] -> [..., *out] as one 2-D matmul over the flattened tokens.

    XLA:CPU feeds the weight gradient of a 3-D einsum ("btd,df->btf") a transposed copy of the
    whole activation gradient; the 2-D form needs none (T5-26M step on 2 cores: ~3.7 -> ~3.0 s).
    """
    lead = x.shape[:x.ndim - n_in]
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    y = x.reshape(-1, math.prod(in_shape)) @ w.reshape(math.prod(in_shape), -1)
    return y.reshape(*lead, *out_shape)


def vocab_logits(x_BxTxD, w, w_axes: str):
    """Float32 logits x @ w over the flattened tokens; `w_axes` is "vd" (tied embedding) or "dv".

    One [B*T, D] matmul, as in `dense`: autodiff of "btd,vd->btv" gave the embedding gradient a
    transposed copy of the whole [V, B*T] logits gradient (0.7-0.9 s of a 14 s GPT-36M step).
    """
    b, t, d = x_BxTxD.shape
    x_NxD = x_BxTxD.reshape(b * t, d)
    logits_NxV = jnp.einsum(f"nd,{w_axes}->nv", x_NxD, w, preferred_element_type=jnp.float32)
    return logits_NxV.reshape(b, t, -1)


class Norm(nn.Module):
    """RMSNorm (T5: no mean, no bias) or LayerNorm (mean, bias), computed in float32."""

    kind: str = "rms"
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x32 = x.astype(jnp.float32)
        scale = param(self, "scale", nn.initializers.ones, (d,), ("embed",))
        if self.kind == "rms":
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
            return (y * scale).astype(self.dtype)
        bias = param(self, "bias", nn.initializers.zeros, (d,), ("embed",))
        mean = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(self.dtype)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
    """T5's bucketing of (key - query) distances: exact for small, log-spaced up to max_distance.

    The bucket of each distance 0..max_distance is computed once on the host, in float32 in
    the reference's order (log, divide, multiply, truncate), and gathered here: inside jit,
    XLA folded the divide and multiply into one rounded constant and put a distance whose
    exact value is a whole bucket one bucket lower (e.g. 6 buckets, max distance 100, at 10).
    """
    n = -relative_position
    ret = 0
    if bidirectional:
        ret = (n < 0).astype(jnp.int32) * (num_buckets // 2)
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    table = _distance_buckets(num_buckets // 2 if bidirectional else num_buckets, max_distance)
    return ret + jnp.asarray(table)[jnp.minimum(n, max_distance)]


@functools.lru_cache(maxsize=64)
def _distance_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of each distance 0..max_distance (farther ones share the last bucket)."""
    n = np.arange(max_distance + 1)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # max_distance <= max_exact: below
        scaled = (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact))
                  * np.float32(num_buckets - max_exact))
    finite = np.isfinite(scaled)
    large = np.minimum(max_exact + np.where(finite, scaled, 0).astype(np.int32), num_buckets - 1)
    # A max_distance not past the exact buckets (ModelConfig refuses it) has no log spacing:
    # such distances get bucket num_buckets, outside the table.
    large = np.where(finite, large, num_buckets)
    return np.where(n < max_exact, n, large).astype(np.int32)


class RelativePositionBias(nn.Module):
    """T5 relative position bias [1, H, T, S], computed once per stack and shared by its layers."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool

    @nn.compact
    def __call__(self, q_pos_T, k_pos_S):
        rel_TxS = k_pos_S[None, :] - q_pos_T[:, None]
        buckets_TxS = relative_position_bucket(rel_TxS, self.bidirectional, self.num_buckets,
                                               self.max_distance)
        # T5X's init: uniform with variance 1 / mean(H, R).
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        table_HxR = param(self, "rel_embedding", init,
                          (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))
        # A gather along R (H stays a pass-through dim, so it shards over `tensor` as is): its
        # gradient is a scatter-add of H x T x S values; a one-hot [T, S, R] einsum built and
        # contracted the T x S x R one-hot in both passes (~4% of a T5-26M step on CPU).
        return jnp.take(table_HxR, buckets_TxS, axis=1)[None]


def rope_inv_freq(cfg) -> np.ndarray:
    """RoPE's inverse frequencies [head_dim / 2] (float32): theta ** (-2i / head_dim), then
    cfg.rope_scaling's. "linear" divides them all by the factor. "llama3" (Llama 3.1) divides
    those whose wavelength 2 pi / f exceeds original / low_freq_factor, keeps those below
    original / high_freq_factor, and between the two blends f / factor and f by s =
    (original / wavelength - low) / (high - low): (1 - s) f / factor + s f. "yarn" ramps
    linearly by pair index from f (below the beta_fast pair) to f / factor (above beta_slow's)."""
    k = cfg.head_dim
    pos_freqs = cfg.rope_theta ** (np.arange(0, k, 2, dtype=np.float32) / k)
    inv_freq = 1.0 / pos_freqs
    factor = np.float32(cfg.rope_scaling_factor)
    if cfg.rope_scaling == "linear":
        return inv_freq / factor
    if cfg.rope_scaling == "llama3":
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        original = cfg.rope_original_max_len
        wavelength = np.float32(2 * np.pi) / inv_freq
        scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
        with np.errstate(divide="ignore", invalid="ignore"):  # low == high: no band between
            s = (original / wavelength - low) / (high - low)
            blended = (1 - s) * scaled / factor + s * scaled
        between = (wavelength >= original / high) & (wavelength <= original / low)
        return np.where(between, blended, scaled).astype(np.float32)
    if cfg.rope_scaling == "yarn":
        # pairs i below `low` keep their frequency, above `high` are divided by the factor,
        # between them a linear ramp in i blends the two (the YaRN paper's, as HF computes it)
        def pair(rotations):  # the pair index at which `rotations` turns fit the original length
            return k * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (
                2 * math.log(cfg.rope_theta))
        low, high = pair(cfg.rope_beta_fast), pair(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, k - 1)
        high = high + 0.001 if low == high else high
        keep = 1 - np.clip((np.arange(k // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        return ((1.0 / (factor * pos_freqs)) * (1 - keep) + inv_freq * keep).astype(np.float32)
    return inv_freq


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's cos / sin factor for a context stretched `factor` times: 0.1 m ln(factor) + 1
    (1 for factor <= 1); HF's `mscale` / `mscale_all_dim` are ratios of two of these."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def rope_attention_scale(cfg) -> float:
    """YaRN's factor on cos and sin (so on q.k twice): rope_attention_factor, or when that is 0
    `yarn_mscale(factor)`; 1 for the other scalings."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    return cfg.rope_attention_factor or yarn_mscale(cfg.rope_scaling_factor)


def rope(x_BxTxHxK, positions_BxT, inv_freq, scale: float = 1.0):
    """Rotary embedding in the rotate-half layout (first/second half of K are the pair), at
    the inverse frequencies [K / 2] `rope_inv_freq` gives, cos and sin times `scale`."""
    k = x_BxTxHxK.shape[-1]
    angles_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angles_BxTxK2)[:, :, None], jnp.cos(angles_BxTxK2)[:, :, None]
    if scale != 1.0:
        sin, cos = sin * scale, cos * scale
    x = x_BxTxHxK.astype(jnp.float32)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxK.dtype)


def attention_bias(mask_BxTxS, extra_bias=None):
    """Boolean mask [B, T, S] (+ optional additive [1|B, H, T, S]) -> float32 bias [B, 1|H, T, S]."""
    bias = jnp.where(mask_BxTxS[:, None], 0.0, NEG_INF).astype(jnp.float32)
    if extra_bias is None:
        return bias
    if extra_bias.shape[0] == 1 < bias.shape[0]:
        extra_bias = broadcast_rows(extra_bias, bias.shape[0])
    return bias + extra_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_rows(x_1xN, rows: int):
    """[1, ...] -> [rows, ...], as `jnp.broadcast_to`; its gradient sums the rows as a
    matrix-vector product with ones.

    Autodiff's gradient of a broadcast is a reduce over the broadcast dim, which XLA:CPU fuses
    with the adds before it into one slow reduction. For T5's relative-position bias (shared by
    every layer, broadcast over the batch) that sum of [B, H, T, S] cotangents took ~46 ms at
    8 x 4 x 512 x 512 over four layers against ~17 ms as a product with ones.
    """
    return jnp.broadcast_to(x_1xN, (rows,) + x_1xN.shape[1:])


def _broadcast_rows_fwd(x_1xN, rows):
    return broadcast_rows(x_1xN, rows), None


def _broadcast_rows_bwd(rows, _, g):
    return (jnp.einsum("b...,b->...", g, jnp.ones((rows,), g.dtype))[None],)


broadcast_rows.defvjp(_broadcast_rows_fwd, _broadcast_rows_bwd)


def make_dropout(cfg: ModelConfig, along_sequence: bool = True) -> nn.Dropout:
    """Dropout of [..., T, features] activations at `cfg.dropout_rate`. With
    `cfg.dropout_broadcast` (T5X) each row's mask is shared along the sequence; `along_sequence`
    False keeps per-element masks there too (T5X's encoder output dropout)."""
    shared = cfg.dropout_broadcast and along_sequence
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,) if shared else ())


def dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, bias, scale: float, impl: str,
                          dropout: Callable | None = None, kv_cache: bool = False,
                          causal_blocks: int = 1, window: int | None = None):
    """softmax(scale * q.k + bias) v with float32 scores and softmax.

    `dropout(probs, first_key)` drops attention probabilities whose keys start at `first_key`.

    `kv_cache`: k and v are the decode cache, [B*H, S, K] (see `Attention`): the batched
    matmuls read it in place, with no transpose or copy of the cache at a step.
    `causal_blocks` > 1 promises that `bias` masks every key after its query (S == T, causal
    self-attention): the queries are split into that many blocks and block i attends only to
    keys [0, (i + 1) T / n), skipping the masked upper triangle, (n + 1) / 2n of the full
    square's work (5/8 at n = 4) with the same result. With a sliding `window` (the bias also
    masks every key `window` or more before its query), block i skips the keys before
    i T / n - window + 1 as well.
    """
    if impl == "dot_product_attention" and dropout is None and not kv_cache:
        b, h, t, s = jnp.broadcast_shapes(bias.shape, (1, q_BxTxHxK.shape[2], 1, 1))
        bias = jnp.broadcast_to(bias, (b, h, q_BxTxHxK.shape[1], k_BxSxHxK.shape[1]))
        # In float16 NEG_INF is -inf, and a row with every key masked (a padding row) would
        # be NaN: half the dtype's lowest stays finite (the scores it is added to are float32).
        bias = jnp.maximum(bias, jnp.finfo(q_BxTxHxK.dtype).min / 2).astype(q_BxTxHxK.dtype)
        return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, bias=bias,
                                            scale=scale)
    if kv_cache:
        return _cached_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, bias, scale, dropout)

    def attend(q, k, v, bias, first_key=0):
        scores_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q, k,
                                    preferred_element_type=jnp.float32) * scale + bias
        probs = jax.nn.softmax(scores_BxHxTxS, axis=-1)
        if dropout is not None:
            probs = dropout(probs, first_key)
        return jnp.einsum("bhts,bshk->bthk", probs.astype(v.dtype), v)

    t = q_BxTxHxK.shape[1]
    if causal_blocks <= 1 or t % causal_blocks:
        return attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, bias)
    assert k_BxSxHxK.shape[1] == t, "causal_blocks needs self-attention (S == T)"
    c = t // causal_blocks
    # Broadcast (size-1) bias dims are kept; only real T / S dims are sliced.
    rows = lambda x, i: x if x.shape[2] == 1 else x[:, :, i * c:(i + 1) * c]
    keys = lambda x, lo, hi, axis: x if x.shape[axis] == 1 else jax.lax.slice_in_dim(
        x, lo, hi, axis=axis)
    outs = [attend(q_BxTxHxK[:, i * c:(i + 1) * c], k_BxSxHxK[:, lo:(i + 1) * c],
                   v_BxSxHxK[:, lo:(i + 1) * c], keys(rows(bias, i), lo, (i + 1) * c, 3), lo)
            for i, lo in enumerate(causal_block_first_keys(t, causal_blocks, window))]
    return jnp.concatenate(outs, axis=1)


def causal_block_first_keys(t: int, blocks: int, window: int | None) -> list[int]:
    """The first key each of `blocks` causal query blocks of t // blocks queries attends to
    (`dot_product_attention`; block i's last is (i + 1) t / blocks - 1): 0, or with a sliding
    `window` the first its first query sees, i t / blocks - window + 1."""
    c = t // blocks
    return [0 if window is None else max(0, i * c - window + 1) for i in range(blocks)]


def _cache_layout(x_BxSxHxK):
    """[B, S, H, K] -> the decode cache's [B*H, S, K]."""
    b, s, h, k = x_BxSxHxK.shape
    return jnp.swapaxes(x_BxSxHxK, 1, 2).reshape(b * h, s, k)


def _cached_attention(q_BxTxHxK, k_NxSxK, v_NxSxK, bias, scale: float, dropout=None):
    """Attention over the decode cache, N = B*Hkv rows (Hkv = H without grouped-query
    attention): the G = H / Hkv query heads of a kv head are G*T query rows against its one
    cache entry, which each step reads once.

    The cache has no size-1 dims at batch 1 (a [B, H, S, K] cache has): XLA's simplifier strips
    those from the attention dots, and the bitcast it leaves between the in-place cache update
    and the dot made XLA:CPU copy every layer's cache 2-3 times per step (GPT-36M batch 1 at
    cache length 272: ~28 copies, ~1 ms of a ~7.5 ms step; A/B 7.75 -> 6.47 ms per token).
    """
    b, t, h, k = q_BxTxHxK.shape
    n = k_NxSxK.shape[0]
    q_NxGTxK = jnp.swapaxes(q_BxTxHxK, 1, 2).reshape(n, -1, k)  # [B, Hkv, G, T, K] rows
    scores_NxGTxS = jnp.einsum("ntk,nsk->nts", q_NxGTxK, k_NxSxK,
                               preferred_element_type=jnp.float32)
    scores_BxHxTxS = scores_NxGTxS.reshape(b, h, t, -1) * scale + bias
    probs = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    probs_NxGTxS = probs.reshape(n, -1, probs.shape[-1]).astype(v_NxSxK.dtype)
    out_NxGTxK = jnp.einsum("nts,nsk->ntk", probs_NxGTxS, v_NxSxK)
    return jnp.swapaxes(out_NxGTxK.reshape(b, h, t, k), 1, 2)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v kernels [D, H, K] and out kernel [H, K, D].

    Self-attention in decode mode keeps `cached_key`/`cached_value` [B*Hkv, L, K] (row-major over
    rows and kv heads, see `_cached_attention`; Hkv = `cfg.kv_heads`) in the 'cache' collection
    and writes the new chunk at `decode_index`. Cross-attention in decode mode stores the projected encoder K/V
    [B*H, S, K] once (when `inputs_kv` is given) and reuses them afterwards.
    """

    config: ModelConfig
    is_cross: bool = False
    causal: bool = False  # the bias masks every later key (lets attention skip that triangle)

    def _proj(self, name, x, d_in, features, axes, bias_axes, dtype, fan_in):
        cfg = self.config
        kernel = param(self, name, dense_init(fan_in), (d_in, *features), axes)
        y = dense(x, kernel.astype(dtype))
        if cfg.has_qkv_bias:
            y = y + param(self, f"{name}_bias", nn.initializers.zeros, features, bias_axes).astype(dtype)
        return y

    def _fused_qkv(self, x, dtype):
        """(q, k, v) from a fused `qkv` kernel [D, 3, H, K] or `qkv_grouped` [D, H + 2 Hkv, K]
        (decoding on CPU, see decoding.steps.fuse_qkv), or None when the module has separate
        kernels."""
        if self.is_cross:
            return None
        h, hkv = self.config.num_heads, self.config.kv_heads
        grouped = hkv != h
        w = fused_kernel(self, "qkv_grouped" if grouped else "qkv")
        if w is None:
            return None
        y = dense(x, w.astype(dtype))
        out = []
        for i, (name, start, n) in enumerate((("query", 0, h), ("key", h, hkv),
                                              ("value", h + hkv, hkv))):
            part = y[..., start:start + n, :] if grouped else y[..., i, :, :]
            if self.config.has_qkv_bias:
                part = part + self.get_variable("params", f"{name}_bias").astype(dtype)
            out.append(part)
        return out

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, bias, *, positions_q=None, positions_kv=None,
                 decode: bool = False, decode_index=None, deterministic: bool = True):
        cfg = self.config
        dtype = cfg.compute_dtype
        d, h, k = inputs_q.shape[-1], cfg.num_heads, cfg.head_dim
        proj = lambda name, x, fan_in=d: self._proj(name, x, d, (h, k), ("embed", "heads", "kv"),
                                                    ("heads", "kv"), dtype, fan_in)
        # Grouped-query attention: key / value have hkv heads, each read by `group` query heads
        # (query head i uses kv head i // group). Their own logical axis lets mesh.rules keep
        # them whole (e.g. one kv head under tensor parallelism).
        hkv = cfg.kv_heads
        group, kv_axis = h // hkv, "heads" if hkv == h else "kv_heads"
        kv_proj = lambda name, x: self._proj(name, x, d, (hkv, k), ("embed", kv_axis, "kv"),
                                             (kv_axis, "kv"), dtype, d)
        fused = self._fused_qkv(inputs_q, dtype)
        # Without attention_scale (T5), q.k is not divided by sqrt(head_dim): T5 folds that
        # factor into the query's init instead (T5X's query_init, HF T5's q std).
        q_fan_in = d if cfg.attention_scale else d * k
        q = proj("query", inputs_q, q_fan_in) if fused is None else fused[0]
        use_rope = cfg.position == "rope" and not self.is_cross
        rope_freqs = (rope_inv_freq(cfg), rope_attention_scale(cfg)) if use_rope else None
        use_cross_cache = self.is_cross and decode
        if use_cross_cache and inputs_kv is None:
            key = self.variable("cache", "cached_key", lambda: None).value
            value = self.variable("cache", "cached_value", lambda: None).value
        else:
            key, value = ((kv_proj("key", inputs_kv), kv_proj("value", inputs_kv))
                          if fused is None else fused[1:])
            if use_rope:
                key = rope(key, positions_kv, *rope_freqs)
            if decode:  # [B, S, H, K] -> the cache's [B*H, S, K]
                key, value = _cache_layout(key), _cache_layout(value)
            if use_cross_cache:
                self.variable("cache", "cached_key", lambda: key).value = key
                self.variable("cache", "cached_value", lambda: value).value = value
        if use_rope:
            q = rope(q, positions_q, *rope_freqs)
        if decode and not self.is_cross:
            initialized = self.has_variable("cache", "cached_key")
            ck = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
            if initialized:
                start = (0, decode_index, 0)
                ck.value = jax.lax.dynamic_update_slice(ck.value, key.astype(ck.value.dtype), start)
                cv.value = jax.lax.dynamic_update_slice(cv.value, value.astype(cv.value.dtype), start)
                key, value = ck.value.astype(dtype), cv.value.astype(dtype)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        if group > 1 and not decode:  # each kv head repeated for its query heads
            key, value = (jnp.repeat(x, group, axis=2) for x in (key, value))
        dropout = None
        if cfg.dropout_rate > 0 and not deterministic:
            drop = nn.Dropout(cfg.dropout_rate, deterministic=False)
            dropout = lambda probs, first_key=0: drop(probs)  # a mask of its own per call
            if cfg.dropout_broadcast:  # T5X: one mask over the keys, shared by every query
                keep_BxHx1xS = drop(jnp.ones((q.shape[0], h, 1, key.shape[1]), jnp.float32))
                dropout = lambda probs, first_key=0: probs * jax.lax.slice_in_dim(
                    keep_BxHx1xS, first_key, first_key + probs.shape[-1], axis=3)
        scale = 1.0 / math.sqrt(k) if cfg.attention_scale else 1.0
        blocked = self.causal and not decode
        out_BxTxHxK = dot_product_attention(
            q, key, value, bias, scale, cfg.attention_impl, dropout, kv_cache=decode,
            causal_blocks=cfg.causal_blocks if blocked else 1,
            window=cfg.sliding_window if blocked else None)
        wo = param(self, "out", dense_init(h * k), (h, k, d), ("heads", "kv", "embed"))
        out = dense(out_BxTxHxK, wo.astype(dtype), n_in=2)
        if cfg.use_bias:
            out = out + param(self, "out_bias", nn.initializers.zeros, (d,), ("embed",)).astype(dtype)
        return out


class Mlp(nn.Module):
    """Position-wise MLP; gated variants multiply the activated branches (T5 v1.1, SwiGLU)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool = True):
        cfg = self.config
        dtype = cfg.compute_dtype
        d, f = x_BxTxD.shape[-1], cfg.d_ff
        acts = MLP_ACTIVATIONS[cfg.mlp]
        w_fused = fused_kernel(self, "wi_fused")  # gated input kernels as one [D, 2, F]
        fused = None if w_fused is None else dense(x_BxTxD, w_fused.astype(dtype))
        hidden = None
        for i, act in enumerate(acts):
            name = "wi" if len(acts) == 1 else f"wi_{i}"
            if fused is not None:
                y = fused[..., i, :]
            else:
                w = param(self, name, dense_init(d), (d, f), ("embed", "mlp"))
                y = dense(x_BxTxD, w.astype(dtype))
            if cfg.use_bias:
                y = y + param(self, f"{name}_bias", nn.initializers.zeros, (f,), ("mlp",)).astype(dtype)
            y = ACTIVATIONS[act](y)
            hidden = y if hidden is None else hidden * y
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        if cfg.family == "t5":  # T5's DenseReluDense drops the hidden; GPT-2 and BERT do not
            hidden = make_dropout(cfg)(hidden, deterministic=deterministic)
        wo = param(self, "wo", dense_init(f), (f, d), ("mlp", "embed"))
        out = dense(hidden, wo.astype(dtype))
        if cfg.use_bias:
            out = out + param(self, "wo_bias", nn.initializers.zeros, (d,), ("embed",)).astype(dtype)
        return out
