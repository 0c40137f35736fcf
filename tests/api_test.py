"""`t5x_lite.load`: HF directories and workdirs, logits / score parity with HF, clear errors."""
import json
import shutil
import sys
import types

import jax
import numpy as np
import pytest
import torch

import hf_reference as ref
import t5x_lite
from t5x_lite import checkpoints, convert, hf_interop, partitioning

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    models = ref.build_all(tmp_path_factory, kinds=("t5_v1_1", "gpt2"))
    ref.train_spm(models["t5_v1_1"][1] / "spiece.model", 80)  # 80 pieces + 100 extra ids <= 203
    return models


@pytest.fixture(scope="module")
def loaded(hf_models):
    return {kind: t5x_lite.load(path) for kind, (_, path) in hf_models.items()}


def test_package_exports():
    assert t5x_lite.load is t5x_lite.api.load and t5x_lite.__version__ == "0.1.0"


@pytest.mark.parametrize("kind", ["t5_v1_1", "gpt2"])
def test_logits_equal_hf(hf_models, loaded, kind):
    inputs, mask, want = ref.hf_logits(kind, hf_models[kind][0])
    lm = loaded[kind]
    if kind == "gpt2":  # ragged lists of lists, right-padded by load's model
        got = lm.logits([list(r[m > 0]) for r, m in zip(inputs["input_ids"], mask)])
    else:  # padded int arrays: encoder id 0 is padding
        got = lm.logits(inputs["input_ids"], decoder_input_ids=inputs["decoder_input_ids"])
    assert got.dtype == np.float32 and got.shape == want.shape
    delta = ref.masked_max_abs_diff(got, want, mask)
    print(f"\nload({kind}).logits: max |delta| vs HF = {delta:.2e}")
    assert delta <= TOL
    assert lm.config.vocab_size == lm.params["token_embedder"]["embedding"].shape[0] == ref.VOCAB


def _log_softmax(logits):
    return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()


def test_t5_score_of_text_equals_hand_computation(hf_models, loaded):
    lm, model = loaded["t5_v1_1"], hf_models["t5_v1_1"][0]
    sources = ["the lazy fox watches", "a much longer input that needs quite a few more tokens"]
    targets = ["cat naps", "warm milk and fish for dinner"]
    got = lm.score(sources, targets)
    enc_rows, tgt_rows = lm.tokenize(sources, add_eos=True), lm.tokenize(targets, add_eos=True)
    assert all(r[-1] == 1 for r in enc_rows + tgt_rows) and max(map(len, enc_rows)) > 20
    np.testing.assert_array_equal(lm.score(enc_rows, tgt_rows), got)  # text == its token ids
    enc = _pad(enc_rows)
    tgt = _pad(tgt_rows)
    logp = _log_softmax(ref.t5_logits(model, enc, enc > 0, ref.shift_right(tgt), tgt > 0))
    hand = [sum(logp[i, j, t] for j, t in enumerate(row)) for i, row in enumerate(tgt_rows)]
    print(f"\nT5 score {got} vs hand {hand}")
    np.testing.assert_allclose(got, hand, rtol=1e-5, atol=TOL)
    assert lm.detokenize(tgt_rows) == targets


def test_gpt2_score_equals_hand_computation(hf_models, loaded):
    lm, model = loaded["gpt2"], hf_models["gpt2"][0]
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, ref.VOCAB, n)) for n in (5, 1, 12)]  # id 0 is a real token
    conts = [list(rng.integers(0, ref.VOCAB, n)) for n in (9, 20, 2)]
    got = lm.score(prompts, conts)
    hand = []
    for p, c in zip(prompts, conts):  # one unpadded row at a time
        seq = np.array([p + c])
        logp = _log_softmax(ref.gpt2_logits(model, seq, np.ones_like(seq)))[0]
        hand.append(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c)))
    print(f"\nGPT-2 score {got} vs hand {hand}")
    np.testing.assert_allclose(got, hand, rtol=1e-5, atol=TOL)


def _pad(rows):
    out = np.zeros((len(rows), max(map(len, rows))), np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def test_workdir_checkpoints_and_step_dirs_load_the_same(hf_models, loaded, tmp_path):
    workdir = tmp_path / "workdir"
    convert.hf_to_workdir(hf_models["gpt2"][1], workdir, scan_layers=True)
    ids = [[5, 0, 17, 200, 3], [9, 9]]
    want = loaded["gpt2"].logits(ids)
    for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "0"):
        lm = t5x_lite.load(path)
        assert lm.config.scan_layers and lm.vocab is None
        assert ref.masked_max_abs_diff(lm.logits(ids), want, [[1] * 5, [1, 1, 0, 0, 0]]) <= 5e-5
    with pytest.raises(checkpoints.CheckpointError, match="No checkpoint for step 3"):
        t5x_lite.load(workdir, step=3)


def test_eos_id_is_the_hf_configs_eos_token_id_within_the_vocabulary(loaded, tmp_path):
    """HF generate stops at config.eos_token_id (a list: any of them); we stop at its first id
    within the vocabulary, else at 1 (GPT-2's 50256 in a smaller vocabulary)."""
    eos = t5x_lite.api.hf_eos_id
    assert eos({"eos_token_id": 7}, 10) == 7 and eos({"eos_token_id": [50256, 3, 4]}, 10) == 3
    for bad in (50256, None, True, "7", [], [10, -1]):
        assert eos({"eos_token_id": bad}, 10) == 1
    assert eos({}, 10) == 1
    assert loaded["t5_v1_1"].eos_id == 1 == loaded["gpt2"].eos_id  # their configs say 1
    cfg = loaded["gpt2"].config
    (tmp_path / convert.HF_SOURCE_CONFIG).write_text('{"eos_token_id": 9}')
    assert [t5x_lite.api.checkpoint_eos(tmp_path, s, cfg) for s in (0, 5)] == [(9, (9,)), (1, (1,))]
    (tmp_path / convert.HF_SOURCE_CONFIG).write_text("[9]")
    with pytest.raises(checkpoints.CheckpointError, match="hf_config.json is not a JSON object"):
        t5x_lite.api.checkpoint_eos(tmp_path, 0, cfg)


def test_sharded_mesh_and_dtype(hf_models, loaded):
    ids = [[5, 0, 17, 200, 3], [9, 9]]
    want = loaded["gpt2"].logits(ids)
    mesh = partitioning.make_mesh(data=4, fsdp=2, tensor=1)
    lm = t5x_lite.load(hf_models["gpt2"][1], mesh=mesh)
    emb = lm.params["token_embedder"]["embedding"]
    assert emb.sharding.mesh.shape["fsdp"] == 2 and not emb.sharding.is_fully_replicated
    np.testing.assert_allclose(lm.logits(ids), want, atol=1e-5)
    # jax.make_mesh's default (Explicit axes) is taken as the same devices' Auto mesh: it was
    # accepted, then every call raised a ShardingTypeError.
    explicit = jax.make_mesh((4, 2, 1), partitioning.MESH_AXES)
    assert jax.sharding.AxisType.Explicit in explicit.axis_types
    on_explicit = t5x_lite.load(hf_models["gpt2"][1], mesh=explicit)
    np.testing.assert_allclose(on_explicit.logits(ids), want, atol=1e-5)
    np.testing.assert_allclose(on_explicit.score([[5, 6]], [[7, 8]]),
                               loaded["gpt2"].score([[5, 6]], [[7, 8]]), rtol=1e-5)
    assert len(on_explicit.generate(input_ids=[[5, 6]], max_new_tokens=3)[0]["ids"]) == 3
    half = t5x_lite.load(hf_models["gpt2"][1], dtype="bfloat16")
    assert half.config.dtype == "bfloat16"
    assert half.params["token_embedder"]["embedding"].dtype == np.float32  # params stay fp32
    got = half.logits(ids)
    assert 0 < np.max(np.abs(got - want)[0]) < 0.05 * np.abs(want).max()


def test_bad_inputs(hf_models, loaded, tmp_path):
    t5, gpt = loaded["t5_v1_1"], loaded["gpt2"]
    with pytest.raises(ValueError, match="encoder-decoder.*pass decoder_input_ids"):
        t5.logits([[5, 6, 1]])
    with pytest.raises(ValueError, match="takes only input_ids"):
        gpt.logits([[5]], decoder_input_ids=[[0]])
    with pytest.raises(ValueError, match="has no vocabulary .vocab.model / spiece.model / "
                       "tokenizer.model / tokenizer.json.; pass token ids"):
        gpt.score("a prompt", "a continuation")
    with pytest.raises(ValueError, match=r"Token ids must be in \[0, 203\)"):
        gpt.logits([[5, 203]])
    with pytest.raises(ValueError, match="exceed this model's 40 learned positions"):
        gpt.logits([list(range(41))])
    with pytest.raises(ValueError, match="at least one prompt token"):
        gpt.score([[3], []], [[4], [5]])
    with pytest.raises(ValueError, match="Batch sizes differ"):
        t5.score([[3, 1]], [[4, 1], [5, 1]])


def test_bad_paths(hf_models, tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        t5x_lite.load(tmp_path / "nope")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"never unpickled")
    (tmp_path / "pickled" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(hf_interop.InteropError, match="re-save it as safetensors"):
        t5x_lite.load(tmp_path / "pickled")
    big_vocab = shutil.copytree(hf_models["t5_v1_1"][1], tmp_path / "big_vocab")
    ref.train_spm(big_vocab / "spiece.model", 150)
    with pytest.raises(checkpoints.CheckpointError,
                       match="has 250 ids .* embedding has only 203 rows"):
        t5x_lite.load(big_vocab)


def test_hf_directory_errors(hf_models, tmp_path):
    """An HF directory has no steps; a malformed one is one InteropError naming the file."""
    with pytest.raises(hf_interop.InteropError, match="Hugging Face directory, which has no "
                                                      "checkpoint steps; step=0"):
        t5x_lite.load(hf_models["gpt2"][1], step=0)
    truncated = shutil.copytree(hf_models["gpt2"][1], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(hf_interop.InteropError, match=f"^{weights}: tensor .*truncated"):
        t5x_lite.load(truncated)
    (truncated / "config.json").write_text("[]")
    with pytest.raises(hf_interop.InteropError, match="config.json is not a JSON object"):
        t5x_lite.load(truncated)
    (truncated / "model.safetensors").unlink()
    (truncated / "config.json").write_text("5")  # not an HF config: looked for as a workdir
    with pytest.raises(checkpoints.CheckpointError, match="No checkpoint found"):
        t5x_lite.load(truncated)


def test_generate_delegates_to_decoding(loaded, monkeypatch):
    fake = types.ModuleType("t5x_lite.decoding.generate")
    fake.generate = lambda model, **kw: (model, kw)
    monkeypatch.setitem(sys.modules, "t5x_lite.decoding.generate", fake)
    lm = loaded["gpt2"]
    assert lm.generate(input_ids=[[3, 4]], max_new_tokens=2) == (
        lm, {"input_ids": [[3, 4]], "max_new_tokens": 2})


def _random_workdir(workdir, cfg, objective):
    """A workdir holding randomly initialised weights of `cfg` at step 0."""
    import flax.linen as nn
    import jax
    from t5x_lite.defaults import base_config
    from t5x_lite.models import build_model

    params = nn.meta.unbox(build_model(cfg).init(jax.random.key(1)))["params"]
    checkpoints.write_config(workdir, base_config(cfg, objective=objective))
    checkpoints.save_params(workdir, params, 0)


def test_gpt_trained_here_gets_the_start_token_before_text(tmp_path):
    """A GPT with a t5x_lite vocabulary saw `[0] + targets[:-1]` in training, so text prompts
    are prefixed with id 0; given ids are used as they are."""
    from t5x_lite import config as mc
    from t5x_lite.data import testing as data_testing

    vocab = data_testing.tiny_vocab()
    cfg = mc.gpt2(vocab_size=vocab.padded_vocab_size, d_model=16, num_heads=2, head_dim=8,
                  d_ff=32, num_layers=1, max_len=64)
    _random_workdir(tmp_path, cfg, "causal_lm")
    vocab.copy_to(tmp_path)
    lm = t5x_lite.load(tmp_path)
    assert lm.uses_start_token and lm.vocab is not None and lm.eos_id == 1
    prompt, cont = "the cat sat", " on the mat"
    p_ids, c_ids = lm.vocab.encode(prompt), lm.vocab.encode(cont)
    np.testing.assert_allclose(lm.score([prompt], [cont]), lm.score([[0] + p_ids], [c_ids]),
                               rtol=1e-6)
    assert abs(lm.score([prompt], [cont])[0] - lm.score([p_ids], [c_ids])[0]) > 1e-4
    np.testing.assert_allclose(lm.logits([prompt]), lm.logits([[0] + p_ids]), atol=1e-6)
    by_text = lm.generate(inputs=[prompt], max_new_tokens=5)
    by_ids = lm.generate(input_ids=[[0] + p_ids], max_new_tokens=5)
    assert by_text[0]["ids"] == by_ids[0]["ids"]


def test_score_with_target_lengths_counts_a_generated_0_as_generate_does(loaded, tmp_path):
    """`generate`'s score sums the log-probs of every generated id, 0 included; `score` reads a
    T5 target 0 as padding (HF's convention) unless `target_lengths` says how many ids count."""
    from t5x_lite import config as mc

    _random_workdir(tmp_path, mc.t5_1_1(vocab_size=8, d_model=16, num_heads=2, head_dim=8,
                                        d_ff=32, num_layers=1, num_decoder_layers=1),
                    "span_corruption")
    lm = t5x_lite.load(tmp_path)
    prompts = [[3, 4, 5, 1], [6, 7, 1]]
    outs = lm.generate(input_ids=prompts, method="sample", num_samples=8, max_new_tokens=6,
                       temperature=1.0, top_k=0, top_p=1.0, seed=0)  # 8 ids: 0 is common
    inputs = [p for p, samples in zip(prompts, outs) for _ in samples]
    ids = [o["ids"] for samples in outs for o in samples]
    with_0 = np.array([0 in r for r in ids])
    assert with_0.any() and not with_0.all()
    got = lm.score(inputs, ids, target_lengths=[len(r) for r in ids])
    np.testing.assert_allclose(got, [o["score"] for samples in outs for o in samples],
                               rtol=1e-5, atol=1e-5)
    default = lm.score(inputs, ids)  # each generated 0's log-prob (< 0) is left out
    np.testing.assert_allclose(default[~with_0], got[~with_0], rtol=1e-6)
    assert np.all(default[with_0] > got[with_0])
    with pytest.raises(ValueError, match=r"target_lengths must be one integer per row, from 0 "
                                         r"to the row's number of target tokens \[2\]; got \[3\]"):
        lm.score([[3, 1]], [[4, 1]], target_lengths=[3])
    gpt = loaded["gpt2"]  # decoder-only: the continuation's first n ids of an int array count
    np.testing.assert_array_equal(
        gpt.score([[3, 9]], np.array([[4, 0, 0]]), target_lengths=[1]), gpt.score([[3, 9]], [[4]]))
    # Nothing to score is log p = 0, also when no row has a token left (they raised
    # ZeroDivisionError / "Empty input"); ragged target_lengths is the argument's own line.
    for model, prompt in ((gpt, [6]), (lm, [3, 1])):
        assert model.score([prompt], [[7]], target_lengths=[0]).tolist() == [0.0]
        assert model.score([prompt, prompt], [[], []]).tolist() == [0.0, 0.0]
        pair = model.score([prompt, prompt], [[7], []])
        assert pair[1] == 0.0 and pair[0] == model.score([prompt], [[7]])[0] < 0
        with pytest.raises(ValueError, match=r"^target_lengths must be one integer per row"):
            model.score([prompt, prompt], [[7], [7]], target_lengths=[[1], [1, 2]])


def test_detokenize_cuts_at_the_models_eos_id(hf_models, tmp_path):
    """An HF T5 whose configs end sequences with an id other than 1: detokenize cuts there
    (at the stop ids, the generation config's: those generated texts end before)."""
    src = shutil.copytree(hf_models["t5_v1_1"][1], tmp_path / "eos")
    vocab = t5x_lite.load(src).vocab
    first, rest = vocab.encode("cat naps"), vocab.encode("warm milk")
    eos = next(i for i in range(3, vocab.sp_size) if i not in first + rest)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    generation = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": eos}))
    lm = t5x_lite.load(src)
    assert lm.eos_id == eos and lm.stop_ids == (eos,)
    assert lm.detokenize([first + [eos] + rest, first + rest + [eos, 0]]) == [
        "cat naps", "cat naps warm milk"]


def _one_line_error(kind, pattern, f):
    with pytest.raises(kind, match=pattern) as e:
        f()
    assert "\n" not in str(e.value)


_IDS = "token ids must be a 1-D or 2-D int array, a list of ints or a list of lists of ints"


@pytest.mark.parametrize("call, pattern", [
    # each used to run on silently (first four), or to end in a TypeError / OverflowError /
    # sentencepiece IndexError, or in int()'s "invalid literal"
    (lambda g, t: g.logits([[5, 6], []]), "input_ids row 1 has no tokens; every row needs one"),
    (lambda g, t: t.logits([[5, 1], [0, 0]], decoder_input_ids=[[0], [0]]),
     r"input_ids row 1 has no tokens \(id 0 is padding\)"),
    (lambda g, t: g.logits([[1.7, 2.0]]), f"{_IDS}.*row 0 holds float 1.7"),
    (lambda g, t: g.logits([[True, False]]), f"{_IDS}.*row 0 holds bool True"),
    (lambda g, t: g.logits([[[1, 2]]]), f"{_IDS}.*row 0 holds list"),
    (lambda g, t: g.logits(["ab", [1, 2]]), f"{_IDS}.*got str 'ab' as row 0"),
    (lambda g, t: g.logits({"input_ids": [1]}), "input_ids must be a list, got dict"),
    (lambda g, t: g.logits(None), "input_ids must be a list, got NoneType"),
    (lambda g, t: g.logits(7), "input_ids must be a list, got int"),
    (lambda g, t: g.logits([[5, 2**40]]),
     r"Token ids must be in \[0, 203\); input_ids row 0 holds 1099511627776"),
    (lambda g, t: g.score([[5]], np.array([[2**40]])),
     r"Token ids must be in \[0, 203\); target_ids row 0 holds 1099511627776"),
    (lambda g, t: t.detokenize([[5, -1]]), r"Token ids must be in \[0, 203\); ids row 0 holds -1"),
    (lambda g, t: t.detokenize([[5.0]]), f"ids: {_IDS}.*float 5.0"),
    (lambda g, t: t.tokenize([5], add_eos=False), "takes a string or a list of strings, got int"),
    (lambda g, t: t.score(["fine", "caf\udce9"], ["a", "b"]),
     r"Cannot tokenize text 1 of 2: it holds a lone surrogate \(U\+DCE9 at character 3\)"),
], ids=["empty_row", "t5_padding_only_row", "floats", "bools", "3d_list", "mixed_text_and_ids",
        "dict", "none", "scalar", "huge_id", "huge_target_id", "detokenize_negative",
        "detokenize_float", "tokenize_int", "text_not_unicode"])
def test_bad_token_inputs_are_one_value_error_line(loaded, call, pattern):
    _one_line_error(ValueError, pattern, lambda: call(loaded["gpt2"], loaded["t5_v1_1"]))


def test_bad_load_arguments_are_one_error_line(hf_models, tmp_path):
    """Each used to fail late or obscurely: 'No checkpoint found in .../config.json', 'No
    checkpoint for step 0 ... available: [0]' (step="0"), an orbax 'damaged checkpoint'
    (step=0.0), a TypeError (dtype, path None), an AttributeError or a jax sharding error
    (mesh)."""
    workdir = tmp_path / "w"
    convert.hf_to_workdir(hf_models["gpt2"][1], workdir)
    cases = [
        (checkpoints.CheckpointError, "config.json is a file; pass a workdir",
         dict(path=workdir / "config.json")),
        (checkpoints.CheckpointError, r"takes a path \(str or os.PathLike\), got NoneType",
         dict(path=None)),
        (checkpoints.CheckpointError, r"step must be a checkpoint step \(an int >= 0\), got '0'",
         dict(step="0")),
        (checkpoints.CheckpointError, r"got 0\.0", dict(step=0.0)),
        (checkpoints.CheckpointError, r"got -1", dict(step=-1)),
        (checkpoints.CheckpointError, r"No checkpoint for step 3 .*available: \[0\]",
         dict(step=3)),
        (ValueError, r"dtype must be one of \('float32', 'bfloat16', 'float16'\).*'nonsense'",
         dict(dtype="nonsense")),
        (ValueError, r"dtype must be one of .*got 'int32'", dict(dtype="int32")),
        (partitioning.MeshError, "mesh must be a jax Mesh.*got str", dict(mesh="data=8")),
        (partitioning.MeshError, r"mesh axes must be \('data', 'fsdp', 'tensor'\).*\('x',\)",
         dict(mesh=jax.make_mesh((8,), ("x",)))),
        (partitioning.MeshError, "does not divide it",  # 3 heads over tensor=2
         dict(mesh=partitioning.make_mesh(data=4, tensor=2))),
    ]
    for kind, pattern, kw in cases:
        _one_line_error(kind, pattern, lambda: t5x_lite.load(kw.pop("path", workdir), **kw))
    # An HF directory without its weights, and one without a model_type.
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(hf_models["gpt2"][1] / "config.json", no_weights)
    _one_line_error(hf_interop.InteropError, "No model.safetensors or "
                    "model.safetensors.index.json in", lambda: t5x_lite.load(no_weights))
    assert t5x_lite.load(workdir, step=np.int64(0)).config.family == "gpt"


@pytest.mark.parametrize("kind", ["t5_v1_1", "gpt2"])
def test_a_batch_gives_each_example_its_own_results(loaded, kind):
    """Right padding changes no example's logits or score."""
    lm = loaded[kind]
    rng = np.random.default_rng(4)
    inputs = [list(rng.integers(2, ref.VOCAB, n)) for n in (12, 1, 30)]
    targets = [list(rng.integers(2, ref.VOCAB, n)) for n in (3, 9, 1)]
    dec = ({"decoder_input_ids": [[0] + t[:-1] for t in targets]} if kind == "t5_v1_1"
           else {})
    logits, scores = lm.logits(inputs, **dec), lm.score(inputs, targets)
    for i in range(3):
        one = {k: [v[i]] for k, v in dec.items()}
        alone = lm.logits([inputs[i]], **one)[0]
        np.testing.assert_allclose(logits[i, :len(alone)], alone, atol=1e-5)
        np.testing.assert_allclose(scores[i], lm.score([inputs[i]], [targets[i]])[0],
                                   rtol=1e-5)
