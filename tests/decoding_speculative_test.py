"""Speculative decoding: greedy equals the target's greedy output; sampled outputs follow the
target's filtered distribution (accept/reject path and the all-accepted bonus path)."""
import jax
import numpy as np
import pytest
import scipy.stats

import decoding_testlib
from t5x_lite import config as config_lib
from t5x_lite.decoding import generate as gen
from t5x_lite.decoding.filtering import filter_logits
from t5x_lite.models import build_model


def _gpt(seed, layers, vocab=64, **kw):
    cfg = config_lib.gpt2(vocab_size=vocab, d_model=32, num_heads=2, head_dim=16, d_ff=48,
                          num_layers=layers, max_len=48, **kw)
    return decoding_testlib.loaded(cfg, seed=seed)


@pytest.mark.parametrize("phases", [False, True])
def test_speculative_greedy_equals_greedy(phases, monkeypatch):
    if phases:  # short phases: both caches grow several times mid-decode
        monkeypatch.setattr(gen, "MIN_PHASE", 2)
        monkeypatch.setattr(gen, "CACHE_PHASES", 6)
    target = _gpt(0, 2)
    assert len(gen.cache_phases(target.model.config, 9, 20, 3)) >= (4 if phases else 1)
    target.params["token_embedder"]["embedding"][1] *= 4.0  # EOS sometimes wins: rows end apart
    draft = _gpt(1, 1)  # a different random model: many proposals are rejected
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [3, 3], [40, 41]]
    plain = gen.generate(target, input_ids=prompts, max_new_tokens=20, batch_size=8)
    for d in (draft, target):  # rejections and rollbacks; every proposal accepted (bonus path)
        spec = gen.generate(target, input_ids=prompts, max_new_tokens=20, batch_size=8,
                            draft=d, num_draft=3)
        assert [r["ids"] for r in spec] == [r["ids"] for r in plain]
        np.testing.assert_allclose([r["score"] for r in spec], [r["score"] for r in plain],
                                   rtol=1e-4)
    assert len({len(r["ids"]) for r in plain}) > 1  # rows end at different steps


def test_speculative_on_a_mesh_equals_greedy():
    """Target and draft sharded on a (2, 2, 2) mesh (FSDP, tensor parallel, rows split over
    data x fsdp) give the one-device greedy output; a draft on other devices is refused."""
    target, draft = _gpt(0, 2), _gpt(1, 1)
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13], [3, 3], [40, 41]]
    plain = gen.generate(target, input_ids=prompts, max_new_tokens=12, batch_size=8)
    on_mesh = decoding_testlib.on_mesh(target, (2, 2, 2))
    spec = gen.generate(on_mesh, input_ids=prompts, max_new_tokens=12, batch_size=8,
                        draft=decoding_testlib.on_mesh(draft, (2, 2, 2)), num_draft=3)
    assert [r["ids"] for r in spec] == [r["ids"] for r in plain]
    with pytest.raises(gen.DecodeError, match="other devices than the target"):
        gen.generate(on_mesh, input_ids=prompts, max_new_tokens=12,
                     draft=decoding_testlib.on_mesh(draft, (4, 1, 1)))


def _target_probs(target, prompt, prefixes, cfg):
    """Filtered target next-token distributions after prompt + each prefix (full forward)."""
    seqs = np.array([prompt + list(p) for p in prefixes], np.int32)
    logits = jax.jit(build_model(target.model.config).logits)(
        target.params, {"decoder_input_tokens": seqs})[:, -1]
    return np.asarray(jax.nn.softmax(filter_logits(logits, cfg)), np.float64)


def _sampled(draft_is_target, k, n_new, rows=4096):
    """`rows` samples of `n_new` tokens after one prompt, from a vocabulary of 8 (EOS = 1
    included: rows that sample it stop early)."""
    v = 8
    target = _gpt(0, 2, vocab=v)
    draft = target if draft_is_target else _gpt(5, 1, vocab=v)
    prompt = [3, 5, 2]
    opts = gen.DecodeOptions(method="sample", max_new_tokens=n_new, num_draft=k,
                             temperature=1.3, top_k=6, seed=11)
    tokens, lengths = gen.pack_prompts(target.model.config, [prompt] * rows, rows)
    out, _ = gen.decode_batch(target, tokens, lengths, opts, draft=draft)
    return target, prompt, opts.sampling, np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)


def _chi2_pvalue(counts, probs):
    keep = probs > 0
    assert counts[~keep].sum() == 0
    return scipy.stats.chisquare(counts[keep], counts.sum() * probs[keep] / probs[keep].sum())[1]


def test_speculative_sampling_joint_law_with_rejections():
    target, prompt, cfg, toks, lengths = _sampled(draft_is_target=False, k=2, n_new=2)
    v, rows = 8, len(toks)
    keep = (lengths == 2)  # rows whose first token was EOS stop early
    p0 = _target_probs(target, prompt, [()], cfg)[0]
    p1 = _target_probs(target, prompt, [(t,) for t in range(v)], cfg)
    joint = p0[:, None] * p1
    joint[1] = 0  # after EOS nothing follows; those rows are counted separately
    counts = np.zeros((v, v))
    np.add.at(counts, (toks[keep, 0], toks[keep, 1]), 1)
    assert abs((~keep).mean() - p0[1]) < 4 * np.sqrt(p0[1] * (1 - p0[1]) / rows) + 1e-9
    assert _chi2_pvalue(counts.ravel(), joint.ravel()) > 1e-3


def test_speculative_sampling_bonus_token_law():
    # Draft == target: every proposal is accepted and the 3rd token is the bonus sample.
    target, prompt, cfg, toks, lengths = _sampled(draft_is_target=True, k=1, n_new=3)
    v = 8
    keep = lengths == 3
    pairs = [(a, b) for a in range(v) for b in range(v) if a != 1 and b != 1]
    p0 = _target_probs(target, prompt, [()], cfg)[0]
    p1 = _target_probs(target, prompt, [(a,) for a in range(v)], cfg)
    p2 = _target_probs(target, prompt, pairs, cfg)
    weights = np.array([p0[a] * p1[a, b] for a, b in pairs])
    marginal = (weights[:, None] * p2).sum(0)  # law of the 3rd token given no early EOS
    counts = np.bincount(toks[keep, 2], minlength=v).astype(float)
    assert _chi2_pvalue(counts, marginal) > 1e-3


# ------------------------------------------------------------------ prompt lookup decoding


def _stats(target, prompts, n, **options):
    tokens, lengths = gen.pack_prompts(target.model.config, prompts, len(prompts))
    out, stats = gen.decode_batch(target, tokens, lengths,
                                  gen.DecodeOptions(max_new_tokens=n, **options))
    return float(stats["accepted_per_iteration"]), np.asarray(out.tokens_BxN)


def test_prompt_lookup_greedy_equals_greedy():
    """No draft model: proposals copied from the row. With a repetitive prompt many are
    accepted, with processors (no repeated bigram) many are rejected; the output is the plain
    greedy one either way, for every proposal length and n-gram size."""
    target = _gpt(0, 2)
    target.params["token_embedder"]["embedding"][1] *= 4.0  # rows end apart
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9], [3, 4] * 6, [40, 41, 42, 40, 41]]
    for extra in ({}, {"no_repeat_ngram_size": 2}):
        plain = gen.generate(target, input_ids=prompts, max_new_tokens=20, **extra)
        for k, g in ((1, 1), (4, 2), (6, 3)):
            out = gen.generate(target, input_ids=prompts, max_new_tokens=20,
                               prompt_lookup_num_tokens=k, max_matching_ngram_size=g, **extra)
            assert [r["ids"] for r in out] == [r["ids"] for r in plain], (extra, k, g)
            np.testing.assert_allclose([r["score"] for r in out],
                                       [r["score"] for r in plain], rtol=1e-4)
    # The random model repeats itself: a row alone accepts over two proposals a pass.
    accepted, _ = _stats(target, prompts[1:2], 20, prompt_lookup_num_tokens=4)
    assert accepted > 2


def test_lookup_proposals_equal_hf_prompt_lookup_candidates():
    """HF's `PromptLookupCandidateGenerator` (one row at a time): its candidates are our
    first proposals; left padding in a batch is never matched."""
    import torch
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    from t5x_lite.decoding.speculative import lookup_proposals
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, 4, rng.integers(1, 30))) for _ in range(300)]
    end = max(map(len, rows)) + 3
    # left padding 0, as id 0 in the rows; after `end`, what a decode has not written yet
    padded = np.zeros((len(rows), end + 9), np.int32)
    padded[:, end:] = rng.integers(0, 4, (len(rows), 9))
    for i, r in enumerate(rows):
        padded[i, end - len(r):end] = r
    lengths = np.array([len(r) for r in rows])
    for k, g in ((1, 1), (5, 2), (3, 4), (4, 9)):
        ours = np.asarray(lookup_proposals(jax.numpy.asarray(padded), end - lengths, end, k, g))
        found = 0
        for row, mine in zip(rows, ours):
            hf = PromptLookupCandidateGenerator(num_output_tokens=k, max_matching_ngram_size=g,
                                                max_length=1000)
            cand = hf.get_candidates(torch.tensor([row]))[0][0, len(row):].tolist()
            assert mine[:len(cand)].tolist() == cand, (row, k, g)
            assert (mine[len(cand):] == row[-1]).all()  # what it lacks: the last id again
            found += bool(cand)
        assert found > 200


def _lookup_sampled(k, n_new, prompt, rows=4096, batch=4096):
    """`rows` samples of `n_new` tokens after a repetitive prompt, vocabulary 8, with prompt
    lookup proposing k ids, decoded `batch` rows at a time (one seed per batch), and the mean
    proposals accepted per pass."""
    target = _gpt(0, 2, vocab=8)
    tokens, lengths = gen.pack_prompts(target.model.config, [prompt] * batch, batch)
    toks, lens, accepted = [], [], []
    for seed in range(rows // batch):
        opts = gen.DecodeOptions(method="sample", max_new_tokens=n_new, temperature=1.3,
                                 top_k=6, seed=seed, prompt_lookup_num_tokens=k)
        out, stats = gen.decode_batch(target, tokens, lengths, opts)
        toks.append(np.asarray(out.tokens_BxN))
        lens.append(np.asarray(out.lengths_B))
        accepted.append(float(stats["accepted_per_iteration"]))
    return (target, prompt, opts.sampling, np.concatenate(toks), np.concatenate(lens),
            np.mean(accepted))


def test_prompt_lookup_sampling_follows_the_target_law():
    """Proposals are a point mass: d is kept with probability p(d), else p without d is
    sampled. The first two tokens' joint law (rejections), and the third token's marginal
    (one proposal: kept, then the bonus token, or resampled), are the target's."""
    v = 8
    target, prompt, cfg, toks, lengths, _ = _lookup_sampled(2, 2, [3, 5, 2, 3, 5, 2, 3, 5])
    keep = lengths == 2
    p0 = _target_probs(target, prompt, [()], cfg)[0]
    p1 = _target_probs(target, prompt, [(t,) for t in range(v)], cfg)
    joint = p0[:, None] * p1
    joint[1] = 0
    counts = np.zeros((v, v))
    np.add.at(counts, (toks[keep, 0], toks[keep, 1]), 1)
    assert _chi2_pvalue(counts.ravel(), joint.ravel()) > 1e-3

    # One row per decode: rows share a cursor, so in a batch a pass keeps the fewest
    # proposals any row accepted, and the bonus path (all accepted) would never run. The
    # model repeats 5 (p ~0.7, 0.44, 0.25): proposing 5 after 5, 5 is often right, and a
    # bonus token that wrongly left out the proposal would lose ~8% of the mass of 5.
    target, prompt, cfg, toks, lengths, accepted = _lookup_sampled(1, 3, [5] * 8, rows=1500,
                                                                   batch=1)
    p0 = _target_probs(target, prompt, [()], cfg)[0]
    p1 = _target_probs(target, prompt, [(t,) for t in range(v)], cfg)
    assert accepted > 0.2  # the bonus path is taken
    keep = lengths == 3
    pairs = [(a, b) for a in range(v) for b in range(v) if a != 1 and b != 1]
    p2 = _target_probs(target, prompt, pairs, cfg)
    weights = np.array([p0[a] * p1[a, b] for a, b in pairs])
    counts = np.bincount(toks[keep, 2], minlength=v).astype(float)
    assert _chi2_pvalue(counts, (weights[:, None] * p2).sum(0)) > 1e-3


def test_prompt_lookup_is_off_where_it_does_not_apply(caplog):
    """Beam search, a draft model, a T5: decoded without it, with a warning (a model's own
    decode options may turn it on for every decode); bad values are one error line."""
    import logging
    target, prompts = _gpt(0, 1), [[5, 6, 5, 6, 5], [7]]
    t5 = decoding_testlib.loaded(config_lib.t5_1_1(
        vocab_size=64, d_model=32, num_heads=2, head_dim=16, d_ff=48, num_layers=1,
        num_decoder_layers=1))
    cases = [(target, {"method": "beam", "num_beams": 2}, "beam search"),
             (target, {"draft": _gpt(1, 1)}, "a draft model proposes"),
             (t5, {}, "not a decoder-only (gpt) model")]
    for model, kw, why in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            out = gen.generate(model, input_ids=prompts, max_new_tokens=6,
                               prompt_lookup_num_tokens=3, **kw)
        assert f"prompt_lookup_num_tokens=3 is not used: {why}" in caplog.text
        assert out == gen.generate(model, input_ids=prompts, max_new_tokens=6, **kw)
    with pytest.raises(gen.DecodeError, match="prompt_lookup_num_tokens must be >= 0"):
        gen.DecodeOptions(prompt_lookup_num_tokens=-1)
    with pytest.raises(gen.DecodeError, match=r"max_matching_ngram_size must be in \[1, 64\]"):
        gen.DecodeOptions(max_matching_ngram_size=0)
