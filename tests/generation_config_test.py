"""Decode defaults of HF weights: `load` and `convert --from_hf` take the settings HF
`generate()` takes from the model's generation config (do_sample, temperature, top_k, top_p,
min_p, typical_p, epsilon_cutoff, eta_cutoff, repetition_penalty, no_repeat_ngram_size,
min_new_tokens, max_new_tokens; unset ones at
HF's defaults), so that `m.generate()` without options decodes as HF `model.generate()` does."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import transformers

import hf_reference
import t5x_lite
from t5x_lite import api, convert
from t5x_lite.decoding import generate as gen

V = 96
FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
          "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size", "min_new_tokens")


def _save(path, generation: dict | None, in_config: dict | None = None):
    """A tiny GPT-2 saved to `path`, with `generation` as its generation_config.json (None: no
    such file) and `in_config` added to its config.json."""
    model = hf_reference.gpt2_ending_with(1, V)
    model.save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **(in_config or {})}))
    return path


def _hf_settings(path) -> dict:
    """HF's own resolution: the loaded model's generation config, unset fields at the values
    HF generate() fills in (GenerationConfig._get_default_generation_params)."""
    g = transformers.GPT2LMHeadModel.from_pretrained(path).generation_config
    defaults = {"min_new_tokens": 0, "min_p": 0.0,  # None there: off
                **transformers.GenerationConfig._get_default_generation_params()}
    out = {k: defaults[k] if getattr(g, k) is None else getattr(g, k) for k in FIELDS}
    out["method"] = "sample" if g.do_sample else "greedy"
    if g.max_new_tokens is not None:
        out["max_new_tokens"] = g.max_new_tokens
    return out


@pytest.mark.parametrize("generation,in_config", [
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, None),  # Llama 3 Instruct's
    ({"repetition_penalty": 1.3, "top_k": 20, "max_new_tokens": 7, "min_new_tokens": 2,
      "min_p": 0.05, "no_repeat_ngram_size": 3}, None),
    (None, {"do_sample": True, "top_k": 7, "repetition_penalty": 1.1}),  # config.json's then
    ({}, {"do_sample": True, "top_k": 7}),  # the file alone counts when there is one
    ({"do_sample": 1, "top_k": 3}, None),  # HF tests do_sample's truth
    ({"do_sample": True, "typical_p": 0.95, "epsilon_cutoff": 3e-4, "eta_cutoff": 1e-3}, None),
])
def test_settings_are_hfs(tmp_path, generation, in_config):
    path = _save(tmp_path / "hf", generation, in_config)
    want = _hf_settings(path)
    config = json.loads((path / "config.json").read_text())
    assert api.hf_decode_defaults(config, generation) == want
    convert.hf_to_workdir(path, tmp_path / "w")
    for m in (t5x_lite.load(path), t5x_lite.load(tmp_path / "w")):
        options = gen.decode_options(m)
        assert {k: getattr(options, k) for k in want} == want
        assert options.max_new_tokens == want.get("max_new_tokens", 64)  # else t5x_lite's


def test_generate_without_options_equals_hf_generate(tmp_path):
    """A generation config with a repetition penalty, min_new_tokens and max_new_tokens: greedy
    rows token for token equal to HF `model.generate()` given only the prompts, from the HF
    directory and from its converted workdir; not the plain greedy rows."""
    path = _save(tmp_path / "hf", {"repetition_penalty": 1.5, "min_new_tokens": 4,
                                   "max_new_tokens": 9, "eos_token_id": 1, "pad_token_id": 0})
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, V, n).tolist() for n in (3, 7, 5, 1, 6, 2)]
    p = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), p), np.int64), np.zeros((len(prompts), p), np.int64)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):], mask[i, p - len(x):] = x, 1
    hf = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        rows = hf.generate(input_ids=torch.tensor(ids),
                           attention_mask=torch.tensor(mask))[:, p:].tolist()
    theirs = [r[:r.index(1) + 1] if 1 in r else r for r in rows]
    assert max(map(len, theirs)) == 9 and min(map(len, theirs)) == 5  # the budget, min_new
    convert.hf_to_workdir(path, tmp_path / "w")
    for m in (t5x_lite.load(path), t5x_lite.load(tmp_path / "w")):
        assert [r["ids"] for r in m.generate(input_ids=prompts)] == theirs
        plain = m.generate(input_ids=prompts, repetition_penalty=1.0, min_new_tokens=0)
        assert [r["ids"] for r in plain] != theirs


def test_sequence_settings_are_taken_as_hf_applies_them(tmp_path):
    """bad_words_ids, suppress_tokens, begin_suppress_tokens and sequence_bias of a generation
    config: `m.generate()` without options equals HF `model.generate()`, from the HF directory
    and its converted workdir; each is held in the decode config as text (tested to read back
    to the same value)."""
    generation = {"bad_words_ids": [[9, 9], [12]], "suppress_tokens": [30],
                  "begin_suppress_tokens": [7], "sequence_bias": [[[5, 9], -3.5], [[44], 2.0]],
                  "max_new_tokens": 8, "eos_token_id": 1, "pad_token_id": 0}
    path = _save(tmp_path / "hf", generation)
    prompts = [[5, 9, 14], [3], [40, 41, 42, 43], [7, 7, 5]]
    hf = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    theirs = [hf_reference.cut_at(hf_reference.padded_generate(hf, [x], 8)[0][0], [1])
              for x in prompts]  # each alone: HF matches left padding against sequences
    config = json.loads((path / "config.json").read_text())
    defaults = api.hf_decode_defaults(config, generation)
    assert defaults["bad_words_ids"] == "[[9, 9], [12]]" and defaults["suppress_tokens"] == "30"
    convert.hf_to_workdir(path, tmp_path / "w")
    for m in (t5x_lite.load(path), t5x_lite.load(tmp_path / "w")):
        options = gen.decode_options(m)
        assert options.sequence_bias == (((5, 9), -3.5), ((44,), 2.0))
        assert options.begin_suppress_tokens == (7,)
        assert [r["ids"] for r in m.generate(input_ids=prompts)] == theirs
        plain = m.generate(input_ids=prompts, bad_words_ids="", suppress_tokens="",
                           begin_suppress_tokens="", sequence_bias="")
        assert [r["ids"] for r in plain] != theirs


def test_unusable_settings_fall_back_with_a_warning(tmp_path, caplog):
    path = _save(tmp_path / "hf", {"do_sample": "yes", "top_p": 1.5, "temperature": "hot",
                                   "top_k": 2.5, "repetition_penalty": True,
                                   "max_new_tokens": -3, "min_new_tokens": 4, "num_beams": 4,
                                   "max_length": 30, "typical_p": 0.0, "eta_cutoff": 1.0,
                                   "forced_eos_token_id": 5, "bad_words_ids": [[7, -8]],
                                   "guidance_scale": 1.0, "epsilon_cutoff": 0.25,
                                   "suppress_tokens": [5, 1000], "stop_strings": "\n",
                                   "begin_suppress_tokens": [float("inf")]})
    with caplog.at_level(logging.WARNING):
        m = t5x_lite.load(path)
    options = gen.decode_options(m)
    assert (options.method, options.top_p, options.temperature, options.top_k,
            options.repetition_penalty, options.max_new_tokens, options.min_new_tokens,
            options.typical_p, options.eta_cutoff, options.epsilon_cutoff) == (
        "sample", 1.0, 1.0, 50, 1.0, 64, 4, 1.0, 0.0, 0.25)
    text = caplog.text
    for name in ("top_p=1.5", "temperature='hot'", "top_k=2.5", "repetition_penalty=True",
                 "max_new_tokens=-3", "typical_p=0.0", "eta_cutoff=1.0"):
        assert f"generation setting {name} is not a usable decode option" in text
    assert "do_sample='yes' is not a bool; taken as HF reads it, True" in text
    assert ("generation settings num_beams=4, max_length=30, forced_eos_token_id=5 are not "
            "taken") in text
    assert "generation setting bad_words_ids=[[7, -8]] is not a usable decode option" in text
    assert "generation setting begin_suppress_tokens=[inf] is not a usable decode option" in text
    assert "suppress_tokens: ids [1000] are outside the vocabulary (HF ignores them)" in text
    assert (options.bad_words_ids, options.begin_suppress_tokens,
            options.suppress_tokens, options.stop_strings) == ((), (), (5,), ())
    # taken, then dropped: this model has no vocabulary to match text with
    assert "stop_strings [\"\\n\"] need a vocabulary, and the model has none" in text
    assert "min_new_tokens=4" not in text and "guidance_scale" not in text
    assert "epsilon_cutoff" not in text


def test_num_return_sequences_of_a_sampling_config_are_samples(tmp_path, caplog):
    """HF `generate()` returns num_return_sequences samples per prompt when it samples; so
    does `m.generate()` (num_samples). Without sampling HF refuses it; here it is not taken."""
    path = _save(tmp_path / "hf", {"do_sample": True, "num_return_sequences": 3,
                                   "max_new_tokens": 4})
    hf = transformers.GPT2LMHeadModel.from_pretrained(path)
    prompts = [[5, 6, 7], [8, 9]]
    want = [len(hf.generate(torch.tensor([p]), pad_token_id=1)) for p in prompts]
    m = t5x_lite.load(path)
    assert gen.decode_options(m).num_samples == 3
    assert [len(rows) for rows in m.generate(input_ids=prompts)] == want == [3, 3]
    with caplog.at_level(logging.WARNING):
        greedy = api.hf_decode_defaults({}, {"num_return_sequences": 2})
    assert "num_samples" not in greedy
    assert "generation settings num_return_sequences=2 are not taken" in caplog.text


def test_stop_strings_from_a_generation_config(caplog):
    """HF reads a str as one stop string (even one that looks like a JSON list); strings over
    t5x_lite's 32 bytes are left out with a warning, the others kept."""
    from t5x_lite import api
    take = lambda value: gen.DecodeOptions(stop_strings=api.hf_decode_defaults(
        {}, {"stop_strings": value})["stop_strings"]).stop_strings
    assert take('["Q:"]') == ('["Q:"]',) and take("\n\n") == ("\n\n",)
    with caplog.at_level(logging.WARNING):
        assert take(["\n", "x" * 33, "Q:"]) == ("\n", "Q:")
    assert "stop_strings: ['" + "x" * 33 + "'] longer than 32 bytes left out" in caplog.text


def test_top_p_zero_keeps_the_top_token_as_in_hf(tmp_path, caplog):
    """HF's top-p filter keeps the most likely token even at top_p 0: its sampling is then the
    greedy output, and so is ours (taken as top_k 1; the option itself refuses 0)."""
    path = _save(tmp_path / "hf", {"do_sample": True, "top_p": 0.0, "max_new_tokens": 9,
                                   "eos_token_id": 1, "pad_token_id": 0})
    prompts = [[5, 9, 14], [3], [40, 41, 42, 43]]
    hf = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    theirs, _ = hf_reference.padded_generate(hf, prompts, 9)
    with caplog.at_level(logging.WARNING):
        m = t5x_lite.load(path)
    assert "top_p=0 keeps only the most likely token in HF; taken as top_k=1" in caplog.text
    options = gen.decode_options(m)
    assert (options.method, options.top_k, options.top_p) == ("sample", 1, 1.0)
    ours = [r["ids"] for r in m.generate(input_ids=prompts)]
    assert ours == [hf_reference.cut_at(r, [1]) for r in theirs]
    assert ours == [r["ids"] for r in m.generate(input_ids=prompts, method="greedy")]


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_beam_search_config_equals_hf_generate(tmp_path, family, caplog):
    """A generation config asking for beam search (num_beams, length_penalty, early_stopping,
    no_repeat_ngram_size; for T5 also max_length / min_length, which count its decoder start
    token): `m.generate()` without options returns HF `model.generate()`'s sequence as its best
    beam, and HF's num_return_sequences beams as its first, from the HF directory and from its
    converted workdir; HF's default length_penalty and early_stopping decode otherwise."""
    generation = {"num_beams": 3, "length_penalty": 3.0, "early_stopping": "never",
                  "no_repeat_ngram_size": 2, "num_return_sequences": 2, "eos_token_id": 1,
                  "pad_token_id": 0}
    if family == "t5":
        generation.update(max_length=10, min_length=4, decoder_start_token_id=0,
                          early_stopping=True, length_penalty=2.0)
        hf = hf_reference.t5_ending_with_eos(V)
    else:
        generation["max_new_tokens"] = 12
        hf = hf_reference.gpt2_ending_with(1, V)
    path = tmp_path / "hf"
    hf.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(generation))
    hf = type(hf).from_pretrained(path, attn_implementation="eager").eval()
    # Of one length: HF's n-gram rule would read a GPT row's left padding (id 0) as history.
    prompts = [[5, 9, 14, 2], [3, 3, 3, 3], [40, 41, 42, 43], [7, 7, 5, 8]]
    rows, scores = hf_reference.padded_generate(hf, prompts, None, family == "gpt2")
    theirs = [hf_reference.cut_at(r, [1]) for r in rows]
    assert scores is not None and len(theirs) == 2 * len(prompts)
    if family == "t5":  # the budget and the minimum of max_length / min_length bind
        assert max(map(len, theirs)) == 9 and min(map(len, theirs)) == 4
    convert.hf_to_workdir(path, tmp_path / "w")
    with caplog.at_level(logging.WARNING):
        loaded = [t5x_lite.load(path), t5x_lite.load(tmp_path / "w")]
    assert "not taken" not in caplog.text
    for m in loaded:
        options = gen.decode_options(m)
        assert (options.method, options.num_beams, options.beam_rule, options.length_penalty,
                options.early_stopping) == ("beam", 3, "hf", generation["length_penalty"],
                                            str(generation["early_stopping"]).lower())
        if family == "t5":
            assert (options.max_new_tokens, options.min_new_tokens) == (9, 3)
        ours = m.generate(input_ids=prompts)
        assert [b["ids"] for beams in ours for b in beams[:2]] == theirs
        np.testing.assert_allclose([b["penalised_score"] for beams in ours for b in beams[:2]],
                                   scores.numpy(), atol=2e-4)
        hf_defaults = m.generate(input_ids=prompts, length_penalty=1.0, early_stopping=False)
        assert [b["ids"] for beams in hf_defaults for b in beams[:2]] != theirs


def test_beam_settings_hf_would_not_use_fall_back_with_a_warning(caplog):
    """Beam sampling (do_sample with num_beams), group and constrained beam search are not
    taken; an unusable length_penalty or
    early_stopping falls back to HF's default; a decoder-only model's max_length / min_length
    (they count the prompt) are not taken, an encoder-decoder's are (less its start token)."""
    with caplog.at_level(logging.WARNING):
        sampled = api.hf_decode_defaults({}, {"do_sample": True, "num_beams": 4})
        odd = api.hf_decode_defaults({}, {"num_beams": 2, "length_penalty": "long",
                                          "early_stopping": "sometimes"})
        gpt = api.hf_decode_defaults({}, {"max_length": 30, "min_length": 5})
        groups = api.hf_decode_defaults({}, {"num_beams": 4, "num_beam_groups": 2,
                                             "diversity_penalty": 1.0})
        forced = api.hf_decode_defaults({}, {"num_beams": 4, "force_words_ids": [[5]]})
        t5 = api.hf_decode_defaults({"is_encoder_decoder": True},
                                    {"max_length": 30, "min_length": 1, "max_new_tokens": 7})
    assert sampled["method"] == "sample" and "num_beams" not in sampled
    assert (odd["method"], odd["num_beams"], odd["length_penalty"], odd["early_stopping"]) == (
        "beam", 2, 1.0, "false")
    assert "max_new_tokens" not in gpt and gpt["min_new_tokens"] == 0  # HF's default
    assert (t5["max_new_tokens"], t5["min_new_tokens"]) == (7, 0)  # max_new_tokens wins
    text = caplog.text
    assert "generation settings num_beams=4 are not taken (beam sampling" in text
    assert "length_penalty='long' is not a usable decode option" in text
    assert "early_stopping='sometimes' is not a usable decode option" in text
    assert "generation settings max_length=30, min_length=5 are not taken" in text
    # HF 5 runs neither group nor constrained beam search itself: not a plain beam search
    assert groups["method"] == forced["method"] == "greedy"
    assert ("num_beams=4, num_beam_groups=2, diversity_penalty=1.0 are not taken (beam "
            "sampling, group and constrained beam search") in text
    assert "num_beams=4, force_words_ids=[[5]] are not taken" in text
    assert text.count("not taken") == 4  # the encoder-decoder's lengths are taken
