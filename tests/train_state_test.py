"""Sharded train-state creation and optimizer-state shardings derived from the params'."""
import importlib.util
import pathlib

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from t5x_lite import partitioning
from t5x_lite.config import ModelConfig
from t5x_lite.models import build_model
from t5x_lite.training import optimizers, testing, train_state

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _by_path(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_adafactor_opt_state_shardings_on_1x4x2():
    cfg = _load_config("tiny_t5")  # d_model 128, d_ff 256: big enough for factored moments
    model = build_model(ModelConfig.from_dict(cfg.model))
    tx, _ = optimizers.make_optimizer(cfg.optimizer, 100)
    mesh = partitioning.make_mesh(1, 4, 2)
    abstract, sh = train_state.state_shardings(model, tx, mesh, partitioning.DEFAULT_RULES)
    params = _by_path(sh.params)
    assert params["['encoder']['layers_0']['mlp']['wi_0']"].spec == P("fsdp", "tensor")
    assert params["['token_embedder']['embedding']"].spec == P("tensor", "fsdp")
    specs = {k: v.spec for k, v in _by_path(sh.opt_state).items()}
    shapes = {k: v.shape for k, v in _by_path(abstract.opt_state).items()}
    # Opt state = chain(adafactor(factored moments, ..., lr schedule count)): T5X clips no norm.
    wi = "['encoder']['layers_0']['mlp']['wi_0']"  # [D=128, F=256]: factored
    assert shapes[f"[0][0].v_row{wi}"] == (128,) and specs[f"[0][0].v_row{wi}"] == P("fsdp")
    assert shapes[f"[0][0].v_col{wi}"] == (256,) and specs[f"[0][0].v_col{wi}"] == P("tensor")
    assert shapes[f"[0][0].v{wi}"] == (1,) and specs[f"[0][0].v{wi}"] == P()
    wo = "['decoder']['layers_1']['mlp']['wo']"  # [F=256, D=128]
    assert specs[f"[0][0].v_row{wo}"] == P("fsdp") and specs[f"[0][0].v_col{wo}"] == P("tensor")
    emb = "['token_embedder']['embedding']"  # [V=8192, D=128]
    assert specs[f"[0][0].v_row{emb}"] == P("fsdp") and specs[f"[0][0].v_col{emb}"] == P("tensor")
    # [128, 4, 32]: factored as the [128, 4 * 32] matrix; its row / column statistics are
    # d_model- and heads * kv-sized vectors, replicated.
    q = "['decoder']['layers_0']['self_attention']['query']"
    assert shapes[f"[0][0].v_row{q}"] == (128,) and shapes[f"[0][0].v_col{q}"] == (128,)
    assert shapes[f"[0][0].v{q}"] == (1,)
    assert specs[f"[0][0].v_row{q}"] == P() and specs[f"[0][0].v_col{q}"] == P()
    assert specs["[0][0].count"] == P()
    scale = "['encoder_norm']['scale']"
    assert specs[f"[0][0].v{scale}"] == P("fsdp")
    # Every leaf got a sharding, and every sharded dim divides evenly.
    for k, spec in specs.items():
        for dim, axes in zip(shapes[k], spec):
            if axes is not None:
                assert dim % mesh.shape[axes] == 0, (k, shapes[k], spec)


def test_derive_spec_rules():
    spec = P("fsdp", "tensor")
    assert train_state.derive_spec((64, 32), (64, 32), spec) == P("fsdp", "tensor")
    assert train_state.derive_spec((64,), (64, 32), spec) == P("fsdp")
    assert train_state.derive_spec((32,), (64, 32), spec) == P("tensor")
    # A square matrix: either dim may have been reduced; the specs disagree -> replicated.
    assert train_state.derive_spec((64,), (64, 64), spec) == P(None)
    assert train_state.derive_spec((1,), (64, 32), spec) == P()
    assert train_state.derive_spec((), (64, 32), spec) == P()


def test_adamw_moments_follow_params_and_state_is_created_sharded():
    cfg = testing.tiny_config("gpt")
    model = build_model(ModelConfig.from_dict(cfg.model))
    tx, _ = optimizers.make_optimizer(cfg.optimizer, 10)
    mesh = partitioning.make_mesh(1, 4, 2)
    state, sh = train_state.create_train_state(model, tx, mesh, partitioning.DEFAULT_RULES,
                                               jax.random.key(0))
    emb = state.params["token_embedder"]["embedding"]  # [8192, 32] on ('tensor', 'fsdp')
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in emb.addressable_shards} == {(4096, 8)}
    mu = _by_path(state.opt_state)["[1][0].mu['token_embedder']['embedding']"]
    assert mu.sharding.spec == P("tensor", "fsdp")
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(sh)):
        assert leaf.sharding == want
    assert int(state.step) == 0
    # Same values as an unsharded model.init with the same key (up to eager-vs-jit rounding).
    ref = jax.device_get(model.init(jax.random.key(0))["params"])
    ref = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, ref,
                       is_leaf=lambda x: hasattr(x, "value"))
    np.testing.assert_allclose(jax.device_get(emb), ref["token_embedder"]["embedding"], atol=1e-7)


def test_scanned_layers_keep_the_layer_axis_replicated():
    cfg = _load_config("tiny_t5")
    cfg.model.scan_layers = True
    model = build_model(ModelConfig.from_dict(cfg.model))
    tx, _ = optimizers.make_optimizer(cfg.optimizer, 100)
    mesh = partitioning.make_mesh(1, 4, 2)
    abstract, sh = train_state.state_shardings(model, tx, mesh, partitioning.DEFAULT_RULES)
    wi = "['decoder']['layers']['block']['mlp']['wi_0']"  # [layers=2, D=128, F=256]
    assert _by_path(sh.params)[wi].spec == P(None, "fsdp", "tensor")
    shapes = {k: v.shape for k, v in _by_path(abstract.opt_state).items()}
    specs = {k: v.spec for k, v in _by_path(sh.opt_state).items()}
    assert shapes[f"[0][0].v_row{wi}"] == (2, 128)
    assert specs[f"[0][0].v_row{wi}"] == P(None, "fsdp")
    assert specs[f"[0][0].v_col{wi}"] == P(None, "tensor")
