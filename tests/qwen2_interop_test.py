"""Query / key / value biases (`model.qkv_bias`) and HF Qwen2ForCausalLM <-> gpt_modern.

References: HF Qwen2ForCausalLM (random weights and biases) for logits and greedy `generate`,
under the hand-written mapping of `hf_reference.llama_as_gpt_modern` and through `convert`."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

import decoding_testlib
import hf_reference as ref
import t5x_lite
from t5x_lite import config as config_lib
from t5x_lite import convert, hf_interop
from t5x_lite import estimate_flops as ef
from t5x_lite.decoding import generate as gen
from t5x_lite.models import abstract_variables, build_model

PROMPTS = [[5, 9, 3, 11, 12, 13, 14], [7, 8], [20, 21, 22, 23]]
N = 10


def _logits_match(hf, cfg, params, length=20):
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, length)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(jax.jit(build_model(cfg).logits)(params, {"decoder_input_tokens": ids}))
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    return ids, got


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 4)])
def test_gpt_modern_with_qkv_bias_equals_hf_qwen2(tie, kv_heads):
    hf = ref.qwen2(tie=tie, kv_heads=kv_heads, seed=1)
    cfg, params = ref.llama_as_gpt_modern(hf)
    assert cfg.qkv_bias and cfg.sliding_window is None
    ids, got = _logits_match(hf, cfg, params)
    # the biases matter: without them the logits are another model's
    attn = params["decoder"]["layers_0"]["self_attention"]
    attn["query_bias"] = np.zeros_like(attn["query_bias"])
    other = np.asarray(jax.jit(build_model(cfg).logits)(params, {"decoder_input_tokens": ids}))
    assert np.abs(other - got).max() > 1e-2


def test_qwen2_with_every_layer_windowed_is_a_sliding_window_model():
    hf = ref.qwen2(seed=2, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    cfg, params = ref.llama_as_gpt_modern(hf)
    assert cfg.sliding_window == 4
    _logits_match(hf, cfg, params, length=16)
    read = hf_interop.model_config_from_hf(hf.config.to_dict())
    assert (read.sliding_window, read.qkv_bias) == (4, True)


def test_qwen2_checkpoint_converts_decodes_as_hf_and_exports_back(tmp_path):
    hf = ref.qwen2(seed=4)
    hf.save_pretrained(tmp_path / "src")
    cfg = convert.hf_to_workdir(tmp_path / "src", tmp_path / "w")
    assert (cfg.qkv_bias, cfg.num_kv_heads, cfg.sliding_window) == (True, 2, None)
    model = t5x_lite.load(str(tmp_path / "w"))
    ours = model.generate(input_ids=PROMPTS, max_new_tokens=N)
    assert [r["ids"] for r in ours] == ref.greedy_left_padded(hf, PROMPTS, N)
    one = model.generate(input_ids=PROMPTS[:1], max_new_tokens=N, batch_size=1)
    assert one[0]["ids"] == ours[0]["ids"]  # one row per step: XLA's own GEMV path

    written = ref.export_matches(tmp_path / "w", tmp_path / "hf", hf, [PROMPTS[0] + PROMPTS[2]],
                                 "Qwen2ForCausalLM")
    assert (written["model_type"], written["use_sliding_window"]) == ("qwen2", False)


def test_qwen2_with_a_window_in_some_layers_only_is_refused():
    c = ref.qwen2(seed=2, use_sliding_window=True, sliding_window=4,
                  max_window_layers=1).config.to_dict()
    with pytest.raises(hf_interop.InteropError,
                       match="^config.json: Qwen2 config with a sliding window in some layers "
                             "only \\(layer_types / max_window_layers\\) is not supported"):
        hf_interop.model_config_from_hf(c)
    del c["layer_types"]  # a 4.x config: derived from max_window_layers, as HF does
    with pytest.raises(hf_interop.InteropError, match="some layers only"):
        hf_interop.model_config_from_hf(c)
    c["use_sliding_window"] = False  # then no layer has one
    assert hf_interop.model_config_from_hf(c).sliding_window is None
    c["attention_bias"] = True  # HF's Qwen2 ignores it (its q / k / v biases are fixed)
    assert hf_interop.model_config_from_hf(c).qkv_bias


def test_counts_decoding_paths_and_config_checks():
    cfg = config_lib.gpt_modern(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2,
                                head_dim=8, d_ff=48, num_layers=2, max_len=32, qkv_bias=True)
    tree = nn.meta.unbox(abstract_variables(build_model(cfg)))["params"]
    attn = tree["decoder"]["layers_0"]["self_attention"]
    assert {k: v.shape for k, v in attn.items() if k.endswith("_bias")} == {
        "query_bias": (4, 8), "key_bias": (2, 8), "value_bias": (2, 8)}  # no out_bias
    assert sum(x.size for x in jax.tree.leaves(tree)) == sum(ef.param_count_by_part(cfg).values())
    plain = dataclasses.replace(cfg, qkv_bias=False)
    assert cfg.shape_signature() != plain.shape_signature()
    # beam search and speculative decoding read the biases through the fused CPU kernels too
    loaded = decoding_testlib.loaded(cfg)
    beams = gen.generate(loaded, input_ids=PROMPTS[:2], method="beam", num_beams=2,
                         max_new_tokens=6, batch_size=2)
    decoding_testlib.assert_beams_score_their_log_probs(loaded, PROMPTS, beams)
    greedy = gen.generate(loaded, input_ids=PROMPTS, max_new_tokens=N, batch_size=4)
    spec = gen.generate(loaded, input_ids=PROMPTS, max_new_tokens=N, batch_size=4,
                        draft=decoding_testlib.loaded(dataclasses.replace(cfg, num_layers=1)),
                        num_draft=3)
    assert [r["ids"] for r in spec] == [r["ids"] for r in greedy]
    with pytest.raises(config_lib.ConfigError, match="qkv_bias=True adds no bias that "
                                                     "use_bias=True does not"):
        config_lib.gpt2(qkv_bias=True)
