"""Beam search against exhaustive search, on a synthetic LM whose state lives in the cache."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding_testlib import HashChain
from t5x_lite.decoding import cache as cache_lib
from t5x_lite.decoding.beam_search import BeamRule, beam_search, length_penalty
from t5x_lite.decoding.processors import Processing

V, N = 5, 3


@functools.partial(jax.jit, static_argnames=("lm", "beams", "alpha", "stops", "n", "rule"))
def _run(h0_B, *, lm, beams, alpha=0.0, stops=(1,), n=N, rule=None):
    h = jnp.repeat(h0_B, beams)
    return beam_search(lm.step, {"h": h}, jnp.asarray(lm.table)[h], num_beams=beams,
                       max_new_tokens=n, rule=rule or BeamRule(False, alpha),
                       reorder_cache=cache_lib.take_rows, eos_id=stops)


def _exhaustive(lm, h0, alpha, stops=(1,)):
    """All finished sequences (ending at their first stop id; best first), then unfinished
    ones of the full length."""
    finished, unfinished = [], []
    for n in range(1, N + 1):
        for seq in itertools.product(range(V), repeat=n):
            if set(seq[:-1]) & set(stops):
                continue
            lp = lm.sequence_logprob(h0, seq)
            if seq[-1] in stops:
                finished.append((lp / ((5 + n) / 6) ** alpha, lp, seq))
            elif n == N:
                unfinished.append((lp / ((5 + n) / 6) ** alpha, lp, seq))
    return sorted(finished, reverse=True) + sorted(unfinished, reverse=True)


@pytest.mark.parametrize("alpha, stops", [(0.0, (1,)), (0.8, (1,)), (0.8, (1, 3))])
def test_wide_beam_equals_exhaustive_search(alpha, stops):
    # 2W >= every candidate of the last step, so nothing is pruned and beam search is exact;
    # with stop ids (1, 3) a sequence ends at either.
    lm = HashChain(V, seed=5)
    lm.table[:, 1] += 0.5
    beams = 40
    h0 = np.array([2, 9], np.int32)
    out = _run(h0, lm=lm, beams=beams, alpha=alpha, stops=stops)
    for b in range(2):
        ref = _exhaustive(lm, int(h0[b]), alpha, stops)[:beams]
        ends = [seq[-1] for _, _, seq in ref if seq[-1] in stops]
        assert 0 < len(ends) < beams  # the unfinished fill-in is exercised too
        assert set(ends) == set(stops)  # every stop id ends some beam
        for w, (score, lp, seq) in enumerate(ref):
            got = out.tokens_BxWxN[b, w, :out.lengths_BxW[b, w]]
            np.testing.assert_array_equal(got, seq)
            np.testing.assert_allclose(out.scores_BxW[b, w], score, rtol=1e-5)
            np.testing.assert_allclose(out.logprob_BxW[b, w], lp, rtol=1e-5)
            assert bool(out.finished_BxW[b, w]) == (seq[-1] in stops)


class _LastToken:
    """A synthetic LM whose next-token logits depend on the last token only (the "cache")."""

    def __init__(self, table):
        self.table = np.asarray(table, np.float32)

    def step(self, ids_BxT, cache):
        return jnp.asarray(self.table)[ids_BxT], {"h": ids_BxT[:, -1]}


def test_several_stop_ids_keep_w_beams_alive():
    """With S stop ids a step keeps (1 + S) W candidates, so W of them are alive even when
    the 2W best all end. Here the first step's 4 best tokens are the stop ids 5, 6, 7 and 1;
    only through 2 (5th) does the best finished sequence under a strong length penalty, 2 5,
    stay reachable; with 2W candidates the search returned 5."""
    table = np.full((8, 8), -20.0)
    table[0, [5, 6, 7, 1, 2]] = [0.0, 0.0, 0.0, -0.3, -0.6]  # the start
    table[1, :] = -5.0
    table[1, 1] = 0.0  # after 1, ending is unlikely
    table[2, 5] = 5.0  # after 2, 5 is near-certain
    table[3:, :] = 0.0
    lm = _LastToken(table)
    h0 = np.zeros(1, np.int32)
    out = _run(h0, lm=lm, beams=2, alpha=5.0, stops=(5, 6, 7), n=2)
    log_p = lambda h, t: float(jax.nn.log_softmax(table[h])[t])
    two = log_p(0, 2) + log_p(2, 5)
    assert two / length_penalty(2, 5.0) > log_p(0, 5)  # 2 5 beats 5, 6 and 7 (equally likely)
    np.testing.assert_array_equal(out.tokens_BxWxN[0, 0, :out.lengths_BxW[0, 0]], [2, 5])
    np.testing.assert_allclose(out.logprob_BxW[0, 0], two, rtol=1e-5)


def test_a_positive_sequence_bias_lets_a_live_beam_overtake_finished_ones():
    """Ranked by processed log-probs, a positively biased token scores above 0, so a live
    beam's sum still rises: the early stop (no live beam can beat the worst finished one)
    would return the two stop ids 1 and 4 after the first step; 2 3 1, biased on 3, beats
    both once finished."""
    table = np.full((5, 5), -8.0)
    table[0, [1, 4]], table[0, 2] = 0.0, -3.0  # the start: the stop ids likely, 2 less so
    table[2, 3] = table[3, 1] = 5.0  # then 3 and a stop
    lm = _LastToken(table)
    h = jnp.zeros((2,), jnp.int32)
    alpha, bias = 0.6, 4.0
    out = beam_search(lm.step, {"h": h}, jnp.asarray(table)[h], num_beams=2, max_new_tokens=3,
                      rule=BeamRule(False, alpha), reorder_cache=cache_lib.take_rows,
                      eos_id=(1, 4), processing=Processing.of(sequence_bias=(((3,), bias),)))

    def processed(seq):  # the ranked score: biased log-probs over T5's length penalty
        logp = jax.nn.log_softmax(table, -1)
        total = sum(float(logp[h, t]) + bias * (t == 3) for h, t in zip((0,) + seq, seq))
        return total / ((5 + len(seq)) / 6) ** alpha

    assert processed((2, 3, 1)) > 0 > max(processed((1,)), processed((4,)))
    np.testing.assert_array_equal(out.tokens_BxWxN[0, 0, :out.lengths_BxW[0, 0]], [2, 3, 1])
    np.testing.assert_allclose(out.scores_BxW[0, 0], processed((2, 3, 1)), rtol=1e-5)
    assert bool(out.finished_BxW[0, 0])


def test_narrow_beam_is_sorted_and_consistent():
    lm = HashChain(V, seed=6)
    out = _run(np.array([1, 4, 7], np.int32), lm=lm, beams=2, alpha=0.6)
    scores, finished = np.asarray(out.scores_BxW), np.asarray(out.finished_BxW)
    for b in range(3):  # finished beams first, each group best first
        assert not np.any(np.diff(finished[b].astype(int)) > 0)
        for group in (finished[b], ~finished[b]):
            assert np.all(np.diff(scores[b][group]) <= 0)
    for b, h0 in enumerate([1, 4, 7]):
        for w in range(2):
            seq = np.asarray(out.tokens_BxWxN[b, w, :out.lengths_BxW[b, w]])
            lp = lm.sequence_logprob(h0, seq)
            np.testing.assert_allclose(out.logprob_BxW[b, w], lp, rtol=1e-5)
            np.testing.assert_allclose(scores[b, w], lp / length_penalty(len(seq), 0.6), rtol=1e-5)
