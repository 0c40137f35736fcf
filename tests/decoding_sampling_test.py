"""The greedy / sampling loop: EOS per row, budget, scores, seeds (on a synthetic cached LM)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from decoding_testlib import HashChain
from t5x_lite.decoding.filtering import SamplingConfig
from t5x_lite.decoding.sampling import sample_decode

V, N = 6, 7


@functools.partial(jax.jit, static_argnames=("lm", "sampling"))
def _run(h0, keys, *, lm, sampling):
    first = jnp.asarray(lm.table)[h0]
    return sample_decode(lm.step, {"h": h0}, first, keys, max_new_tokens=N, sampling=sampling)


def _greedy_reference(lm, h0):
    out, h = [], h0
    for _ in range(N):
        t = int(np.argmax(lm.table[h]))
        out.append(t)
        if t == 1:
            break
        h = lm.next_state(h, t)
    return out


def test_greedy_rows_stop_independently_at_eos():
    lm = HashChain(V, seed=3)
    lm.table[:, 1] += 1.2  # EOS likely, but not everywhere
    h0 = np.arange(13, dtype=np.int32)
    keys = jax.random.split(jax.random.key(0), 13)
    out = _run(h0, keys, lm=lm, sampling=SamplingConfig(0.0))
    tokens, lengths = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
    refs = [_greedy_reference(lm, h) for h in h0]
    assert len({len(r) for r in refs}) > 2 and any(len(r) == N for r in refs)
    for r, ref in enumerate(refs):
        assert lengths[r] == len(ref)
        np.testing.assert_array_equal(tokens[r, :len(ref)], ref)
        assert np.all(tokens[r, len(ref):] == 0)  # pad after EOS
        assert bool(out.finished_B[r]) == (ref[-1] == 1)
        np.testing.assert_allclose(out.logprob_B[r], lm.sequence_logprob(h0[r], ref), rtol=1e-5)


def test_sampling_seeds_and_scores():
    lm = HashChain(V, seed=4, scale=0.5)
    h0 = np.zeros(64, np.int32)  # 64 rows with the same start
    cfg = SamplingConfig(temperature=1.3, top_k=4)
    run = lambda seed: _run(h0, jax.random.split(jax.random.key(seed), 64), lm=lm, sampling=cfg)
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
    assert not np.array_equal(a.tokens_BxN, c.tokens_BxN)
    assert len({tuple(t) for t in np.asarray(a.tokens_BxN)}) > 32  # rows differ too
    for r in range(8):  # scores are under the unfiltered model, up to and including EOS
        ids = np.asarray(a.tokens_BxN[r, :a.lengths_B[r]])
        np.testing.assert_allclose(a.logprob_B[r], lm.sequence_logprob(0, ids), rtol=1e-5)
