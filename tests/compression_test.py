"""The shared compression pieces: kernel layouts, the frozen+trainable optimizer, the trainer
plugin chosen by config."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from t5x_lite import compression, partitioning
from t5x_lite.training import testing


@pytest.mark.parametrize("path,axes,want", [
    ("enc/self_attention/query", ("embed", "heads", "kv"), ((), (0,), (1, 2))),
    ("enc/self_attention/out", ("heads", "kv", "embed"), ((), (0, 1), (2,))),
    ("enc/layers/block/mlp/wo", ("layers", "mlp", "embed"), ((0,), (1,), (2,))),
    ("enc/layers/block/mlp/wi_1", ("layers", "embed", "mlp"), ((0,), (1,), (2,))),
    ("token_embedder/embedding", ("vocab", "embed"), ((), (1,), (0,))),  # per-row (attend)
    ("lm_head", ("embed", "vocab"), ((), (0,), (1,))),
])
def test_kernel_dims(path, axes, want):
    assert tuple(compression.kernel_dims(path, axes)) == want


def test_kernel_dims_rejects_vectors():
    with pytest.raises(compression.CompressionError, match="not a projection kernel"):
        compression.kernel_dims("encoder_norm/scale", ("embed",))


def test_freeze_optimizer_keeps_frozen_bits_and_state_only_for_trainable():
    params = {"frozen": {"w": jnp.array([1.5, -0.0, 0.0, -2.0])},
              "trainable": {"a": jnp.ones((3,))}}
    tx = compression.freeze_optimizer(optax.adam(0.1), "trainable")
    state = tx.init(params)
    assert compression.param_count(state) == 2 * 3 + 1  # mu, nu for 'a', the count
    grads = jax.tree.map(jnp.ones_like, params)  # even a nonzero gradient does not move it
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    got, want = np.asarray(new["frozen"]["w"]), np.asarray(params["frozen"]["w"])
    assert got.tobytes() == want.tobytes()  # bit for bit, the sign of -0.0 included
    assert not np.allclose(new["trainable"]["a"], 1.0)


def test_from_config_identity_and_combinations():
    mesh, rules = partitioning.make_mesh(), partitioning.DEFAULT_RULES
    cfg = testing.tiny_config("t5")
    plugin = compression.from_config(cfg, mesh, rules)
    assert type(plugin) is compression.Plugin
    assert plugin.checkpointed({"x": 1}) == {"x": 1} and plugin.full_params(None, None) is None
    cfg.lora = ml_collections.ConfigDict(dict(base="/nonexistent"))
    cfg.prune = ml_collections.ConfigDict(dict(sparsity=0.5))
    with pytest.raises(compression.CompressionError, match="LoRA cannot be combined"):
        compression.from_config(cfg, mesh, rules)
    del cfg.lora
    from t5x_lite import pruning
    assert isinstance(compression.from_config(cfg, mesh, rules), pruning.PruningPlugin)
    cfg.prune.sparsity = 1.5
    with pytest.raises(compression.CompressionError, match="sparsity"):
        compression.from_config(cfg, mesh, rules)


@pytest.mark.parametrize("section, values, message", [
    ("prune", dict(sparsity="0.5"), "prune.sparsity must be float, got '0.5'"),
    ("prune", dict(frequency=2.5), "prune.frequency must be int, got 2.5"),
    ("distill", dict(teacher="/t", temperature="2"), "distill.temperature must be float"),
    ("lora", dict(base="/b", rank=True), "lora.rank must be int, got True"),
])
def test_section_values_of_the_wrong_type_are_one_line(section, values, message):
    """A config file's `prune=dict(sparsity="0.5")` was a TypeError traceback at the first
    comparison; an int where a float belongs is fine."""
    from t5x_lite import distillation, lora, pruning
    cls = {"prune": pruning.PruneConfig, "distill": distillation.DistillConfig,
           "lora": lora.LoraConfig}[section]
    with pytest.raises(compression.CompressionError, match=message) as e:
        cls.from_dict(values)
    assert "\n" not in str(e.value)
    assert pruning.PruneConfig.from_dict(dict(sparsity=0, power=2)).power == 2.0
