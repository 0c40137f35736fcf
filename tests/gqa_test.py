"""Grouped-query and multi-query attention (`model.num_kv_heads`, GPT family).

References: HF LlamaForCausalLM with `num_key_value_heads` (its `repeat_kv`: query head i reads
kv head i // group) for logits (tests/hf_interop_test.py) and greedy `generate` here; the
uncached forward pass for cached beam search; one device for meshes."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

import decoding_testlib
import hf_reference as ref
from t5x_lite import config as config_lib
from t5x_lite import convert, hf_interop
from t5x_lite import estimate_flops as ef
from t5x_lite import partitioning as part
from t5x_lite.decoding import generate as gen
from t5x_lite.decoding import steps
from t5x_lite.models import abstract_variables, build_model
from t5x_lite.partitioning import MeshError

N = 12
PROMPTS = [[5, 9, 3], [7, 8, 9, 10, 11, 12, 13], [4], [20, 21, 22, 23, 24]]


@pytest.fixture(scope="module", params=[2, 1], ids=["gqa", "mqa"])
def llama(request):
    hf = ref.llama(kv_heads=request.param, seed=3)
    cfg, params = ref.llama_as_gpt_modern(hf)
    return hf, decoding_testlib.loaded(cfg, jax.tree.map(np.asarray, params))


def _hf_greedy(hf, prompts):
    return ref.greedy_left_padded(hf, prompts, N, eos_token_id=1)


def test_cached_greedy_equals_hf_llama_generate(llama):
    hf, loaded = llama
    assert loaded.config.kv_heads < loaded.config.num_heads
    ours = gen.generate(loaded, input_ids=PROMPTS, max_new_tokens=N, batch_size=4)
    assert [r["ids"] for r in ours] == _hf_greedy(hf, PROMPTS)
    one = gen.generate(loaded, input_ids=PROMPTS[1:2], max_new_tokens=N, batch_size=1)
    assert one[0]["ids"] == ours[1]["ids"]  # one row per step: XLA's own GEMV path
    # CPU decoding fuses q [D, H, K] and the smaller k / v into one [D, H + 2 Hkv, K] kernel
    cfg = loaded.config
    fused = steps.cpu_weights(cfg, loaded.params)["decoder"]["layers_0"]["self_attention"]
    assert set(fused) == {"qkv_grouped", "out"}
    assert fused["qkv_grouped"].shape == (cfg.d_model, cfg.num_heads + 2 * cfg.kv_heads,
                                          cfg.head_dim)


def test_beam_search_reorders_the_grouped_cache(llama):
    """Each beam's score is the sum of its tokens' log-probs under the uncached forward pass: a
    cache gathered by the wrong rows (B*H instead of B*Hkv entries per row) would not give it."""
    _, loaded = llama
    beams = gen.generate(loaded, input_ids=PROMPTS[:2], method="beam", num_beams=3,
                         max_new_tokens=6, batch_size=2)
    assert all(len({tuple(b["ids"]) for b in result}) == 3 for result in beams)
    decoding_testlib.assert_beams_score_their_log_probs(loaded, PROMPTS, beams)


def test_meshes_give_one_devices_greedy_outputs_and_gradients():
    cfg = config_lib.gpt_modern(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2,
                                head_dim=8, d_ff=48, num_layers=2, max_len=32)
    loaded = decoding_testlib.loaded(cfg)
    want = gen.generate(loaded, input_ids=PROMPTS, max_new_tokens=N, batch_size=4)
    got = gen.generate(decoding_testlib.on_mesh(loaded, (1, 2, 2)), input_ids=PROMPTS,
                       max_new_tokens=N, batch_size=4)
    assert [r["ids"] for r in got] == [r["ids"] for r in want]

    model = build_model(cfg)
    ids = np.random.default_rng(0).integers(2, 64, (8, 16)).astype(np.int32)
    batch = {"decoder_input_tokens": ids, "decoder_target_tokens": ids}
    grad_fn = jax.value_and_grad(lambda p, b: model.loss_fn(p, b)[0])
    ref_loss, ref_grads = jax.jit(grad_fn)(loaded.params, batch)
    mesh = part.make_mesh(2, 2, 2)
    shardings = part.shardings(abstract_variables(model), mesh)["params"]
    assert shardings["decoder"]["layers_0"]["self_attention"]["key"].spec == \
        jax.sharding.PartitionSpec("fsdp", "tensor", None)
    with part.activate(mesh):
        loss, grads = jax.jit(grad_fn)(jax.device_put(loaded.params, shardings),
                                       jax.device_put(batch, part.data_sharding(mesh)))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_one_kv_head_under_tensor_parallelism_needs_a_rule_that_keeps_it_whole():
    cfg = config_lib.gpt_modern(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=1,
                                head_dim=8, d_ff=48, num_layers=1, max_len=32)
    boxed = abstract_variables(build_model(cfg))
    mesh = part.make_mesh(1, 1, 2, devices=jax.devices()[:2])
    with pytest.raises(MeshError, match=r"\['key'\] has a dimension of 1 split over mesh axes "
                       r"tensor of size 2, which does not divide it; pick another mesh \(data, "
                       r"fsdp, tensor\)=\(1, 1, 2\), or mesh.rules with \('kv_heads', None\) to "
                       r"keep its 'kv_heads' dim whole \(a mesh.rules list replaces the default "
                       r"rules whole: copy partitioning.DEFAULT_RULES and change that entry\)$"):
        part.shardings(boxed, mesh)
    rules = tuple((name, None if name == "kv_heads" else axis)
                  for name, axis in part.DEFAULT_RULES)
    spec = part.shardings(boxed, mesh, rules)["params"]["decoder"]["layers_0"]["self_attention"]
    assert spec["key"].spec == jax.sharding.PartitionSpec("fsdp", None, None)
    assert spec["query"].spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def test_config_checks_counts_and_cache_size():
    with pytest.raises(config_lib.ConfigError, match="num_kv_heads must divide num_heads=4"):
        config_lib.gpt_modern(num_heads=4, num_kv_heads=3)
    with pytest.raises(config_lib.ConfigError, match="num_kv_heads only applies to family 'gpt'"):
        config_lib.t5_1_1(num_heads=4, num_kv_heads=2)
    full = config_lib.gpt2(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48,
                           num_layers=2, max_len=32)
    # As many kv heads as heads is the default, not another model (an HF Llama import says 4)
    assert dataclasses.replace(full, num_kv_heads=4) == full and full.num_kv_heads is None
    grouped = dataclasses.replace(full, num_kv_heads=2)  # GPT-2 style: k / v biases too
    assert full.shape_signature() != grouped.shape_signature()
    for cfg in (full, grouped):
        tree = nn.meta.unbox(abstract_variables(build_model(cfg)))["params"]
        assert sum(x.size for x in jax.tree.leaves(tree)) == sum(
            ef.param_count_by_part(cfg).values())
    # k and v kernels and biases: 2 * (D + 1) * (H - Hkv) * K fewer per layer
    assert ef.matmul_params(full) - ef.matmul_params(grouped) == 2 * 2 * 32 * 2 * 8
    assert gen.cache_bytes(grouped, 4, 10, 0, 1) * 2 == gen.cache_bytes(full, 4, 10, 0, 1)
    convert.hf_config_from_model(full)  # GPT-2's fused c_attn has as many k / v heads as q
    with pytest.raises(hf_interop.InteropError, match=r"use_bias=True, num_kv_heads=2\)"):
        convert.hf_config_from_model(grouped)
