"""Logit filters and token selection for sampling: temperature, then top-k, then top-p.

The order and the tie/edge rules are HF's (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper` with min_tokens_to_keep=1): top-k keeps every logit >= the k-th largest;
top-p sorts ascending, removes the tokens whose cumulative probability is <= 1 - top_p and always
keeps the most likely one. Removed logits become -inf.

Shape legend: B rows, V vocab, K top-k width.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from t5x_lite.argmax import argmax


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a token is chosen from logits. temperature == 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _mask_below(logits_BxV, threshold_Bx1):
    return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def _top_p_threshold(sorted_asc_BxK, top_p: float):
    """The smallest logit top-p keeps, from the (maybe top-k reduced) logits sorted ascending."""
    cum_BxK = jnp.cumsum(jax.nn.softmax(sorted_asc_BxK, axis=-1), axis=-1)
    remove_BxK = cum_BxK <= 1.0 - top_p
    remove_BxK = remove_BxK.at[:, -1].set(False)  # always keep the most likely token
    # cum is non-decreasing, so the removed entries are a prefix of the ascending order.
    n_removed_B = jnp.sum(remove_BxK, axis=-1)
    return jnp.take_along_axis(sorted_asc_BxK, n_removed_B[:, None], axis=-1)


def filter_logits(logits_BxV, cfg: SamplingConfig):
    """Float32 logits after temperature, top-k and top-p (HF order); removed entries are -inf.

    With temperature 0 the logits are returned unscaled (selection is argmax anyway).
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if cfg.temperature not in (0.0, 1.0):
        logits_BxV = logits_BxV / cfg.temperature
    v = logits_BxV.shape[-1]
    use_top_k = 0 < cfg.top_k < v
    if use_top_k:
        top_BxK = jax.lax.top_k(logits_BxV, cfg.top_k)[0]  # descending
        logits_BxV = _mask_below(logits_BxV, top_BxK[:, -1:])
    if cfg.top_p < 1.0:
        # After top-k only the k survivors carry probability, so sorting them is enough.
        sorted_asc = top_BxK[:, ::-1] if use_top_k else jnp.sort(logits_BxV, axis=-1)
        logits_BxV = _mask_below(logits_BxV, _top_p_threshold(sorted_asc, cfg.top_p))
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
    filtered_BxV = filter_logits(logits_BxV, cfg)
    return jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)


def token_log_probs(logits_BxV, tokens_B):
    """log p(token) under the unfiltered distribution softmax(logits), float32 [B]."""
    logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0]


def row_keys(keys_B, step):
    """Per-row keys for decode step `step` (a traced int is fine)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
