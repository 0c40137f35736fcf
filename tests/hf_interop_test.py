"""HF <-> t5x_lite conversion: logits parity with HF PyTorch, exact round trips, clear errors."""
import functools
import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

import hf_reference as ref
from t5x_lite import config as config_lib, convert, hf_interop, transformer
from t5x_lite.models import build_model

TOL = 1e-4  # max |logit difference| on real (unpadded) positions, fp32


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return ref.build_all(tmp_path_factory)


def _batch_and_hf_logits(kind, model):
    """Our batch for a right-padded batch, the mask of real positions, and HF's logits."""
    inputs, mask, want = ref.hf_logits(kind, model)
    if kind == "gpt2":
        batch = {"decoder_input_tokens": inputs["input_ids"]}
    else:
        batch = {"encoder_input_tokens": inputs["input_ids"],
                 "decoder_input_tokens": inputs["decoder_input_ids"]}
    return {k: v.astype(np.int32) for k, v in batch.items()}, mask, want


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        yield from (_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else [(prefix + k, v)])


@functools.lru_cache
def _jitted_logits(cfg):  # one compile per config and shape across the tests here
    return jax.jit(build_model(cfg).logits)


def _our_logits(cfg, params, batch):
    return np.asarray(_jitted_logits(cfg)(params, batch))


@pytest.mark.parametrize("kind", ref.KINDS)
def test_logits_match_hf_pytorch(hf_models, kind):
    model, path = hf_models[kind]
    cfg, params, _, _ = hf_interop.from_hf(path)
    batch, mask, want = _batch_and_hf_logits(kind, model)
    delta = ref.masked_max_abs_diff(_our_logits(cfg, params, batch), want, mask)
    print(f"\n{kind}: max |logits - HF| = {delta:.2e} (logit scale {np.abs(want).max():.1f})")
    assert delta <= TOL
    expect = {"t5_v1_0": (True, True, "relu"), "t5_v1_1": (False, False, "gated-gelu"),
              "gpt2": (True, False, "gelu")}[kind]
    assert (cfg.tie_embeddings, cfg.scale_logits, cfg.mlp) == expect
    assert cfg.vocab_size == ref.VOCAB  # HF's vocab size is kept, not padded


@pytest.mark.parametrize("kind", ref.KINDS)
def test_gradients_match_hf_pytorch(hf_models, kind):
    """d(sum of logits x fixed weights over real positions)/d(every param) equals torch's
    autograd through HF's model. A batch of 3 padded rows: T5's relative-position bias is
    shared by all layers and broadcast over the batch, and its gradient sums both."""
    model, path = hf_models[kind]
    cfg, params, _, _ = hf_interop.from_hf(path)
    batch, mask, want = _batch_and_hf_logits(kind, model)
    weights = np.random.default_rng(7).standard_normal(want.shape).astype(np.float32)
    weights *= mask[..., None]
    logits_fn = build_model(cfg).logits
    ours = jax.jit(jax.grad(lambda p: (logits_fn(p, batch) * weights).sum()))(params)
    ours = hf_interop.params_to_hf(cfg, ours)

    model.zero_grad()
    if kind == "gpt2":
        logits = ref.gpt2_forward(model, batch["decoder_input_tokens"], mask)
    else:
        enc = batch["encoder_input_tokens"]
        logits = ref.t5_forward(model, enc, enc > 0, batch["decoder_input_tokens"], mask)
    (logits * torch.as_tensor(weights)).sum().backward()
    checked = 0
    for name, p in model.named_parameters():
        if name not in ours:
            continue
        g = p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32)
        scale = max(float(np.abs(g).max()), 1e-3)
        np.testing.assert_allclose(ours[name], g, atol=2e-5 * scale, rtol=1e-4, err_msg=name)
        checked += 1
    assert checked >= 10
    if kind != "gpt2":
        rel = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert np.abs(ours[rel]).max() > 1e-3  # the bias really gets a gradient


def test_v1_1_checkpoint_is_really_untied(hf_models):
    tensors = safetensors.numpy.load_file(hf_models["t5_v1_1"][1] / "model.safetensors")
    assert not np.allclose(tensors["lm_head.weight"], tensors["shared.weight"])
    cfg, params, _, _ = hf_interop.from_hf(hf_models["t5_v1_1"][1])
    np.testing.assert_array_equal(params["lm_head"], tensors["lm_head.weight"].T)


@pytest.mark.parametrize("kind", ["t5_v1_1", "gpt2"])
def test_scan_layers_conversion_gives_same_logits(hf_models, kind):
    model, path = hf_models[kind]
    cfg, params, _, _ = hf_interop.from_hf(path)
    scfg, sparams, _, _ = hf_interop.from_hf(path, scan_layers=True)
    assert scfg.scan_layers and "layers_0" not in sparams["decoder"]
    flat = lambda tree: {k: np.asarray(v) for k, v in _flatten(tree)}
    unstacked, plain = flat(transformer.unstack_layers(sparams)), flat(params)
    assert unstacked.keys() == plain.keys()
    for k in plain:
        np.testing.assert_array_equal(unstacked[k], plain[k], err_msg=k)
    batch, mask, want = _batch_and_hf_logits(kind, model)
    scanned = _our_logits(scfg, sparams, batch)
    # Same params; the scanned program rounds differently only at float32 precision.
    assert ref.masked_max_abs_diff(scanned, _our_logits(cfg, params, batch), mask) <= 5e-5
    assert ref.masked_max_abs_diff(scanned, want, mask) <= TOL


@pytest.mark.parametrize("kind", ref.KINDS)
@pytest.mark.parametrize("scan", [False, True])
def test_params_round_trip_bitwise(hf_models, kind, scan):
    tensors = safetensors.numpy.load_file(hf_models[kind][1] / "model.safetensors")
    cfg = hf_interop.model_config_from_hf(
        json.loads((hf_models[kind][1] / "config.json").read_text()), tensors, scan_layers=scan)
    back = hf_interop.params_to_hf(cfg, hf_interop.params_from_hf(cfg, tensors))
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_aliases_and_tensors_hf_ignores(hf_models):
    """Older exports: T5 embedding stored as embed_tokens, an unused cross-attention bias
    (t5-small has one), GPT-2 without the `transformer.` prefix and with mask buffers."""
    for kind, edit in [
        ("t5_v1_0", lambda t: {**{k: v for k, v in t.items() if k != "shared.weight"},
                               "encoder.embed_tokens.weight": t["shared.weight"],
                               "decoder.embed_tokens.weight": t["shared.weight"],
                               "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias"
                               ".weight": np.zeros((16, 5), np.float32)}),
        ("gpt2", lambda t: {**{k.removeprefix("transformer."): v for k, v in t.items()},
                            "h.0.attn.bias": np.ones((1, 1, 40, 40), np.float32)}),
    ]:
        tensors = safetensors.numpy.load_file(hf_models[kind][1] / "model.safetensors")
        hf_cfg = json.loads((hf_models[kind][1] / "config.json").read_text())
        cfg = hf_interop.model_config_from_hf(hf_cfg, tensors)
        want = dict(_flatten(hf_interop.params_from_hf(cfg, tensors)))
        got = dict(_flatten(hf_interop.params_from_hf(cfg, edit(tensors))))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_t5_config_variants():
    base = dict(model_type="t5", d_model=40, d_kv=12, num_heads=5, d_ff=72, num_layers=3)
    emb, other = np.zeros((3, 2)), np.ones((3, 2))
    tensors = {"shared.weight": emb, "lm_head.weight": other}
    # transformers 4.x v1.1 config: tie_word_embeddings=false decides tying and scaling.
    v11_4x = hf_interop.model_config_from_hf({**base, "tie_word_embeddings": False,
                                              "feed_forward_proj": "gated-gelu"})
    assert (v11_4x.tie_embeddings, v11_4x.scale_logits, v11_4x.mlp) == (False, False, "gated-gelu")
    # transformers 5.x always writes tie_word_embeddings=true; scale_decoder_outputs and a
    # differing lm_head.weight tell v1.1.
    v11_5x = hf_interop.model_config_from_hf(
        {**base, "tie_word_embeddings": True, "scale_decoder_outputs": False}, tensors)
    assert (v11_5x.tie_embeddings, v11_5x.scale_logits) == (False, False)
    v10 = hf_interop.model_config_from_hf(base, {"shared.weight": emb, "lm_head.weight": emb})
    assert (v10.tie_embeddings, v10.scale_logits, v10.num_decoder_layers) == (True, True, 3)


def test_aliases_read_as_transformers_reads_them():
    """HF's config aliases (each config class's attribute_map) set the fields they name, e.g.
    GPT-2's num_attention_heads sets n_head. T5Config fills in num_decoder_layers before it
    applies num_hidden_layers, so that alias alone leaves the decoder at the default 6."""
    t5 = dict(hidden_size=40, num_attention_heads=5, head_dim=12, num_hidden_layers=3)
    for config in (t5, {**t5, "num_layers": 3}, {**t5, "num_decoder_layers": 2}):
        theirs = transformers.T5Config.from_dict(config)
        ours = hf_interop.model_config_from_hf({"model_type": "t5", **config})
        assert ((ours.d_model, ours.num_heads, ours.head_dim, ours.num_layers, ours.decoder_layers)
                == (theirs.d_model, theirs.num_heads, theirs.d_kv, theirs.num_layers,
                    theirs.num_decoder_layers))
    gpt = dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2,
               max_position_embeddings=40)
    theirs = transformers.GPT2Config.from_dict(gpt)
    ours = hf_interop.model_config_from_hf({"model_type": "gpt2", **gpt})
    assert ((ours.d_model, ours.num_heads, ours.num_layers, ours.max_len, ours.d_ff)
            == (theirs.n_embd, theirs.n_head, theirs.n_layer, theirs.n_positions, 4 * 48))
    # A bad value read through an alias is named as config.json spells it.
    for config, message in [({"num_attention_heads": 0}, "num_attention_heads=0 is not a pos"),
                            ({"num_attention_heads": 5},
                             "GPT-2 n_embd=768 is not a multiple of num_attention_heads=5")]:
        with pytest.raises(hf_interop.InteropError, match=f"^x/config.json: {message}"):
            hf_interop.model_config_from_hf({"model_type": "gpt2", **config},
                                            source="x/config.json")


def _hf_reload(kind, path):
    """The HF PyTorch model transformers loads from the directory `path`."""
    cls = (transformers.GPT2LMHeadModel if kind == "gpt2"
           else transformers.T5ForConditionalGeneration)
    return cls.from_pretrained(path, attn_implementation="eager").eval()


GPT2_ALIASES = {"num_attention_heads": "n_head", "hidden_size": "n_embd",
                "num_hidden_layers": "n_layer", "max_position_embeddings": "n_positions"}


@pytest.mark.parametrize("aliases", [("num_attention_heads",), tuple(GPT2_ALIASES)])
def test_gpt2_config_with_hf_aliases_matches_hf(hf_models, tmp_path, aliases):
    """A GPT-2 config.json naming n_head (and the other sizes) by HF's aliases loads with its
    real head count, as in transformers. GPT-2's tensor shapes do not depend on the head count,
    so the default 12 (48 % 12 == 0) would load silently: only the logits tell."""
    src = hf_models["gpt2"][1]
    source = json.loads((src / "config.json").read_text())
    assert transformers.GPT2Config.attribute_map == GPT2_ALIASES
    keys = {alias: GPT2_ALIASES[alias] for alias in aliases}
    path = _copy_hf_dir(src, tmp_path / "m", config={a: source[k] for a, k in keys.items()},
                        drop=keys.values())
    assert not set(keys.values()) & set(json.loads((path / "config.json").read_text()))
    model = _hf_reload("gpt2", path)
    assert model.config.n_head == ref.GPT2_SIZES["n_head"] != 12
    cfg, params, _, _ = hf_interop.from_hf(path)
    batch, mask, want = _batch_and_hf_logits("gpt2", model)
    assert ref.masked_max_abs_diff(_our_logits(cfg, params, batch), want, mask) <= TOL
    assert (cfg.num_heads, cfg.d_model, cfg.num_layers, cfg.max_len) == (3, 48, 3, 40)


@pytest.mark.parametrize("kind, config, mlp", [
    ("t5_v1_1", {"dense_act_fn": "gelu_pytorch_tanh"}, "gated-gelu"),
    ("t5_v1_1", {"dense_act_fn": "gelu_new"}, "gated-gelu"),
    ("t5_v1_1", {"dense_act_fn": "silu"}, "gated-silu"),
    ("t5_v1_0", {"dense_act_fn": "gelu_pytorch_tanh"}, "gelu"),
    ("t5_v1_0", {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
                 "is_gated_act": False}, "gelu"),
])
def test_t5_activation_fields_match_hf(hf_models, tmp_path, kind, config, mlp):
    """T5Config derives dense_act_fn and is_gated_act from feed_forward_proj, then the values
    config.json stores (save_pretrained writes both) override them: the MLP HF runs is theirs.
    An export (`hf_config_from_model`) drops both, and HF derives the same MLP back."""
    path = _copy_hf_dir(hf_models[kind][1], tmp_path / "m", config=config)
    model = _hf_reload("t5", path)
    assert model.config.dense_act_fn == config["dense_act_fn"]
    cfg, params, hf_cfg, _ = hf_interop.from_hf(path)
    assert cfg.mlp == mlp
    batch, mask, want = _batch_and_hf_logits(kind, model)
    assert ref.masked_max_abs_diff(_our_logits(cfg, params, batch), want, mask) <= TOL
    back = transformers.T5Config.from_dict(convert.hf_config_from_model(cfg, hf_cfg))
    assert {(False, "relu"): "relu", (False, "gelu_new"): "gelu", (True, "gelu_new"): "gated-gelu",
            (True, "silu"): "gated-silu"}[back.is_gated_act, back.dense_act_fn] == mlp


@pytest.mark.parametrize("kind, config, message", [
    ("t5_v1_1", {"dense_act_fn": "gelu"},
     "feed_forward_proj='gated-gelu' with dense_act_fn='gelu', is_gated_act=true is not supp"),
    ("t5_v1_1", {"dense_act_fn": "relu"}, "dense_act_fn='relu', is_gated_act=true is not supp"),
    ("t5_v1_0", {"dense_act_fn": "silu"},
     "feed_forward_proj='relu' with dense_act_fn='silu', is_gated_act=false is not supported"),
    ("t5_v1_0", {"feed_forward_proj": "gelu", "dense_act_fn": "gelu"},
     "feed_forward_proj='gelu' with dense_act_fn='gelu', is_gated_act=false is not supported"),
    ("t5_v1_0", {"feed_forward_proj": "foo-relu"}, "feed_forward_proj='foo-relu' is not \"ACT\""),
])
def test_t5_unsupported_activation_is_one_error(hf_models, tmp_path, kind, config, message):
    """An MLP transformers runs but t5x_lite does not (exact-erf gelu, gated relu, ungated silu)
    is refused, naming the fields it comes from, rather than run as feed_forward_proj's."""
    path = _copy_hf_dir(hf_models[kind][1], tmp_path / "m", config=config)
    with pytest.raises(hf_interop.InteropError, match=message) as e:
        hf_interop.from_hf(path)
    assert str(e.value).startswith(str(path / "config.json")) and "\n" not in str(e.value)


def test_sharded_index_and_bfloat16(hf_models, tmp_path):
    src = hf_models["gpt2"][1]
    tensors = safetensors.torch.load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, keys in shards.items():
        safetensors.torch.save_file({k: tensors[k].to(torch.bfloat16) for k in keys},
                                    tmp_path / shard, metadata={"format": "pt"})
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    cfg, params, _, _ = hf_interop.from_hf(tmp_path)
    _, want, _, _ = hf_interop.from_hf(src)
    got_wte, want_wte = params["token_embedder"]["embedding"], want["token_embedder"]["embedding"]
    assert got_wte.dtype == np.float32 and not np.array_equal(got_wte, want_wte)  # was bf16
    np.testing.assert_allclose(got_wte, want_wte, rtol=1e-2, atol=1e-2)
    # A tensor in two shards: which copy won was the order the shards were read in.
    safetensors.torch.save_file({names[0]: tensors[names[0]], names[1]: tensors[names[1]]},
                                tmp_path / "b.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf_interop.InteropError, match=rf"^Shards a.safetensors and "
                                                      rf"b.safetensors in \S+ both hold tensor "
                                                      rf"{re.escape(names[0])}$"):
        hf_interop.read_hf_dir(tmp_path)
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(hf_interop.InteropError, match="shard b.safetensors, which is missing"):
        hf_interop.read_hf_dir(tmp_path)
    # A shard name that leaves the directory is not read.
    (tmp_path / "sub").mkdir()
    outside = {k: "../a.safetensors" for k in names}
    (tmp_path / "sub" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": outside}))
    (tmp_path / "sub" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(hf_interop.InteropError, match=r"names shard '../a.safetensors', which is "
                                                      r"not a file name in that directory"):
        hf_interop.read_hf_dir(tmp_path / "sub")


def _copy_hf_dir(src, dst, *, config=None, tensors=None, drop=()):
    dst.mkdir(exist_ok=True)
    cfg = {**json.loads((src / "config.json").read_text()), **(config or {})}
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k not in drop}))
    data = safetensors.numpy.load_file(src / "model.safetensors")
    if tensors is not None:
        data = tensors(data)
    safetensors.numpy.save_file(data, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_bad_directories(tmp_path):
    with pytest.raises(hf_interop.InteropError, match="does not exist"):
        hf_interop.from_hf(tmp_path / "nope")
    with pytest.raises(hf_interop.InteropError, match="No config.json"):
        hf_interop.from_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(hf_interop.InteropError, match="No model.safetensors"):
        hf_interop.from_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(hf_interop.InteropError, match="pickle.*re-save it as safetensors"):
        hf_interop.from_hf(tmp_path)
    (tmp_path / "model.ckpt").write_bytes(b"never unpickled")
    with pytest.raises(hf_interop.InteropError, match="pickle.*re-save"):
        hf_interop.from_hf(tmp_path / "model.ckpt")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(hf_interop.InteropError, match="not valid JSON"):
        hf_interop.read_hf_dir(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(config={"model_type": "falcon"}), "Unsupported HF model_type 'falcon'"),
    (dict(config={"feed_forward_proj": "gelu", "dense_act_fn": "gelu"}),
     "feed_forward_proj='gelu' with dense_act_fn='gelu', is_gated_act=false is not supported"),
    (dict(config={"d_model": 48}), "does not fit token_embedder/embedding"),
    (dict(tensors=lambda t: {k: v for k, v in t.items() if "encoder.block.1.layer.0.S" not in k}),
     "lacks 4 tensor.*encoder.block.1.layer.0.SelfAttention.q"),
    (dict(tensors=lambda t: {**t, "encoder.adapter.weight": t["shared.weight"]}),
     "does not describe, e.g. encoder.adapter.weight"),
])
def test_bad_t5_checkpoints(hf_models, tmp_path, change, message):
    path = _copy_hf_dir(hf_models["t5_v1_0"][1], tmp_path / "m", **change)
    with pytest.raises(hf_interop.InteropError, match=message):
        hf_interop.from_hf(path)


def test_gpt2_unsupported_options(hf_models, tmp_path):
    for option, message in [({"activation_function": "gelu"}, "activation_function='gelu'"),
                            ({"scale_attn_by_inverse_layer_idx": True}, "inverse_layer_idx")]:
        path = _copy_hf_dir(hf_models["gpt2"][1], tmp_path / "m", config=option)
        with pytest.raises(hf_interop.InteropError, match=message):
            hf_interop.from_hf(path)


def _edit_header(path, edit):
    """Rewrites the JSON header of the safetensors file `path` with `edit(header)`."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(edit(json.loads(data[8:8 + n]))).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n:])


def _first_tensor(header, **change):
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name] = {k: v for k, v in {**header[name], **change}.items() if v is not None}
    return header


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1000]), "data_offsets .* within the file's"),
    (lambda p: _edit_header(p, lambda h: _first_tensor(h, data_offsets=None)),
     "data_offsets null, not a"),
    (lambda p: _edit_header(p, lambda h: [1]), "header is not a JSON object"),
    (lambda p: _edit_header(p, lambda h: _first_tensor(h, data_offsets=[0, 10 ** 9])),
     r"data_offsets \[0, 1000000000\], not a \[start, end\] range"),
    (lambda p: _edit_header(p, lambda h: _first_tensor(h, data_offsets=[100, 4])),
     r"data_offsets \[100, 4\]"),
    (lambda p: _edit_header(p, lambda h: _first_tensor(h, dtype="F8X")), 'dtype "F8X"'),
    (lambda p: _edit_header(p, lambda h: _first_tensor(h, dtype=["F32"])), r'dtype \["F32"\]'),
    (lambda p: _edit_header(p, lambda h: _first_tensor(h, shape=[7, 3])),
     r"shape \[7, 3\] of F32 needs 84"),
    (lambda p: _edit_header(p, lambda h: _first_tensor(h, shape="x")), "no valid shape"),
])
def test_malformed_safetensors_are_one_error_naming_the_file(hf_models, tmp_path, edit, message):
    path = _copy_hf_dir(hf_models["gpt2"][1], tmp_path / "m")
    edit(path / "model.safetensors")
    with pytest.raises(hf_interop.InteropError, match=message) as e:
        hf_interop.from_hf(path)
    assert str(e.value).startswith(str(path / "model.safetensors")) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind, config, message", [
    ("gpt2", [1], "config.json is not a JSON object"),
    ("gpt2", {"n_head": 0}, "config.json: n_head=0 is not a positive integer"),
    ("gpt2", {"n_head": None}, "config.json: n_head=null is not a positive integer"),
    ("gpt2", {"n_layer": "3"}, 'config.json: n_layer="3" is not a positive integer'),
    ("gpt2", {"n_positions": True}, "config.json: n_positions=true is not a positive integer"),
    ("gpt2", {"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon=\"1e-5\" is not a positive"),
    ("gpt2", {"resid_pdrop": 1.5}, r"resid_pdrop=1.5 is not a number in \[0, 1\)"),
    ("gpt2", {"activation_function": None}, "activation_function=null is not a string"),
    ("gpt2", {"scale_attn_weights": "no"}, 'scale_attn_weights="no" is not true or false'),
    ("t5_v1_0", {"feed_forward_proj": ["relu"]}, r'feed_forward_proj=\["relu"\] is not a string'),
    ("t5_v1_0", {"d_kv": 12.0}, "d_kv=12.0 is not a positive integer"),
    ("t5_v1_0", {"tie_word_embeddings": 1}, "tie_word_embeddings=1 is not true or false"),
    ("t5_v1_0", {"dense_act_fn": None}, "dense_act_fn=null is not a string"),
    ("t5_v1_0", {"is_gated_act": "no"}, 'is_gated_act="no" is not true or false'),
    ("gpt2", {"num_attention_heads": 4}, r"num_attention_heads=4 and n_head=3 disagree \("
                                         "num_attention_heads is HF's alias of n_head"),
    ("gpt2", {"num_attention_heads": 3.0}, "num_attention_heads=3.0 and n_head=3 disagree"),
    ("t5_v1_0", {"hidden_size": 41}, "hidden_size=41 and d_model=40 disagree"),
    # HF takes it (and fails only on inputs past 2 x 30 tokens); t5x_lite's check, HF's names
    ("t5_v1_0", {"relative_attention_num_buckets": 64, "relative_attention_max_distance": 30},
     r"relative_attention_max_distance must be > relative_attention_num_buckets // 2 = 32, got "
     r"30$"),
])
def test_malformed_configs_are_one_error_naming_the_file(hf_models, tmp_path, kind, config,
                                                         message):
    path = _copy_hf_dir(hf_models[kind][1], tmp_path / "m")
    if isinstance(config, dict):
        config = {**json.loads((path / "config.json").read_text()), **config}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_interop.InteropError, match=message) as e:
        hf_interop.from_hf(path)
    assert str(e.value).startswith(str(path / "config.json")) and "\n" not in str(e.value)


@pytest.mark.parametrize("index", ['{"weight_map": [1]}', "[1]", '{"weight_map": {"a": 3}}'])
def test_malformed_shard_index_is_one_error(hf_models, tmp_path, index):
    path = _copy_hf_dir(hf_models["gpt2"][1], tmp_path / "m")
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(hf_interop.InteropError,
                       match="model.safetensors.index.json has no valid weight_map"):
        hf_interop.from_hf(path)


def _our_dropout_shapes(cfg, params, batch):
    """The shapes of the tensors our model drops out in a training forward pass."""
    import collections
    import dataclasses

    import flax.linen as nn
    model = build_model(dataclasses.replace(cfg, dropout_rate=0.1, causal_blocks=1))
    shapes = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            if kwargs.get("deterministic", context.module.deterministic) is False:
                shapes.append(tuple(args[0].shape))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.logits(params, batch, rng=jax.random.key(0), deterministic=False)
    return collections.Counter(shapes)


def _hf_dropout_shapes(model, **inputs):
    """The shapes of the tensors HF's model drops out in training mode (its Dropout modules and
    eager attention both call torch.nn.functional.dropout)."""
    import collections
    model.train()
    shapes = []
    functional = torch.nn.functional.dropout

    def probs(x, p=0.5, training=True, inplace=False):
        if training and p > 0:
            shapes.append(tuple(x.shape))
        return functional(x, p, training, inplace)

    torch.nn.functional.dropout = probs
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        torch.nn.functional.dropout = functional
        model.eval()
    return collections.Counter(shapes)


@pytest.mark.parametrize("kind", ["gpt2", "t5_v1_1"])
def test_dropout_sits_where_hf_puts_it(hf_models, kind):
    """The same tensors dropped as HF's model drops in training mode. GPT-2 used to drop its MLP
    hidden and its final norm's output too (T5's places, not GPT-2's)."""
    model, path = hf_models[kind]
    for m in model.modules():  # HF's rates are 0.1 but T5's attention reads its config
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.1
    cfg, params, _, _ = hf_interop.from_hf(path)
    ids = np.random.default_rng(0).integers(2, ref.VOCAB, (2, 8))
    if kind == "gpt2":
        ours = _our_dropout_shapes(cfg, params, {"decoder_input_tokens": ids})
        theirs = _hf_dropout_shapes(model, input_ids=torch.tensor(ids))
    else:
        ours = _our_dropout_shapes(cfg, params, {"encoder_input_tokens": ids,
                                                 "decoder_input_tokens": ids[:, :5]})
        theirs = _hf_dropout_shapes(model, input_ids=torch.tensor(ids),
                                    decoder_input_ids=torch.tensor(ids[:, :5]))
    assert sum(theirs.values()) > 0 and ours == theirs


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_t5_init_scales_equal_hf_t5_init_weights(tmp_path, feed_forward_proj):
    """A fresh T5's kernels have HF T5's init std, the query's 1/sqrt(d_model * head_dim)
    included (T5 folds attention's 1/sqrt(head_dim) into it); the relative-bias table has
    T5X's (HF: d_model**-0.5)."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=512, d_model=256, d_kv=32, d_ff=512, num_layers=2, num_heads=8,
        feed_forward_proj=feed_forward_proj, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, attn_implementation="eager")
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)  # HF's own init
    cfg, hf_params, _, _ = hf_interop.from_hf(tmp_path)
    ours = dict(_flatten(nn.meta.unbox(build_model(cfg).init(jax.random.key(0))["params"])))
    compared = 0
    for name, want in _flatten(hf_params):
        got = np.asarray(ours[name])
        if name.endswith("rel_embedding"):  # T5X: variance_scaling(1, fan_avg, uniform)
            assert got.std() == pytest.approx((2 / sum(got.shape)) ** 0.5, rel=0.15), name
        elif np.asarray(want).std() > 0:  # norms start at 1 on both sides
            assert got.std() == pytest.approx(np.asarray(want).std(), rel=0.05), name
            compared += 1
    assert compared == 1 + 2 * (4 + 2 + (feed_forward_proj == "gated-gelu")) + 2 * (8 + 2 + (
        feed_forward_proj == "gated-gelu"))  # embedding; encoder and decoder layers


@pytest.mark.parametrize("tie,kv_heads", [(False, 4), (True, 4), (False, 2), (True, 1)])
def test_gpt_modern_equals_hf_llama_under_the_documented_mapping(tie, kv_heads):
    """gpt_modern is a Llama decoder: HF LlamaForCausalLM's random weights, mapped as README.md
    says (rotate-half RoPE, wi_0 = SiLU gate_proj, wi_1 = up_proj; num_kv_heads =
    num_key_value_heads, 2 and 1 of 4 being grouped-query and multi-query attention), give its
    logits."""
    hf = ref.llama(tie=tie, kv_heads=kv_heads)
    cfg, params = ref.llama_as_gpt_modern(hf)
    ours_tree = nn.meta.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0))["params"])
    assert jax.tree.map(np.shape, ours_tree) == jax.tree.map(np.shape, params)
    V = cfg.vocab_size
    ids = np.random.default_rng(0).integers(3, V, (3, 20)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = _our_logits(cfg, params, {"decoder_input_tokens": ids})
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
