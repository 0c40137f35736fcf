"""`python -m t5x_lite.convert`: HF -> workdir -> HF round trips that transformers loads."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import hf_reference as ref
import t5x_lite
from t5x_lite import checkpoints, convert, hf_interop
from t5x_lite import vocab as vocab_lib
from t5x_lite.config import ModelConfig, gpt_modern
from t5x_lite.data import testing


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    models = ref.build_all(tmp_path_factory)
    # Conversion copies a T5 vocabulary byte for byte (80 pieces + 100 extra ids <= 203 rows).
    ref.train_spm(models["t5_v1_0"][1] / "spiece.model", 80)
    return models


def _from_pretrained(kind, path):
    cls = (transformers.GPT2LMHeadModel if kind == "gpt2"
           else transformers.T5ForConditionalGeneration)
    return cls.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("kind, scan", [("t5_v1_0", False), ("t5_v1_1", True), ("gpt2", False)])
def test_round_trip_loads_in_transformers_with_same_logits(hf_models, tmp_path, kind, scan):
    model, src = hf_models[kind]
    workdir, out = tmp_path / "workdir", tmp_path / "hf"
    cfg = convert.hf_to_workdir(src, workdir, scan_layers=scan)
    run = checkpoints.read_config(workdir)
    assert ModelConfig.from_dict(run.model) == cfg and cfg.scan_layers == scan
    assert run.data.objective == ("causal_lm" if kind == "gpt2" else "span_corruption")
    assert checkpoints.all_steps(workdir) == [0]

    convert.workdir_to_hf(workdir, out)
    original = safetensors.numpy.load_file(src / "model.safetensors")
    written = safetensors.numpy.load_file(out / "model.safetensors")
    assert written.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(written[name], original[name], err_msg=name)

    back = _from_pretrained(kind, out)
    inputs, mask, want = ref.hf_logits(kind, model)
    delta = ref.masked_max_abs_diff(ref.hf_forward(kind, back, inputs), want, mask)
    print(f"\n{kind}: HF -> t5x_lite -> HF max |logits delta| = {delta:.1e}")
    assert delta == 0.0
    if kind == "t5_v1_1":  # the reloaded head must stay untied and unscaled
        assert not torch.equal(back.lm_head.weight, back.shared.weight)
        assert back.config.scale_decoder_outputs is False
    if kind == "t5_v1_0":
        spiece = (src / "spiece.model").read_bytes()
        assert (workdir / "vocab.model").read_bytes() == spiece
        assert (out / "spiece.model").read_bytes() == spiece
    if kind == "gpt2":  # the source config's extras (token ids) come back
        assert json.loads((out / "config.json").read_text())["bos_token_id"] == 5


def test_to_hf_accepts_step_and_checkpoints_dirs(hf_models, tmp_path):
    workdir = tmp_path / "workdir"
    convert.hf_to_workdir(hf_models["gpt2"][1], workdir)
    for path in (workdir / "checkpoints", workdir / "checkpoints" / "0"):
        convert.workdir_to_hf(path, tmp_path / path.name)
        assert (tmp_path / path.name / "model.safetensors").exists()
    with pytest.raises(checkpoints.CheckpointError, match="No checkpoint for step 7"):
        convert.workdir_to_hf(workdir, tmp_path / "x", step=7)
    with pytest.raises(hf_interop.InteropError, match="already holds checkpoints"):
        convert.hf_to_workdir(hf_models["gpt2"][1], workdir)


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "t5x_lite.convert", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_converts_both_ways(hf_models, tmp_path):
    src = hf_models["gpt2"][1]
    r = _cli(f"--from_hf={src}", f"--workdir={tmp_path / 'w'}", "--scan_layers")
    assert r.returncode == 0, r.stderr
    r = _cli("--to_hf", f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    assert "wrote HF directory" in r.stdout
    # orbax's INFO page per restore / save stays off the console, as in the other CLIs.
    assert not re.findall(r"^I\d{4} .*", r.stderr, re.M), r.stderr[-2000:]
    back = _from_pretrained("gpt2", tmp_path / "hf")
    inputs, mask, want = ref.hf_logits("gpt2", hf_models["gpt2"][0])
    assert ref.masked_max_abs_diff(ref.hf_forward("gpt2", back, inputs), want, mask) == 0.0


def _pickle_dir(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    return tmp_path


def _unknown_type_dir(tmp_path, hf_models):
    src = hf_models["gpt2"][1]
    (tmp_path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}')
    return tmp_path


@pytest.mark.parametrize("case, message", [
    ("from_hf_with_out_and_step", "--out, --step only apply to --to_hf; drop them"),
    ("to_hf_with_scan_layers", "--scan_layers only applies to --from_hf; drop it"),
    ("missing", "does not exist"),
    ("pickle", "re-save it as safetensors"),
    ("unknown_type", "Unsupported HF model_type 'mamba'"),
    ("to_hf_missing", "does not exist"),
])
def test_cli_errors_are_one_line(hf_models, tmp_path, case, message):
    args = {
        "missing": lambda: [f"--from_hf={tmp_path / 'nope'}"],
        "pickle": lambda: [f"--from_hf={_pickle_dir(tmp_path)}"],
        "unknown_type": lambda: [f"--from_hf={_unknown_type_dir(tmp_path, hf_models)}"],
        "to_hf_missing": lambda: ["--to_hf", f"--out={tmp_path / 'out'}"],
        # both used to exit 0 with the flags ignored (no HF directory at --out)
        "from_hf_with_out_and_step": lambda: [f"--from_hf={hf_models['gpt2'][1]}",
                                              f"--out={tmp_path / 'out'}", "--step=7"],
        "to_hf_with_scan_layers": lambda: ["--to_hf", f"--out={tmp_path / 'out'}",
                                           "--scan_layers"],
    }[case]()
    r = _cli(*args, f"--workdir={tmp_path / 'w'}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("convert: error:") and message in lines[0], lines[0]


def test_models_without_hf_equivalent_are_refused():
    small = dict(vocab_size=64, d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=1)
    assert convert.hf_config_from_model(gpt_modern(**small))["model_type"] == "llama"
    for cfg in (gpt_modern(**small, mlp="gelu"), gpt_modern(**small, position="none")):
        with pytest.raises(hf_interop.InteropError, match="No HF equivalent"):
            convert.hf_config_from_model(cfg)


def test_to_hf_refuses_an_out_that_would_break_a_workdir_or_mix_models(hf_models, tmp_path):
    workdir, other = tmp_path / "workdir", tmp_path / "other"
    convert.hf_to_workdir(hf_models["gpt2"][1], workdir)
    convert.hf_to_workdir(hf_models["gpt2"][1], other)
    run_config = (workdir / "config.json").read_bytes()
    afile = tmp_path / "afile"
    afile.write_text("keep")
    pickles, foreign = tmp_path / "pickles", tmp_path / "foreign"
    pickles.mkdir()
    (pickles / "pytorch_model.bin").write_bytes(b"weights")
    foreign.mkdir()
    (foreign / "config.json").write_text('{"learning_rate": 1}')
    for out, message in [
        (workdir, "is the workdir itself"),
        (str(workdir) + "/", "is the workdir itself"),
        (workdir / "checkpoints" / "hf", "inside the workdir's checkpoints/"),
        (other, "is a t5x_lite workdir"),
        (afile, "is a file, not a directory"),
        (afile / "x", f"its parent {afile} is a file"),
        (pickles, r"holds another model's weights \(pytorch_model.bin\)"),
        (foreign, "not a Hugging Face model config"),
    ]:
        with pytest.raises(hf_interop.InteropError, match=message):
            convert.workdir_to_hf(workdir / "checkpoints" / "0", out)
    # Nothing was written anywhere.
    assert (workdir / "config.json").read_bytes() == run_config
    assert sorted(p.name for p in workdir.iterdir()) == [
        "checkpoints", "config.json", "hf_config.json", "hf_generation_config.json"]
    assert not (other / "model.safetensors").exists() and afile.read_text() == "keep"
    assert sorted(p.name for p in pickles.iterdir()) == ["pytorch_model.bin"]
    assert (foreign / "config.json").read_text() == '{"learning_rate": 1}'
    with pytest.raises(hf_interop.InteropError, match="is a file, not a t5x_lite workdir"):
        convert.workdir_to_hf(afile, tmp_path / "hf")


def test_to_hf_replaces_an_earlier_export(hf_models, tmp_path):
    workdir, out = tmp_path / "workdir", tmp_path / "hf"
    convert.hf_to_workdir(hf_models["gpt2"][1], workdir)
    convert.workdir_to_hf(workdir, out)
    want = {name: (out / name).read_bytes() for name in ("config.json", "model.safetensors")}
    (out / "config.json").write_text('{"model_type": "gpt2", "stale": true}')
    (out / "model.safetensors").write_bytes(b"stale")
    (out / "README.md").write_text("mine")
    convert.workdir_to_hf(workdir, out)  # a re-run: same files again, the others left alone
    assert {name: (out / name).read_bytes() for name in want} == want
    assert (out / "README.md").read_text() == "mine"
    assert not list(out.glob("*.tmp"))


def test_to_hf_over_an_export_with_a_vocabulary_removes_that_vocabulary(hf_models, tmp_path):
    """A T5 export wrote spiece.model; a GPT-2 (no vocabulary) exported over it must not leave
    it next to its weights, where it would pass for this model's vocabulary."""
    t5, gpt, out = tmp_path / "t5", tmp_path / "gpt", tmp_path / "hf"
    convert.hf_to_workdir(hf_models["t5_v1_0"][1], t5)
    convert.hf_to_workdir(hf_models["gpt2"][1], gpt)
    convert.workdir_to_hf(t5, out)
    assert (out / hf_interop.HF_T5_VOCAB).exists()
    convert.workdir_to_hf(gpt, out)
    assert not (out / hf_interop.HF_T5_VOCAB).exists()
    assert t5x_lite.load(out).vocab is None


def test_from_hf_refuses_a_workdir_that_is_a_file_or_an_hf_dir(hf_models, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in hf_models["gpt2"][1].iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for workdir, message in [(src, "is the --from_hf directory"),
                             (hf_models["t5_v1_0"][1], "not a t5x_lite run config"),
                             (afile, "is a file, not a directory"),
                             (afile / "w", f"its parent {afile} is a file")]:
        with pytest.raises(hf_interop.InteropError, match=message):
            convert.hf_to_workdir(src, workdir)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # config.json kept
    assert afile.read_text() == "keep"


def test_cli_out_errors_are_one_line_and_keep_the_workdir(hf_models, tmp_path):
    workdir = tmp_path / "w"
    convert.hf_to_workdir(hf_models["gpt2"][1], workdir)
    run_config = (workdir / "config.json").read_bytes()
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for out, message in [(workdir, "is the workdir itself"), (afile, "is a file"),
                         (afile / "x", "is a file")]:
        r = _cli("--to_hf", f"--workdir={workdir}", f"--out={out}")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
        assert lines[0].startswith("convert: error: --out") and message in lines[0], lines[0]
        assert "Errno" not in lines[0]
    assert (workdir / "config.json").read_bytes() == run_config
    assert not (workdir / "model.safetensors").exists()
    r = _cli(f"--from_hf={hf_models['gpt2'][1]}", f"--workdir={afile / 'w'}")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"convert: error: --workdir {afile / 'w'}: its parent {afile} is a file, not a "
        "directory"), r.stderr


def _hf_copy(src, dst, **config):
    """A copy of the HF directory `src` whose config.json has `config` merged in."""
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(
        {**json.loads((dst / "config.json").read_text()), **config}))
    return dst


def test_cli_malformed_hf_inputs_are_one_line_and_write_nothing(hf_models, tmp_path):
    truncated = _hf_copy(hf_models["gpt2"][1], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    no_heads = _hf_copy(hf_models["gpt2"][1], tmp_path / "no_heads", n_head=0)
    for src, message in [(truncated, f"{weights}: tensor "),
                         (no_heads, f"{no_heads / 'config.json'}: n_head=0 is not a positive")]:
        r = _cli(f"--from_hf={src}", f"--workdir={tmp_path / 'w'}")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
        assert lines[0].startswith(f"convert: error: {message}"), lines[0]
        assert not (tmp_path / "w").exists()


def test_from_hf_refuses_a_vocabulary_larger_than_the_embedding(hf_models, tmp_path):
    """load would refuse the workdir, so the conversion refuses it first and writes nothing."""
    src = shutil.copytree(hf_models["t5_v1_0"][1], tmp_path / "big_vocab")
    ref.train_spm(src / "spiece.model", 150)  # 150 pieces + 100 extra ids > 203 rows
    with pytest.raises(checkpoints.CheckpointError, match="has 250 ids .* only 203 rows"):
        convert.hf_to_workdir(src, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_t5_extra_ids_of_the_tokenizer_config_are_followed_both_ways(hf_models, tmp_path,
                                                                     caplog):
    """T5Tokenizer's `extra_ids` (here 8, for 150 pieces in 203 rows, which 100 would not fit):
    the sentinels HF's tokenizer gives, through load, a workdir and its export."""
    src = shutil.copytree(hf_models["t5_v1_0"][1], tmp_path / "src")
    ref.train_spm(src / "spiece.model", 150)
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 8}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    want = [hf_tok.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(8)]
    assert want == list(range(157, 149, -1))
    m = t5x_lite.load(str(src))
    assert [m.vocab.sentinel_id(i) for i in range(8)] == want
    convert.hf_to_workdir(src, tmp_path / "w")
    assert checkpoints.read_config(tmp_path / "w").data.extra_ids == 8
    w = t5x_lite.load(str(tmp_path / "w"))
    assert [w.vocab.sentinel_id(i) for i in range(8)] == want
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf")
    out_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert [out_tok.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(8)] == want
    assert len(out_tok) == len(hf_tok) == 158
    # HF gives listed tokens that are not among the sentinels ids after them: not read
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 8,
         "additional_special_tokens": ["<extra_id_0>", "<x>", "<extra_id_8>"]}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    assert [hf_tok.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(8)] == want
    assert hf_tok.convert_tokens_to_ids(["<x>", "<extra_id_8>"]) == [158, 159]
    assert [t5x_lite.load(str(src)).vocab.sentinel_id(i) for i in range(8)] == want
    assert ("2 added tokens past the vocabulary's 158 ids ('<x>', '<extra_id_8>') are not "
            "read") in caplog.text
    (src / "tokenizer_config.json").write_text(json.dumps({"extra_ids": "8"}))
    with pytest.raises(hf_interop.InteropError, match=r'tokenizer_config.json: extra_ids="8" is '
                       "not an integer >= 0"):
        t5x_lite.load(str(src))


def test_a_t5_vocabulary_with_byte_pieces_exports_with_a_warning(hf_models, tmp_path, caplog):
    """HF's T5Tokenizer does not use sentencepiece byte fallback (which vocabularies trained
    here have): the export says so, as HF's tokenizer of the export shows."""
    vocab = testing.tiny_vocab(400)
    ref.t5_ending_with_eos(512).save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "spiece.model").write_bytes(vocab.path.read_bytes())
    convert.hf_to_workdir(tmp_path / "src", tmp_path / "w")
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf")
    assert "has byte pieces (sentencepiece byte fallback), which HF's T5Tokenizer" in caplog.text
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = vocab.encode("\u2211")
    assert vocab.decode(ours) == "\u2211" and len(ours) > 1  # its bytes, after a space piece
    assert hf_tok("\u2211", add_special_tokens=False)["input_ids"][-1] == 2  # <unk>
    caplog.clear()  # a vocabulary without them (as T5's own): no warning
    convert.hf_to_workdir(hf_models["t5_v1_0"][1], tmp_path / "w2")
    convert.workdir_to_hf(tmp_path / "w2", tmp_path / "hf2")
    assert "byte pieces" not in caplog.text


def test_to_hf_refuses_a_damaged_vocabulary_before_writing(hf_models, tmp_path):
    convert.hf_to_workdir(hf_models["t5_v1_0"][1], tmp_path / "w")
    good = (tmp_path / "w" / "vocab.model").read_bytes()
    (tmp_path / "w" / "vocab.model").write_bytes(good[:len(good) // 2])  # a partial copy
    with pytest.raises(vocab_lib.VocabularyError, match="not a sentencepiece model: .*vocab.model"):
        convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() or not list((tmp_path / "hf").iterdir())


def test_from_hf_refuses_a_workdir_holding_another_vocabulary(hf_models, tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    stale = workdir / "vocab.model"
    stale.write_bytes((hf_models["t5_v1_0"][1] / "spiece.model").read_bytes())
    for src in (hf_models["gpt2"][1],  # no spiece.model: the stale one would stay
                _hf_copy(hf_models["t5_v1_0"][1], tmp_path / "other_vocab")):
        if src.name == "other_vocab":
            ref.train_spm(src / "spiece.model", 60)
        with pytest.raises(hf_interop.InteropError,
                           match="holds a vocab.model that is not this model's "
                                 "(vocabulary .it has none.|spiece.model);"):
            convert.hf_to_workdir(src, workdir)
        assert sorted(p.name for p in workdir.iterdir()) == ["vocab.model"]
    convert.hf_to_workdir(hf_models["t5_v1_0"][1], workdir)  # the same vocabulary: fine
    t5x_lite.load(workdir)


@pytest.mark.parametrize("ids, want", [
    (dict(eos_token_id=None, bos_token_id=None), dict(eos_token_id=1, bos_token_id=None)),
    (dict(eos_token_id=[1, 7]), dict(eos_token_id=[1, 7], bos_token_id=5)),
    (dict(eos_token_id=[1, 500]), dict(eos_token_id=1)),
    (dict(eos_token_id=[500, 7, 1]), dict(eos_token_id=7)),
    (dict(eos_token_id=[], bos_token_id="5"), dict(eos_token_id=1, bos_token_id=1)),
])
def test_to_hf_keeps_null_and_list_token_ids_and_the_eos_load_stops_at(hf_models, tmp_path,
                                                                        ids, want):
    """Token ids within the vocabulary (lists too) and null ones are kept; eos_token_id names
    load()'s EOS (a null one reads as 1 there, so the export says 1). HF generate stops where
    load() does: at the generation config's ids (1 here), which the export keeps."""
    workdir = tmp_path / "w"
    convert.hf_to_workdir(hf_models["gpt2"][1], workdir)
    source = workdir / "hf_config.json"
    source.write_text(json.dumps({**json.loads(source.read_text()), **ids}))
    convert.workdir_to_hf(workdir, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: written[k] for k in want} == want
    back = _from_pretrained("gpt2", tmp_path / "hf")  # transformers accepts them
    first_eos = (want["eos_token_id"] if isinstance(want["eos_token_id"], int)
                 else want["eos_token_id"][0])
    assert first_eos == t5x_lite.load(workdir).eos_id == t5x_lite.load(tmp_path / "hf").eos_id
    assert back.generation_config.eos_token_id == 1
    assert t5x_lite.load(workdir).stop_ids == (1,) == t5x_lite.load(tmp_path / "hf").stop_ids


def test_to_hf_eos_is_the_id_load_stops_at_for_that_step(hf_models, tmp_path):
    """Step 0 of a converted workdir holds the source's weights, which end with the source's
    eos_token_id (7 here; GPT-2's 50256). A later step beside the same hf_config.json (a LoRA
    merge copies it) was trained here, on data that ends in id 1: its export says 1, so HF
    generate stops where load() does."""
    src = _hf_copy(hf_models["gpt2"][1], tmp_path / "src", eos_token_id=7)
    generation = src / "generation_config.json"  # where HF generate reads its stop ids
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "eos_token_id": 7}))
    workdir = tmp_path / "w"
    cfg = convert.hf_to_workdir(src, workdir)
    checkpoints.save_params(workdir, convert.restore_numpy_params(workdir, 0, cfg), 3)
    for step, want in ((0, 7), (3, 1)):
        out = tmp_path / f"hf{step}"
        convert.workdir_to_hf(workdir, out, step=step)
        assert json.loads((out / "config.json").read_text())["eos_token_id"] == want
        for m in (t5x_lite.load(workdir, step=step), t5x_lite.load(out)):
            assert m.eos_id == want and m.stop_ids == (want,)
        assert _from_pretrained("gpt2", out).generation_config.eos_token_id == want


def test_to_hf_refuses_a_broken_source_config(hf_models, tmp_path):
    workdir = tmp_path / "w"
    convert.hf_to_workdir(hf_models["gpt2"][1], workdir)
    (workdir / "hf_config.json").write_text("[1]")
    with pytest.raises(hf_interop.InteropError, match="hf_config.json is not a JSON object"):
        convert.workdir_to_hf(workdir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_gelu_pytorch_tanh_config_round_trips_unchanged(hf_models, tmp_path):
    src = _hf_copy(hf_models["gpt2"][1], tmp_path / "src", activation_function="gelu_pytorch_tanh")
    convert.hf_to_workdir(src, tmp_path / "w")
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf")
    assert (json.loads((tmp_path / "hf" / "config.json").read_text())
            == json.loads((src / "config.json").read_text()))
    # Equivalent T5 names are kept too; a name for another activation is not.
    cfg = hf_interop.model_config_from_hf({"model_type": "t5", "feed_forward_proj": "gated-gelu"})
    for source, want in [("gated-gelu_new", "gated-gelu_new"), ("gated-gelu", "gated-gelu"),
                         ("relu", "gated-gelu"), (["x"], "gated-gelu")]:
        got = convert.hf_config_from_model(cfg, {"feed_forward_proj": source})
        assert got["feed_forward_proj"] == want


def test_export_drops_the_base_configs_aliases():
    """A base config naming the head count num_attention_heads (HF's alias of n_head, which HF
    reads over n_head) exported with n_head=4 beside the stale alias: HF read 3 heads."""
    base = {"model_type": "gpt2", "num_attention_heads": 3, "n_embd": 24}
    cfg = dataclasses.replace(hf_interop.model_config_from_hf(base), num_heads=4, head_dim=6)
    got = convert.hf_config_from_model(cfg, base)
    assert "num_attention_heads" not in got
    assert transformers.GPT2Config.from_dict(got).n_head == 4
    t5 = hf_interop.model_config_from_hf({"model_type": "t5", "hidden_size": 32, "d_kv": 8})
    got = convert.hf_config_from_model(t5, {"model_type": "t5", "hidden_size": 32})
    assert "hidden_size" not in got and transformers.T5Config.from_dict(got).d_model == 32
    # a transformers 4.x source's torch_dtype: the export's weights are float32 whatever it was
    got = convert.hf_config_from_model(cfg, {**base, "torch_dtype": "bfloat16"})
    assert "torch_dtype" not in got and got["dtype"] == "float32"


def test_gpt2_dropouts_round_trip_and_follow_a_changed_rate(hf_models, tmp_path, caplog):
    """GPT-2 has three dropout rates, t5x_lite one (resid_pdrop's): an export writes the
    source's three back while that one is unchanged, and the new rate for all three after."""
    rates = dict(resid_pdrop=0.1, embd_pdrop=0.0, attn_pdrop=0.2)
    src = _hf_copy(hf_models["gpt2"][1], tmp_path / "src", **rates)
    convert.hf_to_workdir(src, tmp_path / "w")
    assert "uses resid_pdrop=0.1 for all three (embd_pdrop=0, attn_pdrop=0.2)" in caplog.text
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: written[k] for k in rates} == rates
    cfg = hf_interop.model_config_from_hf(written)
    got = convert.hf_config_from_model(dataclasses.replace(cfg, dropout_rate=0.05), written)
    assert {k: got[k] for k in rates} == dict.fromkeys(rates, 0.05)
    assert "shared along the sequence" not in caplog.text
    # Masks shared along the sequence (T5X's) have no HF equivalent: the export says so.
    convert.hf_config_from_model(dataclasses.replace(cfg, dropout_broadcast=True), written)
    assert ("HF has no dropout masks shared along the sequence (model.dropout_broadcast): a "
            "model trained from this export draws them per element at dropout_rate=0.1"
            in caplog.text)
