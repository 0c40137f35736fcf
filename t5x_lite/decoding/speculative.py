"""Speculative decoding for decoder-only models: a draft proposes k tokens, the target checks them.

Per iteration (one `lax.while_loop` step):
  1. the draft proposes d_1..d_k autoregressively in k steps. Its first step feeds TWO tokens,
     [prev, last], one slot before the target's cursor: `prev` (the committed token before
     `last`) is either already in the draft cache (rewritten with identical K/V) or, after a
     fully accepted iteration, the last draft d_k that the draft never fed. So the draft cache
     stays in step with no extra pass;
  2. the target feeds [last, d_1..d_k] in ONE pass and gets the logits for k+1 positions;
  3. each row accepts a prefix of the proposals: greedy -- d_j equals the target's argmax;
     sampling -- the standard rule (Leviathan et al. 2023): accept d_j with probability
     min(1, p(d_j) / q(d_j)), on the first rejection sample from norm(max(0, p - q)), and if all k
     are accepted take a bonus token from p. p and q are the target's and the draft's
     distributions after the same temperature / top-k / top-p, so outputs follow the target's
     filtered distribution exactly;
  4. the cache cursor is ONE scalar shared by all rows, so every row advances by m + 1 tokens
     where m is the minimum accepted count over the unfinished rows. A row that accepted more
     keeps its own accepted token at position m + 1 (a valid target sample) and drops the rest;
     rows that are done do not hold the others back. Both cursors are then set back to
     `old + 1 + m`; the stale slots after it are invisible by slot causality and overwritten next.

With greedy selection the output is token for token the target's greedy output (for any batch
size). Larger batches accept less per iteration (the minimum over rows): batch 1 gains most.

Prompt lookup (HF's `prompt_lookup_num_tokens`; `lookup`): no draft model. Step 1 instead
takes the row's last g ids (g = `max_matching_ngram_size`, then smaller) and proposes the k ids
that followed their first earlier occurrence in the row (prompt and generated ids); a row
without one proposes what it has (or its last id), and the target rejects what is wrong. q is
then a point mass on each proposal, so sampling accepts d_j with probability p(d_j) and
otherwise samples from p without d_j: exact, as with a draft model.

Shape legend: B rows, N max new tokens, k draft length, V vocab.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from t5x_lite.argmax import argmax
from t5x_lite.decoding import cache as cache_lib
from t5x_lite.decoding.filtering import (SamplingConfig, categorical, filter_logits, row_keys,
                                         select_tokens)
from t5x_lite.decoding import processors
from t5x_lite.decoding.processors import History, Processing, extend, process
from t5x_lite.decoding.sampling import EOS_ID, PAD_ID, DecodeOutput, StepFn
from t5x_lite.decoding.stop_strings import StopStrings, advance, advance_all, initial_state
from t5x_lite.decoding.stops import StopIds, is_eos


class Lookup(NamedTuple):
    """Prompt lookup's inputs: the rows' prompts (left-padded) and the largest n-gram."""

    prompt_BxP: jax.Array
    lengths_B: jax.Array
    max_ngram: int


def lookup_proposals(history_BxL, start_B, end, k: int, max_ngram: int):
    """[B, k] proposals: per row, the ids after the first occurrence in history[start:end]
    of its last g ids (g from `max_ngram` down to 1; the first g with an occurrence that has a
    next id wins), up to `end`; a row's missing ones repeat its last id. `end` is a scalar.

    One pass per offset t < max_ngram: `run[e]` counts how many ids ending at e match the
    row's last ids, so the largest g is max(run) and its first window ends at the leftmost e
    with that count."""
    b, length = history_BxL.shape
    pos_L = jnp.arange(length)
    run_BxL = jnp.zeros((b, length), jnp.int32)
    alive_BxL = jnp.ones((b, length), jnp.bool_)
    for t in range(max_ngram):  # does history[e - t] equal history[end - 1 - t]?
        key_B = jax.lax.dynamic_index_in_dim(history_BxL, end - 1 - t, 1, False)
        # the window inside the row (then so is the key: the window ends before it)
        alive_BxL &= (jnp.roll(history_BxL, t, 1) == key_B[:, None]) & (
            pos_L - t >= start_B[:, None])
        run_BxL += alive_BxL
    run_BxL = jnp.where(pos_L + 1 < end, run_BxL, 0)  # a next id exists: not the key itself
    g_B = jnp.max(run_BxL, 1)
    begin_B = jnp.where(g_B > 0, jnp.argmax(run_BxL == g_B[:, None], 1) + 1, end)
    idx_BxK = begin_B[:, None] + jnp.arange(k)
    last_B = jax.lax.dynamic_index_in_dim(history_BxL, end - 1, 1, False)
    ids_BxK = jnp.take_along_axis(history_BxL, jnp.minimum(idx_BxK, length - 1), 1)
    return jnp.where(idx_BxK < end, ids_BxK, last_B[:, None]).astype(jnp.int32)


class _State(NamedTuple):
    count: jax.Array  # tokens emitted so far (same for every row)
    prev_B: jax.Array  # the committed token before last_B
    last_B: jax.Array  # last emitted token, not yet fed to either model
    target_cache: Any
    draft_cache: Any
    tokens: jax.Array  # [B, N + k + 1]
    token_logprob: jax.Array  # [B, N + k + 1]: log p of each kept token, 0 elsewhere
    logprob_B: jax.Array
    length_B: jax.Array
    done_B: jax.Array
    iterations: jax.Array
    accepted: jax.Array  # sum over iterations of m (draft tokens kept)
    history: History | None  # what the processors read, last_B included (None: none on)
    matched: jax.Array | None  # [B, S] stop-string states, last_B included (None: none)


def _probs(logits_BxKxV, sampling: SamplingConfig):
    b, k, v = logits_BxKxV.shape
    filtered = filter_logits(logits_BxKxV.reshape(b * k, v), sampling)
    return jax.nn.softmax(filtered, -1).reshape(b, k, v)


def speculative_decode(target_step: StepFn, draft_step: StepFn | None, target_cache,
                       draft_cache, first_logits_BxV, prompt_last_B, keys_B, *,
                       max_new_tokens: int, num_draft: int, sampling: SamplingConfig,
                       eos_id: StopIds = EOS_ID, grow_to: tuple[int, ...] = (),
                       processing: Processing | None = None, history: History | None = None,
                       stops: StopStrings | None = None, lookup: Lookup | None = None):
    """Returns (DecodeOutput, stats) -- stats: iterations and mean accepted draft tokens.

    Both caches must hold the prompt (cursor at the same slot) with room for
    `max_new_tokens + num_draft` more slots, or with `grow_to` (as in `sample_decode`: lengths
    both caches grow to, the last with that room) for the first phase; an iteration runs in a
    phase while the target's k + 1 writes fit. `first_logits_BxV` are the target's prefill
    logits and `prompt_last_B` the last prompt token of each row.

    `processing` (repetition penalty, no-repeat n-grams, min_new_tokens; `history` the rows'
    histories before the first new token, with room for num_draft + 1 more ids than they get) is
    applied as in `sample_decode`, at each position with the proposals before it counted: to
    the draft's logits (so q is what it sampled from) and to the target's (so p, and greedy's
    argmax, are the plain decode's). `stops`: stop strings, as in `sample_decode`.

    `lookup`: prompt lookup instead of a draft model (`draft_step` and `draft_cache` None).
    """
    b, n, k = first_logits_BxV.shape[0], max_new_tokens, num_draft
    greedy = sampling.greedy
    tok0_B = select_tokens(row_keys(keys_B, 0), process(processing, first_logits_BxV, history, 0),
                           sampling)
    logp0_B = jax.nn.log_softmax(first_logits_BxV.astype(jnp.float32), -1)
    logp0_B = jnp.take_along_axis(logp0_B, tok0_B[:, None], -1)[:, 0]
    tokens = jnp.zeros((b, n + k + 1), jnp.int32).at[:, 0].set(tok0_B)
    token_logprob = jnp.zeros((b, n + k + 1), jnp.float32).at[:, 0].set(logp0_B)
    matched, hit0_B = advance(stops, initial_state(stops, (b,)), tok0_B)
    state = _State(jnp.int32(1), prompt_last_B.astype(jnp.int32), tok0_B, target_cache,
                   draft_cache, tokens, token_logprob, logp0_B, jnp.ones((b,), jnp.int32),
                   is_eos(tok0_B, eos_id) | hit0_B,
                   jnp.int32(0), jnp.int32(0), extend(history, tok0_B), matched)

    def draft_proposals(s: _State, it_keys, start):
        """The draft model's k proposals, their (processed) logits and its cache."""
        dcache = cache_lib.set_index(s.draft_cache, start - 1)
        q_Bx2xV, dcache = draft_step(jnp.stack([s.prev_B, s.last_B], 1), dcache)
        q_BxV = process(processing, q_Bx2xV[:, 1], s.history, s.count)
        d_B = select_tokens(row_keys(it_keys, 0), q_BxV, sampling)
        drafts_BxK, qlogits_BxKxV = d_B[:, None], q_BxV[:, None]
        if k > 1:
            def draft_one(carry, j):
                x_B, history, dcache = carry
                logits_Bx1xV, dcache = draft_step(x_B[:, None], dcache)
                q_BxV = process(processing, logits_Bx1xV[:, 0], history, s.count + j)
                d_B = select_tokens(row_keys(it_keys, j), q_BxV, sampling)
                return (d_B, extend(history, d_B), dcache), (d_B, q_BxV)

            (_, _, dcache), (rest_JxB, rest_JxBxV) = jax.lax.scan(
                draft_one, (d_B, extend(s.history, d_B), dcache), jnp.arange(1, k))
            drafts_BxK = jnp.concatenate([drafts_BxK, rest_JxB.T], 1)
            qlogits_BxKxV = jnp.concatenate([qlogits_BxKxV, jnp.swapaxes(rest_JxBxV, 0, 1)], 1)
        return drafts_BxK, qlogits_BxKxV, dcache

    if lookup is not None:
        prompt_len = lookup.prompt_BxP.shape[1]
        start_B = prompt_len - lookup.lengths_B.astype(jnp.int32)

    def body(s: _State):
        it_keys = row_keys(keys_B, s.iterations + 1)  # distinct from the first-token key (0)
        start = cache_lib.get_index(s.target_cache)
        if lookup is None:
            drafts_BxK, qlogits_BxKxV, dcache = draft_proposals(s, it_keys, start)
        else:  # q: a point mass on each proposal
            ids_BxL = jnp.concatenate([lookup.prompt_BxP.astype(jnp.int32), s.tokens], 1)
            drafts_BxK = lookup_proposals(ids_BxL, start_B, prompt_len + s.count, k,
                                          lookup.max_ngram)
            qlogits_BxKxV, dcache = None, None
        fed_Bx1K = jnp.concatenate([s.last_B[:, None], drafts_BxK], 1)
        plogits_BxK1xV, tcache = target_step(fed_Bx1K, s.target_cache)
        # Position j predicts token count + j, after d_1..d_j: its history includes them.
        histories = processors.extensions(s.history, drafts_BxK)
        scores_BxK1xV = plogits_BxK1xV if processing is None else jnp.stack(
            [process(processing, plogits_BxK1xV[:, j], histories[j], s.count + j)
             for j in range(k + 1)], 1)

        if greedy:
            target_tok_BxK1 = argmax(scores_BxK1xV)
            ok_BxK = target_tok_BxK1[:, :k] == drafts_BxK
        else:
            p_BxK1xV = _probs(scores_BxK1xV, sampling)
            p_d = jnp.take_along_axis(p_BxK1xV[:, :k], drafts_BxK[..., None], -1)[..., 0]
            if lookup is None:
                q_BxKxV = _probs(qlogits_BxKxV, sampling)
                q_d = jnp.take_along_axis(q_BxKxV, drafts_BxK[..., None], -1)[..., 0]
            else:
                q_d = jnp.ones_like(p_d)
            uniform = lambda key: jax.random.uniform(key, (k,))
            u_BxK = jax.vmap(uniform)(row_keys(it_keys, k + 1))
            ok_BxK = u_BxK * q_d < p_d
        n_acc_B = jnp.sum(jnp.cumprod(ok_BxK.astype(jnp.int32), 1), 1)
        m = jnp.min(jnp.where(s.done_B, k, n_acc_B))

        # Token at position m: the row's own accepted draft, or the correction / bonus token.
        if greedy:
            fix_B = jax.lax.dynamic_index_in_dim(target_tok_BxK1, m, 1, False)
        else:
            p_m = jax.lax.dynamic_index_in_dim(p_BxK1xV, m, 1, False)
            if lookup is None:
                q_m = jax.lax.dynamic_index_in_dim(
                    jnp.concatenate([q_BxKxV, jnp.zeros_like(q_BxKxV[:, :1])], 1), m, 1, False)
            else:  # the point mass on d_m; none at the bonus position
                d_m = jax.lax.dynamic_index_in_dim(drafts_BxK, jnp.minimum(m, k - 1), 1, False)
                q_m = jax.nn.one_hot(d_m, p_m.shape[-1], dtype=p_m.dtype) * (m < k)
            resid = jnp.maximum(p_m - q_m, 0.0)  # q is 0 at the bonus position (m == k)
            resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_m)
            fix_B = categorical(row_keys(it_keys, k + 2), jnp.log(resid))
            own_B = jax.lax.dynamic_index_in_dim(
                jnp.concatenate([drafts_BxK, drafts_BxK[:, :1]], 1), m, 1, False)
            fix_B = jnp.where(n_acc_B > m, own_B, fix_B).astype(jnp.int32)
        j_K1 = jnp.arange(k + 1)
        new_BxK1 = jnp.where(j_K1 < m, jnp.concatenate([drafts_BxK, drafts_BxK[:, :1]], 1),
                             fix_B[:, None])

        # Keep tokens up to each row's first EOS or stop string and within the budget.
        matched_BxK1, hit_BxK1 = advance_all(stops, s.matched, new_BxK1)
        stop_BxK1 = (is_eos(new_BxK1, eos_id) | hit_BxK1) & (j_K1 <= m)
        before_eos = jnp.cumsum(stop_BxK1, 1) - stop_BxK1 == 0
        keep_BxK1 = (j_K1 <= m) & before_eos & (s.count + j_K1 < n) & ~s.done_B[:, None]
        logp_BxK1 = jnp.take_along_axis(
            jax.nn.log_softmax(plogits_BxK1xV.astype(jnp.float32), -1), new_BxK1[..., None], -1)
        kept_logp_BxK1 = jnp.where(keep_BxK1, logp_BxK1[..., 0], 0.0)
        logprob_B = s.logprob_B + jnp.sum(kept_logp_BxK1, 1)
        tokens = jax.lax.dynamic_update_slice(
            s.tokens, jnp.where(keep_BxK1, new_BxK1, PAD_ID), (0, s.count))
        token_logprob = jax.lax.dynamic_update_slice(s.token_logprob, kept_logp_BxK1,
                                                     (0, s.count))
        done_B = s.done_B | jnp.any(stop_BxK1 & keep_BxK1, 1)

        rollback = start + 1 + m
        prev_B = jax.lax.dynamic_index_in_dim(
            jnp.concatenate([s.last_B[:, None], drafts_BxK], 1), m, 1, False)
        history = extend(processors.nth_extension(histories, m), fix_B)
        matched = None if stops is None else jax.lax.dynamic_index_in_dim(matched_BxK1, m, 1,
                                                                          False)
        return _State(s.count + m + 1, prev_B, fix_B, cache_lib.set_index(tcache, rollback),
                      dcache, tokens, token_logprob, logprob_B,
                      s.length_B + jnp.sum(keep_BxK1, 1).astype(jnp.int32), done_B,
                      s.iterations + 1, s.accepted + m, history, matched)

    s = cache_lib.while_in_phases(  # the draft writes below the target's k + 1 slots
        lambda s: (s.count < n) & ~jnp.all(s.done_B), body, state, grow_to,
        cache_of=lambda s: s.target_cache, writes=k + 1,
        grow_caches=lambda s, length: s._replace(
            target_cache=cache_lib.grow(s.target_cache, length),
            draft_cache=None if lookup else cache_lib.grow(s.draft_cache, length)))
    out = DecodeOutput(s.tokens[:, :n], s.length_B, s.logprob_B, s.done_B,
                       s.token_logprob[:, :n])
    stats = {"iterations": s.iterations, "accepted_per_iteration":
             s.accepted / jnp.maximum(s.iterations, 1)}
    return out, stats
