"""Beam search against exhaustive search, on a synthetic LM whose state lives in the cache."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding_testlib import HashChain
from t5x_lite.decoding import cache as cache_lib
from t5x_lite.decoding.beam_search import beam_search, length_penalty

V, N = 5, 3


@functools.partial(jax.jit, static_argnames=("lm", "beams", "alpha"))
def _run(h0_B, *, lm, beams, alpha):
    h = jnp.repeat(h0_B, beams)
    return beam_search(lm.step, {"h": h}, jnp.asarray(lm.table)[h], num_beams=beams,
                       max_new_tokens=N, alpha=alpha, reorder_cache=cache_lib.take_rows)


def _exhaustive(lm, h0, alpha):
    """All finished sequences (best first), then unfinished ones of the full length."""
    finished, unfinished = [], []
    for n in range(1, N + 1):
        for seq in itertools.product(range(V), repeat=n):
            if 1 in seq[:-1]:
                continue
            lp = lm.sequence_logprob(h0, seq)
            if seq[-1] == 1:
                finished.append((lp / ((5 + n) / 6) ** alpha, lp, seq))
            elif n == N:
                unfinished.append((lp / ((5 + n) / 6) ** alpha, lp, seq))
    return sorted(finished, reverse=True) + sorted(unfinished, reverse=True)


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_wide_beam_equals_exhaustive_search(alpha):
    # 2W >= every candidate of the last step, so nothing is pruned and beam search is exact.
    lm = HashChain(V, seed=5)
    lm.table[:, 1] += 0.5
    beams = 40
    h0 = np.array([2, 9], np.int32)
    out = _run(h0, lm=lm, beams=beams, alpha=alpha)
    for b in range(2):
        ref = _exhaustive(lm, int(h0[b]), alpha)[:beams]
        n_fin = sum(seq[-1] == 1 for _, _, seq in ref)
        assert 0 < n_fin < beams  # the unfinished fill-in is exercised too
        for w, (score, lp, seq) in enumerate(ref):
            got = out.tokens_BxWxN[b, w, :out.lengths_BxW[b, w]]
            np.testing.assert_array_equal(got, seq)
            np.testing.assert_allclose(out.scores_BxW[b, w], score, rtol=1e-5)
            np.testing.assert_allclose(out.logprob_BxW[b, w], lp, rtol=1e-5)
            assert bool(out.finished_BxW[b, w]) == (seq[-1] == 1)


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
