"""Logit processors that depend on the sequence so far: repetition penalty and min_new_tokens.

Both are HF's, with HF's arithmetic and placement, so decodes with them equal HF `generate`:

  repetition_penalty  (`RepetitionPenaltyLogitsProcessor`, CTRL's rule) every token id already
                      in the row -- its prompt (left padding excluded) and what it generated; for
                      an encoder-decoder, its decoder input: the start id 0 and what it
                      generated -- has its score s replaced by s * penalty where s < 0, else
                      s / penalty. 1.0 = off; > 1 discourages repeats.
  min_new_tokens      (`MinNewTokensLengthLogitsProcessor`) while a row has generated fewer than
                      this many tokens, its stop ids score -inf. 0 = off.

They act before temperature / top-k / top-p (HF's order), on the raw logits for greedy and
sampled decoding and speculative decoding's target and draft, and on the log-softmax of the
logits for beam search (HF applies its processors to the log-probs there, so beams are ranked
by the processed sums). The reported `score` stays the sum of log p(token) under the model.

A row's seen tokens are a [B, V] bool mask carried through the decode loop; it is only built
when the penalty is on.

Shape legend: B rows, P prompt length, V vocab.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from t5x_lite.decoding.stops import StopIds, is_eos, stop_id_tuple

T5_START_ID = 0  # an encoder-decoder's decoder input begins with it (HF: decoder_start_token_id)


@dataclasses.dataclass(frozen=True)
class Processing:
    """The sequence-dependent processors of a decode (static: part of what compiles)."""

    repetition_penalty: float = 1.0  # 1.0 = off
    min_new_tokens: int = 0  # 0 = off
    stop_ids: tuple[int, ...] = ()  # what min_new_tokens holds back

    def __post_init__(self):
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be finite and > 0, got "
                             f"{self.repetition_penalty}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")

    @classmethod
    def of(cls, repetition_penalty: float = 1.0, min_new_tokens: int = 0,
           eos_id: StopIds = ()) -> "Processing | None":
        """The processing, or None when nothing is on (the decode then compiles as without)."""
        stops = stop_id_tuple(eos_id) if min_new_tokens > 0 else ()
        out = cls(float(repetition_penalty), int(min_new_tokens), stops)
        return out if out.active else None

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def active(self) -> bool:
        return self.penalizes or (self.min_new_tokens > 0 and bool(self.stop_ids))


def initial_seen(processing: Processing | None, family: str, prompt_BxP, lengths_B,
                 vocab_size: int):
    """[B, V] bool: the ids the penalty starts from (see module docstring), or None when the
    penalty is off. GPT prompts are left-padded to P with `lengths_B` real tokens; an
    encoder-decoder's decoder starts from its start id alone."""
    if processing is None or not processing.penalizes:
        return None
    b, p = prompt_BxP.shape
    if family != "gpt":
        return jnp.zeros((b, vocab_size), jnp.bool_).at[:, T5_START_ID].set(True)
    real_BxP = jnp.arange(p)[None, :] >= p - lengths_B[:, None]
    ids_BxP = jnp.where(real_BxP, prompt_BxP, vocab_size)  # padding: past the end, dropped
    return jnp.zeros((b, vocab_size), jnp.bool_).at[jnp.arange(b)[:, None], ids_BxP].set(
        True, mode="drop")


def add_seen(seen_BxV, tokens_B, keep_B=None):
    """`seen_BxV` with each row's token added (where `keep_B`); None stays None."""
    if seen_BxV is None:
        return None
    b, v = seen_BxV.shape
    ids_B = tokens_B if keep_B is None else jnp.where(keep_B, tokens_B, v)
    return seen_BxV.at[jnp.arange(b), ids_B].set(True, mode="drop")


def process(processing: Processing | None, scores_BxV, seen_BxV, generated):
    """Scores (as float32; unchanged without `processing`) after the penalty (on `seen_BxV`) and min_new_tokens (`generated`: tokens
    each row has generated before this one, a scalar or [B]). Leading axes beyond B are fine
    when `seen` and `generated` broadcast to them."""
    if processing is None:
        return scores_BxV
    scores_BxV = scores_BxV.astype(jnp.float32)
    if processing.penalizes:
        r = jnp.float32(processing.repetition_penalty)
        penalised = jnp.where(scores_BxV < 0, scores_BxV * r, scores_BxV / r)
        scores_BxV = jnp.where(seen_BxV, penalised, scores_BxV)
    if processing.min_new_tokens > 0 and processing.stop_ids:
        early = jnp.asarray(generated) < processing.min_new_tokens
        stop_V = is_eos(jnp.arange(scores_BxV.shape[-1]), processing.stop_ids)
        held = jnp.expand_dims(early, -1) & stop_V
        scores_BxV = jnp.where(held, -jnp.inf, scores_BxV)
    return scores_BxV
