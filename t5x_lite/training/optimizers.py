"""Optimizers and learning-rate schedules from the `optimizer` config section.

- `adafactor` with the T5 defaults: decay_rate 0.8, update clipping 1.0, updates scaled by the
  parameter RMS, no momentum, factored second moments, and lr = 1/sqrt(max(step, warmup_steps))
  (schedule 'rsqrt'; 'constant' uses `learning_rate`).
- `adamw` with linear warmup then cosine / linear decay to `end_lr_fraction * learning_rate`
  (or constant), decoupled weight decay.
Both chain global-norm gradient clipping (`grad_clip`, 0 = off) in front.

Weight decay skips norm scales/biases and projection biases, and embeddings unless
`weight_decay_embeddings` is set: see `decay_mask`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from t5x_lite.errors import UserError

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("rsqrt", "constant", "cosine", "linear")
EMBEDDING_NAMES = ("embedding", "rel_embedding")


class OptimizerError(UserError):
    """An optimizer config that cannot be built."""


def make_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> Callable:
    """Learning rate as a function of the optimizer step count (0-based)."""
    warmup = int(opt.warmup_steps)
    lr = float(opt.learning_rate)
    if opt.schedule == "rsqrt":
        # T5: 1/sqrt(max(step, warmup)); constant 1/sqrt(warmup) during warmup.
        return lambda count: jax.lax.rsqrt(jnp.maximum(count, max(warmup, 1)).astype(jnp.float32))
    if opt.schedule == "constant":
        return optax.constant_schedule(lr)
    if opt.schedule not in ("cosine", "linear"):
        raise OptimizerError(f"optimizer.schedule must be one of {SCHEDULES}, got {opt.schedule!r}")
    decay_steps = int(opt.decay_steps) or int(num_steps)
    end = lr * float(opt.end_lr_fraction)
    warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
    remaining = max(decay_steps - warmup, 1)
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, remaining, alpha=float(opt.end_lr_fraction))
    else:
        decay = optax.linear_schedule(lr, end, remaining)
    return optax.join_schedules([warm, decay], [warmup])


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def decay_mask(params, decay_embeddings: bool = False):
    """True for params that get weight decay: matrices, not norms, biases or (by default) embeddings.

    Decided by name rather than rank so scanned stacks (with a leading layer axis) behave alike.
    """
    def decays(path, _):
        name = _leaf_name(path)
        if name in ("scale", "bias") or name.endswith("_bias"):
            return False
        if name in EMBEDDING_NAMES:
            return decay_embeddings
        return True
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable]:
    """Returns (optax transformation, schedule: count -> lr) for the `optimizer` config section."""
    if opt.name not in OPTIMIZERS:
        raise OptimizerError(f"optimizer.name must be one of {OPTIMIZERS}, got {opt.name!r}")
    if opt.name == "adamw" and opt.schedule == "rsqrt":
        raise OptimizerError("optimizer.schedule='rsqrt' is the Adafactor schedule; use cosine, "
                             "linear or constant with adamw")
    schedule = make_schedule(opt, num_steps)
    if opt.schedule == "constant" and int(opt.warmup_steps) > 0:
        logging.warning("optimizer.warmup_steps=%d is unused: schedule='constant' uses "
                        "learning_rate from step 0 (cosine or linear warm up)",
                        int(opt.warmup_steps))
    decay_embeddings = bool(opt.get("weight_decay_embeddings", False))
    mask = lambda params: decay_mask(params, decay_embeddings)
    wd = float(opt.weight_decay)
    if opt.name == "adafactor":
        # optax's Adafactor weight decay is multiplied by the lr like T5X's decay_rate (not
        # decoupled); None keeps the mask out of the state entirely when unused.
        core = optax.adafactor(
            learning_rate=schedule, decay_rate=0.8, clipping_threshold=1.0,
            multiply_by_parameter_scale=True, momentum=None, factored=True,
            min_dim_size_to_factor=128, weight_decay_rate=wd or None,
            weight_decay_mask=mask if wd else None)
    else:
        core = optax.adamw(learning_rate=schedule, b1=float(opt.b1), b2=float(opt.b2),
                           eps=float(opt.eps), weight_decay=wd, mask=mask)
    parts = []
    if float(opt.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip)))
    parts.append(core)
    return optax.chain(*parts), schedule
