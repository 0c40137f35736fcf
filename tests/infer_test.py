"""`python -m t5x_lite.infer`: output lines, resume after a cut, and bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import decoding_testlib
from t5x_lite import checkpoints
from t5x_lite import config as config_lib
from t5x_lite import errors, files
from t5x_lite import infer
from t5x_lite.data import testing
from t5x_lite.decoding import generate as gen
from t5x_lite.defaults import base_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny GPT checkpoint with a vocabulary and its own decode defaults."""
    vocab = testing.tiny_vocab(400)
    cfg = config_lib.gpt2(vocab_size=vocab.padded_vocab_size, d_model=32, num_heads=2,
                          head_dim=16, d_ff=48, num_layers=1, max_len=64)
    run = base_config(cfg, objective="causal_lm", seq_len=64)
    run.decode.max_new_tokens = 5
    run.decode.batch_size = 2
    path = tmp_path_factory.mktemp("ckpt")
    checkpoints.write_config(path, run)
    checkpoints.save_params(path, decoding_testlib.random_params(cfg, seed=4), step=1)
    vocab.copy_to(path)
    return path


@pytest.fixture(scope="module")
def prompts_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "prompts.txt"
    path.write_text("\n".join(s[:40] for s in testing.sentences(5, seed=1)) + "\n")
    return path


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_one_line_per_input_and_resumes(workdir, prompts_txt, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    sample = {"method": "sample", "top_k": 20, "seed": 3}
    assert infer.run(workdir, prompts_txt, out, sample, log=open(os.devnull, "w")) == 5
    lines = _lines(out)
    texts = prompts_txt.read_text().splitlines()
    assert [x["inputs"] for x in lines] == texts
    for x in lines:
        assert set(x) == {"inputs", "output", "output_ids", "score", "finished"}
        assert isinstance(x["output"], str) and 1 <= len(x["output_ids"]) <= 5  # checkpoint's 5
        assert x["score"] < 0
    full = out.read_text()

    # Cut the file in the middle of line 4: lines 1-3 stay, the partial line is dropped, and the
    # rest is decoded again -- with the same samples as the uninterrupted run.
    cut = len("".join(full.splitlines(keepends=True)[:3])) + 7
    out.write_text(full[:cut])
    # The partial line goes by truncating the file in place: rewriting it (empty first, then
    # all written back) lost every finished record when the resume itself was killed.
    truncated, truncate = [], os.truncate
    monkeypatch.setattr(os, "truncate", lambda *a: truncated.append(a) or truncate(*a))
    assert infer.resume_point(out, infer.read_prompts(prompts_txt)) == 3
    assert out.read_text() == full[:cut - 7]
    assert truncated == [(str(out), len(full[:cut - 7].encode()))]
    assert infer.run(workdir, prompts_txt, out, sample, log=open(os.devnull, "w")) == 2
    resumed = _lines(out)
    assert [{**x, "score": 0} for x in resumed] == [{**x, "score": 0} for x in lines]
    # Rows batch differently after a resume: scores agree to float rounding.
    np.testing.assert_allclose([x["score"] for x in resumed], [x["score"] for x in lines],
                               rtol=1e-5)
    assert infer.run(workdir, prompts_txt, out, sample, log=open(os.devnull, "w")) == 0
    # Another run writing the same --output on this host (here: its lock, held): refused before
    # anything is loaded or written.
    before = out.read_bytes()
    with files.host_lock(files.real(out), wait=False):
        with pytest.raises(infer.InferError, match=rf"--output {out} is being written by another "
                                                   rf"infer run on this host \(pid {os.getpid()}"):
            infer.run(workdir, prompts_txt, out, {"seed": 4}, log=open(os.devnull, "w"))
    assert out.read_bytes() == before

    # The same outputs as the Python API.
    import t5x_lite
    loaded = t5x_lite.load(workdir)
    api = gen.generate(loaded, inputs=texts, **sample)
    assert [x["output_ids"] for x in lines] == [r["ids"] for r in api]


def test_beam_and_ids_input(workdir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"input_ids": [5, 6, 7]}\n"plain string prompt"\n{"inputs": "an object"}\n')
    out = tmp_path / "out.jsonl"
    infer.run(workdir, src, out, {"method": "beam", "num_beams": 2, "alpha": 0.6},
              log=open(os.devnull, "w"))
    lines = _lines(out)
    assert [x["inputs"] for x in lines] == [[5, 6, 7], "plain string prompt", "an object"]
    for x in lines:
        assert len(x["output_ids"]) == 2 and len(x["penalised_score"]) == 2  # beams
        assert isinstance(x["output"], list)


@pytest.mark.parametrize("content,overrides,message", [
    ("", {}, "is empty"),
    ('{"inputs": "a"}\n{"inputs": "b"\n', {}, "prompts.jsonl:2: bad JSON"),
    ('{"inputs": "a"}\n[1, 2]\n', {}, "prompts.jsonl:2: expected a JSON string"),
    # valid JSON that python's json or sentencepiece refuse: tracebacks before, not one line
    ('"a"\n{"inputs": "caf\\udce9"}\n', {}, "prompts.jsonl:2: the prompt holds a lone "
                                            "surrogate (U+DCE9 at character 3)"),
    ('{"input_ids": [' + "9" * 5000 + ']}\n', {}, "prompts.jsonl:1: bad JSON (Exceeds the "
                                                  "limit (4300 digits)"),
    ("[" * 100_000 + "\n", {}, "prompts.jsonl:1: bad JSON (maximum recursion depth exceeded"),
    ('"a"\n"b <extra_id_500>"\n', {}, "prompts.jsonl:2: <extra_id_500> needs at least 501 "
                                      "extra_ids"),
    ('"a"\n"' + "word " * 80 + '"\n', {}, "prompts.jsonl:2: prompt of"),
    ('"hi"\n', {"method": "nucleus"}, "unknown decode method 'nucleus'"),
    ('"hi"\n', {"top_p": 0.0}, "top_p must be in (0, 1]"),
    ('"hi"\n', {"num_beams": 0, "method": "beam"}, "num_beams must be >= 1"),
])
def test_bad_input_fails_before_writing(workdir, tmp_path, content, overrides, message):
    src = tmp_path / "prompts.jsonl"
    src.write_text(content)
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError) as e:
        infer.run(workdir, src, out, overrides, log=open(os.devnull, "w"))
    assert message in str(e.value)
    assert not out.exists()


def test_output_of_other_inputs_is_not_resumed(workdir, prompts_txt, tmp_path):
    out = tmp_path / "out.jsonl"
    record = {"inputs": "something else", "output": "x", "output_ids": [5], "score": -1.0,
              "finished": False}
    out.write_text(json.dumps(record) + "\n")
    with pytest.raises(infer.InferError, match="other inputs"):
        infer.run(workdir, prompts_txt, out, {}, log=open(os.devnull, "w"))


def test_bad_mesh_flag(workdir, prompts_txt, tmp_path):
    out = tmp_path / "bad.jsonl"
    for mesh, message in (("2,2", "three integers"), ("a,1,1", "three integers"),
                          ("3,1,1", r"needs 3 devices but 8 are available")):
        with pytest.raises(ValueError, match=message):
            infer.run(workdir, prompts_txt, out, {}, log=open(os.devnull, "w"), mesh=mesh)
    assert not out.exists()


def test_two_processes_write_what_one_process_writes(workdir, prompts_txt, tmp_path):
    """2 processes x 4 devices (launch/cpu_local.sh) with --mesh=2,2,2 (FSDP x tensor
    parallelism): what one process on its default 8-way data-parallel mesh writes; process 0
    alone writes --output and reports progress."""
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    infer.run(workdir, prompts_txt, one, {"method": "beam", "num_beams": 2},
              log=open(os.devnull, "w"))
    script = os.path.join(os.path.dirname(__file__), "..", "launch", "cpu_local.sh")
    r = subprocess.run(
        ["bash", script, "--num_processes=2", "--devices_per_process=4",
         "--module=t5x_lite.infer", "--timeout=240", "--", f"--checkpoint={workdir}",
         f"--input={prompts_txt}", f"--output={two}", "--decode.method=beam",
         "--decode.num_beams=2", "--mesh=2,2,2"], capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = _lines(one), _lines(two)
    assert [x["output_ids"] for x in b] == [x["output_ids"] for x in a]
    np.testing.assert_allclose([x["score"] for x in b], [x["score"] for x in a], atol=1e-4)
    assert "[0] infer: 5/5 inputs" in r.stdout and "[1] infer:" not in r.stdout


def _cli(*args):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device is enough here
    return subprocess.run([sys.executable, "-m", "t5x_lite.infer", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_line(workdir, prompts_txt, tmp_path):
    out = tmp_path / "cli.jsonl"
    r = _cli(f"--checkpoint={workdir}", f"--input={prompts_txt}", f"--output={out}",
             "--decode.max_new_tokens=3", "--decode.batch_size=4")
    assert r.returncode == 0, r.stderr
    assert "5/5 inputs" in r.stderr
    lines = _lines(out)
    assert len(lines) == 5 and all(len(x["output_ids"]) <= 3 for x in lines)
    bad = _cli(f"--checkpoint={workdir}", f"--input={prompts_txt}", f"--output={tmp_path / 'b'}",
               "--decode.top_p=1.5")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == "infer: error: top_p must be in (0, 1], got 1.5"
    assert not (tmp_path / "b").exists()
    np.testing.assert_equal(len(bad.stderr.strip().splitlines()), 1)
    bad_mesh = _cli(f"--checkpoint={workdir}", f"--input={prompts_txt}",
                    f"--output={tmp_path / 'b'}", "--mesh=2,1,1")
    assert bad_mesh.returncode != 0 and not (tmp_path / "b").exists()
    assert bad_mesh.stderr.strip().splitlines() == [
        "infer: error: Mesh (data, fsdp, tensor)=(2, 1, 1) needs 2 devices but 1 are available"]


# ---------------------------------------------------------------- files infer did not write
_NOT_OURS = "exists and was not written by infer; choose another path or remove it"


@pytest.mark.parametrize("content", [
    "precious notes without a final newline",  # one unterminated line: was cut to nothing
    "line one\nline two",  # complete lines that are not records + an unterminated one
    "line one\nline two\n",
    '{"inputs": "a"}',  # a one-line copy of a .jsonl input: not the start of a record
    '{"inputs": "a"}\n{"inputs": "b"}',
])
def test_files_infer_did_not_write_are_never_cut(tmp_path, content):
    out = tmp_path / "notes.jsonl"
    out.write_text(content)
    prompts = [infer.Prompt("a", None), infer.Prompt("b", None)]
    with pytest.raises(infer.InferError, match="was not written by infer"):
        infer.resume_point(out, prompts)
    assert out.read_text() == content


def test_output_that_is_the_input_or_a_foreign_file_is_refused(workdir, tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text('{"inputs": "a"}\n{"inputs": "b"}')  # no final newline
    for output in (src, tmp_path / "." / "x.jsonl"):
        with pytest.raises(infer.InferError, match="is the --input file"):
            infer.run(workdir, src, output, {}, log=open(os.devnull, "w"))
    assert src.read_text() == '{"inputs": "a"}\n{"inputs": "b"}'
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(infer.InferError) as e:
        infer.run(workdir, src, notes, {}, log=open(os.devnull, "w"))
    assert str(e.value) == f"--output {notes} {_NOT_OURS}"
    assert notes.read_text() == "precious"
    assert not infer.sidecar_path(notes).exists()
    (tmp_path / "adir").mkdir()
    for output, message in [(tmp_path / "adir", "is a directory; give a file path"),
                            (f"{tmp_path}/newdir/", "names a directory; give a file path")]:
        with pytest.raises(infer.InferError, match=message):
            infer.run(workdir, src, output, {}, log=open(os.devnull, "w"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "notes.txt", "x.jsonl"]


def test_an_interrupted_first_record_is_still_cut(workdir, prompts_txt, tmp_path):
    out = tmp_path / "out.jsonl"
    # Any settings: these (as test_a_failing_decode_writes_nothing's) share its compiled decode.
    infer.run(workdir, prompts_txt, out, {"max_new_tokens": 2}, log=open(os.devnull, "w"))
    full = out.read_bytes()
    prompts = infer.read_prompts(prompts_txt)
    for cut in (1, 12, full.index(b"\n")):  # inside "inputs", after it, just the newline lost
        out.write_bytes(full[:cut])
        assert infer.resume_point(out, prompts) == 0
        assert out.read_bytes() == b""
    out.write_bytes(full[:full.index(b"\n") + 1] + b"junk")  # a record + foreign junk
    with pytest.raises(infer.InferError, match="unterminated line"):
        infer.resume_point(out, prompts)


# ---------------------------------------------------------------- the sidecar
def test_token_scores(workdir, prompts_txt, tmp_path):
    """--token_scores: each record's per-token log-probs (beam: per beam) sum to its score;
    the sidecar records the choice, so a resume without it is refused."""
    out, quiet = tmp_path / "out.jsonl", open(os.devnull, "w")
    beam = {"method": "beam", "num_beams": 2, "max_new_tokens": 3}
    assert infer.run(workdir, prompts_txt, out, beam, log=quiet, token_scores=True) == 5
    assert json.loads(infer.sidecar_path(out).read_text())["token_scores"] is True
    for x in _lines(out):
        for ids, scores, total in zip(x["output_ids"], x["token_scores"], x["score"]):
            assert len(scores) == len(ids) and abs(sum(scores) - total) < 1e-4
    with pytest.raises(infer.InferError, match="token_scores: True there, unset now"):
        infer.run(workdir, prompts_txt, out, beam, log=quiet)


def test_sequence_processors(workdir, prompts_txt, tmp_path):
    """The records equal `generate`'s, the sidecar records the options that are on (so an older
    sidecar without them resumes: they were off), and a resume with other values is refused."""
    out, quiet = tmp_path / "out.jsonl", open(os.devnull, "w")
    opts = {"method": "greedy", "max_new_tokens": 2, "repetition_penalty": 1.3,
            "min_new_tokens": 2, "no_repeat_ngram_size": 2, "min_p": 0.1}
    assert infer.run(workdir, prompts_txt, out, opts, log=quiet) == 5
    meta = json.loads(infer.sidecar_path(out).read_text())
    assert meta["decode"] == {"method": "greedy", "max_new_tokens": 2, "stop_ids": [1],
                              "repetition_penalty": 1.3, "min_new_tokens": 2,
                              "no_repeat_ngram_size": 2}  # min_p: sampling only
    import t5x_lite
    texts = prompts_txt.read_text().splitlines()
    want = gen.generate(t5x_lite.load(workdir), inputs=texts, max_new_tokens=2,
                        repetition_penalty=1.3, min_new_tokens=2, no_repeat_ngram_size=2)
    assert [x["output_ids"] for x in _lines(out)] == [r["ids"] for r in want]
    assert all(len(r["ids"]) == 2 for r in want)
    with pytest.raises(infer.InferError, match="decode.repetition_penalty: 1.3 there, 1.2 now"):
        infer.run(workdir, prompts_txt, out, {**opts, "repetition_penalty": 1.2}, log=quiet)
    with pytest.raises(infer.InferError, match="decode.min_new_tokens: 2 there, unset now"):
        infer.run(workdir, prompts_txt, out, {**opts, "min_new_tokens": 0}, log=quiet)
    with pytest.raises(errors.UserError, match="repetition_penalty must be finite and > 0"):
        infer.run(workdir, prompts_txt, tmp_path / "bad.jsonl", {"repetition_penalty": -1},
                  log=quiet)


def test_sequence_options_from_flag_text(workdir, prompts_txt, tmp_path):
    """sequence_bias, bad_words_ids and suppressed tokens given as the flags' text (ids taken
    from the plain decode, so that each changes it): the records equal `generate`'s with the
    same options as Python values, the sidecar records them, and a resume with another value
    is refused."""
    import t5x_lite
    out, quiet = tmp_path / "out.jsonl", open(os.devnull, "w")
    m, texts = t5x_lite.load(workdir), prompts_txt.read_text().splitlines()
    plain = [r["ids"] for r in gen.generate(m, inputs=texts, max_new_tokens=3)]
    values = {"sequence_bias": {(plain[4][0],): -5.0, (plain[0][0], 7): 1.5},
              "bad_words_ids": [plain[3][:2]], "suppress_tokens": [plain[1][0]],
              "begin_suppress_tokens": [plain[2][0]]}
    opts = {"max_new_tokens": 3,
            **{k: gen.sequence_option_text(k, getattr(gen.DecodeOptions(**{k: v}), k))
               for k, v in values.items()}}
    assert opts["suppress_tokens"] == str(plain[1][0])
    assert json.loads(opts["bad_words_ids"]) == [plain[3][:2]]
    assert infer.run(workdir, prompts_txt, out, opts, log=quiet) == 5
    decode = json.loads(infer.sidecar_path(out).read_text())["decode"]
    assert decode["sequence_bias"] == [[[plain[4][0]], -5.0], [[plain[0][0], 7], 1.5]]
    assert decode["suppress_tokens"] == [plain[1][0]]
    want = [r["ids"] for r in gen.generate(m, inputs=texts, max_new_tokens=3, **values)]
    assert [x["output_ids"] for x in _lines(out)] == want
    assert all(w != p for w, p in zip(want[1:], plain[1:]))  # each option changed its row
    with pytest.raises(infer.InferError, match="decode.suppress_tokens"):
        infer.run(workdir, prompts_txt, out, {**opts, "suppress_tokens": ""}, log=quiet)
    with pytest.raises(errors.UserError, match="decode.bad_words_ids must be JSON"):
        infer.run(workdir, prompts_txt, tmp_path / "bad.jsonl", {"bad_words_ids": "[[8,"},
                  log=quiet)
    with pytest.raises(errors.UserError, match="token id 99999 of sequence_bias"):
        infer.run(workdir, prompts_txt, tmp_path / "bad.jsonl", {"suppress_tokens": "99999"},
                  log=quiet)
    assert not (tmp_path / "bad.jsonl").exists()


def test_stop_strings_from_flag_text(workdir, prompts_txt, tmp_path):
    """--decode.stop_strings as the flag's JSON text: records equal `generate`'s with the
    Python list, keep the completing token in `output`, and the sidecar records them."""
    import t5x_lite
    out, quiet = tmp_path / "out.jsonl", open(os.devnull, "w")
    m, texts = t5x_lite.load(workdir), prompts_txt.read_text().splitlines()
    plain = gen.generate(m, inputs=texts, max_new_tokens=5)
    stops = [plain[0]["text"][2:4], plain[3]["text"][1:3]]
    text = gen.sequence_option_text("stop_strings", stops)
    assert json.loads(text) == stops
    assert infer.run(workdir, prompts_txt, out, {"stop_strings": text}, log=quiet) == 5
    assert json.loads(infer.sidecar_path(out).read_text())["decode"]["stop_strings"] == stops
    want = gen.generate(m, inputs=texts, max_new_tokens=5, stop_strings=stops)
    records = _lines(out)
    assert [x["output_ids"] for x in records] == [r["ids"] for r in want]
    assert sum(len(w["ids"]) < len(p["ids"]) for w, p in zip(want, plain)) >= 2
    assert all(r["finished"] for r in want[:1]) and stops[0] in records[0]["output"]
    with pytest.raises(infer.InferError, match="decode.stop_strings"):
        infer.run(workdir, prompts_txt, out, {"stop_strings": ""}, log=quiet)
    with pytest.raises(errors.UserError, match="decode.stop_strings: '' must be 1 to 32"):
        infer.run(workdir, prompts_txt, tmp_path / "bad.jsonl", {"stop_strings": '["a", ""]'},
                  log=quiet)
    assert not (tmp_path / "bad.jsonl").exists()


def test_prompt_lookup_is_recorded_only_where_it_changes_records():
    """Greedy prompt lookup writes the plain greedy records (a resume may turn it on or off);
    sampled, it changes the samples, so it is recorded."""
    ckpt, on = {"path": "/c", "step": 1}, dict(prompt_lookup_num_tokens=4)
    greedy = infer.output_meta(ckpt, gen.DecodeOptions(**on), None, None, [1])["decode"]
    assert "prompt_lookup_num_tokens" not in greedy
    sampled = infer.output_meta(ckpt, gen.DecodeOptions(method="sample", **on), None, None,
                                [1])["decode"]
    assert (sampled["prompt_lookup_num_tokens"], sampled["max_matching_ngram_size"]) == (4, 2)


def test_beam_rule_is_recorded_with_its_settings():
    """T5X's beam search records num_beams and alpha, as before HF's rule existed (so older
    sidecars resume); HF's records its length_penalty and early_stopping instead of alpha."""
    ckpt = {"path": "/c", "step": 1}
    t5x = infer.output_meta(ckpt, gen.DecodeOptions(method="beam"), None, None, [1])["decode"]
    assert {k: t5x.get(k) for k in ("alpha", "beam_rule", "length_penalty")} == {
        "alpha": 0.6, "beam_rule": None, "length_penalty": None}
    hf = infer.output_meta(ckpt, gen.DecodeOptions(method="beam", beam_rule="hf",
                                                   early_stopping=True), None, None, [1])
    assert {k: hf["decode"].get(k) for k in ("alpha", "beam_rule", "length_penalty",
                                             "early_stopping")} == {
        "alpha": None, "beam_rule": "hf", "length_penalty": 1.0, "early_stopping": "true"}
    # the flag's text forms, as HF's values
    assert [gen.decode_options(early_stopping=v).early_stopping
            for v in ("True", "never", False)] == ["true", "never", "false"]


def test_sampling_filters_are_recorded_when_on():
    """min_p, typical_p and the cutoffs change sampled records: recorded when on and sampling
    (so older sidecars, written without them, resume), never for greedy decoding."""
    ckpt = {"path": "/c", "step": 1}
    on = dict(min_p=0.1, typical_p=0.9, epsilon_cutoff=1e-3, eta_cutoff=2e-3)
    sampled = infer.output_meta(ckpt, gen.DecodeOptions(method="sample", **on), None, None, [1])
    assert {k: sampled["decode"].get(k) for k in on} == on
    plain = infer.output_meta(ckpt, gen.DecodeOptions(method="sample", typical_p=0.9), None,
                              None, [1])["decode"]
    assert plain["typical_p"] == 0.9 and not {"min_p", "epsilon_cutoff", "eta_cutoff"} & set(plain)
    greedy = infer.output_meta(ckpt, gen.DecodeOptions(**on), None, None, [1])["decode"]
    assert not set(on) & set(greedy)


def test_sidecar_refuses_other_settings(workdir, prompts_txt, tmp_path):
    out, quiet = tmp_path / "out.jsonl", open(os.devnull, "w")
    greedy = {"method": "greedy", "max_new_tokens": 2}  # as the tests above: compiled there
    assert infer.run(workdir, prompts_txt, out, greedy, log=quiet) == 5
    meta = json.loads(infer.sidecar_path(out).read_text())
    assert meta == {"written_by": "t5x_lite.infer",
                    "checkpoint": {"path": str(workdir.resolve()), "step": 1},
                    "quantize": "none", "draft": None,
                    "decode": {"method": "greedy", "max_new_tokens": 2, "stop_ids": [1]}}
    full = out.read_text()

    # A complete output: another setting is no "nothing to do".
    with pytest.raises(infer.InferError) as e:
        infer.run(workdir, prompts_txt, out, {**greedy, "max_new_tokens": 4}, log=quiet)
    assert str(e.value) == (
        f"--output {out} was written with other settings (decode.max_new_tokens: 2 there, 4 "
        "now); re-run with those, or choose another --output")
    with pytest.raises(infer.InferError, match="quantize: 'none' there, 'int8' now"):
        infer.run(workdir, prompts_txt, out, greedy, log=quiet, quantize="int8")
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    with pytest.raises(infer.InferError, match=f"checkpoint.path: '{workdir.resolve()}' there"):
        infer.run(copy, prompts_txt, out, greedy, log=quiet)

    # Interrupted: resuming with other options would mix greedy and beam records.
    out.write_text("".join(full.splitlines(keepends=True)[:2]) + full.splitlines()[2][:9])
    cut = out.read_text()
    with pytest.raises(infer.InferError, match="decode.method: 'greedy' there, 'beam' now"):
        infer.run(workdir, prompts_txt, out, {"method": "beam", "num_beams": 2}, log=quiet)
    assert out.read_text() == cut  # not even the partial line is cut
    # batch_size does not change what is written: resuming with another one is fine.
    assert infer.run(workdir, prompts_txt, out, {**greedy, "batch_size": 1}, log=quiet) == 3
    assert [x["output_ids"] for x in _lines(out)] == [
        json.loads(x)["output_ids"] for x in full.splitlines()]

    # An output without a sidecar (an older infer) resumes unchecked, as before.
    infer.sidecar_path(out).unlink()
    out.write_text("".join(full.splitlines(keepends=True)[:4]))
    assert infer.run(workdir, prompts_txt, out, {**greedy, "max_new_tokens": 3}, log=quiet) == 1
    assert not infer.sidecar_path(out).exists()

    # A file at the sidecar's path that infer did not write is never overwritten.
    fresh = tmp_path / "fresh.jsonl"
    infer.sidecar_path(fresh).write_text("my notes")
    with pytest.raises(infer.InferError, match="sidecar .* was not written by infer"):
        infer.run(workdir, prompts_txt, fresh, greedy, log=quiet)
    assert infer.sidecar_path(fresh).read_text() == "my notes" and not fresh.exists()


# ---------------------------------------------------------------- lines, BOM
def test_lines_end_at_newline_only(workdir, tmp_path):
    src = tmp_path / "p.txt"
    odd = "hello\x0cworld\u2028x\x1cy\x85z\x0bw\rv"  # all line breaks to str.splitlines
    src.write_bytes((odd + "\r\nsecond\n").encode())
    assert [p.inputs for p in infer.read_prompts(src)] == [odd, "second"]

    # Output written with ensure_ascii=False holds U+2028 raw; it resumes.
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps("a\u2028b") + "\n" + json.dumps("c\x85d") + "\n")
    out = tmp_path / "out.jsonl"
    assert infer.run(workdir, src, out, {"max_new_tokens": 2}, log=open(os.devnull, "w")) == 2
    assert "\u2028" in out.read_text()
    assert infer.resume_point(out, infer.read_prompts(src)) == 2
    assert infer.run(workdir, src, out, {"max_new_tokens": 2}, log=open(os.devnull, "w")) == 0


def test_byte_order_mark_is_dropped(tmp_path):
    txt, jsonl = tmp_path / "p.txt", tmp_path / "p.jsonl"
    txt.write_bytes(b"\xef\xbb\xbfhello\nworld\n")
    jsonl.write_bytes(b'\xef\xbb\xbf{"inputs": "hello"}\n"world"\n')
    for path in (txt, jsonl):
        assert [p.inputs for p in infer.read_prompts(path)] == ["hello", "world"]


# ---------------------------------------------------------------- nothing written on failure
@pytest.fixture(scope="module")
def t5_workdir(tmp_path_factory):
    """A tiny T5 (no max_len limit on new tokens, unlike a GPT's prompt + new tokens)."""
    vocab = testing.tiny_vocab(400)
    cfg = config_lib.t5_1_1(vocab_size=vocab.padded_vocab_size, d_model=32, num_heads=2,
                            head_dim=16, d_ff=48, num_layers=1, max_len=64)
    path = tmp_path_factory.mktemp("t5")
    checkpoints.write_config(path, base_config(cfg, objective="span_corruption", seq_len=64))
    checkpoints.save_params(path, decoding_testlib.random_params(cfg, seed=4), step=1)
    vocab.copy_to(path)
    return path


def test_a_failing_decode_writes_nothing(workdir, t5_workdir, prompts_txt, tmp_path,
                                         monkeypatch):
    # An absurd value that no check catches yet fails inside the first batch (the audit's
    # OverflowError; a DecodeError once DecodeOptions bounds it): no empty --output.
    out = tmp_path / "out.jsonl"
    with pytest.raises((OverflowError, errors.UserError)):
        infer.run(t5_workdir, prompts_txt, out, {"max_new_tokens": 99999999999999999999},
                  log=open(os.devnull, "w"))
    assert not out.exists() and not infer.sidecar_path(out).exists()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    infer.run(workdir, prompts_txt, out, {"max_new_tokens": 2}, log=open(os.devnull, "w"))
    interrupted = "".join(out.read_text().splitlines(keepends=True)[:2]) + '{"inpu'
    out.write_text(interrupted)
    sidecar = infer.sidecar_path(out).read_text()
    monkeypatch.setattr(gen, "decode_batch", broken)
    for target in (out, tmp_path / "new.jsonl"):
        with pytest.raises(RuntimeError, match="out of memory"):
            infer.run(workdir, prompts_txt, target, {"max_new_tokens": 2},
                      log=open(os.devnull, "w"))
    assert out.read_text() == interrupted and infer.sidecar_path(out).read_text() == sidecar
    assert not (tmp_path / "new.jsonl").exists()
    assert not infer.sidecar_path(tmp_path / "new.jsonl").exists()
