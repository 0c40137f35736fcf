"""Logit filters and token selection for sampling: temperature, then top-k, top-p and min-p.

The order and the edge rules are HF's (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`, `MinPLogitsWarper` with min_tokens_to_keep=1): top-k keeps every logit >=
the k-th largest; top-p removes the tokens whose cumulative probability, in ascending order, is
<= 1 - top_p and always keeps the most likely one; min-p removes the tokens whose probability is
below min_p times the most likely one's. Removed logits become -inf. Ties at the top-p cut are
kept together (HF removes some of them, in the order of its unstable sort).

Neither sorts (`t5x_lite.selection`): top-k's threshold is the smallest logit with at most k - 1
above it, top-p's the smallest logit y whose probability mass at or below y exceeds 1 - top_p,
each found by bisection over the logits' uint32 keys (32 passes over [B, V]). On the 2-core
CPU the sorting filters took 95-112 ms for a [16, 32128] block (`jnp.sort`; and `lax.top_k`,
which XLA:CPU compiled to a full sort there), the bisection 2-3 ms (top-p or top-k) and ~5 ms
(both), against a ~19 ms decode step.

Shape legend: B rows, V vocab, K top-k width.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from t5x_lite import selection
from t5x_lite.argmax import argmax


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a token is chosen from logits. temperature == 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _mask_below(logits_BxV, keys_BxV, threshold_B):
    return jnp.where(keys_BxV < threshold_B[:, None], -jnp.inf, logits_BxV)


def _top_k_threshold(keys_BxV, k: int):
    """Key of each row's k-th largest logit: the smallest key with at least V - k + 1 at or
    below it."""
    b, v = keys_BxV.shape

    def test(x_B, keys):
        n = selection.count(keys <= x_B[:, None], axis=-1)
        return n >= v - k + 1, n

    return selection.bisect(test, (b,), carry=keys_BxV)[0]


def _top_p_threshold(logits_BxV, keys_BxV, top_p: float):
    """Key of the smallest logit top-p keeps: the smallest y with mass(<= y) > 1 - top_p, at
    most the row's largest (always kept)."""
    probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)

    def test(x_B, carry):
        keys, probs = carry
        mass = jnp.sum(jnp.where(keys <= x_B[:, None], probs, 0.0), axis=-1)
        return mass > 1.0 - top_p, mass

    b = keys_BxV.shape[0]
    t_B = selection.bisect(test, (b,), aux0=jnp.zeros((b,), jnp.float32),
                           carry=(keys_BxV, probs_BxV))[0]
    return jnp.minimum(t_B, jnp.max(keys_BxV, axis=-1))


def _min_p_mask(logits_BxV, min_p: float):
    """HF's MinPLogitsWarper: tokens with probability < min_p * the row's top probability go
    (the top token always stays)."""
    probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
    top_B = jnp.max(probs_BxV, axis=-1, keepdims=True)
    return jnp.where(probs_BxV < jnp.float32(min_p) * top_B, -jnp.inf, logits_BxV)


def filter_logits(logits_BxV, cfg: SamplingConfig):
    """Float32 logits after temperature, top-k, top-p and min-p (HF order); removed entries
    are -inf.

    With temperature 0 the logits are returned unscaled (selection is argmax anyway).
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if cfg.temperature not in (0.0, 1.0):
        scaled_BxV = logits_BxV / cfg.temperature
        if cfg.temperature < 1e-4:  # above it, only logits past 3e34 could overflow
            # A tiny temperature overflows finite logits (and XLA:CPU flushes a subnormal one
            # to 0): 1e-38 gave ties of +inf, rows of -inf and NaN, so the wrong tokens. Such
            # rows are scaled after subtracting their max instead, by a finite 1 / temperature:
            # the same (near one-hot) distribution, the max at 0, no NaN.
            inv = min(1.0 / cfg.temperature, float(jnp.finfo(jnp.float32).max))
            shifted_BxV = (logits_BxV - jnp.max(logits_BxV, -1, keepdims=True)) * inv
            overflow_B = jnp.any(~jnp.isfinite(scaled_BxV) & jnp.isfinite(logits_BxV), axis=-1)
            scaled_BxV = jnp.where(overflow_B[:, None], shifted_BxV, scaled_BxV)
        logits_BxV = scaled_BxV
    if 0 < cfg.top_k < logits_BxV.shape[-1]:
        keys_BxV = selection.order_keys(logits_BxV)
        logits_BxV = _mask_below(logits_BxV, keys_BxV, _top_k_threshold(keys_BxV, cfg.top_k))
    if cfg.top_p < 1.0:
        keys_BxV = selection.order_keys(logits_BxV)
        logits_BxV = _mask_below(logits_BxV, keys_BxV,
                                 _top_p_threshold(logits_BxV, keys_BxV, cfg.top_p))
    if cfg.min_p > 0.0:
        logits_BxV = _min_p_mask(logits_BxV, cfg.min_p)
    return logits_BxV


def select_tokens(keys_B, logits_BxV, cfg: SamplingConfig):
    """Next token per row: argmax when greedy, else a categorical sample of the filtered logits.

    Args:
      keys_B: one PRNG key per row (rows sample independently of how they are batched).
      logits_BxV: raw float logits.
    Returns:
      int32 [B].
    """
    if cfg.greedy:
        return argmax(logits_BxV)
    return categorical(keys_B, filter_logits(logits_BxV, cfg))


def categorical(keys_B, logits_BxV):
    """One sample per row of softmax(logits), int32 [B]: `jax.random.categorical(key, row)` for
    each row, bit for bit (the Gumbel-max trick with the same noise), with its argmax taken by
    `t5x_lite.argmax`. On the 2-core CPU, a [16, 32128] block: 7.9 ms through
    `jax.random.categorical` (its `jnp.argmax` is a reduction XLA:CPU does not vectorise),
    1.8 ms here, of which 1.6 ms is drawing the noise."""
    v = logits_BxV.shape[-1]
    gumbel_BxV = jax.vmap(lambda key: jax.random.gumbel(key, (v,), logits_BxV.dtype))(keys_B)
    return argmax(gumbel_BxV + logits_BxV)


def token_log_probs(logits_BxV, tokens_B):
    """log p(token) under the unfiltered distribution softmax(logits), float32 [B]."""
    logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0]


def row_keys(keys_B, step):
    """Per-row keys for decode step `step` (a traced int is fine)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
