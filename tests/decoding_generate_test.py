"""generate(): greedy and beam search equal HF `generate` on converted random T5 v1.1 / GPT-2
weights; the API's options, errors, seeds and batching.

The HF models are tiny, random, built offline (eager attention) and then biased so that EOS
(id 1) becomes likely and every beam ends within the budget: GPT-2 gets a component added to the
position embeddings from position 8 on that the (tied) EOS embedding reads out, so outputs end
after a prompt-dependent number of tokens; T5 gets that component on the input embeddings of a
third of the vocabulary ("terminators"), read out by its untied lm_head's EOS row, so EOS follows
those tokens.
"""
import math
import re
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import decoding_testlib
import hf_reference
import t5x_lite
from t5x_lite import checkpoints, convert
from t5x_lite import config as config_lib
from t5x_lite.config import ModelConfig
from t5x_lite.data import testing as data_testing
from t5x_lite.decoding import generate as gen
from t5x_lite.decoding.generate import DecodeError, generate

V, N = 96, 20
PROMPT_LENGTHS = [3, 7, 5, 1, 6, 2]


@pytest.fixture(scope="module")
def gpt2():
    model = hf_reference.gpt2_ending_with(1, V)
    return model, hf_reference.as_loaded(model)


@pytest.fixture(scope="module")
def t5():
    model = hf_reference.t5_ending_with_eos(V)
    loaded = hf_reference.as_loaded(model)
    assert not loaded.model.config.tie_embeddings
    return model, loaded


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(2, V, n).tolist() for n in PROMPT_LENGTHS]


_HF_OUTPUTS = {}  # one HF generate per (model, prompts, settings) in this module


def _hf_generate(model, prompts, left_pad, eos=1, **kw):
    """HF generate's (rows cut after EOS, sequences_scores), computed once per model, prompts
    and settings: several tests compare against the same reference (a copy each)."""
    key = (model, tuple(map(tuple, prompts)), left_pad, eos, tuple(sorted(kw.items())))
    if key not in _HF_OUTPUTS:
        _HF_OUTPUTS[key] = _hf_generate_uncached(model, prompts, left_pad, eos, **kw)
    rows, scores = _HF_OUTPUTS[key]
    return [list(r) for r in rows], None if scores is None else scores.clone()


def _hf_generate_uncached(model, prompts, left_pad, eos=1, **kw):
    rows, scores = hf_reference.padded_generate(model, prompts, N, left_pad, eos_token_id=eos,
                                                do_sample=False, **kw)
    return [hf_reference.cut_at(r, [eos]) for r in rows], scores


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_greedy_equals_hf(family, request):
    model, loaded = request.getfixturevalue(family)
    prompts = _prompts()
    theirs, _ = _hf_generate(model, prompts, left_pad=family == "gpt2")
    ours = generate(loaded, input_ids=prompts, max_new_tokens=N, batch_size=8)
    assert [r["ids"] for r in ours] == theirs
    lengths = [len(r["ids"]) for r in ours]
    assert len(set(lengths)) >= 3 and all(r["finished"] for r in ours)  # EOS per row
    assert all(np.isfinite(r["score"]) and r["score"] < 0 for r in ours)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_greedy_in_cache_phases_equals_hf(family, request, monkeypatch):
    """Short phases (a few slots each): the cache grows several times mid-decode."""
    monkeypatch.setattr(gen, "MIN_PHASE", 2)
    monkeypatch.setattr(gen, "CACHE_PHASES", 6)
    cfg = request.getfixturevalue(family)[1].model.config
    assert len(gen.cache_phases(cfg, 7, N)) >= 4
    model, loaded = request.getfixturevalue(family)
    prompts = _prompts()
    theirs, _ = _hf_generate(model, prompts, left_pad=family == "gpt2")
    ours = generate(loaded, input_ids=prompts, max_new_tokens=N, batch_size=8)
    assert [r["ids"] for r in ours] == theirs


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_beam_alpha0_equals_hf(family, request):
    model, loaded = request.getfixturevalue(family)
    prompts, w = _prompts(), 3
    theirs, hf_scores = _hf_generate(model, prompts, left_pad=family == "gpt2", num_beams=w,
                                     num_return_sequences=w, length_penalty=0.0,
                                     early_stopping="never")
    hf_scores = hf_scores.numpy().reshape(-1, w)
    ours = generate(loaded, input_ids=prompts, method="beam", num_beams=w, alpha=0.0,
                    max_new_tokens=N, batch_size=8)
    for i, beams in enumerate(ours):
        assert all(seq[-1] == 1 for seq in theirs[i * w:(i + 1) * w])  # all HF beams ended
        assert all(b["finished"] for b in beams)
        assert beams[0]["ids"] == theirs[i * w]  # the best beam
        np.testing.assert_allclose(beams[0]["score"], hf_scores[i, 0], atol=2e-4)
        np.testing.assert_allclose([b["penalised_score"] for b in beams],
                                   [b["score"] for b in beams])  # alpha 0: no penalty
        # HF lets only the top-W ranked candidates finish; every EOS candidate may finish
        # here, so each rank can only be as good or better.
        assert np.all(np.array([b["score"] for b in beams]) >= hf_scores[i] - 2e-4)


# Each early_stopping value changes HF's beams here, against the others at the same penalty
# and budget (T5: all three; GPT-2: "never" against the other two).
HF_BEAM_SETTINGS = [(1.0, False, N), (2.0, True, 6), (2.0, "never", N), (-0.5, False, 6)]


@pytest.mark.parametrize("family", ["gpt2", "t5"])
@pytest.mark.parametrize("length_penalty, early_stopping, n", HF_BEAM_SETTINGS)
def test_hf_beam_rule_equals_hf(family, length_penalty, early_stopping, n, request):
    """beam_rule "hf": every returned beam (ids, length-normalised score, whether it ended)
    equals HF's beam search with the same length_penalty / early_stopping, in budgets where
    every beam ends (N) and where most are cut at the budget (6)."""
    model, loaded = request.getfixturevalue(family)
    prompts, w = _prompts(), 3
    rows, hf_scores = hf_reference.padded_generate(
        model, prompts, n, family == "gpt2", eos_token_id=1, do_sample=False, num_beams=w,
        num_return_sequences=w, length_penalty=length_penalty, early_stopping=early_stopping)
    hf_scores = hf_scores.numpy().reshape(-1, w)
    ours = generate(loaded, input_ids=prompts, method="beam", num_beams=w, beam_rule="hf",
                    length_penalty=length_penalty, early_stopping=early_stopping,
                    max_new_tokens=n, batch_size=8)
    cut = 0
    for i, beams in enumerate(ours):
        theirs = [hf_reference.cut_at(r, [1]) for r in rows[i * w:(i + 1) * w]]
        assert [b["ids"] for b in beams] == theirs
        np.testing.assert_allclose([b["penalised_score"] for b in beams], hf_scores[i],
                                   atol=2e-4)
        np.testing.assert_allclose([b["penalised_score"] for b in beams],
                                   [b["score"] / len(b["ids"]) ** length_penalty
                                    for b in beams], rtol=1e-5)
        assert [b["finished"] for b in beams] == [t[-1] == 1 for t in theirs]
        cut += sum(not b["finished"] for b in beams)
    assert (cut > 0) == (n < N)  # the budget-cut path runs where meant


def test_one_hf_beam_is_greedy_as_in_hf(gpt2):
    """HF decodes greedily with num_beams=1 (length_penalty and early_stopping unused); so does
    beam_rule "hf". Here a one-beam search under "never" and a strong penalty would differ."""
    model, loaded = gpt2
    prompts = _prompts()
    kw = dict(length_penalty=3.0, early_stopping="never")
    theirs, _ = _hf_generate(model, prompts, left_pad=True, num_beams=1, **kw)
    assert gen.DecodeOptions(method="beam", beam_rule="hf", num_beams=1).method == "greedy"
    ours = generate(loaded, input_ids=prompts, method="beam", num_beams=1, beam_rule="hf",
                    max_new_tokens=N, batch_size=8, **kw)
    assert [r["ids"] for r in ours] == theirs
    one_beam = generate(loaded, input_ids=prompts, method="beam", num_beams=1, alpha=3.0,
                        max_new_tokens=N, batch_size=8)  # T5X's rule: a search of one beam
    assert [r["ids"] for r in one_beam] != theirs


def test_no_sequence_at_all_is_an_empty_beam():
    """Processors that ban every candidate before a beam can end (a 6-id vocabulary, no
    repeated id, no EOS before 8 tokens): one beam is an empty result, more are an empty list
    (both rules)."""
    loaded = hf_reference.as_loaded(hf_reference.gpt2_ending_with(1, 6))
    kw = dict(input_ids=[[2, 3], [4, 5]], method="beam", no_repeat_ngram_size=1,
              min_new_tokens=8, max_new_tokens=10, batch_size=2)
    for rule in ("t5", "hf"):
        assert generate(loaded, num_beams=2, beam_rule=rule, **kw) == [[], []]
    one = generate(loaded, num_beams=1, token_scores=True, **kw)
    assert one == [{"ids": [], "score": -math.inf, "finished": False,
                    "penalised_score": -math.inf, "token_scores": []}] * 2


def _hf_token_log_probs(model, family, prompt, ids):
    """log p(id) of each id under the HF model, by one uncached forward pass."""
    with torch.no_grad():
        if family == "gpt2":
            logits = model(input_ids=torch.tensor([prompt + ids[:-1]])).logits[0, len(prompt) - 1:]
        else:
            logits = model(input_ids=torch.tensor([prompt]),
                           decoder_input_ids=torch.tensor([[0] + ids[:-1]])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return logp[torch.arange(len(ids)), torch.tensor(ids)].numpy()


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_token_scores_equal_hf_transition_scores(family, request):
    """`token_scores`: greedy and the best beam equal HF's `compute_transition_scores` (beam:
    with its beam indices); sampled rows (num_samples 2) and speculative greedy rows equal the
    uncached forward's log-probs of their ids; every list sums to `score`."""
    model, loaded = request.getfixturevalue(family)
    prompts, gpt = _prompts(), family == "gpt2"
    ours = generate(loaded, input_ids=prompts, max_new_tokens=N, batch_size=8,
                    token_scores=True)
    rows, theirs = hf_reference.padded_generate(model, prompts, N, gpt, transition=True,
                                                eos_token_id=1, do_sample=False)
    for r, row, t in zip(ours, rows, theirs):
        assert r["ids"] == hf_reference.cut_at(row, [1])
        np.testing.assert_allclose(r["token_scores"], t[:len(r["ids"])], atol=1e-4)
        np.testing.assert_allclose(sum(r["token_scores"]), r["score"], rtol=1e-5)
    assert max(len(r["ids"]) for r in ours) >= 5

    w = 3
    beams = generate(loaded, input_ids=prompts, method="beam", num_beams=w, alpha=0.0,
                     max_new_tokens=N, batch_size=8, token_scores=True)
    rows, theirs = hf_reference.padded_generate(
        model, prompts, N, gpt, transition=True, eos_token_id=1, num_beams=w,
        num_return_sequences=w, length_penalty=0.0, early_stopping="never", do_sample=False)
    for i, b in enumerate(beams):
        best = b[0]
        assert best["ids"] == hf_reference.cut_at(rows[i * w], [1])
        np.testing.assert_allclose(best["token_scores"], theirs[i * w][:len(best["ids"])],
                                   atol=1e-4)
        for beam in b:
            assert len(beam["token_scores"]) == len(beam["ids"])
            np.testing.assert_allclose(sum(beam["token_scores"]), beam["score"], rtol=1e-5)

    sampled = generate(loaded, input_ids=prompts[:3], method="sample", num_samples=2, seed=3,
                       max_new_tokens=N, temperature=1.5, top_k=20, token_scores=True)
    checked = [(p, s) for p, two in zip(prompts, sampled) for s in two]
    if gpt:  # speculative decoding (decoder-only): bonus path, and a random draft's rejections
        for draft in (loaded, decoding_testlib.loaded(loaded.model.config, seed=5)):
            spec = generate(loaded, input_ids=prompts, max_new_tokens=N, batch_size=8,
                            draft=draft, num_draft=3, token_scores=True)
            assert [r["ids"] for r in spec] == [r["ids"] for r in ours]
            checked += list(zip(prompts, spec))
    for prompt, r in checked:
        np.testing.assert_allclose(r["token_scores"],
                                   _hf_token_log_probs(model, family, prompt, r["ids"]),
                                   atol=1e-4)
        np.testing.assert_allclose(sum(r["token_scores"]), r["score"], rtol=1e-5)
    assert "token_scores" not in generate(loaded, input_ids=prompts[:1], max_new_tokens=2)[0]


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_decoding_on_meshes_equals_hf_and_splits_the_rows(family, request):
    """Params sharded as `t5x_lite.load(path, mesh=...)` places them (FSDP, tensor parallel);
    the prompts split over data x fsdp, padded to a multiple of it (batch_size 4 on 8-way data
    parallelism); beam search equals its one-device result."""
    model, loaded = request.getfixturevalue(family)
    prompts = _prompts()
    theirs, _ = _hf_generate(model, prompts, left_pad=family == "gpt2")
    for shape, batch in (((2, 2, 2), 8), ((8, 1, 1), 4)):
        ours = generate(decoding_testlib.on_mesh(loaded, shape), input_ids=prompts,
                        max_new_tokens=N, batch_size=batch)
        assert [r["ids"] for r in ours] == theirs, shape
    beam = dict(input_ids=prompts, method="beam", num_beams=3, max_new_tokens=N, batch_size=8)
    want = generate(loaded, **beam)
    got = generate(decoding_testlib.on_mesh(loaded, (2, 2, 2)), **beam)
    assert [[b["ids"] for b in r] for r in got] == [[b["ids"] for b in r] for r in want]
    np.testing.assert_allclose([[b["score"] for b in r] for r in got],
                               [[b["score"] for b in r] for r in want], atol=1e-4)

    # Each device decodes its own rows: per-device FLOPs of the compiled decode on 8-way data
    # parallelism are ~1/8 of one device's (every device decoding every row would give ~1).
    # Both programs are the ones decoded above / in test_greedy_equals_hf: the one-device one
    # is the unsharded model's (no mesh), 8 rows as there.
    def device_flops(model):
        cfg = model.model.config
        tokens, lengths = gen.pack_prompts(cfg, prompts + prompts[:2], 8)
        (tokens, lengths, example), context = gen.shard_rows(
            model, tokens, lengths, np.arange(8, dtype=np.int32))
        with context:
            return gen._sample_jit.lower(
                model.params, tokens, lengths, np.uint32(0), example, cfg=cfg, n=N,
                sampling=gen.SamplingConfig(0.0), samples=1).compile().cost_analysis()["flops"]

    assert getattr(loaded, "mesh", None) is None  # one device
    ratio = device_flops(decoding_testlib.on_mesh(loaded, (8, 1, 1))) / device_flops(loaded)
    assert 0.1 < ratio < 0.2, ratio


# ------------------------------------------------------------------- the HF config's EOS id
K = 7  # the end-of-text id of the GPT-2 below (as GPT-2's 50256): not our 1


@pytest.fixture(scope="module")
def gpt2_eos_k(tmp_path_factory):
    """A GPT-2 whose config says eos_token_id=K, biased (as `gpt2`) to end with K: (HF model,
    its saved directory, the workdir `convert --from_hf` makes of it)."""
    model = hf_reference.gpt2_ending_with(K, V)
    root = tmp_path_factory.mktemp("eos_k")
    model.save_pretrained(root / "hf", safe_serialization=True)
    convert.hf_to_workdir(root / "hf", root / "workdir")
    return model, root / "hf", root / "workdir"


def test_hf_eos_token_id_ends_generation_as_in_hf(gpt2_eos_k):
    """An HF directory and its converted workdir stop at the config's eos_token_id (K): greedy
    and speculative output equal HF generate(eos_token_id=K), every row finished at K; a draft
    that stops elsewhere is one error."""
    model, hf_dir, workdir = gpt2_eos_k
    prompts = _prompts()
    theirs, _ = _hf_generate(model, prompts, left_pad=True, eos=K)
    assert all(ids[-1] == K for ids in theirs) and len(set(map(len, theirs))) >= 3
    hf_loaded = t5x_lite.load(hf_dir)
    for m in (hf_loaded, t5x_lite.load(workdir)):
        assert m.eos_id == K
        ours = m.generate(input_ids=prompts, max_new_tokens=N, batch_size=8)
        assert [r["ids"] for r in ours] == theirs and all(r["finished"] for r in ours)
    spec = hf_loaded.generate(input_ids=prompts, max_new_tokens=N, batch_size=8,
                              draft=hf_loaded, num_draft=3)
    assert [r["ids"] for r in spec] == theirs and all(r["finished"] for r in spec)
    ones = types.SimpleNamespace(**{**vars(hf_loaded), "eos_id": 1, "stop_ids": (1,)})
    with pytest.raises(DecodeError, match="draft model stops at EOS id 1, the target at EOS id 7"):
        hf_loaded.generate(input_ids=prompts, draft=ones)


def test_a_checkpoint_trained_here_stops_at_1(gpt2_eos_k, tmp_path):
    """The converted weights at a later step (trained here: our data ends rows in 1, as after a
    LoRA merge, which copies hf_config.json too) stop at 1, as HF generate(eos_token_id=1)."""
    model, _, workdir = gpt2_eos_k
    shutil.copytree(workdir, tmp_path / "w")
    cfg = ModelConfig.from_dict(checkpoints.read_config(tmp_path / "w").model)
    checkpoints.save_params(tmp_path / "w", convert.restore_numpy_params(workdir, 0, cfg), step=3)
    assert t5x_lite.load(tmp_path / "w", step=0).eos_id == K
    trained = t5x_lite.load(tmp_path / "w")
    assert trained.eos_id == 1
    prompts = _prompts()
    theirs, _ = _hf_generate(model, prompts, left_pad=True, eos=1)
    assert any(K in ids[:-1] for ids in theirs)  # K does not stop it
    ours = trained.generate(input_ids=prompts, max_new_tokens=N, batch_size=8)
    assert [r["ids"] for r in ours] == theirs
    assert [r["finished"] for r in ours] == [ids[-1] == 1 for ids in theirs]


# ---------------------------------------------------------------------------------- API
@pytest.fixture(scope="module")
def tiny_gpt():
    cfg = config_lib.gpt2(vocab_size=64, d_model=32, num_heads=2, head_dim=16, d_ff=48,
                          num_layers=1, max_len=40)
    return decoding_testlib.loaded(cfg, seed=3)


def test_sampling_seeds_samples_and_batching(tiny_gpt):
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13, 14], [3, 3]]
    kw = dict(input_ids=prompts, method="sample", max_new_tokens=6, num_samples=2,
              temperature=1.5, top_p=0.95)
    a = generate(tiny_gpt, seed=7, batch_size=4, **kw)
    assert len(a) == 4 and all(len(x) == 2 for x in a)
    assert a == generate(tiny_gpt, seed=7, batch_size=4, **kw)
    assert a != generate(tiny_gpt, seed=8, batch_size=4, **kw)
    assert any(x[0]["ids"] != x[1]["ids"] for x in a)  # samples of one prompt differ
    # Samples are keyed by (seed, input index, sample): batching does not change them.
    b = generate(tiny_gpt, seed=7, batch_size=2, **kw)
    assert [[s["ids"] for s in x] for x in a] == [[s["ids"] for s in x] for x in b]
    np.testing.assert_allclose([s["score"] for x in a for s in x],
                               [s["score"] for x in b for s in x], rtol=1e-5)
    greedy = generate(tiny_gpt, input_ids=prompts, max_new_tokens=6, batch_size=4)
    t0 = generate(tiny_gpt, input_ids=prompts, max_new_tokens=6, batch_size=4, method="sample",
                  temperature=0.0, seed=3)
    assert [g["ids"] for g in greedy] == [t["ids"] for t in t0]  # temperature 0 = greedy


def test_gpt_prompt_at_max_len_gets_its_last_token(tiny_gpt):
    """The last new token is never fed back: a prompt of max_len (40) tokens gets one new token,
    one of 39 two (both were refused, as if prompt + max_new_tokens positions were fed). The
    token after 40 comes from the prefill, the same token after 39 + 1 from a cached step at the
    last learned position: they agree."""
    prompt = np.random.default_rng(1).integers(2, 64, 39).tolist()
    two = generate(tiny_gpt, input_ids=[prompt], max_new_tokens=2)[0]["ids"]
    assert len(two) == 2 and 1 not in two
    one = generate(tiny_gpt, input_ids=[prompt, prompt + two[:1]], max_new_tokens=1)
    assert [r["ids"] for r in one] == [two[:1], two[1:]]
    with pytest.raises(DecodeError, match=r"40 tokens \+ max_new_tokens 2 - 1 exceeds"):
        generate(tiny_gpt, input_ids=[prompt + two[:1]], max_new_tokens=2)


def test_text_in_text_out_and_checkpoint_defaults(tiny_gpt):
    vocab = types.SimpleNamespace(encode=lambda s: [2 + ord(c) % 60 for c in s],
                                  decode=lambda ids: "".join(chr(65 + i % 26) for i in ids))
    run_config = {"decode": {"method": "greedy", "max_new_tokens": 3, "batch_size": 4}}
    loaded = types.SimpleNamespace(**{**vars(tiny_gpt), "vocab": vocab, "run_config": run_config})
    out = generate(loaded, inputs=["abc", "hello"])
    assert all(len(r["ids"]) <= 3 for r in out)  # the checkpoint's max_new_tokens
    assert out[0]["text"] == vocab.decode(out[0]["ids"])
    plain = generate(tiny_gpt, input_ids=[vocab.encode("abc"), vocab.encode("hello")],
                     max_new_tokens=3, batch_size=4)
    assert [r["ids"] for r in out] == [r["ids"] for r in plain] and "text" not in plain[0]


def test_prompt_checks_refuse_t5_padding_and_name_the_draft():
    """A T5 prompt of only id 0 decoded from an encoder that attended to nothing (score()
    refuses such a row); a prompt too long for the draft alone named "the model"."""
    small = dict(vocab_size=64, d_model=32, num_heads=2, head_dim=16, d_ff=48, num_layers=1)
    options = gen.DecodeOptions(max_new_tokens=8)
    with pytest.raises(DecodeError, match=r"^input 1: empty prompt \(only id 0, padding for a "
                                          r"T5 encoder\)$"):
        gen.check_prompts(config_lib.t5_1_1(**small), [[5, 1], [0, 0]], options)
    target, draft = (config_lib.gpt2(**small, max_len=n) for n in (40, 30))
    gen.check_prompts(target, [[0] * 25], options)  # id 0 is a GPT token; 25 + 7 fit 40
    with pytest.raises(DecodeError, match=r"^input 0: prompt of 25 tokens \+ max_new_tokens 8 "
                                          r"- 1 exceeds the draft model's max length 30$"):
        gen.check_prompts(target, [[0] * 25], options, draft)


def test_a_text_the_vocabulary_refuses_names_its_row(tiny_gpt):
    """A lone surrogate (valid in JSON, no Unicode text) was sentencepiece's RuntimeError."""
    loaded = types.SimpleNamespace(**{**vars(tiny_gpt), "vocab": data_testing.tiny_vocab()})
    with pytest.raises(DecodeError, match=r"^inputs\[1\]: Cannot tokenize the text: it holds a "
                                          r"lone surrogate \(U\+DCE9 at character 3\)"):
        generate(loaded, inputs=["fine", "caf\udce9"], max_new_tokens=2)


def test_config_decode_section_holds_every_option_with_its_default():
    """A run config's `decode` section (what --decode.<field> and README list) is DecodeOptions,
    field for field and default for default (as read: stop_ids "" is ())."""
    import dataclasses
    from t5x_lite.decoding.generate import DecodeOptions, decode_options, default_decode_config
    assert set(default_decode_config()) == {f.name for f in dataclasses.fields(DecodeOptions)}
    assert decode_options() == DecodeOptions()


@pytest.mark.parametrize("kw,message", [
    (dict(method="topk"), "unknown decode method"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(num_beams=0, method="beam"), "num_beams"),
    (dict(num_samples=2), "needs method='sample'"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(input_ids=[[]]), "empty prompt"),
    (dict(input_ids=[[3] * 38]), "exceeds the model's max length"),
    (dict(input_ids=[[3, 99]]), "outside [0, 64)"),
    (dict(input_ids=None, inputs=["x"]), "need a vocabulary"),
    (dict(input_ids=None, inputs=[[3, 4]]), "inputs are texts (str), got list [3, 4]; give "
                                            "token ids as input_ids"),
    (dict(input_ids=[[3, 4], [3.7]]), "input_ids: token ids must be a 1-D or 2-D int array, "
                                      "a list of ints or a list of lists of ints (texts go in "
                                      "inputs); row 1 holds float 3.7"),
    (dict(input_ids=["hello"]), "got str 'hello' as row 0"),
    (dict(input_ids=5), "input_ids must be a list, got int"),
    (dict(input_ids=[[True, 2]]), "row 0 holds bool True"),  # was the prompt [1, 2]
    (dict(input_ids=[[2, 3], [[4, 5], [6, 7]]]), "row 1 holds list [4, 5]"),  # was flattened
    (dict(input_ids=[[2, 3], 4]), "got int 4 as row 1"),  # was the prompt [4]
    (dict(input_ids=np.zeros((1, 2, 2), np.int32)), "got a int32 array(1, 2, 2)"),
    (dict(max_new_tokens=True), "max_new_tokens must be an int, got True"),
    (dict(method="sample", temperature=True), "temperature must be a float, got True"),
    (dict(temperature="hot"), "must be a float"),
    (dict(method="sample", temperature=float("inf")), "temperature must be finite"),
    (dict(method="beam", alpha=float("nan")), "alpha must be finite"),
    (dict(method="beam", beam_rule="HF"), "unknown beam_rule 'HF'; choose one of t5, hf"),
    (dict(method="beam", length_penalty=float("inf")), "length_penalty must be finite"),
    (dict(method="beam", early_stopping="sometimes"),
     "early_stopping must be one of false, true, never (or a bool), got 'sometimes'"),
    (dict(max_new_tokens=2**31), "max_new_tokens must be <= 2147483647"),
    (dict(method="beam", num_beams=10**8), "too large to decode"),
    # keys take 32 bits: 2**32 sampled what seed 0 samples, -1 what 2**32 - 1 does
    (dict(method="sample", seed=2**32), "seed must be in [0, 2**32), got 4294967296"),
    (dict(method="sample", seed=-1), "seed must be in [0, 2**32), got -1"),
])
def test_bad_options(tiny_gpt, kw, message):
    kw = {"input_ids": [[3, 4]], "max_new_tokens": 4, **kw}
    with pytest.raises(DecodeError, match=re.escape(message)):
        generate(tiny_gpt, **kw)


def test_input_ids_forms_give_the_same_prompts(tiny_gpt):
    """One row as a list of ints, of 0-d arrays (iterating an array) or a 1-D array; rows as
    lists, 1-D arrays or a 2-D array."""
    ids = lambda x: [r["ids"] for r in generate(tiny_gpt, input_ids=x, max_new_tokens=3)]
    one, two = ids([3, 4, 5]), ids([[3, 4, 5], [6, 7, 8]])
    assert ids(list(jnp.array([3, 4, 5]))) == ids(np.array([3, 4, 5])) == one
    assert ids([np.array([3, 4, 5]), [6, 7, 8]]) == ids(np.array([[3, 4, 5], [6, 7, 8]])) == two
    assert two[0] == one[0]


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_cache_bytes_is_what_prefill_allocates(family):
    from t5x_lite.decoding import steps
    make = config_lib.gpt2 if family == "gpt" else config_lib.t5_1_1
    cfg = make(vocab_size=64, d_model=32, num_heads=2, head_dim=16, d_ff=48, num_layers=2,
               max_len=40, **({"num_decoder_layers": 3} if family == "t5" else {}))
    params = decoding_testlib.random_params(cfg)
    tokens = np.full((3, 8), 5, np.int32)
    # The cache prefill returns, as shapes and dtypes (abstract evaluation: what it allocates,
    # without running it op by op).
    cache = jax.eval_shape(
        lambda p: steps.prefill(cfg, p, tokens, np.full((3,), 8, np.int32), 20)[1], params)
    kv = sum(math.prod(leaf.shape) * leaf.dtype.itemsize
             for path, leaf in jax.tree_util.tree_leaves_with_path(cache)
             if str(path[-1]).strip("[]'.") in ("cached_key", "cached_value"))
    assert kv == gen.cache_bytes(cfg, rows=3, slots=20, encoder_len=8, devices=1)
    assert gen.cache_bytes(cfg, rows=3, slots=20, encoder_len=8, devices=2) == kv // 2


def test_a_decode_larger_than_free_memory_is_refused_before_it_runs(tiny_gpt, monkeypatch):
    assert gen.free_memory() > 0  # this host's MemAvailable, shared by its CPU devices
    # Without a mesh one device holds every row's cache.
    need = gen.cache_bytes(tiny_gpt.config, rows=16, slots=8 + 20, encoder_len=8, devices=1)
    monkeypatch.setattr(gen, "free_memory", lambda: need - 1)
    calls = []
    monkeypatch.setattr(gen, "decode_batch", lambda *a, **k: calls.append(1))
    with pytest.raises(DecodeError, match=r"needs 0.0 GiB of KV cache per device \(at least\), "
                                          r"more than the 0.0 GiB free; lower batch_size"):
        generate(tiny_gpt, input_ids=[[3, 4]] * 16, max_new_tokens=20, batch_size=16)
    assert calls == []
    monkeypatch.setattr(gen, "free_memory", lambda: need)
    with pytest.raises(AttributeError):  # fits: on to decode_batch (stubbed: returns None)
        generate(tiny_gpt, input_ids=[[3, 4]] * 16, max_new_tokens=20, batch_size=16)
    assert calls == [1]
    # On a mesh of 8 data shards one prompt is padded to 8 rows, one per device (the check
    # counted 1 row over 8 devices, 8x too little); a (1,1,1) mesh holds them all on one device.
    for shape, prompts in (((8, 1, 1), 1), ((1, 1, 1), 4)):
        on_mesh = decoding_testlib.on_mesh(tiny_gpt, shape)
        need = gen.cache_bytes(tiny_gpt.config, rows=max(prompts, shape[0]), slots=8 + 20,
                               encoder_len=8, devices=shape[0])
        monkeypatch.setattr(gen, "free_memory", lambda: need - 1)
        with pytest.raises(DecodeError, match="of KV cache per device"):
            generate(on_mesh, input_ids=[[3, 4]] * prompts, max_new_tokens=20, batch_size=16)


def test_out_of_device_memory_is_one_decode_error(tiny_gpt, monkeypatch):
    def oom(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes.")
    monkeypatch.setattr(gen, "decode_batch", oom)
    with pytest.raises(DecodeError, match=r"out of memory decoding 2 rows x 1 \(batch_size 2, "
                                          r"max_new_tokens 4\): RESOURCE_EXHAUSTED: Out of memory"):
        generate(tiny_gpt, input_ids=[[3, 4], [5]], max_new_tokens=4, batch_size=2)

    def other(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")
    monkeypatch.setattr(gen, "decode_batch", other)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        generate(tiny_gpt, input_ids=[[3, 4], [5]], max_new_tokens=4, batch_size=2)


def test_more_beams_than_sequences_returns_only_real_beams():
    """A vocabulary of 4 and one new token: 4 sequences exist, so 8 beams are 4 (the empty slots
    came back as beams with ids [] and score 0.0, better than any real beam)."""
    cfg = config_lib.gpt2(vocab_size=4, d_model=32, num_heads=2, head_dim=16, d_ff=48,
                          num_layers=1, max_len=40)
    loaded = decoding_testlib.loaded(cfg, seed=3)
    beams = generate(loaded, input_ids=[[2, 3]], max_new_tokens=1, method="beam", num_beams=8,
                     alpha=0.6)[0]
    assert sorted(b["ids"] for b in beams) == [[0], [1], [2], [3]]
    assert all(-50 < b["score"] < 0 for b in beams)
