"""train_step: sharded meshes reproduce the 1-device run; accumulation equals the big batch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import partitioning
from t5x_lite.config import ModelConfig
from t5x_lite.models import LossConfig, build_model
from t5x_lite.training import optimizers, run_checks, testing, train_state, train_step


def _setup(family="t5", **opt):
    cfg = testing.tiny_config(family)
    cfg.optimizer.name = "adafactor"  # the T5 default; rsqrt schedule
    cfg.optimizer.schedule = "rsqrt"
    cfg.optimizer.warmup_steps = 100
    cfg.optimizer.update(opt)
    model = build_model(ModelConfig.from_dict(cfg.model), LossConfig(z_loss=1e-4))
    tx, schedule = optimizers.make_optimizer(cfg.optimizer, 10)
    return model, tx, schedule


def _batch(model, b=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    tgt = rng.integers(3, 8000, (b, t)).astype(np.int32)
    weights = (rng.random((b, t)) < 0.8).astype(np.float32)
    batch = {"decoder_target_tokens": tgt,
             "decoder_input_tokens": np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
             "decoder_loss_weights": weights}
    if model.config.family == "t5":
        batch["encoder_input_tokens"] = rng.integers(3, 8000, (b, 2 * t)).astype(np.int32)
    return batch


def _run(model, tx, schedule, mesh_shape, batch, steps=3, state=None, **kwargs):
    """`steps` steps on a mesh; a given (host) `state` is placed on it, else one is created."""
    n = int(np.prod(mesh_shape))
    mesh = partitioning.make_mesh(*mesh_shape, devices=jax.devices()[:n])
    rules = partitioning.DEFAULT_RULES
    if state is None:
        state, sh = train_state.create_train_state(model, tx, mesh, rules, jax.random.key(0))
    else:
        _, sh = train_state.state_shardings(model, tx, mesh, rules)
        state = jax.device_put(state, sh)
    step = train_step.jit_train_step(train_step.make_train_step(model, tx, schedule, **kwargs),
                                     sh, mesh, rules)
    global_batch = jax.device_put(batch, partitioning.data_sharding(mesh))
    out = []
    for _ in range(steps):
        state, metrics = step(state, global_batch, jax.random.key(1))
        out.append(jax.device_get(metrics))
    return state, out


def test_sharded_meshes_match_single_device():
    """DP, DP+FSDP+TP and FSDP+TP give the 1-device losses (T5 + Adafactor, f32)."""
    model, tx, schedule = _setup("t5")
    batch = _batch(model)
    # The state is created sharded on (1, 4, 2) (as the trainer does) and copied to the others.
    sharded_state, _ = _run(model, tx, schedule, (1, 4, 2), batch, steps=0)
    state0 = jax.device_get(sharded_state)
    _, ref = _run(model, tx, schedule, (1, 1, 1), batch, state=state0)
    assert ref[2]["loss"] < ref[0]["loss"] - 0.05  # the steps do something
    for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
        _, got = _run(model, tx, schedule, shape, batch, state=state0)
        for i in range(3):
            assert abs(got[i]["loss"] - ref[i]["loss"]) < 1e-5, (shape, i, got[i], ref[i])
            assert abs(got[i]["grad_norm"] - ref[i]["grad_norm"]) < 1e-4 * ref[i]["grad_norm"]


def test_gradient_accumulation_equals_big_batch():
    # Plain SGD with lr 1, so that the parameter change *is* the gradient: an adaptive optimizer
    # would turn float noise in near-zero gradients into full-size sign flips.
    model, _, schedule = _setup("gpt")
    tx = optax.sgd(1.0)
    batch = _batch(model)
    state0 = jax.device_get(_run(model, tx, schedule, (2, 1, 1), batch, steps=0)[0])
    big_state, big = _run(model, tx, schedule, (2, 1, 1), batch, steps=1, state=state0)
    acc_state, acc = _run(model, tx, schedule, (2, 1, 1), batch, steps=1, state=state0,
                          microbatches=4)
    np.testing.assert_allclose(acc[0]["loss"], big[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc[0]["grad_norm"], big[0]["grad_norm"], rtol=1e-5)
    assert acc[0]["weight_sum"] == big[0]["weight_sum"] == batch["decoder_loss_weights"].sum()
    for a, b in zip(jax.tree.leaves(acc_state.params), jax.tree.leaves(big_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(big[0]["loss"], big[0]["loss_sum"] / big[0]["weight_sum"],
                               rtol=1e-6)
    assert 0 < big[0]["z_loss_sum"] < 1e-2 * big[0]["loss_sum"]


def test_loss_normalizer_options():
    model, _, _ = _setup("gpt")
    batch = _batch(model)
    np.testing.assert_allclose(train_step._normalizer(model, batch, "tokens"),
                               batch["decoder_loss_weights"].sum(), rtol=1e-6)
    assert float(train_step._normalizer(model, batch, 100.0)) == 100.0  # T5X's constant factor
    assert float(train_step._normalizer(model, batch, "256")) == 256.0
    no_weights = {"decoder_target_tokens": np.array([[5, 6, 0, 0]])}  # pad (0) has no weight
    assert float(train_step._normalizer(model, no_weights, "tokens")) == 2.0


def test_microbatches_must_divide_batch():
    x = jnp.zeros((6, 4))
    with pytest.raises(train_step.TrainStepError, match="not divisible"):
        train_step.split_microbatches(x, 4)
    mbs = train_step.split_microbatches(jnp.arange(6)[:, None], 3)
    np.testing.assert_array_equal(mbs[:, :, 0], [[0, 3], [1, 4], [2, 5]])


def test_bad_loss_normalizer():
    model, tx, schedule = _setup("gpt")
    with pytest.raises(train_step.TrainStepError, match="loss_normalizer"):
        train_step.make_train_step(model, tx, schedule, loss_normalizer="sequences")


# Start-up checks (training.run_checks): a model that cannot train on its data is refused before
# anything is built or written, in one line naming the keys.

def test_rows_longer_than_learned_positions_are_refused_before_training(tmp_path):
    from t5x_lite.training.trainer import TrainingError, train
    cfg = testing.tiny_config("gpt")  # max_len 32
    cfg.data.seq_len = 64  # positions 32..63 would read NaN embeddings, then "diverge"
    with pytest.raises(TrainingError, match=r"^data\.seq_len=64 is longer than model\.max_len="
                                            r"32, the model's learned position table"):
        train(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    cfg.data.seq_len = 32
    run_checks.check_loop_numbers(cfg, TrainingError)  # the table's length exactly: fine


def test_length_check_follows_the_family_and_position():
    from t5x_lite import config as mc
    cfg = testing.tiny_config("gpt")
    cfg.data.seq_len = 64
    cfg.model = mc.gpt2(**{**cfg.model.to_dict(), "position": "rope"}).to_dict()
    run_checks.check_loop_numbers(cfg, ValueError)  # RoPE has no table to run past
    cfg.model = mc.bert(vocab_size=8192, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                        num_layers=1, max_len=32).to_dict()
    cfg.data.objective, cfg.data.inputs_length = "mlm", 48
    with pytest.raises(ValueError, match=r"^data\.inputs_length=48 is longer than "
                                         r"model\.max_len=32"):
        run_checks.check_loop_numbers(cfg, ValueError)


def test_settings_the_model_ignores_and_foreign_objectives_are_refused():
    cfg = testing.tiny_config("gpt")
    cfg.model.position = "relative"  # what a bare ModelConfig(family="gpt") used to hold
    with pytest.raises(ValueError, match="position='relative' is not supported for family 'gpt'"
                                         ".*set that to train on from a checkpoint saved with it"):
        run_checks.check_loop_numbers(cfg, ValueError)
    cfg = testing.tiny_config("gpt")
    cfg.data.objective = "span_corruption"  # used to train a GPT on the targets alone
    with pytest.raises(ValueError, match="data.objective='span_corruption' does not fit "
                                         "model.family='gpt'"):
        run_checks.check_loop_numbers(cfg, ValueError)


def test_estimate_refuses_what_the_trainer_refuses():
    from t5x_lite import estimate
    cfg = testing.tiny_config("gpt")
    cfg.data.seq_len = 64
    with pytest.raises(estimate.EstimateError, match=r"data\.seq_len=64 is longer than"):
        estimate.estimate(cfg, mesh=(1, 1, 1))
