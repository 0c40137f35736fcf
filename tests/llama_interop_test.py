"""HF LlamaForCausalLM <-> gpt_modern: `convert --from_hf` / `--to_hf` and `t5x_lite.load`."""
import json

import numpy as np
import pytest
import torch

import hf_reference as ref
import t5x_lite
from t5x_lite import convert, hf_interop

PROMPTS = [[1, 5, 9, 3], [1, 7, 8], [1, 60, 61, 62, 63, 64]]


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 1)])
def test_converted_llama_decodes_as_hf_and_exports_back(tmp_path, tie, kv_heads):
    hf = ref.llama(tie=tie, kv_heads=kv_heads, seed=5)
    # A stop id the model emits mid-row (Llama's own is 2): decoding must stop where HF's does.
    eos = _hf_greedy(hf, PROMPTS[0], 6)[3]
    hf.config.eos_token_id, hf.config.bos_token_id = eos, 1
    hf.generation_config.eos_token_id = eos
    hf.save_pretrained(tmp_path / "src")
    cfg = convert.hf_to_workdir(tmp_path / "src", tmp_path / "w")
    assert (cfg.num_kv_heads, cfg.tie_embeddings, cfg.rope_theta) == (kv_heads, tie, 5e5)
    ours = t5x_lite.load(str(tmp_path / "w")).generate(input_ids=PROMPTS, max_new_tokens=10)
    for prompt, row in zip(PROMPTS, ours):
        assert row["ids"] == _hf_greedy(hf, prompt, 10)
    assert ours[0]["ids"][-1] == eos and len(ours[0]["ids"]) == 4

    written = ref.export_matches(tmp_path / "w", tmp_path / "hf", hf, [PROMPTS[2] + [11, 12]],
                                 "LlamaForCausalLM")
    assert {k: written[k] for k in ("model_type", "num_key_value_heads", "eos_token_id")} == {
        "model_type": "llama", "num_key_value_heads": kv_heads, "eos_token_id": eos}


def _config(**changes):
    c = ref.llama(kv_heads=2).config.to_dict()
    c.update(changes)
    return c


def test_a_transformers_4_config_reads_rope_theta_and_inv_freq_buffers_are_dropped():
    hf = ref.llama(kv_heads=2)
    c = _config(rope_theta=1e4, rope_scaling=None)
    del c["rope_parameters"]
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    cfg = hf_interop.model_config_from_hf(c, tensors)
    assert cfg.rope_theta == 1e4 and cfg.num_kv_heads == 2
    assert "layers_0" in hf_interop.params_from_hf(cfg, tensors)["decoder"]


@pytest.mark.parametrize("changes,message", [
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 5e5, "factor": 8.0}),
     "Llama config with rope_type=\"dynamic\" \\(supported: 'default', 'linear', 'llama3', "
     "'yarn'\\)"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_parameters.low_freq_factor=null is not a positive number"),
    (dict(partial_rotary_factor=0.5), "Llama config with partial_rotary_factor=0.5 \\(RoPE on "
                                      "all of head_dim only\\) is not supported"),
    (dict(hidden_act="gelu"), "Llama config with hidden_act='gelu' \\(supported: 'silu'\\)"),
    (dict(attention_bias=True), "Llama config with attention_bias=true is not supported"),
    (dict(num_key_value_heads=3), "num_key_value_heads must divide num_heads=4"),
    (dict(num_key_value_heads="2"), 'num_key_value_heads="2" is not a positive integer'),
    # unhashable values: a TypeError traceback before
    (dict(model_type=["llama"]), r'model_type=\["llama"\] is not a name; t5x_lite converts'),
    (dict(rope_parameters={"rope_type": ["linear"], "rope_theta": 1e4, "factor": 2.0}),
     r'Llama config with rope_type=\["linear"\] \(supported'),
    (dict(rope_scaling={"type": {"a": 1}, "factor": 2.0}),
     r'Llama config with rope_type={"a": 1} \(supported'),
])
def test_llama_configs_it_cannot_build_are_one_line(changes, message):
    with pytest.raises(hf_interop.InteropError, match=f"^config.json: .*{message}"):
        hf_interop.model_config_from_hf(_config(**changes))


def test_export_keeps_the_source_configs_token_ids_and_extra_fields(tmp_path):
    """A converted Llama-family model writes back its source config.json's fields (token ids,
    fields t5x_lite does not read) as a converted T5 or GPT-2 does; another architecture's
    source fields do not carry over."""
    hf = ref.llama(kv_heads=2, seed=6)
    hf.config.bos_token_id, hf.config.pad_token_id = 7, 3
    hf.config.initializer_range = 0.05
    hf.save_pretrained(tmp_path / "src")
    convert.hf_to_workdir(tmp_path / "src", tmp_path / "w")
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (written["bos_token_id"], written["pad_token_id"], written["initializer_range"]) == (
        7, 3, 0.05)
    assert hf_interop.hf_model_type(hf_interop.model_config_from_hf(written)) == "llama"
    # the same workdir written as Mistral (a window): Llama's source fields are not Mistral's
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    cfg["model"]["sliding_window"] = 4
    (tmp_path / "w" / "config.json").write_text(json.dumps(cfg))
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "hf2")
    written = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert written["model_type"] == "mistral" and written.get("pad_token_id") != 3
