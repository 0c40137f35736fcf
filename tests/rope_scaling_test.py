"""Scaled RoPE (`model.rope_scaling`: "linear", Llama 3.1's "llama3", "yarn").

References: HF LlamaForCausalLM with the same rope_parameters: its rotary embedding's inverse
frequencies and cos / sin factor, its logits and its greedy `generate`."""
import dataclasses

import numpy as np
import pytest
import torch
import transformers

import hf_reference as ref
import t5x_lite
from t5x_lite import config as config_lib
from t5x_lite import convert, hf_interop, layers
from t5x_lite.models import build_model

# head_dim 16 at theta 5e5 has wavelengths 6.3, 32.5, 168, 872, 4517, ... : with an original
# length of 1024, llama3 keeps the first three (below 1024 / 4), blends the fourth and scales the
# rest (above 1024 / 1), so every branch of its formula is in play.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
LINEAR = {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}
# at head_dim 16 and an original length of 1024, pairs 0-2 are kept, 5-7 scaled, 3-4 ramped
YARN = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
        "original_max_position_embeddings": 1024}
TOL = 1e-4


@pytest.mark.parametrize("rope", [
    LLAMA3, LINEAR, {"rope_type": "default", "rope_theta": 1e4},
    # HF warns but builds these: no band between kept and divided frequencies
    dict(LLAMA3, low_freq_factor=2.0, high_freq_factor=2.0),
    dict(LLAMA3, low_freq_factor=4.0, high_freq_factor=1.0),
    YARN, dict(YARN, truncate=None, beta_fast=16, beta_slow=2),
    dict(YARN, mscale=0.8, mscale_all_dim=0.5), dict(YARN, attention_factor=1.3),
    {"rope_type": "yarn", "rope_theta": 5e5, "factor": None,
     "original_max_position_embeddings": 512}],
    ids=["llama3", "linear", "default", "llama3_low_eq_high", "llama3_low_above_high", "yarn",
         "yarn_untruncated_betas", "yarn_mscale", "yarn_attention_factor", "yarn_no_factor"])
def test_frequencies_equal_transformers(rope):
    hf = ref.llama(rope=dict(rope))
    want = hf.model.rotary_emb.inv_freq  # what HF's model rotates by
    cfg = hf_interop.model_config_from_hf(hf.config.to_dict())
    # YaRN also scales cos / sin; the others keep them as they are
    assert layers.rope_attention_scale(cfg) == pytest.approx(
        hf.model.rotary_emb.attention_scaling, rel=1e-12)
    assert (hf.model.rotary_emb.attention_scaling != 1.0) == (rope["rope_type"] == "yarn")
    got = layers.rope_inv_freq(cfg)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
    if rope == LLAMA3:  # the three bands: kept, blended, divided by the factor
        plain = layers.rope_inv_freq(config_lib.gpt_modern(head_dim=16, rope_theta=5e5))
        ratio = plain / got
        np.testing.assert_allclose(ratio[:3], 1.0, rtol=1e-6)
        assert 1.0 < ratio[3] < 8.0
        np.testing.assert_allclose(ratio[4:], 8.0, rtol=1e-6)


@pytest.mark.parametrize("rope", [LLAMA3, LINEAR, YARN], ids=["llama3", "linear", "yarn"])
def test_scaled_llama_logits_equal_hf(rope):
    hf = ref.llama(kv_heads=2, rope=dict(rope), seed=2)
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    cfg = hf_interop.model_config_from_hf(hf.config.to_dict(), tensors)
    assert cfg.rope_scaling == rope["rope_type"] and cfg.rope_scaling_factor == rope["factor"]
    params = hf_interop.params_from_hf(cfg, tensors)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 96)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(build_model(cfg).logits(params, {"decoder_input_tokens": ids}))
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()


def test_llama3_checkpoint_converts_decodes_as_hf_and_exports_back(tmp_path):
    hf = ref.llama(kv_heads=2, rope=dict(LLAMA3), seed=4)
    hf.save_pretrained(tmp_path / "src")
    cfg = convert.hf_to_workdir(tmp_path / "src", tmp_path / "w")
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor, cfg.rope_original_max_len) == ("llama3", 8.0, 1.0, 4.0, 1024)
    prompt = list(range(3, 43))  # 40 tokens, then 12 cached steps at positions 40..51
    ours = t5x_lite.load(str(tmp_path / "w")).generate(input_ids=[prompt], max_new_tokens=12)
    with torch.no_grad():
        want = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    assert ours[0]["ids"] == want[0, len(prompt):].tolist()

    written = ref.export_matches(tmp_path / "w", tmp_path / "hf", hf, [prompt],
                                 "LlamaForCausalLM")
    assert written["rope_parameters"] == LLAMA3  # 4.x: scaling without theta (top-level)
    assert written["rope_scaling"] == {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    assert written["rope_theta"] == LLAMA3["rope_theta"]


def _hf_inv_freq(config: dict):
    """The inverse frequencies HF's Llama builds from a config.json dict."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    return LlamaRotaryEmbedding(transformers.LlamaConfig.from_dict(config)).inv_freq.numpy()


@pytest.mark.parametrize("changes", [
    # transformers 4.x: rope_scaling with "type", theta top-level
    dict(rope_parameters=None, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}),
    # both: transformers 5 reads rope_scaling first
    dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5},
         rope_scaling={"rope_type": "linear", "factor": 3.0}),
    # a top-level original length wins over the rope dict's (HF's standardize_rope_params)
    dict(rope_parameters=dict(LLAMA3), original_max_position_embeddings=512),
], ids=["4.x", "both_fields", "top_level_original_length"])
def test_configs_are_read_as_transformers_reads_them(changes):
    c = ref.llama(kv_heads=2).config.to_dict()
    c.update(changes)
    if c["rope_parameters"] is None:
        del c["rope_parameters"]
    cfg = hf_interop.model_config_from_hf(c)
    assert cfg.rope_scaling == "linear" or cfg.rope_original_max_len == 512
    np.testing.assert_allclose(layers.rope_inv_freq(cfg), _hf_inv_freq(c), rtol=1e-6, atol=0)


@pytest.mark.parametrize("changes,message", [
    (dict(rope_scaling="dynamic"), "rope_scaling must be one of \\('none', 'linear', 'llama3', "
                                   "'yarn'\\), got 'dynamic'"),
    (dict(rope_scaling_factor=8.0), "rope_scaling_factor=8.0 only applies with rope_scaling "
                                    "'linear' / 'llama3' / 'yarn' \\(this model: 'none'\\)"),
    (dict(rope_scaling="linear", rope_original_max_len=4096),
     "rope_original_max_len=4096 only applies with rope_scaling 'llama3' / 'yarn'"),
    (dict(rope_scaling="linear", rope_scaling_factor=0.0), "rope_scaling_factor must be > 0"),
    (dict(rope_scaling="llama3", rope_low_freq_factor=0.0),
     "rope_low_freq_factor and rope_high_freq_factor must be > 0, got 0.0 and 4.0"),
    (dict(rope_scaling="llama3", rope_beta_fast=16.0),
     "rope_beta_fast=16.0 only applies with rope_scaling 'yarn' \\(this model: 'llama3'\\)"),
    (dict(rope_scaling="yarn", rope_attention_factor=-1.0),
     "rope_beta_fast and rope_beta_slow must be > 0 and rope_attention_factor >= 0"),
])
def test_bad_scaling_settings_are_one_line(changes, message):
    with pytest.raises(config_lib.ConfigError, match=f"^Invalid model config: {message}"):
        config_lib.gpt_modern(**changes)


def test_scaling_needs_rope():
    with pytest.raises(config_lib.ConfigError,
                       match="rope_scaling='linear' only applies with position='rope'"):
        config_lib.gpt2(rope_scaling="linear")


def test_yarn_checkpoint_exports_back_with_its_derived_attention_factor(tmp_path):
    """A YaRN rope dict with mscale / mscale_all_dim exports its cos / sin factor explicitly
    (what HF derived from them), so HF and a re-import build the same model."""
    hf = ref.llama(kv_heads=2, rope=dict(YARN, mscale=0.8, mscale_all_dim=0.5), seed=8)
    hf.save_pretrained(tmp_path / "src")
    cfg = convert.hf_to_workdir(tmp_path / "src", tmp_path / "w")
    written = ref.export_matches(tmp_path / "w", tmp_path / "hf", hf, [list(range(3, 43))],
                                 "LlamaForCausalLM")
    assert written["rope_parameters"]["attention_factor"] == pytest.approx(
        hf.model.rotary_emb.attention_scaling, rel=1e-12)
    assert hf_interop.model_config_from_hf(written) == cfg


def test_export_drops_a_stale_top_level_original_length():
    """A source config's top-level original_max_position_embeddings would override the exported
    rope_parameters' (HF reads it first): the export leaves it out."""
    base = ref.llama(kv_heads=2, rope=dict(LLAMA3)).config.to_dict()
    base["original_max_position_embeddings"] = 1024
    cfg = dataclasses.replace(hf_interop.model_config_from_hf(base), rope_scaling="yarn",
                              rope_scaling_factor=4.0, rope_original_max_len=2048,
                              rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
    written = convert.hf_config_from_model(cfg, base)
    assert "original_max_position_embeddings" not in written
    assert hf_interop.model_config_from_hf(written).rope_original_max_len == 2048
    np.testing.assert_allclose(_hf_inv_freq(written), layers.rope_inv_freq(cfg), rtol=1e-6)


@pytest.mark.parametrize("changes,message", [
    (dict(mscale="a", mscale_all_dim=1), 'rope_parameters.mscale="a" is not a number'),
    (dict(mscale=1, mscale_all_dim=-20), "give a cos / sin factor <= 0"),
    (dict(beta_fast=-1), "rope_parameters.beta_fast=-1 is not a positive number"),
    (dict(truncate="yes"), 'rope_parameters.truncate="yes" is not true or false'),
])
def test_bad_yarn_fields_are_one_line(changes, message):
    c = ref.llama(kv_heads=2).config.to_dict()
    c["rope_parameters"] = dict(YARN, **changes)
    with pytest.raises(hf_interop.InteropError, match=f"^config.json: .*{message}"):
        hf_interop.model_config_from_hf(c)
