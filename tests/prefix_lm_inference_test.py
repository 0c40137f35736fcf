"""A GPT trained with `data.objective="prefix_lm"` is scored and decoded as it was trained.

Training (`data.objectives._prefix_lm_example`, T5X PrefixLM) flags BOS + prefix in
`decoder_causal_attention`: those positions attend to each other bidirectionally. `load` reads
the objective from the run config, and `score`, `logits`, `generate` (greedy, beam, speculative)
and `evaluation.likelihood.log_likelihoods` treat the prompt as the prefix. The references here
are the training pipeline's own features (`PrefixLMFromPairs`, `PrefixLMFromText`,
`AddDecoderInputs`) fed to the model's uncached forward pass; a twin workdir with the same
weights and objective causal_lm stays causal.
"""
import types

import numpy as np
import pytest

import t5x_lite
from decoding_testlib import random_params
from t5x_lite import checkpoints
from t5x_lite import config as mc
from t5x_lite.data import objectives
from t5x_lite.decoding import generate as gen
from t5x_lite.defaults import base_config
from t5x_lite.evaluation import likelihood

# Two layers: with one, the last prompt position and every later one read keys / values made
# from embeddings alone, and bidirectional attention over the prompt would change nothing.
CFG = mc.gpt2(vocab_size=64, d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=2,
              max_len=48)
REF_LEN = 40  # the uncached reference pads its rows to this length: one compiled shape
EOS = 1


def _workdir(path, objective, params):
    checkpoints.write_config(path, base_config(CFG, objective=objective, seq_len=32))
    checkpoints.save_params(path, params, 0)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    params = random_params(CFG, seed=3)
    root = tmp_path_factory.mktemp("prefix_lm")
    plm = t5x_lite.load(_workdir(root / "plm", "prefix_lm", params))
    causal = t5x_lite.load(_workdir(root / "causal", "causal_lm", params))
    draft = t5x_lite.load(_workdir(root / "draft", "prefix_lm", random_params(CFG, seed=4)))
    return types.SimpleNamespace(plm=plm, causal=causal, draft=draft)


def test_the_run_configs_objective_says_which_models_are_prefix_lms(models):
    assert models.plm.prefix_lm and models.draft.prefix_lm and not models.causal.prefix_lm
    assert t5x_lite.api.is_prefix_lm(models.plm)
    assert not t5x_lite.api.is_prefix_lm(types.SimpleNamespace(model=models.plm.model))


def _forward(lm, rows):
    """Uncached logits [B, REF_LEN, V] of training-pipeline rows, right-padded (padding is
    after every real position, causal and unflagged: it changes none of theirs)."""
    import jax
    batch = {}
    for key in ("decoder_input_tokens", "decoder_causal_attention"):
        if key in rows[0]:
            a = np.zeros((len(rows), REF_LEN), np.int32)
            for i, r in enumerate(rows):
                a[i, :len(r[key])] = r[key]
            batch[key] = a
    fn = lm._jitted.setdefault("test_forward", jax.jit(lm.model.logits))
    return np.asarray(fn(lm.params, batch), np.float64)


def _pipeline_score(lm, row, *, flags=True):
    """The model's `score_batch` on one training row (as the pipeline builds it)."""
    batch = {k: np.asarray(v)[None] for k, v in row.items()
             if flags or k != "decoder_causal_attention"}
    return float(lm.model.score_batch(lm.params, batch)[0])


def _pairs_row(inputs, targets):
    row = objectives.PrefixLMFromPairs(32).map({"inputs": np.array(inputs, np.int32),
                                                "targets": np.array(targets, np.int32)})
    return objectives.AddDecoderInputs().map(row)


PAIRS = [([5, 9, 13, 2, 40], [7, 21, 3]), ([11, 4], [30, 6, 17, 8, 2]), ([50], [12])]


def test_score_equals_the_training_rows_score(models):
    """`score(prompt, continuation)` with prompt = [0] + inputs + EOS (the pairs' prefix) is the
    model's score of the row `PrefixLMFromPairs` trains on, and not the causal score."""
    lm = models.plm
    prompts = [[0] + i + [EOS] for i, _ in PAIRS]
    conts = [t + [EOS] for _, t in PAIRS]
    got = lm.score(prompts, conts)  # one ragged batch: per-row prefixes
    rows = [_pairs_row(i, t) for i, t in PAIRS]
    want = [_pipeline_score(lm, r) for r in rows]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    causal = [_pipeline_score(lm, r, flags=False) for r in rows]
    assert np.all(np.abs(np.array(want) - causal) > 1e-3)
    # The causal twin (same weights, objective causal_lm) scores causally, as before.
    np.testing.assert_allclose(models.causal.score(prompts, conts), causal, rtol=1e-5,
                               atol=1e-5)


def test_score_equals_text_objective_rows(models):
    """`PrefixLMFromText` splits a piece at a random point: the prefix (after BOS) is the
    prompt, the rest the continuation."""
    lm = models.plm
    piece = np.array([8, 14, 22, 5, 31, 9, 60, 2, 19, 1], np.int32)
    for seed in range(4):
        row = objectives.PrefixLMFromText().random_map(piece, np.random.default_rng(seed))
        row = objectives.AddDecoderInputs().map(row)
        n = int(np.argmax(row["decoder_loss_weights"]))  # prefix_len
        got = lm.score([[0] + piece[:n].tolist()], [piece[n:].tolist()])[0]
        np.testing.assert_allclose(got, _pipeline_score(lm, row), rtol=1e-5, atol=1e-5)


def test_log_likelihoods_equal_score(models):
    """The batched, bucketed scoring of few-shot / multiple-choice evaluation, as `score`."""
    for lm in (models.plm, models.causal):
        prompts = [[0] + i + [EOS] for i, _ in PAIRS] * 3
        conts = [t + [EOS] for _, t in PAIRS] * 3
        got = likelihood.log_likelihoods(lm, prompts, conts, batch_size=4)
        np.testing.assert_allclose(got, lm.score(prompts, conts), rtol=1e-5, atol=1e-5)
    want = [_pipeline_score(models.plm, _pairs_row(i, t)) for i, t in PAIRS]
    got = likelihood.log_likelihoods(models.plm, [[0] + i + [EOS] for i, _ in PAIRS],
                                     [t + [EOS] for _, t in PAIRS])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_logits_prefix_lengths(models):
    """`logits`: None is the whole row as the prefix for a prefix-LM model (causal for others);
    `prefix_lengths` flags that many leading positions."""
    lm, causal = models.plm, models.causal
    ids = [0, 5, 9, 13, 2, 40, 7]

    def ref(n):
        return _forward(lm, [{"decoder_input_tokens": ids,
                              "decoder_causal_attention": [1] * n + [0] * (len(ids) - n)}]
                        )[0, :len(ids)]

    np.testing.assert_allclose(lm.logits([ids])[0], ref(len(ids)), rtol=1e-4, atol=1e-4)
    for n in (0, 3):
        np.testing.assert_allclose(lm.logits([ids], prefix_lengths=n)[0], ref(n), rtol=1e-4,
                                   atol=1e-4)
        np.testing.assert_allclose(causal.logits([ids], prefix_lengths=[n])[0], ref(n),
                                   rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(causal.logits([ids])[0], ref(0), rtol=1e-4, atol=1e-4)
    assert np.abs(ref(len(ids))[-1] - ref(0)[-1]).max() > 1e-3
    with pytest.raises(ValueError, match="prefix_lengths must be an integer or one per row"):
        lm.logits([ids], prefix_lengths=[8])


def _reference_greedy(lm, prompt, n, prefix_lm=True):
    """Greedy ids and score by uncached forward passes: each step, the training pipeline's row
    for prefix = the prompt after BOS and the tokens so far, argmax of the last position."""
    assert prompt[0] == 0
    seq, logp = list(prompt), 0.0
    for _ in range(n):
        row = objectives._prefix_lm_example(len(prompt) - 1, np.array(seq[1:] + [0], np.int32))
        row = objectives.AddDecoderInputs().map(row)
        assert row["decoder_input_tokens"].tolist() == seq
        if not prefix_lm:
            del row["decoder_causal_attention"]
        logits = _forward(lm, [row])[0, len(seq) - 1]
        tok = int(np.argmax(logits))
        logp += float(logits[tok] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max())
        seq.append(tok)
        if tok == EOS:
            break
    return seq[len(prompt):], logp


PROMPTS = [[0, 5, 9, 13, 2, 40], [0, 11, 4, 1], [0, 23, 8, 44, 17, 3, 29, 10, 52]]
N = 6


@pytest.fixture(scope="module")
def references(models):
    return {name: [_reference_greedy(getattr(models, name), p, N, name == "plm")
                   for p in PROMPTS] for name in ("plm", "causal")}


def test_greedy_generate_equals_uncached_reference(models, references):
    """Prefill bidirectional over the prompt, later steps causal: token for token (and score)
    the uncached prefix-LM forward pass; the causal twin decodes causally."""
    for name in ("plm", "causal"):
        lm = getattr(models, name)
        out = lm.generate(input_ids=PROMPTS, max_new_tokens=N, method="greedy")
        for o, (ids, score) in zip(out, references[name]):
            assert o["ids"] == ids
            np.testing.assert_allclose(o["score"], score, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(lm.score(PROMPTS, [o["ids"] for o in out]),
                                   [o["score"] for o in out], rtol=1e-4, atol=1e-4)
    assert [r[0] for r in references["plm"]] != [r[0] for r in references["causal"]]


def test_beam_search_with_one_beam_is_greedy(models, references):
    out = models.plm.generate(input_ids=PROMPTS, max_new_tokens=N, method="beam", num_beams=1)
    assert [o["ids"] for o in out] == [r[0] for r in references["plm"]]


def test_speculative_decoding_prefills_target_and_draft_as_prefix_lms(models, references):
    """Greedy speculative output is the target's greedy output; a draft identical to the
    target (both prefix-LM) has every proposal accepted, which needs its prefill to be the
    target's too."""
    plm = models.plm
    for draft in (models.draft, models.causal, plm):
        out = plm.generate(input_ids=PROMPTS, max_new_tokens=N, draft=draft, num_draft=2)
        assert [o["ids"] for o in out] == [r[0] for r in references["plm"]]
    opts = gen.decode_options(plm, max_new_tokens=N, num_draft=2, method="greedy")
    prompt = [[0, 23, 8, 44, 17, 3, 29, 10, 52]]
    tokens, lengths = gen.pack_prompts(plm.config, prompt, 1)
    (out, stats) = gen.decode_batch(plm, tokens, lengths, opts, draft=plm)
    assert int(np.asarray(out.lengths_B)[0]) == N  # no early EOS: every iteration is full
    assert float(stats["accepted_per_iteration"]) == 2.0
