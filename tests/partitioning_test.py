"""Logical axis names -> PartitionSpecs on a (data=2, fsdp=2, tensor=2) mesh, and sharded == 1 device."""
import functools
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5x_lite import config as mc
from t5x_lite import estimate_xla
from t5x_lite import partitioning as part
from t5x_lite.models import abstract_variables, build_model
from t5x_lite.training import testing

SMALL = dict(vocab_size=128, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_layers=2)

# What we intend under DEFAULT_RULES: embed -> fsdp (FSDP), heads/mlp/vocab -> tensor (TP),
# head_dim, relative-position buckets and the position table's length replicated.
INTENDED = {
    "embedding": P("tensor", "fsdp"),  # token table [vocab, embed]
    "position_embedding": P(None, "fsdp"),  # [max_len, embed]
    "query": P("fsdp", "tensor", None), "key": P("fsdp", "tensor", None),
    "value": P("fsdp", "tensor", None), "out": P("tensor", None, "fsdp"),
    "query_bias": P("tensor", None), "key_bias": P("tensor", None),
    "value_bias": P("tensor", None), "out_bias": P("fsdp"),
    "wi": P("fsdp", "tensor"), "wi_0": P("fsdp", "tensor"), "wi_1": P("fsdp", "tensor"),
    "wo": P("tensor", "fsdp"), "wi_bias": P("tensor"), "wo_bias": P("fsdp"),
    "scale": P("fsdp"), "bias": P("fsdp"),  # norms
    "rel_embedding": P("tensor", None),  # [heads, buckets]
    "lm_head": P("fsdp", "tensor"), "mlm_dense": P("fsdp", "tensor"), "mlm_bias": P("tensor"),
}


def intended_spec(path, scanned):
    names = [getattr(k, "key", str(k)) for k in path]
    leaf = names[-1]
    if leaf == "embedding" and "position_embedder" in names:
        leaf = "position_embedding"
    spec = INTENDED[leaf]
    if scanned and "layers" in names:
        spec = P(None, *spec)
    return spec


CONFIGS = {
    "t5_1_1": mc.t5_1_1(**SMALL), "t5_1_0": mc.t5_1_0(**SMALL),
    "gpt2": mc.gpt2(**SMALL, max_len=16),
    "gpt_modern_scan": mc.gpt_modern(**SMALL, scan_layers=True),
    "bert": mc.bert(**SMALL, max_len=16),
}


@functools.lru_cache(maxsize=None)
def _created_sharded(name):
    """(model, boxed abstract variables, shardings, variables created by a jitted init with
    those out_shardings on a (2, 2, 2) mesh) -- once per config: the one-device reference below
    takes its params from here (the same values as an unsharded init: threefry keys are
    partitionable), instead of compiling the init a second time."""
    mesh = part.make_mesh(2, 2, 2)
    model = build_model(CONFIGS[name])
    boxed = abstract_variables(model)
    shardings = part.shardings(boxed, mesh)
    with part.activate(mesh):
        variables = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0))),
                            out_shardings=shardings)()
    return model, boxed, shardings, variables


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_param_gets_the_intended_partition_spec(name):
    cfg = CONFIGS[name]
    _, boxed, shardings, params = _created_sharded(name)
    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))[0]
    assert flat
    for path, sharding in flat:
        assert sharding.spec == intended_spec(path, cfg.scan_layers), jax.tree_util.keystr(path)
    # Each logical name is one per dimension: the boxes' names match the array ranks.
    for box in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert len(box.names) == len(box.value.shape)
    # Creating the state sharded puts every param where the spec says.
    for (path, want), got in zip(flat, jax.tree.leaves(params)):
        assert got.sharding.spec == want.spec, jax.tree_util.keystr(path)


@functools.lru_cache(maxsize=None)
def _one_device_reference(family):
    """(model, params, batch, loss_and_grad, (loss, grads) on one device) -- once per family."""
    model, _, _, variables = _created_sharded({"t5": "t5_1_1", "gpt": "gpt2"}.get(family, family))
    rng = np.random.default_rng(0)
    batch = {"decoder_input_tokens": rng.integers(3, 128, (8, 8)).astype(np.int32),
             "decoder_target_tokens": rng.integers(3, 128, (8, 8)).astype(np.int32)}
    if family == "t5":
        batch["encoder_input_tokens"] = rng.integers(0, 128, (8, 12)).astype(np.int32)
    if family == "bert":  # MLM over every position (the LossConfig default)
        batch = {"encoder_input_tokens": rng.integers(3, 128, (8, 8)).astype(np.int32),
                 "encoder_target_tokens": rng.integers(3, 128, (8, 8)).astype(np.int32),
                 "encoder_loss_weights": (rng.random((8, 8)) < 0.3).astype(np.float32)}
    # model.init(key 0)'s values, fetched to the host: the reference runs on one device.
    params = jax.device_get(variables["params"])
    grad_fn = jax.value_and_grad(lambda p, b: model.loss_fn(p, b)[0])
    return model, params, batch, grad_fn, jax.jit(grad_fn)(params, batch)


@pytest.mark.parametrize("shape, family", [
    *((shape, family) for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2), (2, 1, 4)]
      for family in ("t5", "gpt")),
    ((2, 2, 2), "bert"),  # its MLM head's gradients were wrong here (the loss right)
])
def test_sharded_loss_and_grads_equal_one_device(shape, family):
    model, params, batch, grad_fn, (ref_loss, ref_grads) = _one_device_reference(family)
    mesh = part.make_mesh(*shape)
    shardings = part.shardings(abstract_variables(model), mesh)["params"]
    with part.activate(mesh):
        sharded_params = jax.device_put(params, shardings)
        sharded_batch = jax.device_put(batch, part.data_sharding(mesh))
        loss, grads = jax.jit(grad_fn)(sharded_params, sharded_batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_mesh_shape_fills_and_rejects():
    assert part.mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
    assert part.mesh_shape(1, -1, 1, 8) == (1, 8, 1)
    with pytest.raises(part.MeshError, match="needs 12 devices"):
        part.mesh_shape(3, 2, 2, 8)
    with pytest.raises(part.MeshError, match="At most one"):
        part.mesh_shape(-1, -1, 2, 8)
    with pytest.raises(part.MeshError, match="Cannot fill"):
        part.mesh_shape(-1, 3, 1, 8)


def test_rules_from_config_round_trips_lists():
    rules = part.rules_from_config([["batch", ["data", "fsdp"]], ["embed", None]])
    assert rules == (("batch", ("data", "fsdp")), ("embed", None))
    assert part.rules_from_config(None) == part.DEFAULT_RULES


@pytest.mark.parametrize("rules, match", [
    ([["embd", "fsdp"]], "unknown logical axis 'embd'"),  # would silently replicate embed
    ([["batch", "dataa"]], r"'batch' -> 'dataa'; map it to None, one of data, fsdp, tensor"),
    ([["batch", ["data", "data"]]], "tuple of distinct ones"),
    ([["batch"]], r"entries are \(logical_axis, mesh_axis"),
    (["batch"], "entries are"),
    ([["embed", 3]], r"'embed' -> 3; map it to None"),  # a TypeError traceback before
    ([["batch", True]], r"'batch' -> True; map it to None"),
    (5, r"mesh.rules is a list of \(logical_axis"),
])
def test_bad_rules_are_one_mesh_error(rules, match):
    with pytest.raises(part.MeshError, match=match):
        part.rules_from_config(rules)


def test_tensor_parallel_step_never_gathers_the_logits():
    """With the vocab sharded on `tensor`, no collective of the compiled train step carries a
    device's full [tokens, vocab] logits. XLA partitions a gather along a sharded axis by first
    all-gathering that axis unless the gather is a take_along_axis (t5x_lite/argmax.py: token
    accuracy; the loss picks the target logits the same way)."""
    config = testing.tiny_config("gpt")
    txt = estimate_xla.compiled_train_step(config, part.make_mesh(2, 2, 2)).as_text()
    seq, _ = estimate_xla.sequence_lengths(config)
    tokens = config.train.batch_size * seq // 4  # rows split over data x fsdp
    shapes = re.findall(r"= f32\[(\d+),(\d+)\]\S* (?:all-gather|all-reduce|all-to-all|"
                        r"collective-permute)\(", txt)
    assert shapes and (str(tokens), str(config.model.vocab_size)) not in shapes
