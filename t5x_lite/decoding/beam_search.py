"""Beam search, as one `lax.while_loop` over a KV-cached step, by T5X's rule or by HF's.

T5X's rule (`BeamRule()`, the default): each step expands the W alive beams by every token,
keeps the 2W best candidates by summed log-prob ((1 + S) W with S > 1 stop ids, as HF keeps);
the best W of them that do not end in EOS stay alive, and the ones that do end in EOS compete
with the finished set, scored by

    score = sum log p / ((5 + length) / 6) ** alpha       (length counts EOS; alpha 0 = log-prob)

The search stops at the length budget or when no alive beam can still beat the worst finished
one (for alpha >= 0 the alive bound uses the largest penalty, at the budget: exact, not a
heuristic; with a positive `sequence_bias` a processed log-prob can be above 0 and a sum can
still rise, so such a search runs to the budget). A batch element with fewer than W finished
beams at the end is filled with its best alive beams (unfinished, scored at their length);
finished beams always rank first.

A beam that completes a stop string (`stop_strings`) ends as one ending in EOS does (HF's
rule: its stopping criteria end beams), keeping the token.

HF's rule (`BeamRule(hf=True, penalty=length_penalty, early_stopping=...)`, HF `generate`'s
beam search in transformers 5): the same (1 + S) W candidates and alive beams, but

    score = sum log p / length ** length_penalty           (length counts EOS)

only the top W ranked candidates that end (EOS, a stop string, or the length budget: at the
last step every one of them ends) may join the finished set; with early_stopping "true" an
element stops taking finished beams once it holds W of them, with "false" once its best alive
beam, scored at its current length, cannot beat its worst finished one (HF's heuristic), with
"never" the same test at the budget's length when length_penalty > 0 (exact). The search stops
when every element is done that way, and returns each element's finished set, best first
(full by then: at the budget the top W candidates finish).

With T5X's rule every EOS candidate among the (1 + S) W may finish; both rules agree (at
alpha = length_penalty = 0) whenever no EOS candidate ranked below W would enter the final top
beams and every beam ends in EOS within the budget.

Shape legend: B batch, W beams, N max new tokens, V vocab.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite.decoding import processors
from t5x_lite.decoding.processors import History, Processing, process
from t5x_lite.decoding.sampling import EOS_ID, PAD_ID, StepFn
from t5x_lite.decoding.stop_strings import StopStrings, advance, initial_state
from t5x_lite.decoding.stops import StopIds, is_eos, stop_id_tuple

NEG = -1.0e9  # "impossible" score; finite so arithmetic on it stays NaN-free


def length_penalty(length, alpha: float):
    """T5's brevity penalty ((5 + length) / 6) ** alpha."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


EARLY_STOPPING = ("false", "true", "never")  # HF's early_stopping False / True / "never"


class BeamRule(NamedTuple):
    """How beams are scored and when the search ends (part of the compiled program).

    hf False: T5X's rule, `penalty` is alpha of ((5 + length) / 6) ** alpha. hf True: HF's,
    `penalty` is length_penalty of length ** length_penalty, `early_stopping` one of
    `EARLY_STOPPING` (module docstring)."""

    hf: bool = False
    penalty: float = 0.6
    early_stopping: str = "false"

    def divisor(self, length, n: int):
        """What a sum of log-probs of `length` tokens (1..n) is divided by. HF's is computed
        as HF's is, in float64 and then rounded to float32; the division itself may differ from
        torch's by an ulp (XLA multiplies by the reciprocal)."""
        if not self.hf:
            return length_penalty(length, self.penalty)
        table = np.maximum(np.arange(n + 1, dtype=np.float64), 1.0) ** self.penalty
        return jnp.asarray(table.astype(np.float32))[length]


class BeamOutput(NamedTuple):
    tokens_BxWxN: jax.Array  # int32, best beam first; pad (0) after EOS / after the length
    scores_BxW: jax.Array  # float32, length-penalised
    logprob_BxW: jax.Array  # float32, sum of the (processed) log-probs beams are ranked by
    lengths_BxW: jax.Array  # int32, generated tokens including EOS
    finished_BxW: jax.Array  # bool, ended with EOS
    model_logprob_BxW: jax.Array  # float32, sum of the model's log-probs (= logprob unprocessed)
    token_logprob_BxWxN: jax.Array  # float32, the model's log-prob of each token; 0 after


class _State(NamedTuple):
    step: jax.Array  # tokens generated so far by every alive beam
    alive_seq: jax.Array  # [B, W, N]
    alive_logp: jax.Array  # [B, W], processed (what ranks)
    alive_tok_logp: jax.Array  # [B, W, N], the model's per token
    fin_seq: jax.Array  # [B, W, N]
    fin_score: jax.Array
    fin_logp: jax.Array
    fin_tok_logp: jax.Array
    fin_len: jax.Array
    fin_flag: jax.Array
    cache: Any
    history: History | None  # [B * W] rows: what the processors read (None: none on)
    alive_matched: jax.Array | None  # [B, W, S] stop-string states (None: no stop strings)
    open: jax.Array  # [B] HF's rule: the element may still take finished beams


def _gather(x_BxCx, idx_BxW):
    """x[b, idx[b, w], ...] for every b, w."""
    idx = idx_BxW.reshape(idx_BxW.shape + (1,) * (x_BxCx.ndim - 2))
    return jnp.take_along_axis(x_BxCx, idx, axis=1)


def beam_search(tokens_to_logits: StepFn, cache, first_logits_BWxV, *, num_beams: int,
                max_new_tokens: int, rule: BeamRule,
                reorder_cache: Callable[[Any, jax.Array], Any], eos_id: StopIds = EOS_ID,
                processing: Processing | None = None, history: History | None = None,
                stops: StopStrings | None = None) -> BeamOutput:
    """Beam search over B*W cache rows (row b*W + w is beam w of element b).

    Args:
      tokens_to_logits: `(ids [B*W, 1], cache) -> (logits [B*W, 1, V], cache)`.
      cache: the prefilled cache, already repeated to B*W rows (all beams of an element equal).
      first_logits_BWxV: logits predicting the first token, repeated likewise.
      reorder_cache: `(cache, rows [B*W]) -> cache` taking those rows (see cache.take_rows).
      eos_id: the stop id, or a tuple of them. With S > 1 stop ids a step keeps the
        (1 + S) * W best candidates (as HF does), of which at most S * W end in a stop id.
      processing, history: the repetition penalty, no-repeat n-grams and min_new_tokens and
        the rows' histories (`processors`), applied to the log-probs as HF does in beam search;
        beams are ranked by the processed sums, `model_logprob_BxW` keeps the model's.
      stops: stop strings (`stop_strings.tables`): a candidate completing one ends there.
      rule: T5X's or HF's scoring and stopping (`BeamRule`).
    """
    w, n = num_beams, max_new_tokens
    bw, v = first_logits_BWxV.shape
    candidates = min(max(2, 1 + len(stop_id_tuple(eos_id))) * w, w * v)
    b = bw // w
    row_base_Bx1 = (jnp.arange(b) * w)[:, None]

    def expand(s: _State, logits_BWxV):
        """One beam step from the alive beams' next-token logits; returns the new state."""
        i = s.step
        model_BWxV = jax.nn.log_softmax(logits_BWxV.astype(jnp.float32), -1)
        logp_BxWxV = process(processing, model_BWxV, s.history, i).reshape(b, w, v)
        cand_BxWV = (s.alive_logp[:, :, None] + logp_BxWxV).reshape(b, w * v)
        top_logp_BxC, top_idx = jax.lax.top_k(cand_BxWV, candidates)
        top_beam, top_tok = top_idx // v, (top_idx % v).astype(jnp.int32)
        tok_logp_BxC = _gather(model_BWxV.reshape(b, w * v), top_idx)
        top_tok_logp = jax.lax.dynamic_update_slice(
            _gather(s.alive_tok_logp, top_beam), tok_logp_BxC[:, :, None], (0, 0, i))
        top_seq = _gather(s.alive_seq, top_beam)
        top_seq = jax.lax.dynamic_update_slice(top_seq, top_tok[:, :, None], (0, 0, i))
        # Candidates of placeholder beams (score ~NEG) appear only when V is tiny: never finish.
        matched = None if stops is None else _gather(s.alive_matched, top_beam)
        matched, hit_BxC = advance(stops, matched, top_tok)
        stopped = is_eos(top_tok, eos_id) | hit_BxC
        ends = stopped & (top_logp_BxC > NEG / 2)

        # Alive: the best W candidates that did not end (at most S * W of the (1 + S) * W end
        # at stop ids; with stop strings, more may: the alive slots left are placeholders).
        alive_logp, keep = jax.lax.top_k(jnp.where(ends, NEG, top_logp_BxC), w)
        alive_seq = _gather(top_seq, keep)
        alive_tok_logp = _gather(top_tok_logp, keep)
        parent_rows = (row_base_Bx1 + jnp.take_along_axis(top_beam, keep, 1)).reshape(-1)
        history = processors.extend(processors.take_rows(s.history, parent_rows),
                                    _gather(top_tok, keep).reshape(-1))

        # Finished: merge the new EOS candidates into the best W finished so far.
        finishing = ends
        if rule.hf:  # the top W that end, the budget ending all; not once the element is done
            full_Bx1 = jnp.all(s.fin_score > NEG / 2, 1, keepdims=True)
            finishing = ((stopped | (i + 1 >= n)) & (jnp.arange(candidates) < w)
                         & (top_logp_BxC > NEG / 2) & s.open[:, None]
                         & ~(full_Bx1 & (rule.early_stopping == "true")))
        new_score = jnp.where(finishing, top_logp_BxC / rule.divisor(i + 1, n), NEG)
        pool_score = jnp.concatenate([s.fin_score, new_score], 1)
        fin_score, pick = jax.lax.top_k(pool_score, w)
        fin_seq = _gather(jnp.concatenate([s.fin_seq, top_seq], 1), pick)
        fin_logp = _gather(jnp.concatenate([s.fin_logp, top_logp_BxC], 1), pick)
        fin_tok_logp = _gather(jnp.concatenate([s.fin_tok_logp, top_tok_logp], 1), pick)
        fin_len = _gather(jnp.concatenate([s.fin_len, jnp.full_like(top_tok, i + 1)], 1), pick)
        fin_flag = _gather(jnp.concatenate([s.fin_flag, ends], 1), pick)
        still_open = s.open
        if rule.hf:  # HF's test of whether the best alive beam may still beat a finished one
            best_len = n if rule.early_stopping == "never" and rule.penalty > 0 else i + 1
            best_Bx1 = alive_logp[:, :1] / rule.divisor(best_len, n)
            worst_BxW = jnp.where(fin_score > NEG / 2, jnp.min(fin_score, 1, keepdims=True), NEG)
            still_open = s.open & jnp.any(best_Bx1 > worst_BxW, 1)
        return _State(i + 1, alive_seq, alive_logp, alive_tok_logp, fin_seq,
                      fin_score, fin_logp, fin_tok_logp, fin_len, fin_flag,
                      reorder_cache(s.cache, parent_rows), history,
                      None if matched is None else _gather(matched, keep), still_open)

    zeros_seq = jnp.zeros((b, w, n), jnp.int32)
    init_logp = jnp.tile(jnp.array([0.0] + [NEG] * (w - 1), jnp.float32), (b, 1))
    zeros_f, zeros_tok = jnp.zeros((b, w), jnp.float32), jnp.zeros((b, w, n), jnp.float32)
    state = _State(jnp.int32(0), zeros_seq, init_logp, zeros_tok, zeros_seq,
                   jnp.full((b, w), NEG), zeros_f, zeros_tok,
                   jnp.zeros((b, w), jnp.int32), jnp.zeros((b, w), jnp.bool_), cache, history,
                   initial_state(stops, (b, w)), jnp.ones((b,), jnp.bool_))
    state = expand(state, first_logits_BWxV)
    best_possible_bound = rule.divisor(n if rule.penalty >= 0 else 1, n)
    rising = processing is not None and processing.raises_scores

    def cond(s: _State):
        if rule.hf:  # HF's end of the search (where every candidate ends, the loop goes on
            # to the budget, finishing nothing more: a step's placeholder beams never finish)
            full = jnp.all(s.fin_score > NEG / 2)
            return ((s.step < n) & jnp.any(s.open)
                    & ~(full & (rule.early_stopping == "true")))
        if rising:  # the bound assumes summed scores only fall: run to the budget
            return s.step < n
        best_alive_B = s.alive_logp[:, 0] / best_possible_bound
        worst_fin_B = jnp.where(jnp.all(s.fin_flag, 1), jnp.min(s.fin_score, 1), NEG)
        return (s.step < n) & ~jnp.all(worst_fin_B > best_alive_B)

    def body(s: _State):
        last_BW = jax.lax.dynamic_index_in_dim(s.alive_seq, s.step - 1, 2, False).reshape(-1)
        logits_BWx1xV, cache = tokens_to_logits(last_BW[:, None], s.cache)
        return expand(s._replace(cache=cache), logits_BWx1xV[:, 0])

    s = jax.lax.while_loop(cond, body, state)
    return _finalize(s, w, rule, processed=processing is not None)


def _finalize(s: _State, w: int, rule: BeamRule, processed: bool) -> BeamOutput:
    """The best W beams, best first. T5X's rule: finished (first) and alive (filling in) beams;
    HF's: the finished set (already best first). The model's log-prob sums are the ranked
    sums, or with `processed` log-probs their tokens' sums."""
    if rule.hf:
        score, flag, length, seq, tok_logp, logp = (
            s.fin_score, s.fin_flag, s.fin_len, s.fin_seq, s.fin_tok_logp, s.fin_logp)
    else:
        alive_len = jnp.broadcast_to(s.step, s.alive_logp.shape).astype(jnp.int32)
        alive_score = s.alive_logp / rule.divisor(alive_len, s.alive_seq.shape[-1])
        cat = lambda a, c: jnp.concatenate([a, c], 1)
        score, flag = cat(s.fin_score, alive_score), cat(s.fin_flag, jnp.zeros_like(s.fin_flag))
        # Lexicographic (finished first, then score): two stable sorts, no score offsets that
        # would cost float32 precision. Empty finished slots (score NEG) sort after alive beams.
        by_score = jnp.argsort(-score, axis=1, stable=True)
        pick = _gather(by_score, jnp.argsort(~_gather(flag, by_score), axis=1, stable=True))[:, :w]
        score, flag, length, seq, tok_logp, logp = (
            _gather(x, pick) for x in (score, flag, cat(s.fin_len, alive_len),
                                       cat(s.fin_seq, s.alive_seq),
                                       cat(s.fin_tok_logp, s.alive_tok_logp),
                                       cat(s.fin_logp, s.alive_logp)))
    within = jnp.arange(seq.shape[-1]) < length[..., None]
    seq = jnp.where(within, seq, PAD_ID)
    tok_logp = jnp.where(within, tok_logp, 0.0)
    return BeamOutput(seq, score, logp, length, flag,
                      jnp.sum(tok_logp, -1) if processed else logp, tok_logp)
