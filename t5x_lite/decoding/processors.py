"""Logit processors that depend on the sequence so far: sequence bias, repetition penalty,
no-repeat n-grams, bad words, min_new_tokens and suppressed tokens.

All are HF's, with HF's arithmetic and placement (in this order), so decodes with them equal HF
`generate`. A row's history is its prompt without left padding (GPT) or its decoder input
(encoder-decoder: the start id 0, not the encoder's input), then what it generated:

  sequence_bias         (`SequenceBiasLogitsProcessor`) ((ids...), bias) pairs: the last id's
                        score gets `bias` added where the history ends with the ids before it
                        (always, for one id). Biases of sequences with the same last id add up.
  repetition_penalty    (`RepetitionPenaltyLogitsProcessor`, CTRL's rule) every id in the
                        history has its score s replaced by s * penalty where s < 0, else
                        s / penalty. 1.0 = off; > 1 discourages repeats.
  no_repeat_ngram_size  (`NoRepeatNGramLogitsProcessor`) n: a token that would complete an
                        n-gram already in the history scores -inf. 0 = off. (HF counts a GPT
                        row's left padding as history too, so a padded row's n-grams can
                        depend on its batch there; here they never do.)
  bad_words_ids         (`NoBadWordsLogitsProcessor`) id sequences never generated: the last
                        id scores -inf where the history ends with the ids before it. A
                        single-id bad word that is a stop id is left out, as in HF.
  min_new_tokens        (`MinNewTokensLengthLogitsProcessor`) while a row has generated fewer
                        than this many tokens, its stop ids score -inf. 0 = off.
  suppress_tokens       (`SuppressTokensLogitsProcessor`) these ids always score -inf;
  begin_suppress_tokens (`SuppressTokensAtBeginLogitsProcessor`) these at the first new token.

A sequence's ids before its last (a bias's or bad word's prefix) must all lie in the history:
as for n-grams, HF also matches them against a GPT row's left padding.

They act before the sampling filters (temperature, top-k, top-p, min-p, typical-p, epsilon,
eta: HF's order), on the raw logits for greedy
and sampled decoding and speculative decoding's target and draft, and on the log-softmax of the
logits for beam search (HF applies its processors to the log-probs there, so beams are ranked
by the processed sums). The reported `score` stays the sum of log p(token) under the model.

The history is carried through the decode loop as `History`: a [B, V] mask of seen ids (only
with the penalty) and the ids themselves (only with the n-gram rule or a sequence of several
ids).

Shape legend: B rows, P prompt length, L history slots, V vocab.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite.decoding.stops import StopIds, stop_id_tuple

T5_START_ID = 0  # an encoder-decoder's decoder input begins with it (HF: decoder_start_token_id)


@dataclasses.dataclass(frozen=True)
class Processing:
    """The sequence-dependent processors of a decode (static: part of what compiles)."""

    repetition_penalty: float = 1.0  # 1.0 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    min_new_tokens: int = 0  # 0 = off
    stop_ids: tuple[int, ...] = ()  # what min_new_tokens holds back
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()  # ((ids, bias), ...)
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be finite and > 0, got "
                             f"{self.repetition_penalty}")
        if self.min_new_tokens < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"min_new_tokens and no_repeat_ngram_size must be >= 0, got "
                             f"{self.min_new_tokens}, {self.no_repeat_ngram_size}")

    @classmethod
    def of(cls, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
           min_new_tokens: int = 0, eos_id: StopIds = (), sequence_bias=(), bad_words_ids=(),
           suppress_tokens=(), begin_suppress_tokens=()) -> "Processing | None":
        """The processing, or None when nothing is on (the decode then compiles as without).
        Single-id bad words that are stop ids are left out (HF's rule)."""
        stops = stop_id_tuple(eos_id)
        bad = tuple(w for w in bad_words_ids if not (len(w) == 1 and w[0] in stops))
        out = cls(float(repetition_penalty), int(no_repeat_ngram_size), int(min_new_tokens),
                  stops if min_new_tokens > 0 else (), tuple(sequence_bias), bad,
                  tuple(suppress_tokens), tuple(begin_suppress_tokens))
        return out if out.active else None

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def holds_stops(self) -> bool:
        return self.min_new_tokens > 0 and bool(self.stop_ids)

    @property
    def active(self) -> bool:
        return (self.penalizes or self.no_repeat_ngram_size > 0 or self.holds_stops
                or bool(self.sequence_bias or self.bad_words_ids or self.suppress_tokens
                        or self.begin_suppress_tokens))

    @property
    def raises_scores(self) -> bool:
        """Whether a processed log-prob can be above 0 (a positive sequence bias), so that a
        beam's summed score can still rise."""
        return any(bias > 0 for _, bias in self.sequence_bias)

    @property
    def reads_ids(self) -> bool:
        """Whether a processor reads the history's ids: n-grams, sequences of several ids."""
        return self.no_repeat_ngram_size > 0 or any(
            len(ids) > 1 for ids in (*self.bad_words_ids, *(i for i, _ in self.sequence_bias)))


class History(NamedTuple):
    """What the processors read of each row's history (None fields: not needed)."""

    seen: Any  # [B, V] bool: the ids in the history (the penalty)
    ids: Any  # [B, L] int32: the history, from slot `start` to slot `length` - 1 (n-grams)
    start: Any  # [B] int32
    length: Any  # int32 scalar: slots filled (the same for every row)


def initial_history(processing: Processing | None, family: str, prompt_BxP, lengths_B,
                    vocab_size: int, room: int) -> History | None:
    """The history before the first new token (see module docstring), with `room` free slots
    for the ids to come; None when no processor needs one. GPT prompts are left-padded to P
    with `lengths_B` real tokens."""
    if processing is None or not (processing.penalizes or processing.reads_ids):
        return None
    b, p = prompt_BxP.shape
    if family == "gpt":
        ids_BxP, start_B = prompt_BxP.astype(jnp.int32), p - lengths_B.astype(jnp.int32)
    else:
        ids_BxP, start_B = jnp.full((b, 1), T5_START_ID, jnp.int32), jnp.zeros((b,), jnp.int32)
    seen = None
    if processing.penalizes:
        real_BxP = jnp.arange(ids_BxP.shape[1])[None, :] >= start_B[:, None]
        seen = jnp.zeros((b, vocab_size), jnp.bool_).at[
            jnp.arange(b)[:, None], jnp.where(real_BxP, ids_BxP, vocab_size)].set(
                True, mode="drop")  # padding: past the end, dropped
    ids = None
    if processing.reads_ids:
        ids = jnp.concatenate([ids_BxP, jnp.zeros((b, room), jnp.int32)], 1)
    return History(seen, ids, start_B, jnp.int32(ids_BxP.shape[1]))


def extend(history: History | None, tokens_B, keep_B=None) -> History | None:
    """`history` with each row's token appended (counted as seen where `keep_B`)."""
    if history is None:
        return None
    seen, ids = history.seen, history.ids
    if seen is not None:
        b, v = seen.shape
        seen = seen.at[jnp.arange(b), tokens_B if keep_B is None else
                       jnp.where(keep_B, tokens_B, v)].set(True, mode="drop")
    if ids is not None:
        ids = jax.lax.dynamic_update_slice(ids, tokens_B.astype(jnp.int32)[:, None],
                                           (0, history.length))
    return History(seen, ids, history.start, history.length + 1)


def take_rows(history: History | None, rows_R) -> History | None:
    """The histories of rows `rows_R` (beam search's parents)."""
    if history is None:
        return None
    pick = lambda x: None if x is None else x[rows_R]
    return History(pick(history.seen), pick(history.ids), history.start[rows_R],
                   history.length)


def extensions(history: History | None, tokens_BxK) -> list:
    """[history, history + tokens[:, :1], ..., history + tokens]: the K + 1 histories of the
    positions a speculative target pass scores (None entries when `history` is None)."""
    out = [history]
    for j in range(tokens_BxK.shape[1] if history is not None else 0):
        out.append(extend(out[-1], tokens_BxK[:, j]))
    return out if history is not None else [None] * (tokens_BxK.shape[1] + 1)


def nth_extension(extended: list, m) -> History | None:
    """`extended[m]` of `extensions(...)` for a traced m: the history plus the first m tokens."""
    first, last = extended[0], extended[-1]
    if first is None:
        return None
    seen = None if first.seen is None else jax.lax.dynamic_index_in_dim(
        jnp.stack([h.seen for h in extended], 1), m, 1, False)
    # The ids past slot `length` are never read: the last extension's serve every m.
    return History(seen, last.ids, first.start, first.length + m)


def ngram_bans(history: History, n: int, vocab_size: int):
    """[B, V] bool: the tokens that would complete an n-gram already in the history (HF's
    NoRepeatNGramLogitsProcessor: each window whose first n - 1 ids are the history's last
    n - 1 bans its last id)."""
    ids, cur = history.ids, history.length
    b, slots = ids.shape
    w = slots - n + 1  # window starts
    if w <= 0:  # no room for an n-gram
        return jnp.zeros((b, vocab_size), jnp.bool_)
    suffix = jax.lax.dynamic_slice_in_dim(ids, jnp.maximum(cur - (n - 1), 0), n - 1, axis=1)
    match = jnp.ones((b, w), jnp.bool_)
    for o in range(n - 1):
        match = match & (ids[:, o:o + w] == suffix[:, o:o + 1])
    s_W = jnp.arange(w)
    match = match & (s_W[None, :] >= history.start[:, None]) & (s_W[None, :] <= cur - n)
    banned = jnp.where(match, ids[:, n - 1:n - 1 + w], vocab_size)
    return jnp.zeros((b, vocab_size), jnp.bool_).at[jnp.arange(b)[:, None], banned].set(
        True, mode="drop")


def ends_with(history: History, prefixes_SxM):
    """[B, S] bool: whether each row's history ends with each of the S prefixes of M ids (all
    of it in the history, not in a GPT row's left padding; never when M ids do not fit)."""
    s, m = prefixes_SxM.shape
    b, slots = history.ids.shape
    if m > slots:
        return jnp.zeros((b, s), jnp.bool_)
    tail_BxM = jax.lax.dynamic_slice_in_dim(history.ids, jnp.maximum(history.length - m, 0), m,
                                            axis=1)
    same_BxS = jnp.all(tail_BxM[:, None, :] == jnp.asarray(prefixes_SxM)[None], axis=-1)
    return same_BxS & (history.length - m >= history.start)[:, None]


def sequence_bias(pairs, history: History | None, b: int, vocab_size: int):
    """[B, V] float32: what HF's SequenceBiasLogitsProcessor adds for `pairs` ((ids, bias),
    ...): each bias on its last id where the history ends with the ids before it. Sequences
    with prefixes of the same length are matched together (one compare and one scatter-add
    per length, as HF groups them)."""
    static_V = np.zeros((vocab_size,), np.float32)
    by_length: dict[int, list] = {}
    for ids, bias in pairs:
        if len(ids) == 1:
            static_V[ids[0]] = bias  # set: HF's dict holds one bias per sequence
        else:
            by_length.setdefault(len(ids) - 1, []).append((ids, bias))
    bias_BxV = jnp.broadcast_to(jnp.asarray(static_V), (b, vocab_size))
    for group in by_length.values():
        prefixes_SxM = np.array([ids[:-1] for ids, _ in group], np.int32)
        last_S = np.array([ids[-1] for ids, _ in group], np.int32)
        biases_S = np.array([bias for _, bias in group], np.float32)
        on_BxS = ends_with(history, prefixes_SxM)
        bias_BxV = bias_BxV.at[:, last_S].add(jnp.where(on_BxS, biases_S[None], 0.0))
    return bias_BxV


def process(processing: Processing | None, scores_BxV, history: History | None, generated):
    """Scores (as float32; unchanged without `processing`) after the sequence bias, the
    penalty, the n-gram rule, bad words, min_new_tokens and suppressed tokens (`generated`:
    the tokens each row has generated before this one)."""
    if processing is None:
        return scores_BxV
    scores_BxV = scores_BxV.astype(jnp.float32)
    b, v = scores_BxV.shape
    if processing.sequence_bias:
        scores_BxV = scores_BxV + sequence_bias(processing.sequence_bias, history, b, v)
    if processing.penalizes:
        r = jnp.float32(processing.repetition_penalty)
        penalised = jnp.where(scores_BxV < 0, scores_BxV * r, scores_BxV / r)
        scores_BxV = jnp.where(history.seen, penalised, scores_BxV)
    if processing.no_repeat_ngram_size:
        banned = ngram_bans(history, processing.no_repeat_ngram_size, scores_BxV.shape[-1])
        scores_BxV = jnp.where(banned, -jnp.inf, scores_BxV)
    if processing.bad_words_ids:
        bad = tuple((ids, -math.inf) for ids in processing.bad_words_ids)  # -inf twice: -inf
        scores_BxV = scores_BxV + sequence_bias(bad, history, b, v)
    if processing.holds_stops:
        stop_V = _id_mask(processing.stop_ids, v)
        scores_BxV = jnp.where((generated < processing.min_new_tokens) & stop_V, -jnp.inf,
                               scores_BxV)
    if processing.suppress_tokens:
        scores_BxV = jnp.where(_id_mask(processing.suppress_tokens, v), -jnp.inf, scores_BxV)
    if processing.begin_suppress_tokens:
        at_begin_V = (generated == 0) & _id_mask(processing.begin_suppress_tokens, v)
        scores_BxV = jnp.where(at_begin_V, -jnp.inf, scores_BxV)
    return scores_BxV


def _id_mask(ids, vocab_size: int):
    """[V] bool constant: True at `ids`."""
    mask_V = np.zeros((vocab_size,), np.bool_)
    mask_V[list(ids)] = True
    return jnp.asarray(mask_V)
