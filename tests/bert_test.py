"""BERT-style MLM (`family="bert"`): parity with an independent PyTorch model, a short training
run on the default corpus, and what `t5x_lite.load` offers for it.

The reference: our encoder is pre-LN (embedding LayerNorm, LayerNorm before attention and MLP,
a final LayerNorm), so HF's post-LN `BertForMaskedLM` is a different function, and no
weight copy can make them agree. HF's `RobertaPreLayerNormForMaskedLM` has our layout, layer for
layer, with three differences the test bridges and the README states: its head dense has a
bias (ours has none: set to 0), its head GELU is erf (ours tanh, as every GELU here and
Google's BERT: patched to tanh; measured below), and it has token-type embeddings (one type,
zeros) and positions from padding_idx + 1 (given explicitly from 0).
"""
import importlib.util
import json
import math
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.models.roberta_prelayernorm import modeling_roberta_prelayernorm as hf_roberta

import t5x_lite
from t5x_lite import checkpoints
from t5x_lite import config as mc
from t5x_lite.defaults import base_config
from t5x_lite.errors import UserError
from t5x_lite.models import build_model

# Untuned sizes: d_model 48 = 3 heads x 16, odd d_ff and vocab, an odd epsilon.
V, D, H, K, F, L, P, EPS = 203, 48, 3, 16, 88, 3, 40, 2.3e-5


def _random_params(cfg, seed=0):
    """Every param re-randomized (norm scales around 1, biases nonzero) so a tensor mapped to
    the wrong place or transposed cannot hide."""
    params = nn.meta.unbox(build_model(cfg).init(jax.random.key(0)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if "norm" in name and name.endswith("['scale']"):
            return 1 + 0.2 * noise
        if "bias" in name:
            return 0.1 * noise
        if "embedding" in name:
            return 0.5 * noise
        fan_in = x.shape[0] * (x.shape[1] if name.endswith("['out']") else 1)
        return noise / np.sqrt(fan_in)

    return jax.tree_util.tree_map_with_path(draw, params)


def _workdir(path, cfg, params):
    checkpoints.write_config(path, base_config(cfg, objective="mlm", seq_len=P))
    checkpoints.save_params(path, params, 0)
    return path


def _hf_model(params):
    """RobertaPreLayerNormForMaskedLM holding `params` (the mapping written out by hand)."""
    config = transformers.RobertaPreLayerNormConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
        intermediate_size=F, hidden_act="gelu_pytorch_tanh", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=P, type_vocab_size=1,
        layer_norm_eps=EPS, pad_token_id=0, attn_implementation="eager")
    model = transformers.RobertaPreLayerNormForMaskedLM(config).eval()
    t = lambda x: torch.tensor(np.array(x))
    sd = {}

    def norm(prefix, p):
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = t(p["scale"]), t(p["bias"])

    base = "roberta_prelayernorm."
    sd[base + "embeddings.word_embeddings.weight"] = t(params["token_embedder"]["embedding"])
    sd[base + "embeddings.position_embeddings.weight"] = t(
        params["position_embedder"]["embedding"])
    sd[base + "embeddings.token_type_embeddings.weight"] = torch.zeros(1, D)
    norm(base + "embeddings.LayerNorm", params["embedding_norm"])
    for i in range(L):
        ours, theirs = params["encoder"][f"layers_{i}"], f"{base}encoder.layer.{i}."
        norm(theirs + "attention.LayerNorm", ours["pre_attention_norm"])
        attn = ours["self_attention"]
        for n in ("query", "key", "value"):  # [D, H, K] -> torch [H*K, D]
            sd[f"{theirs}attention.self.{n}.weight"] = t(np.reshape(attn[n], (D, H * K)).T)
            sd[f"{theirs}attention.self.{n}.bias"] = t(np.reshape(attn[f"{n}_bias"], H * K))
        sd[theirs + "attention.output.dense.weight"] = t(np.reshape(attn["out"], (H * K, D)).T)
        sd[theirs + "attention.output.dense.bias"] = t(attn["out_bias"])
        norm(theirs + "intermediate.LayerNorm", ours["pre_mlp_norm"])
        sd[theirs + "intermediate.dense.weight"] = t(np.transpose(ours["mlp"]["wi"]))
        sd[theirs + "intermediate.dense.bias"] = t(ours["mlp"]["wi_bias"])
        sd[theirs + "output.dense.weight"] = t(np.transpose(ours["mlp"]["wo"]))
        sd[theirs + "output.dense.bias"] = t(ours["mlp"]["wo_bias"])
    norm(base + "LayerNorm", params["encoder_norm"])
    sd["lm_head.dense.weight"] = t(np.transpose(params["mlm_dense"]))
    sd["lm_head.dense.bias"] = torch.zeros(D)  # ours has none
    norm("lm_head.layer_norm", params["mlm_norm"])
    sd["lm_head.bias"] = sd["lm_head.decoder.bias"] = t(params["mlm_bias"])
    sd["lm_head.decoder.weight"] = sd[base + "embeddings.word_embeddings.weight"]  # tied
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def _hf_logits(model, ids, gelu):
    ids = torch.as_tensor(ids, dtype=torch.long)
    positions = torch.arange(ids.shape[1]).expand(ids.shape)
    old, hf_roberta.gelu = hf_roberta.gelu, gelu
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=(ids > 0).long(),
                         position_ids=positions).logits.numpy()
    finally:
        hf_roberta.gelu = old


def test_logits_equal_hf_roberta_prelayernorm(tmp_path):
    cfg = mc.bert(vocab_size=V, d_model=D, num_heads=H, head_dim=K, d_ff=F, num_layers=L,
                  max_len=P, norm_eps=EPS, dtype="float32")
    params = _random_params(cfg)
    hf = _hf_model(params)
    rng = np.random.default_rng(1)
    rows = [list(rng.integers(1, V, n)) for n in (P, 23, 9)]  # EOS (1) may occur: a token
    ids = np.zeros((3, P), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    mask = (ids > 0)[..., None]
    want = _hf_logits(hf, ids, torch.nn.GELU(approximate="tanh"))
    got = t5x_lite.load(_workdir(tmp_path, cfg, params)).logits(rows)  # ragged, right-padded
    assert got.shape == want.shape == (3, P, V)
    delta = float(np.max(np.abs(got - want) * mask))
    erf_head = float(np.max(np.abs(got - _hf_logits(hf, ids, hf_roberta.gelu)) * mask))
    print(f"\nBERT logits vs HF RobertaPreLayerNorm: max |delta| = {delta:.2e} (scale "
          f"{np.abs(want).max():.0f}); with HF's erf GELU in the head {erf_head:.2e}")
    assert np.abs(want).max() > 5 and delta < 1e-4
    assert erf_head > 1e-3  # the comparison can tell the two GELUs apart


def test_batch_logits_equal_per_example_in_float32_and_bfloat16(tmp_path):
    """Padding (id 0, right) changes no example's logits; dtype=bfloat16 computes in bf16."""
    cfg = mc.bert(vocab_size=V, d_model=D, num_heads=H, head_dim=K, d_ff=F, num_layers=L,
                  max_len=P, norm_eps=EPS, dtype="float32")
    path = _workdir(tmp_path, cfg, _random_params(cfg, seed=3))
    rng = np.random.default_rng(2)
    rows = [list(rng.integers(3, V, n)) for n in (17, 1, 30, 6)]
    full = {}
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):  # padding leaking in: O(1)
        m = t5x_lite.load(path, dtype=dtype)
        assert m.config.dtype == dtype and m.params["mlm_dense"].dtype == np.float32
        full[dtype] = batch = m.logits(rows)
        for i, r in enumerate(rows):
            np.testing.assert_allclose(batch[i, :len(r)], m.logits([r])[0], atol=tol)
    diff = np.abs(full["bfloat16"][0, :17] - full["float32"][0, :17]).max()
    assert 0 < diff < 0.05 * np.abs(full["float32"]).max()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """configs/tiny_bert.py for 30 steps on the default corpus (~20 s on 2 CPU cores)."""
    spec = importlib.util.spec_from_file_location(
        "tiny_bert", pathlib.Path(__file__).parent.parent / "configs" / "tiny_bert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.train.num_steps, c.train.log_every = 30, 5
    c.optimizer.learning_rate, c.optimizer.schedule, c.optimizer.warmup_steps = 3e-3, "constant", 5
    c.checkpoint.save_every = 30
    workdir = tmp_path_factory.mktemp("tiny_bert")
    from t5x_lite.training.trainer import train
    train(c, workdir)
    return workdir, c


def test_tiny_bert_loss_falls(trained):
    workdir, c = trained
    losses = [r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").open())
              if "loss" in r]
    print(f"\ntiny_bert losses every 5 steps: {np.round(losses, 2).tolist()}")
    uniform = math.log(c.model.vocab_size)  # 9.0: a prediction that knows nothing
    assert len(losses) == 6 and losses[0] < uniform + 0.5
    assert losses[-1] < losses[0] - 1.0 and losses[-1] < uniform - 1.5


def test_load_of_a_bert_workdir_offers_logits_only(trained):
    workdir, _ = trained
    m = t5x_lite.load(workdir)
    assert m.config.family == "bert" and m.vocab is not None
    text = "Return the <extra_id_0> of the list."  # <extra_id_0> is [MASK]
    ids = m.vocab.encode(text)
    assert m.vocab.sentinel_id(0) in ids
    logits = m.logits([text])
    assert logits.shape == (1, len(ids) + 1, m.config.vocab_size)  # + EOS, as in training
    np.testing.assert_allclose(logits, m.logits([ids + [1]]), atol=1e-6)
    with pytest.raises(ValueError, match=r"^score\(\) needs a T5 or GPT model; this one is "
                                         r"encoder-only \(MLM\): use logits\(\)$"):
        m.score([text], ["list"])
    with pytest.raises(UserError, match=r"^decoding needs a 't5' or 'gpt' model, this one is "
                                        r"'bert'$"):
        m.generate(inputs=[text], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"^input_ids row 1 has no tokens \(id 0 is padding\)"):
        m.logits([ids, [0, 0]])


def test_the_mlm_head_on_the_scored_positions_only_gives_the_full_head_loss_and_gradients():
    """LossConfig.mlm_predictions = k: the head projects each row's k scored positions, not all
    T; on rows BertMask made (at most k weighted tokens each, also packed rows) the loss, token
    accuracy and every gradient equal the full head's (float32)."""
    from t5x_lite.data import DataConfig, make_dataset
    from t5x_lite.data import objectives
    from t5x_lite.data import testing as data_testing
    from t5x_lite.models import LossConfig

    cfg = mc.bert(vocab_size=512, d_model=D, num_heads=H, head_dim=K, d_ff=F, num_layers=2,
                  max_len=64, dtype="float32")
    vocab = data_testing.tiny_vocab(400)
    pipe = make_dataset(DataConfig(source="default", objective="mlm", inputs_length=64,
                                   read_threads=0), vocab, split="train", batch_size=6, seed=2)
    batches = [next(pipe) for _ in range(2)]
    k = objectives.mlm_predictions(64, 0.15)
    assert k == 10 and max(int(b["encoder_loss_weights"].sum(1).max()) for b in batches) <= k
    full, cut = (build_model(cfg, LossConfig(mlm_predictions=n)) for n in (0, k))
    params = _random_params(cfg, seed=3)
    grad_full, grad_cut = (jax.jit(jax.value_and_grad(m.loss_fn, has_aux=True))
                           for m in (full, cut))
    for b in batches:
        batch = {name: jax.numpy.asarray(v) for name, v in b.items()}
        (l0, s0), g0 = grad_full(params, batch)
        (l1, s1), g1 = grad_cut(params, batch)
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        for name in s0:
            np.testing.assert_allclose(s1[name], s0[name], rtol=1e-6, err_msg=name)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)
