"""Several stop ids: an HF model whose generation_config.json lists `eos_token_id` (Llama 3
Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>) stops each row at the first of any of them,
in greedy, sampled, speculative and beam decoding, as HF `generate` does; `convert` keeps the
generation config both ways.

The stop ids are picked from what this random model generates unstopped, so that different
rows stop at different ids.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import transformers

import hf_reference as ref
import t5x_lite
from t5x_lite import api, checkpoints, convert, hf_interop, infer
from t5x_lite.config import ModelConfig
from t5x_lite.decoding.generate import DecodeError

N = 20  # new tokens
PROMPT_LENGTHS = (3, 9, 5, 12, 7, 4, 6)


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(HF dir, converted workdir, prompts, stop ids, HF greedy rows cut at the stops, config
    eos). The generation config lists three stop ids; config.json names another one's EOS."""
    hf = ref.llama(kv_heads=2, seed=3)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 96, n).tolist() for n in PROMPT_LENGTHS]
    free = ref.greedy_left_padded(hf, prompts, N, eos_token_id=10**6)  # never stops
    stops = []
    for i, row in enumerate(free):  # a token from the middle of each row, until three
        if len(stops) < 3 and row[3 + i] not in stops:
            stops.append(row[3 + i])
    hf.config.eos_token_id = stops[1]
    hf.generation_config.eos_token_id = stops
    root = tmp_path_factory.mktemp("stops")
    hf.save_pretrained(root / "hf")
    theirs = ref.greedy_left_padded(_hf(root / "hf"), prompts, N)  # the file's stop ids
    theirs = [ref.cut_at(r, stops) for r in theirs]
    ended = [r[-1] for r in theirs if r[-1] in stops and len(r) < N]
    assert len(set(ended)) >= 2 and len(ended) >= 4  # rows stop early, at different ids
    convert.hf_to_workdir(root / "hf", root / "w")
    return root / "hf", root / "w", prompts, tuple(stops), theirs


def test_greedy_and_speculative_stop_at_any_listed_id_as_hf(model):
    hf_dir, workdir, prompts, stops, theirs = model
    for m in (t5x_lite.load(hf_dir), t5x_lite.load(workdir)):
        assert m.stop_ids == stops and m.eos_id == stops[1]  # config.json's EOS
        assert f"stop_ids={list(stops)}" in repr(m)
        ours = m.generate(input_ids=prompts, max_new_tokens=N, batch_size=4)
        assert [r["ids"] for r in ours] == theirs
        assert [r["finished"] for r in ours] == [r[-1] in stops for r in theirs]
        spec = m.generate(input_ids=prompts, max_new_tokens=N, batch_size=4, draft=m,
                          num_draft=3)
        assert [r["ids"] for r in spec] == theirs


def test_sampled_rows_end_at_their_first_stop_id(model):
    hf_dir, _, prompts, stops, _ = model
    m = t5x_lite.load(hf_dir)
    for draft in (None, m):
        rows = m.generate(input_ids=prompts, method="sample", temperature=1.5, num_samples=3,
                          max_new_tokens=N, seed=4, draft=draft)
        rows = [s for r in rows for s in r]
        ends = [r["ids"][-1] for r in rows if r["finished"]]
        assert len(set(ends)) >= 2  # more than one stop id ended a row
        for r in rows:
            assert not set(r["ids"][:-1]) & set(stops)  # nothing after a stop
            assert r["finished"] == (r["ids"][-1] in stops)
            assert r["finished"] or len(r["ids"]) == N


def test_beam_search_finishes_beams_at_any_listed_id(model):
    """A beam ends at its first stop id (the best ones at different ids), its score is the log-probs
    HF's forward pass gives its tokens, and each rank is at least as good as HF beam search's:
    HF lets only the top-W ranked candidates finish, every stop candidate may here (T5X's rule,
    see `beam_search`), which with several stop ids often finds a better finished beam."""
    hf_dir, _, prompts, stops, _ = model
    w = 3
    hf, p = _hf(hf_dir), max(map(len, prompts))
    ids = np.zeros((len(prompts), p), np.int64)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = x
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids > 0),
                          max_new_tokens=N, num_beams=w, num_return_sequences=w,
                          length_penalty=0.0, early_stopping="never", do_sample=False,
                          pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    hf_scores = out.sequences_scores.numpy().reshape(-1, w)
    ours = t5x_lite.load(hf_dir).generate(input_ids=prompts, method="beam", num_beams=w,
                                          alpha=0.0, max_new_tokens=N)
    assert len({beams[0]["ids"][-1] for beams in ours}) >= 2
    for prompt, beams, theirs in zip(prompts, ours, hf_scores):
        assert len(beams) == w and beams[0]["finished"]
        for b in beams:
            assert b["finished"] == (b["ids"][-1] in stops) and not set(b["ids"][:-1]) & set(stops)
            assert b["finished"] or len(b["ids"]) == N
        for b in beams:
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([prompt + b["ids"]])).logits[0], -1)
            want = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(b["ids"]))
            np.testing.assert_allclose(b["score"], want, atol=2e-4)
        assert np.all(np.array([b["score"] for b in beams]) >= theirs - 2e-4)


def test_convert_keeps_the_generation_config_both_ways(model, tmp_path):
    """The export's generation_config.json is the source's, byte for byte, at step 0; a step
    trained here (our data ends rows in 1) says 1 there and in config.json, so HF generate stops
    where load() does."""
    hf_dir, workdir, prompts, stops, theirs = model
    source = (hf_dir / "generation_config.json").read_bytes()
    assert (workdir / "hf_generation_config.json").read_bytes() == source
    convert.workdir_to_hf(workdir, tmp_path / "out")
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == source
    back = _hf(tmp_path / "out")
    assert back.generation_config.eos_token_id == list(stops)
    rows = ref.greedy_left_padded(back, prompts, N)
    assert [ref.cut_at(r, stops) for r in rows] == theirs
    assert t5x_lite.load(tmp_path / "out").stop_ids == stops

    cfg = ModelConfig.from_dict(checkpoints.read_config(workdir).model)
    trained = tmp_path / "w"
    convert.hf_to_workdir(hf_dir, trained)
    checkpoints.save_params(trained, convert.restore_numpy_params(trained, 0, cfg), 2)
    convert.workdir_to_hf(trained, tmp_path / "out2")
    for m in (t5x_lite.load(trained), t5x_lite.load(tmp_path / "out2")):
        assert (m.eos_id, m.stop_ids) == (1, (1,))
    assert _hf(tmp_path / "out2").generation_config.eos_token_id == 1
    written = json.loads((tmp_path / "out2" / "generation_config.json").read_text())
    assert {k: v for k, v in written.items() if k != "eos_token_id"} == {
        k: v for k, v in json.loads(source).items() if k != "eos_token_id"}


def test_an_export_over_another_model_removes_its_generation_config(model, tmp_path):
    """A model without a generation config (a GPT trained here) exported over this one's export
    leaves no generation_config.json behind: HF generate would stop at its ids."""
    hf_dir, workdir, *_ = model
    convert.workdir_to_hf(workdir, tmp_path / "out")
    (workdir_plain := tmp_path / "plain").mkdir()
    hf = ref.llama(kv_heads=2, seed=5)
    hf.save_pretrained(tmp_path / "bare")
    (tmp_path / "bare" / "generation_config.json").unlink()
    convert.hf_to_workdir(tmp_path / "bare", workdir_plain / "w")
    convert.workdir_to_hf(workdir_plain / "w", tmp_path / "out")
    assert not (tmp_path / "out" / "generation_config.json").exists()
    assert t5x_lite.load(tmp_path / "out").stop_ids == (hf.config.eos_token_id,)


def test_stop_id_rules():
    """HF's: the generation config's ids within the vocabulary, in order, without repeats;
    without that file, config.json's (all of a list); none named: none (HF runs to the
    budget)."""
    stops = api.hf_stop_ids
    assert stops({"eos_token_id": 7}, 10, {"eos_token_id": [3, 50256, 4, 3]}) == (3, 4)
    assert stops({"eos_token_id": [7, 2]}, 10) == (7, 2)
    for generation in ({"eos_token_id": None}, {}, {"eos_token_id": [True, "3", -1, 10]}):
        assert stops({"eos_token_id": [7, 2]}, 10, generation) == ()
    assert stops({"model_type": "llama"}, 10) == ()  # HF reads config.json's own fields
    assert api.hf_eos({"eos_token_id": 7}, 10, {"eos_token_id": [3, 7]}) == (7, (3, 7))
    assert api.hf_eos({"model_type": "llama"}, 10) == (2, ())  # eos_id: LlamaConfig's default


def test_a_broken_generation_config_is_one_line_and_writes_nothing(model, tmp_path):
    hf_dir, *_ = model
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "generation_config.json").write_bytes(b"[1, 2]")
    ref.assert_load_and_convert_refuse(bad, tmp_path / "w", hf_interop.InteropError,
                                       "generation_config.json is not a JSON object")


class _Digits:
    """A stand-in vocabulary: each id as its decimal text."""

    vocab_size = 96

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_detokenize_cuts_before_the_first_stop_id(model):
    hf_dir, _, _, stops, _ = model
    m = t5x_lite.load(hf_dir)
    m = api.LoadedModel(m.config, m.run_config, m.model, m.params, _Digits(), m.mesh, m.rules,
                        m.eos_id, m.stop_ids)
    other = next(i for i in range(3, 96) if i not in stops)
    rows = [[other, stops[2], other, stops[0]], [other, other], [stops[0]], [other, m.eos_id]]
    assert m.detokenize(rows) == [str(other), f"{other} {other}", "", str(other)]


# ------------------------------------------------------------ the decode.stop_ids option
def _custom_stops(free, model_stops):
    """Two ids other than the model's that end different rows of `free` early."""
    picked = []
    for i, row in enumerate(free):
        t = row[2 + i % 5]
        if t not in model_stops and t not in picked and len(picked) < 2:
            picked.append(t)
    return picked


def test_stop_ids_option_replaces_the_models_as_hf_eos_token_id_does(model):
    hf_dir, _, prompts, stops, _ = model
    hf = _hf(hf_dir)
    free = ref.greedy_left_padded(hf, prompts, N, eos_token_id=10**6)
    custom = _custom_stops(free, stops)
    theirs = [ref.cut_at(r, custom)
              for r in ref.greedy_left_padded(hf, prompts, N, eos_token_id=custom)]
    assert len({r[-1] for r in theirs if len(r) < N}) == 2  # both end rows
    m = t5x_lite.load(hf_dir)
    for draft in (None, types.SimpleNamespace(**{**vars(m), "stop_ids": (1,)})):
        ours = m.generate(input_ids=prompts, max_new_tokens=N, stop_ids=custom, draft=draft)
        assert [r["ids"] for r in ours] == theirs  # a draft's own stop ids do not matter then
    as_text = m.generate(input_ids=prompts, max_new_tokens=N, stop_ids=f"{custom[0]}, {custom[1]}")
    assert [r["ids"] for r in as_text] == theirs
    with pytest.raises(DecodeError, match=r"^stop id 96 is outside the model's vocabulary"):
        m.generate(input_ids=prompts, stop_ids=[3, 96])
    for bad in ("3;4", [2.5], [True], "x"):
        with pytest.raises(DecodeError, match="decode.stop_ids must be token ids"):
            m.generate(input_ids=prompts, stop_ids=bad)
    with pytest.raises(DecodeError,
                       match=r"stop_ids must be token ids in \[0, 2147483647\], got \[-3\]"):
        m.generate(input_ids=prompts, stop_ids=[-3])


def test_infer_takes_stop_ids_and_records_them(model, tmp_path):
    hf_dir, _, prompts, stops, _ = model
    hf = _hf(hf_dir)
    custom = _custom_stops(ref.greedy_left_padded(hf, prompts, N, eos_token_id=10**6), stops)
    theirs = [ref.cut_at(r, custom)
              for r in ref.greedy_left_padded(hf, prompts, N, eos_token_id=custom)]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "t5x_lite.infer", f"--checkpoint={hf_dir}",
                        f"--input={src}", f"--output={out}", f"--decode.max_new_tokens={N}",
                        f"--decode.stop_ids={custom[0]},{custom[1]}"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["output_ids"] for x in out.read_text().splitlines()] == theirs
    meta = json.loads(infer.sidecar_path(out).read_text())
    assert meta["decode"] == {"method": "greedy", "max_new_tokens": N, "stop_ids": custom}
    quiet = open(os.devnull, "w")
    with pytest.raises(infer.InferError, match=re.escape(
            f"decode.stop_ids: {custom} there, {list(stops)} now")):  # the model's
        infer.run(hf_dir, src, out, {"max_new_tokens": N}, log=quiet)
    # A sidecar from before stop ids were recorded resumes (unchecked for them, as before).
    del meta["decode"]["stop_ids"]
    infer.sidecar_path(out).write_text(json.dumps(meta))
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:3]))
    assert infer.run(hf_dir, src, out, {"max_new_tokens": N, "stop_ids": custom},
                     log=quiet) == len(prompts) - 3


# ------------------------------------------------------------ HF's rule at its edges
def _copy(src, dst, generation=None):
    """A copy of the HF directory `src`, its generation config's eos_token_id set to
    `generation` (the key removed when it is "absent")."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "generation_config.json").read_text())
    config.pop("eos_token_id")
    if generation != "absent":
        config["eos_token_id"] = generation
    (dst / "generation_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("generation", ["absent", None, [], [500]])
def test_a_generation_config_that_names_no_stop_id_runs_to_the_budget_as_hf(
        model, tmp_path, generation):
    """HF reads the stop ids from generation_config.json alone when there is one; naming none
    there, it never stops (config.json's id is not read). So does load(), with a warning; the
    step-0 export keeps the file byte for byte."""
    hf_dir, _, prompts, stops, _ = model
    src = _copy(hf_dir, tmp_path / "src", generation)
    theirs = ref.greedy_left_padded(_hf(src), prompts, N)
    assert all(len(r) == N for r in theirs)  # HF stopped nowhere (config.json says stops[1])
    m = t5x_lite.load(src)
    assert (m.eos_id, m.stop_ids) == (stops[1], ())
    ours = m.generate(input_ids=prompts, max_new_tokens=N)
    assert [r["ids"] for r in ours] == theirs and not any(r["finished"] for r in ours)
    convert.hf_to_workdir(src, tmp_path / "w")
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "out")
    assert ((tmp_path / "out" / "generation_config.json").read_bytes()
            == (src / "generation_config.json").read_bytes())
    assert t5x_lite.load(tmp_path / "out").stop_ids == ()


def test_stale_generation_configs_are_removed(model, tmp_path):
    """An export writing no generation config removes the one in --out, even in the model's
    own directory (a workdir converted before generation configs were kept, at a later step);
    a conversion into a workdir left by an earlier one drops that one's copy."""
    hf_dir, workdir, prompts, stops, _ = model
    src = _copy(hf_dir, tmp_path / "src", list(stops))
    old = tmp_path / "old"
    convert.hf_to_workdir(src, old)
    (old / "hf_generation_config.json").unlink()  # as converted before they were kept
    cfg = ModelConfig.from_dict(checkpoints.read_config(old).model)
    checkpoints.save_params(old, convert.restore_numpy_params(old, 0, cfg), 2)
    convert.workdir_to_hf(old, src, step=2)  # into its own source directory
    assert not (src / "generation_config.json").exists()
    assert t5x_lite.load(src).stop_ids == (1,) == tuple([_hf(src).generation_config.eos_token_id])

    again = tmp_path / "again"
    convert.hf_to_workdir(hf_dir, again)
    (again / "checkpoints").rename(tmp_path / "moved")  # an interrupted conversion's leftovers
    bare = _copy(hf_dir, tmp_path / "bare")
    (bare / "generation_config.json").unlink()
    convert.hf_to_workdir(bare, again)
    assert not (again / "hf_generation_config.json").exists()
    assert t5x_lite.load(again).stop_ids == (stops[1],)  # config.json's, as HF


def test_a_generation_config_that_is_a_directory_is_one_line(model, tmp_path):
    hf_dir, *_ = model
    bad = _copy(hf_dir, tmp_path / "bad")
    (bad / "generation_config.json").unlink()
    (bad / "generation_config.json").mkdir()
    ref.assert_load_and_convert_refuse(bad, tmp_path / "w", hf_interop.InteropError,
                                       "generation_config.json cannot be read")
