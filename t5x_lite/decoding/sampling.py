"""Greedy and sampled decoding as one `lax.while_loop` over a KV-cached step function.

The step is `tokens_to_logits(ids_BxT, cache) -> (logits_BxTxV, cache)`: it writes the chunk at
the cache cursor and returns float logits. The caller has already run the prompt (prefill) and
passes the logits of its last position; from there the loop picks one token, feeds it, and
repeats, so `max_new_tokens` tokens cost `max_new_tokens - 1` steps. Rows stop independently at
EOS (later slots hold pad 0) or at a stop string (`stop_strings`); the loop ends when every
row is done or the budget is spent.

`eos_id`, here and in beam search and speculative decoding, is one stop id or a tuple of them
(`stops`), as HF `generate`'s list `eos_token_id`. The repetition penalty, no-repeat n-grams
and min_new_tokens (`processors`) act on the logits before a token is chosen.

Shape legend: B rows, N max new tokens, V vocab.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from t5x_lite.decoding.cache import grow, while_in_phases
from t5x_lite.decoding.filtering import SamplingConfig, row_keys, select_tokens, token_log_probs
from t5x_lite.decoding.processors import History, Processing, extend, process
from t5x_lite.decoding.stop_strings import StopStrings, advance, initial_state
from t5x_lite.decoding.stops import StopIds, is_eos

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]
EOS_ID = 1
PAD_ID = 0


class DecodeOutput(NamedTuple):
    tokens_BxN: jax.Array  # int32; EOS kept, pad (0) after it
    lengths_B: jax.Array  # int32; generated tokens including EOS
    logprob_B: jax.Array  # float32; sum of log p(token) under the unfiltered model
    finished_B: jax.Array  # bool; the row produced EOS (or completed a stop string)
    token_logprob_BxN: jax.Array  # float32; log p(token) of each token as logprob_B; 0 after


class _State(NamedTuple):
    step: jax.Array
    last_B: jax.Array
    cache: Any
    out: DecodeOutput
    history: History | None  # what the processors read (None: none on)
    matched: jax.Array | None  # [B, S] stop-string states (None: no stop strings)


def sample_decode(tokens_to_logits: StepFn, cache, first_logits_BxV, keys_B, *,
                  max_new_tokens: int, sampling: SamplingConfig, eos_id: StopIds = EOS_ID,
                  grow_to: tuple[int, ...] = (), processing: Processing | None = None,
                  history: History | None = None, stops: StopStrings | None = None
                  ) -> DecodeOutput:
    """Greedy (sampling.temperature == 0) or sampled decoding.

    Args:
      tokens_to_logits: the cached step function (see module docstring).
      cache: the cache after prefill, with room for `max_new_tokens - 1` more tokens (or, with
        `grow_to`, for the first phase).
      first_logits_BxV: logits predicting the first new token.
      keys_B: one PRNG key per row; step i uses fold_in(key, i), so a row's samples do not
        depend on the other rows in its batch.
      grow_to: decode in phases over a growing cache (a decode-mode model's cache, see
        decoding.cache). A step's attention reads every slot the cache has, so the loop runs
        while the cache has room, then `cache.grow` gives it the next of the `grow_to` lengths,
        and so on: one loop per phase, the last with room for the whole budget. The output is
        the same as with one cache.
      processing, history: the repetition penalty, no-repeat n-grams and min_new_tokens
        (`processors`), with each row's history before the first new token
        (`processors.initial_history`; None when no processor reads it).
      stops: stop strings' tables (`stop_strings.tables`): a row also ends at the token that
        completes one of them, keeping it.
    """
    b = first_logits_BxV.shape[0]
    n = max_new_tokens
    empty = DecodeOutput(jnp.zeros((b, n), jnp.int32), jnp.zeros((b,), jnp.int32),
                         jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.bool_),
                         jnp.zeros((b, n), jnp.float32))

    def record(out: DecodeOutput, history, matched, step, logits_BxV):
        scores_BxV = process(processing, logits_BxV, history, step)
        tok_B = select_tokens(row_keys(keys_B, step), scores_BxV, sampling)
        done_B = out.finished_B
        tok_B = jnp.where(done_B, PAD_ID, tok_B)
        logp_B = jnp.where(done_B, 0.0, token_log_probs(logits_BxV, tok_B))
        matched, hit_B = advance(stops, matched, tok_B)
        return tok_B, extend(history, tok_B, ~done_B), matched, DecodeOutput(
            tokens_BxN=jax.lax.dynamic_update_slice(out.tokens_BxN, tok_B[:, None], (0, step)),
            lengths_B=out.lengths_B + (~done_B).astype(jnp.int32),
            logprob_B=out.logprob_B + logp_B,
            finished_B=done_B | is_eos(tok_B, eos_id) | hit_B,
            token_logprob_BxN=jax.lax.dynamic_update_slice(out.token_logprob_BxN,
                                                           logp_B[:, None], (0, step)))

    last_B, history, matched, out = record(empty, history, initial_state(stops, (b,)), 0,
                                           first_logits_BxV)
    state = _State(jnp.int32(1), last_B, cache, out, history, matched)

    def body(s: _State):
        logits_Bx1xV, cache = tokens_to_logits(s.last_B[:, None], s.cache)
        last_B, history, matched, out = record(s.out, s.history, s.matched, s.step,
                                               logits_Bx1xV[:, 0])
        return _State(s.step + 1, last_B, cache, out, history, matched)

    state = while_in_phases(
        lambda s: (s.step < n) & ~jnp.all(s.out.finished_B), body, state, grow_to,
        cache_of=lambda s: s.cache,
        grow_caches=lambda s, length: s._replace(cache=grow(s.cache, length)))
    return state.out
