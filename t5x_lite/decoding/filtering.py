"""Logit filters and token selection for sampling: temperature, then top-k, top-p, min-p,
typical-p, epsilon and eta cutoffs.

The order and the edge rules are HF's (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`, `MinPLogitsWarper`, `TypicalLogitsWarper`, `EpsilonLogitsWarper`,
`EtaLogitsWarper`, with min_tokens_to_keep=1): top-k keeps every logit >= the k-th largest;
top-p removes the tokens whose cumulative probability, in ascending order, is <= 1 - top_p and
always keeps the most likely one; min-p removes the tokens whose probability is below min_p
times the most likely one's; typical-p (Meister et al. 2022) keeps the tokens whose surprisal
-log p is closest to the entropy H, in order of |-log p - H|, until their mass reaches
typical_p; epsilon removes the tokens with probability < epsilon_cutoff, eta (Hewitt et al.
2022) those below min(eta_cutoff, sqrt(eta_cutoff) * exp(-H)); both keep the most likely one.
Removed logits become -inf. Ties at the top-p cut are kept together (HF removes some of them,
in the order of its unstable sort); so are ties at the typical-p cut, as HF keeps them too.

None sorts (`t5x_lite.selection`): top-k's threshold is the smallest logit with at most k - 1
above it, top-p's the smallest logit y whose probability mass at or below y exceeds 1 - top_p,
typical-p's the smallest distance d from H whose tokens at or below d hold typical_p of the
mass, each found by bisection over uint32 keys (32 passes over [B, V]). On the 2-core
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
    typical_p: float = 1.0  # 1.0 = off
    epsilon_cutoff: float = 0.0  # 0.0 = off
    eta_cutoff: float = 0.0  # 0.0 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.typical_p <= 1.0:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

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
    return _mass_threshold(keys_BxV, jax.nn.softmax(logits_BxV, axis=-1),
                           lambda mass: mass > 1.0 - top_p)


def _mass_threshold(keys_BxV, probs_BxV, enough):
    """Per row, the smallest key x whose tokens at or below it hold a mass `enough(mass)`
    accepts (monotone), at most the row's largest key (the whole row: where rounding keeps
    the full mass from passing)."""
    def test(x_B, carry):
        keys, probs = carry
        mass = jnp.sum(jnp.where(keys <= x_B[:, None], probs, 0.0), axis=-1)
        return enough(mass), mass

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


def _entropy(logp_BxV):
    """-sum p log p per row, float32 [B, 1]; removed (-inf) entries count 0."""
    plogp_BxV = jnp.where(jnp.isinf(logp_BxV), 0.0, jnp.exp(logp_BxV) * logp_BxV)
    return -jnp.sum(plogp_BxV, axis=-1, keepdims=True)


def _typical_mask(logits_BxV, typical_p: float):
    """HF's TypicalLogitsWarper: the tokens in order of |-log p - H|, up to and including the
    one where their mass reaches typical_p, stay (the closest always)."""
    logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    distance_BxV = jnp.abs(-logp_BxV - _entropy(logp_BxV))  # +inf for removed tokens
    keys_BxV = selection.order_keys(distance_BxV)
    t_B = _mass_threshold(keys_BxV, jax.nn.softmax(logits_BxV, axis=-1),
                          lambda mass: mass >= typical_p)
    return jnp.where(keys_BxV > t_B[:, None], -jnp.inf, logits_BxV)


def _cutoff_mask(logits_BxV, epsilon: float, eta: bool):
    """HF's EpsilonLogitsWarper (probability < epsilon goes) or, with `eta`, EtaLogitsWarper
    (< min(epsilon, sqrt(epsilon) exp(-H)) goes); the most likely token always stays."""
    probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
    cut = jnp.float32(epsilon)
    if eta:
        entropy_B1 = _entropy(jax.nn.log_softmax(logits_BxV, axis=-1))
        cut = jnp.minimum(cut, jnp.sqrt(cut) * jnp.exp(-entropy_B1))
    top_B1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
    return jnp.where((probs_BxV < cut) & (logits_BxV < top_B1), -jnp.inf, logits_BxV)


def filter_logits(logits_BxV, cfg: SamplingConfig):
    """Float32 logits after temperature, top-k, top-p, min-p, typical-p, epsilon and eta
    (HF order); removed entries are -inf.

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
    if cfg.typical_p < 1.0:
        logits_BxV = _typical_mask(logits_BxV, cfg.typical_p)
    if cfg.epsilon_cutoff > 0.0:
        logits_BxV = _cutoff_mask(logits_BxV, cfg.epsilon_cutoff, eta=False)
    if cfg.eta_cutoff > 0.0:
        logits_BxV = _cutoff_mask(logits_BxV, cfg.eta_cutoff, eta=True)
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
