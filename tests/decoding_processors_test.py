"""Sequence bias, repetition penalty, no-repeat n-grams, bad words, min_new_tokens and
suppressed tokens against HF: the logit arithmetic against HF's
processors, greedy and beam decodes against HF `generate`, the sampled laws against
distributions built with HF's processors, speculative decoding against the plain decode."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation import logits_process as hf_lp

import decoding_testlib
import hf_reference
from t5x_lite import config as config_lib
from t5x_lite.decoding import generate as gen
from t5x_lite.decoding import processors
from t5x_lite.models import build_model

HF_V, N = 96, 20


@pytest.fixture(scope="module", params=["gpt2", "t5"])
def pair(request):
    """HF models whose rows end with EOS (1) at varied lengths: 2-9 new tokens greedily."""
    hf = (hf_reference.gpt2_ending_with(1, HF_V) if request.param == "gpt2" else
          hf_reference.t5_ending_with_eos(HF_V))
    return request.param, hf, hf_reference.as_loaded(hf)


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(2, HF_V, n).tolist() for n in (3, 7, 5, 1, 6, 2)]


def _hf_generate(kind, hf, prompts, **kw):
    """HF generate's rows (cut after EOS) and sequences_scores."""
    rows, scores = hf_reference.padded_generate(hf, prompts, N, kind == "gpt2", eos_token_id=1,
                                                **kw)
    return [hf_reference.cut_at(r, [1]) for r in rows], scores


# ----------------------------------------------------------------------------- the arithmetic
# Sequence biases of one to three ids (two ending in 6: they add up; one after the id GPT rows
# are padded with, which only T5's start id may match), bad words (the stop ids [1] and [5] are
# left out, as in HF; one longer than any history here), always- and first-suppressed ids.
SEQUENCES = dict(sequence_bias=(((3,), 1.5), ((2, 6), -2.0), ((5, 6), -1.0), ((6, 3), 0.7),
                                ((4, 2, 6), 2.5), ((0, 3), 0.9)),  # 0: GPT's padding id here
                 bad_words_ids=((1,), (5,), (5, 2), (2, 6, 3), (7,), (2, 3, 4, 5, 6, 7) * 4),
                 suppress_tokens=(4,),
                 begin_suppress_tokens=(6, 0))


@pytest.mark.parametrize("sequences", [False, True])
@pytest.mark.parametrize("penalty,ngram", [(0.7, 2), (1.3, 3), (1.0, 1)])
@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_process_equals_hf_processors(penalty, ngram, family, sequences):
    """Scores of both signs; GPT prompts left-padded (HF: prompt_ignore_length; its n-gram,
    bias and bad-word rules see the padding, so they are given each row unpadded), T5's
    decoder input starting at its start id 0; a small vocabulary, so that n-grams repeat; rows
    before and past min_new_tokens; with `sequences`, HF's sequence bias, bad words and
    suppressed tokens too, in HF's order."""
    rng = np.random.default_rng(1)
    b, p, v, min_new, stops = 4, 6, 8, 3, (1, 5)
    lengths = np.array([6, 2, 4, 1])
    prompt = rng.integers(0, v, (b, p)).astype(np.int32)
    prompt[np.arange(p)[None] < p - lengths[:, None]] = 0  # left padding
    extra = dict(SEQUENCES) if sequences else {}
    if sequences:  # GPT row 3 is its padding (0s), then one id t: padding + t must not match
        extra["sequence_bias"] += (((0, int(prompt[3, -1]), 3), 1.25),)
    proc = processors.Processing.of(penalty, ngram, min_new, stops, **extra)
    for generated in (0, 2, 3, 5, 9, 16):
        new = rng.integers(0, v, (b, generated)).astype(np.int32)
        new[0] = np.resize([2, 6, 3], generated)  # row 0 repeats a 3-gram: bans for n <= 4
        scores = rng.normal(0, 3, (b, v)).astype(np.float32)
        history = processors.initial_history(proc, family, jnp.asarray(prompt),
                                             jnp.asarray(lengths), v, room=16)
        for j in range(generated):
            history = processors.extend(history, jnp.asarray(new[:, j]))
        ours = np.asarray(processors.process(proc, jnp.asarray(scores), history, generated))

        if family == "gpt":
            full = np.concatenate([prompt, new], 1)
            pen = hf_lp.RepetitionPenaltyLogitsProcessor(
                penalty, prompt_ignore_length=torch.tensor(p - lengths))
            rows, start = [full[r, p - lengths[r]:] for r in range(b)], p
        else:
            full = np.concatenate([np.zeros((b, 1), np.int32), new], 1)
            pen, start = hf_lp.RepetitionPenaltyLogitsProcessor(penalty), 1
            rows = list(full)
        ids = torch.tensor(full, dtype=torch.long)

        def per_row(processor, scores):  # each row unpadded
            return torch.cat([processor(torch.tensor(row[None], dtype=torch.long),
                                        scores[r:r + 1]) for r, row in enumerate(rows)])

        theirs = torch.tensor(scores)
        if sequences:
            theirs = per_row(hf_lp.SequenceBiasLogitsProcessor(
                [[list(i), bias] for i, bias in extra["sequence_bias"]]), theirs)
        theirs = per_row(hf_lp.NoRepeatNGramLogitsProcessor(ngram), pen(ids, theirs))
        if sequences:
            theirs = per_row(hf_lp.NoBadWordsLogitsProcessor(
                [list(w) for w in extra["bad_words_ids"]], list(stops)), theirs)
        theirs = hf_lp.MinNewTokensLengthLogitsProcessor(start, min_new, list(stops))(ids, theirs)
        if sequences:
            theirs = hf_lp.SuppressTokensLogitsProcessor(extra["suppress_tokens"])(ids, theirs)
            theirs = hf_lp.SuppressTokensAtBeginLogitsProcessor(
                extra["begin_suppress_tokens"], full.shape[1] - generated)(ids, theirs)
        theirs = theirs.numpy()
        np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
        finite = np.isfinite(theirs)  # XLA:CPU's division may be 1 ulp off the rounded one
        np.testing.assert_array_max_ulp(ours[finite], theirs[finite], maxulp=1)
        if generated < min_new:
            assert np.isneginf(ours[:, list(stops)]).all()
        if generated >= 5:  # row 0's last n - 1 ids came before, followed by one id
            assert np.isneginf(ours[0]).any()
        if sequences and generated == 2:  # row 0 ends with 2 6: the bad word 2 6 3
            without = processors.process(processors.Processing.of(penalty, ngram, min_new, stops),
                                         jnp.asarray(scores), history, generated)
            assert np.isneginf(ours[0, 3]) and (ngram == 1 or np.isfinite(without[0, 3]))


def test_off_is_none_and_bad_values_are_refused():
    assert processors.Processing.of(1.0, 0, 0, (1,)) is None
    assert processors.Processing.of(1.0, 0, 5, ()) is None  # no stop id to hold back
    assert processors.Processing.of(1.2, 0, 0, (1, 2)).stop_ids == ()
    assert processors.Processing.of(1.0, 2, 0, (1,)) is not None
    x = jnp.ones((2, 3))
    assert processors.process(None, x, None, 0) is x
    for kw, message in [({"repetition_penalty": 0.0}, "repetition_penalty must be finite and > 0"),
                        ({"repetition_penalty": float("inf")}, "repetition_penalty must be"),
                        ({"min_new_tokens": -1}, "min_new_tokens must be >= 0"),
                        ({"min_new_tokens": 1.5}, "decode.min_new_tokens must be an integer"),
                        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size must be >= 0"),
                        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
                        ({"repetition_penalty": "x"}, "repetition_penalty must be a float"),
                        ({"bad_words_ids": "[[5,"}, "bad_words_ids must be JSON"),
                        ({"bad_words_ids": [[]]}, "must hold non-empty lists of token ids"),
                        ({"bad_words_ids": [[True]]}, "must hold non-empty lists of token ids"),
                        ({"sequence_bias": [[[5], float("inf")]]}, "finite float32 or -inf"),
                        ({"sequence_bias": [[[5], float("nan")]]}, "finite float32 or -inf"),
                        ({"sequence_bias": [[[5], 1e39]]}, "finite float32 or -inf"),
                        ({"sequence_bias": 5}, r"must be \[ids, bias\] pairs"),
                        ({"suppress_tokens": [-1]}, r"token ids in \[0, 2147483647\]"),
                        ({"begin_suppress_tokens": [float("inf")]}, "must be token ids")]:
        with pytest.raises(gen.DecodeError, match=message):
            gen.decode_options(**kw)
    # The flags' text forms read back to the Python values (-inf: JSON's -Infinity).
    text = dict(sequence_bias='[[[5, 6], -Infinity], [[7], 1.5]]', bad_words_ids="[[5, 6], [7]]",
                suppress_tokens="3, 4", begin_suppress_tokens="[9, 8]")
    options = gen.decode_options(**text)
    assert (options.sequence_bias, options.bad_words_ids, options.suppress_tokens,
            options.begin_suppress_tokens) == ((((5, 6), -np.inf), ((7,), 1.5)),
                                               ((5, 6), (7,)), (3, 4), (9, 8))
    assert gen.decode_options(sequence_bias={(5, 6): -np.inf, (7,): 1.5}) == options.__class__(
        sequence_bias=options.sequence_bias)
    for name in gen.SEQUENCE_OPTIONS:
        value = getattr(options, name)
        assert getattr(gen.decode_options(**{name: gen.sequence_option_text(name, value)}),
                       name) == value


# ----------------------------------------------------------------------------- against generate
@pytest.mark.parametrize("penalty,ngram,min_new", [(1.5, 0, 0), (1.0, 0, 10), (0.8, 3, 6),
                                                   (1.0, 2, 10)])
def test_greedy_equals_hf(pair, penalty, ngram, min_new):
    """HF generate is run on each prompt alone where the n-gram rule is on: HF's rule counts a
    row's left padding as history (here it does not)."""
    kind, hf, loaded = pair
    prompts = _prompts()
    hf_kw = dict(do_sample=False, repetition_penalty=penalty, no_repeat_ngram_size=ngram,
                 min_new_tokens=min_new)
    theirs = ([_hf_generate(kind, hf, [x], **hf_kw)[0][0] for x in prompts] if ngram else
              _hf_generate(kind, hf, prompts, **hf_kw)[0])
    ours = gen.generate(loaded, input_ids=prompts, max_new_tokens=N, batch_size=8,
                        repetition_penalty=penalty, no_repeat_ngram_size=ngram,
                        min_new_tokens=min_new)
    assert [r["ids"] for r in ours] == theirs
    plain = gen.generate(loaded, input_ids=prompts, max_new_tokens=N, batch_size=8)
    assert [r["ids"] for r in plain] != theirs  # the processors changed the decode
    if ngram:  # and the n-gram rule did
        assert [r["ids"] for r in gen.generate(
            loaded, input_ids=prompts, max_new_tokens=N, batch_size=8,
            repetition_penalty=penalty, min_new_tokens=min_new)] != theirs
    if min_new:
        assert min(len(r["ids"]) for r in plain) < min_new
        assert all(len(r["ids"]) > min_new for r in ours) and any(r["finished"] for r in ours)
    # The score stays the model's log-prob of the ids (the uncached forward's).
    for prompt, r in zip(prompts, ours):
        np.testing.assert_allclose(r["score"], _logprob(kind, hf, prompt, r["ids"]),
                                   rtol=1e-4, atol=1e-4)


def test_sequence_bias_bad_words_and_suppression_equal_hf(pair):
    """Greedy with HF's sequence bias, bad words and suppressed tokens equals HF generate token
    for token (each prompt alone: HF matches a GPT row's left padding too). Each option is
    chosen from HF's decode with the ones before it, so that it changes that decode; without
    any one of them, HF's decode differs."""
    kind, hf, loaded = pair
    prompts = _prompts()

    def hf_rows(**kw):
        return [_hf_generate(kind, hf, [x], do_sample=False, **kw)[0][0] for x in prompts]

    rows = hf_rows()
    options = {"bad_words_ids": [rows[0][:2]]}
    rows = hf_rows(**options)
    options["suppress_tokens"] = [
        collections.Counter(t for r in rows for t in r if t != 1).most_common(1)[0][0]]
    rows = hf_rows(**options)
    options["begin_suppress_tokens"] = [rows[1][0]]
    rows = hf_rows(**options)
    options["sequence_bias"] = {(rows[2][0],): -4.0, (rows[3][0], 7): 6.0}
    theirs = hf_rows(**options)
    for name in options:
        assert hf_rows(**{k: v for k, v in options.items() if k != name}) != theirs, name
    ours = gen.generate(loaded, input_ids=prompts, max_new_tokens=N, batch_size=8, **options)
    assert [r["ids"] for r in ours] == theirs
    for prompt, r in zip(prompts, ours):
        np.testing.assert_allclose(r["score"], _logprob(kind, hf, prompt, r["ids"]),
                                   rtol=1e-4, atol=1e-4)


def test_beam_search_keeps_bad_words_and_suppressed_ids_out(pair):
    """Beam search with a bad bigram and a suppressed id taken from its plain beams: no beam
    holds them, and the beams change. A bad word longer than any history rides along: it
    once failed to compile (it is never matched, as HF skips it: `test_process_equals_...`)."""
    kind, hf, loaded = pair
    prompts = _prompts()
    kw = dict(method="beam", num_beams=3, alpha=0.0, max_new_tokens=8, batch_size=8)
    plain = [[b["ids"] for b in beams] for beams in gen.generate(loaded, input_ids=prompts, **kw)]
    bigram = plain[0][0][:2]
    common = collections.Counter(t for beams in plain for ids in beams for t in ids
                                 if t != 1).most_common(1)[0][0]
    too_long = list(range(2, 40))  # 38 ids: more than a prompt + 8 new tokens
    ours = [[b["ids"] for b in beams] for beams in gen.generate(
        loaded, input_ids=prompts, bad_words_ids=[bigram, too_long], suppress_tokens=[common],
        **kw)]
    assert ours != plain
    for beams, prompt in zip(ours, prompts):
        for ids in beams:
            history = (prompt if kind == "gpt2" else [0]) + ids
            assert common not in ids
            first = len(prompt) - 1 if kind == "gpt2" else 0  # windows ending in new ids
            assert all(history[i:i + 2] != bigram for i in range(first, len(history) - 1))


def _no_repeated_ngram(ids, n):
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) == len(set(grams))


def _logprob(kind, hf, prompt, ids, penalty=1.0, ngram=0, min_new=0):
    """Sum of log p(id) under the HF model (uncached forward); with `penalty` / `ngram` /
    `min_new`, of the log-probs after HF's processors, as HF's beam search sums them."""
    gpt = kind == "gpt2"
    history = torch.tensor([(prompt if gpt else [0]) + ids[:-1]])
    with torch.no_grad():
        if gpt:
            logits = hf(input_ids=history).logits[0, len(prompt) - 1:]
        else:
            logits = hf(input_ids=torch.tensor([prompt]), decoder_input_ids=history).logits[0]
    total, start = 0.0, len(prompt) if gpt else 1
    for t, token in enumerate(ids):
        before = history[:, :start + t]
        scores = torch.log_softmax(logits[t:t + 1].float(), -1)
        scores = hf_lp.RepetitionPenaltyLogitsProcessor(penalty)(before, scores)
        if ngram:
            scores = hf_lp.NoRepeatNGramLogitsProcessor(ngram)(before, scores)
        scores = hf_lp.MinNewTokensLengthLogitsProcessor(start, min_new, [1])(before, scores)
        total += float(scores[0, token])
    return total


def test_beam_equals_hf(pair):
    """alpha 0 / length_penalty 0: the best beam and its processed sum equal HF's (HF ranks by
    the processed log-probs; every HF beam ends here, so T5X's and HF's finishing rules agree on
    the best); each rank is at least as good as HF's finished beam of that rank (every stop
    candidate may finish here; finished beams rank first).
    `penalised_score` is the processed sum and `score` the model's, both recomputed with HF."""
    kind, hf, loaded = pair
    prompts, w, penalty, ngram, min_new = _prompts(), 3, 1.4, 2, 10
    runs = [_hf_generate(kind, hf, [x], num_beams=w, do_sample=False, num_return_sequences=w,
                         length_penalty=0.0, early_stopping="never", repetition_penalty=penalty,
                         no_repeat_ngram_size=ngram, min_new_tokens=min_new) for x in prompts]
    theirs = [row for rows, _ in runs for row in rows]  # each prompt alone: see above
    hf_scores = np.stack([scores.numpy() for _, scores in runs])
    kw = dict(method="beam", num_beams=w, alpha=0.0, max_new_tokens=N, batch_size=8)
    ours = gen.generate(loaded, input_ids=prompts, repetition_penalty=penalty,
                        no_repeat_ngram_size=ngram, min_new_tokens=min_new, **kw)
    plain = gen.generate(loaded, input_ids=prompts, **kw)
    assert [b[0]["ids"] for b in plain] != [b[0]["ids"] for b in ours]
    for i, (prompt, beams) in enumerate(zip(prompts, ours)):
        assert theirs[i * w][-1] == 1 and beams[0]["ids"] == theirs[i * w]
        np.testing.assert_allclose(beams[0]["penalised_score"], hf_scores[i, 0], atol=2e-4)
        hf_finished = [hf_scores[i, j] for j in range(w) if theirs[i * w + j][-1] == 1]
        ranks = np.array([b["penalised_score"] for b in beams])[:len(hf_finished)]
        assert np.all(ranks >= np.array(hf_finished) - 2e-4)
        for b in beams:
            assert len(b["ids"]) > min_new and b["finished"]
            np.testing.assert_allclose(
                b["penalised_score"],
                _logprob(kind, hf, prompt, b["ids"], penalty, ngram, min_new),
                rtol=1e-4, atol=1e-4)
            assert _no_repeated_ngram((prompt if kind == "gpt2" else [0]) + b["ids"], ngram)
            np.testing.assert_allclose(b["score"], _logprob(kind, hf, prompt, b["ids"]),
                                       rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- sampled laws
V, PROMPT = 8, [3, 5, 7, 2]


def _tiny_gpt(seed, layers):
    cfg = config_lib.gpt2(vocab_size=V, d_model=32, num_heads=2, head_dim=16, d_ff=48,
                          num_layers=layers, max_len=32)
    return decoding_testlib.loaded(cfg, seed=seed)


def _hf_law(target, prefixes, penalty, ngram, min_new, temperature, min_p, generated):
    """Next-token distributions after PROMPT + each prefix, built with HF's processors on the
    target's full-forward logits: penalty, no-repeat n-grams, min_new_tokens (stop id 1),
    temperature, min-p."""
    seqs = np.array([PROMPT + list(p) for p in prefixes], np.int32)
    logits = jax.jit(build_model(target.model.config).logits)(
        target.params, {"decoder_input_tokens": seqs})[:, -1]
    ids, scores = torch.tensor(seqs, dtype=torch.long), torch.tensor(np.asarray(logits))
    scores = hf_lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
    if ngram:
        scores = hf_lp.NoRepeatNGramLogitsProcessor(ngram)(ids, scores)
    scores = hf_lp.MinNewTokensLengthLogitsProcessor(len(PROMPT), min_new, [1])(ids, scores)
    scores = hf_lp.TemperatureLogitsWarper(temperature)(ids, scores)
    scores = hf_lp.MinPLogitsWarper(min_p)(ids, scores)
    assert ids.shape[1] == len(PROMPT) + generated
    return torch.softmax(scores.double(), -1).numpy()


@pytest.mark.parametrize("draft", ["none", "other"])
def test_sampled_pairs_follow_the_processed_law(draft):
    """The first two tokens of 4096 samples, plain and speculative (a different draft: accept,
    reject and correction paths), follow the law HF's processors give: the second token's
    penalty counts the first, a bigram of the prompt is not repeated (after a first token 5,
    the prompt's 5 7 bans 7, the likeliest token), min_new_tokens 1 holds EOS back only at the
    first, and min-p drops the unlikely tokens. Each of them matters to the law."""
    target = _tiny_gpt(0, 2)
    target.params["token_embedder"]["embedding"][1] *= 3.0  # EOS likely once allowed
    rows, penalty, temperature, min_p = 4096, 1.8, 2.0, 0.01
    law = dict(ngram=2, min_new=1, temperature=temperature, min_p=min_p)
    opts = gen.DecodeOptions(method="sample", max_new_tokens=2, num_draft=2, seed=5,
                             temperature=temperature, min_p=min_p, repetition_penalty=penalty,
                             no_repeat_ngram_size=2, min_new_tokens=1, stop_ids=(1,))
    tokens, lengths = gen.pack_prompts(target.model.config, [PROMPT] * rows, rows)
    out = gen.decode_batch(target, tokens, lengths, opts,
                           draft=None if draft == "none" else _tiny_gpt(5, 1))
    out = out if draft == "none" else out[0]
    toks, n = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
    assert (n == 2).all()  # no EOS first (min_new_tokens), so every row has two tokens
    p0 = _hf_law(target, [()], penalty, generated=0, **law)[0]
    p1 = _hf_law(target, [(t,) for t in range(V)], penalty, generated=1, **law)
    assert p0[1] == 0 and p1[:, 1].max() > 0.02  # min_new_tokens
    no_ngram = _hf_law(target, [(5,)], penalty, generated=1, **{**law, "ngram": 0})[0]
    assert p0[5] > 0.02 and p1[5, 7] == 0 and no_ngram[7] > 0.1
    no_min_p = _hf_law(target, [(t,) for t in range(V)], penalty, generated=1,
                       **{**law, "min_p": 0.0})
    assert ((p1 == 0) & (no_min_p > 0)).sum() >= 3  # min-p dropped tokens
    joint = p0[:, None] * p1
    counts = np.zeros((V, V))
    np.add.at(counts, (toks[:, 0], toks[:, 1]), 1)
    keep = joint.ravel() > 0
    assert counts.ravel()[~keep].sum() == 0
    expected = rows * joint.ravel()[keep] / joint.ravel()[keep].sum()
    assert scipy.stats.chisquare(counts.ravel()[keep], expected)[1] > 1e-3
    # Not the unpenalised law: the prompt's ids are rarer than without the penalty.
    plain = _hf_law(target, [()], 1.0, generated=0, **law)[0]
    assert p0[7] < plain[7] * 0.8 and abs(np.mean(toks[:, 0] == 7) - p0[7]) < 0.03


@pytest.mark.parametrize("draft", ["none", "other"])
@pytest.mark.parametrize("name,value,warper", [
    ("typical_p", 0.9, hf_lp.TypicalLogitsWarper), ("epsilon_cutoff", 0.03,
                                                    hf_lp.EpsilonLogitsWarper),
    ("eta_cutoff", 0.1, hf_lp.EtaLogitsWarper)])
def test_sampled_tokens_follow_hfs_typical_epsilon_eta_law(name, value, warper, draft):
    """4096 first tokens, plain and speculative, sampled with temperature 2 and typical-p, an
    epsilon or an eta cutoff follow the law of HF's warpers on the full-forward logits; the
    filter removes tokens the temperature alone keeps."""
    target = _tiny_gpt(0, 2)
    rows, temperature = 4096, 2.0
    opts = gen.DecodeOptions(method="sample", max_new_tokens=1, num_draft=2, seed=3,
                             temperature=temperature, **{name: value})
    tokens, lengths = gen.pack_prompts(target.model.config, [PROMPT] * rows, rows)
    out = gen.decode_batch(target, tokens, lengths, opts,
                           draft=None if draft == "none" else _tiny_gpt(5, 1))
    first = np.asarray((out if draft == "none" else out[0]).tokens_BxN)[:, 0]
    logits = jax.jit(build_model(target.model.config).logits)(
        target.params, {"decoder_input_tokens": np.array([PROMPT], np.int32)})[:, -1]
    ids = torch.tensor([PROMPT], dtype=torch.long)
    scores = hf_lp.TemperatureLogitsWarper(temperature)(ids, torch.tensor(np.asarray(logits)))
    unfiltered = torch.softmax(scores.double(), -1).numpy()[0]
    p = torch.softmax(warper(value)(ids, scores).double(), -1).numpy()[0]
    assert unfiltered[p == 0].sum() > 0.03 and (p > 0).sum() >= 3  # the filter matters
    counts = np.bincount(first, minlength=V)
    assert counts[p == 0].sum() == 0
    assert scipy.stats.chisquare(counts[p > 0], rows * p[p > 0] / p[p > 0].sum())[1] > 1e-3


GREEDY_PROMPTS = [[5, 6, 7], [4], [2, 3, 4, 5, 6], [3, 3], [7, 2]]


def _ending_gpt():
    """The tiny GPT with EOS likelier (rows end at different steps)."""
    target = _tiny_gpt(0, 2)
    target.params["token_embedder"]["embedding"][1] *= 4.0
    return target


@pytest.mark.parametrize("sequences", [False, True])
def test_speculative_greedy_equals_plain_greedy(sequences):
    """Draft other than the target (rejections) and the target itself (bonus path); with
    `sequences`, sequence biases, bad words and suppressed tokens too."""
    target, prompts = _ending_gpt(), GREEDY_PROMPTS
    # min_new_tokens 6: with k = 3, an iteration from count 5 checks positions 5-8 and EOS is
    # allowed from the second of them on (rows end right there).
    kw = dict(max_new_tokens=14, batch_size=8, repetition_penalty=1.6, no_repeat_ngram_size=3,
              min_new_tokens=6)
    if sequences:
        before = gen.generate(target, input_ids=prompts, **kw)
        kw.update(sequence_bias={(3,): 1.0, (2, 4): 2.5, (4, 2, 6): -1.5},
                  bad_words_ids=[[6, 3], [7, 7, 2]], suppress_tokens=[0],
                  begin_suppress_tokens=[2])
    plain = gen.generate(target, input_ids=prompts, **kw)
    assert plain != gen.generate(target, input_ids=prompts, max_new_tokens=14, batch_size=8)
    if sequences:
        assert [r["ids"] for r in plain] != [r["ids"] for r in before]
    assert all(len(r["ids"]) > 6 for r in plain) and any(r["finished"] for r in plain)
    for d in (_tiny_gpt(1, 1), target):
        spec = gen.generate(target, input_ids=prompts, draft=d, num_draft=3, **kw)
        assert [r["ids"] for r in spec] == [r["ids"] for r in plain]
        np.testing.assert_allclose([r["score"] for r in spec], [r["score"] for r in plain],
                                   rtol=1e-4)


@pytest.mark.parametrize("draft", [False, True])
def test_each_sample_row_keeps_its_prompts_history(draft):
    """num_samples 3 with top_k 1 (so each sample is the greedy pick): every sample of every
    prompt equals that prompt's greedy decode with the same processors, plain and speculative
    (rows of other prompts' histories would differ)."""
    target, prompts = _ending_gpt(), GREEDY_PROMPTS
    kw = dict(max_new_tokens=12, batch_size=8, repetition_penalty=1.6, no_repeat_ngram_size=2,
              min_new_tokens=4)
    greedy = gen.generate(target, input_ids=prompts, **kw)
    assert len({tuple(r["ids"]) for r in greedy}) == len(prompts)
    sampled = gen.generate(target, input_ids=prompts, method="sample", top_k=1, num_samples=3,
                           draft=_tiny_gpt(1, 1) if draft else None, num_draft=3, **kw)
    for g, samples in zip(greedy, sampled):
        assert [s["ids"] for s in samples] == [g["ids"]] * 3
