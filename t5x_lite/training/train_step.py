"""The pure training and evaluation steps, and their jitted, sharded forms.

`train_step(state, batch, rng) -> (state, metrics)` is pure: the dropout key is
`fold_in(rng, state.step)` (and `fold_in(.., microbatch)`), so a resumed run replays the same
randomness. Gradient accumulation splits the batch into `microbatches` interleaved slices and
normalises every slice's loss by the *whole* batch's normaliser, so the accumulated gradient
equals the big-batch gradient. Metrics are device scalars; the loop fetches them only at log
steps.

Shape legend: B global batch, M microbatches, T length.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from t5x_lite import partitioning
from t5x_lite.errors import UserError
from t5x_lite.models import BaseModel
from t5x_lite.training.train_state import TrainState

SUM_KEYS = ("loss_sum", "z_loss_sum", "weight_sum", "correct_sum")


class TrainStepError(UserError):
    """Bad step settings (batch not divisible into microbatches, unknown normaliser)."""


def loss_weights(model: BaseModel, batch) -> jax.Array:
    if model.weight_feature in batch:
        return batch[model.weight_feature].astype(jnp.float32)
    return (batch[model.target_feature] > 0).astype(jnp.float32)


def _normalizer(model: BaseModel, batch, loss_normalizer):
    """'tokens': the batch's total loss weight; a number: that constant (T5X's
    loss_normalizing_factor)."""
    if loss_normalizer == "tokens":
        return jnp.maximum(jnp.sum(loss_weights(model, batch)), 1.0)
    try:
        return jnp.float32(float(loss_normalizer))
    except (TypeError, ValueError):
        raise TrainStepError(f"train.loss_normalizer must be 'tokens' or a number, "
                             f"got {loss_normalizer!r}") from None


def split_microbatches(x_BxT, m: int):
    """[B, ...] -> [M, B/M, ...]; microbatch i holds rows i, i+M, ..., so every device keeps
    contributing rows to every microbatch under a batch-sharded layout."""
    b = x_BxT.shape[0]
    if b % m:
        raise TrainStepError(f"train.batch_size {b} is not divisible by train.microbatches {m}")
    x_bxMx = x_BxT.reshape((b // m, m) + x_BxT.shape[1:])
    return jnp.swapaxes(x_bxMx, 0, 1)


def make_train_step(model: BaseModel, tx: optax.GradientTransformation, schedule: Callable, *,
                    microbatches: int = 1, loss_normalizer: Any = "tokens") -> Callable:
    """Returns the pure `train_step(state, batch, rng) -> (new_state, metrics)`."""
    use_dropout = model.config.dropout_rate > 0
    _normalizer(model, {model.target_feature: jnp.ones((1, 1), jnp.int32)}, loss_normalizer)

    def grads_and_sums(params, batch, rng, normalizer):
        def loss(p):
            return model.loss_fn(p, batch, rng if use_dropout else None, normalizer=normalizer)
        (_, sums), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return grads, sums

    def train_step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        normalizer = _normalizer(model, batch, loss_normalizer)
        if microbatches <= 1:
            grads, sums = grads_and_sums(state.params, batch, rng, normalizer)
        else:
            mbs = jax.tree.map(lambda x: split_microbatches(x, microbatches), batch)

            def body(carry, xs):
                i, mb = xs
                mb = jax.tree.map(lambda x: nn.with_logical_constraint(
                    x, ("batch",) + (None,) * (x.ndim - 1)), mb)
                g, s = grads_and_sums(state.params, mb, jax.random.fold_in(rng, i), normalizer)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params),
                     {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS})
            (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(microbatches), mbs))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": sums["loss_sum"] / normalizer,
            **{k: sums[k] for k in SUM_KEYS},
            "grad_norm": optax.global_norm(grads),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        }
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: BaseModel) -> Callable:
    """Pure `eval_step(params, batch) -> sums` (deterministic, un-normalised sums)."""
    def eval_step(params, batch):
        _, sums = model.loss_fn(params, batch)
        return {k: sums[k] for k in SUM_KEYS}
    return eval_step


def _in_context(fn, mesh: Mesh, rules):
    def call(*args):
        with partitioning.activate(mesh, rules):
            return fn(*args)
    call.jitted = fn
    return call


def jit_train_step(step_fn: Callable, state_shardings: TrainState, mesh: Mesh, rules) -> Callable:
    """Jitted once with in/out shardings; the incoming state's buffers are donated."""
    repl = partitioning.replicated(mesh)
    fn = jax.jit(step_fn, in_shardings=(state_shardings, partitioning.data_sharding(mesh), repl),
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))
    return _in_context(fn, mesh, rules)


def jit_eval_step(eval_fn: Callable, param_shardings, mesh: Mesh, rules) -> Callable:
    fn = jax.jit(eval_fn, in_shardings=(param_shardings, partitioning.data_sharding(mesh)),
                 out_shardings=partitioning.replicated(mesh))
    return _in_context(fn, mesh, rules)
