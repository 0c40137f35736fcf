"""Optimizers and learning-rate schedules from the `optimizer` config section.

- `adafactor` with the T5 defaults: decay_rate 0.8, update clipping 1.0, updates scaled by the
  parameter RMS (both per layer of a scanned stack), no momentum, factored second moments (an
  attention kernel as its [embed, heads * kv] matrix, as T5X factors it), and
  lr = 1/sqrt(max(step, warmup_steps)) (schedule 'rsqrt'; 'constant' uses `learning_rate`).
- `adamw` with linear warmup then cosine / linear decay to `end_lr_fraction * learning_rate`
  (or constant), decoupled weight decay.
Both can chain global-norm gradient clipping in front (`grad_clip`, 0 = off; default, None:
off for adafactor, whose update clipping bounds each step, as in T5X; 1.0 for adamw).

Weight decay skips norm scales/biases and projection biases, and embeddings unless
`weight_decay_embeddings` is set: see `decay_mask`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from t5x_lite.errors import UserError
from t5x_lite.transformer import in_scanned_stack

OPTIMIZERS = ("adafactor", "adamw")
DEFAULT_GRAD_CLIP = {"adafactor": 0.0, "adamw": 1.0}
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


def _adafactor(schedule: Callable, weight_decay: float, mask) -> optax.GradientTransformation:
    """`optax.adafactor` with T5's settings (decay_rate 0.8, update clipping 1.0, updates scaled
    by the parameter RMS, no momentum, factored second moments), its transformations in its
    order (so its state), except that the update clipping and the parameter scale take the
    RMS of each layer of a scanned stack: optax's take it over a whole [layers, ...] leaf, so
    every layer got the stack's RMS and a scanned model trained differently from the same
    model unscanned (T5X treats the layer axis as a batch axis too).

    Weight decay (`weight_decay` x param, masked) is added after the lr scaling, as in optax and
    T5X: it is not multiplied by the learning rate, unlike AdamW's."""
    parts = [_on_matrix_views(optax.scale_by_factored_rms(
                 factored=True, decay_rate=0.8, min_dim_size_to_factor=_MIN_DIM_TO_FACTOR)),
             _per_block(lambda u, rms: u / jnp.maximum(1.0, rms), of_params=False),  # clip at 1
             optax.scale_by_learning_rate(schedule, flip_sign=False),
             _per_block(lambda u, rms: u * jnp.maximum(rms, 1e-3), of_params=True)]
    if weight_decay:  # left out of the chain (and its state) when unused, as optax does
        parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
    parts.append(optax.scale(-1.0))
    return optax.chain(*parts)


# Attention kernels: [(layers,) embed, heads, kv] (query / key / value) and [(layers,) heads, kv,
# embed] (out). T5X factors them as the [embed, heads * kv] matrices they are (its factor rules:
# embed a row, heads and kv columns; mesh-tf T5 stores them 2-D); optax factors a leaf's two
# largest dims only when both are >= 128, which heads or kv never is, so it kept a full second
# moment for every attention weight.
_HEADS_KV_LAST, _HEADS_KV_FIRST = ("query", "key", "value"), ("out",)


def matrix_view(path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape Adafactor factors a param as: attention kernels with heads and kv merged,
    other params as they are (a leading layers axis stays a batch axis)."""
    name = _leaf_name(path)
    if name in _HEADS_KV_LAST and len(shape) >= 3:
        return (*shape[:-2], shape[-2] * shape[-1])
    if name in _HEADS_KV_FIRST and len(shape) >= 3:
        return (*shape[:-3], shape[-3] * shape[-2], shape[-1])
    return tuple(shape)


_MIN_DIM_TO_FACTOR = 128


def factored_across_layers(params) -> list[str]:
    """The scanned params whose layer axis optax's factoring takes as one of its two dims (it
    factors a leaf's two largest dims when the smaller is >= 128: with 128 or more layers, a
    [layers, d] norm scale, which unscanned is never factored). Their Adafactor updates
    differ from the same model's unscanned (by up to 2x per layer, measured)."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        shape = matrix_view(path, x.shape)
        if in_scanned_stack(path) and len(shape) >= 2:
            two = np.argsort(shape)[-2:]  # optax's choice, its own argsort
            if shape[two[0]] >= _MIN_DIM_TO_FACTOR and 0 in two:
                out.append(jax.tree_util.keystr(path))
    return out


def _on_matrix_views(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to the params' `matrix_view`s, its updates reshaped back."""
    def views(tree):
        return jax.tree_util.tree_map_with_path(lambda p, x: x.reshape(matrix_view(p, x.shape)),
                                                tree)

    def init(params):
        across = factored_across_layers(params)
        if across:
            logging.warning("Adafactor factors the second moments of %d scanned params across "
                            "the layer axis (%s, ...), unlike the same model unscanned; for a "
                            "new run set model.scan_layers=False (or use adamw)", len(across),
                            across[0])
        return inner.init(views(params))

    def update(updates, state, params=None):
        new, state = inner.update(views(updates), state, None if params is None else views(params))
        return jax.tree.map(lambda n, u: n.reshape(u.shape), new, updates), state

    return optax.GradientTransformation(init, update)


def _per_block(fn: Callable, of_params: bool) -> optax.GradientTransformation:
    """A stateless transformation u -> fn(u, rms) with the RMS of the update (or, `of_params`,
    of the param) over each block: a whole param, or one layer of a scanned stack
    (`transformer.in_scanned_stack`, its leading axis the layers)."""
    def one(path, u, p):
        x = p if of_params else u
        axes = tuple(range(1, x.ndim)) if in_scanned_stack(path) and x.ndim > 1 else None
        return fn(u, jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=axes is not None)))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("Adafactor's block RMS scaling needs the params")
        return jax.tree_util.tree_map_with_path(one, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


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


def grad_clip(opt: ml_collections.ConfigDict) -> float:
    """The global-norm clipping threshold: `grad_clip`, or when it is None (unset) the
    optimizer's default (`DEFAULT_GRAD_CLIP`)."""
    value = opt.get("grad_clip")
    return DEFAULT_GRAD_CLIP.get(opt.name, 0.0) if value is None else float(value)


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
    horizon = int(opt.decay_steps) or int(num_steps)
    if opt.schedule in ("cosine", "linear") and 0 < horizon <= int(opt.warmup_steps):
        logging.warning("optimizer.warmup_steps=%d reaches the %s decay's end (step %d, "
                        "optimizer.decay_steps or train.num_steps): the learning rate only "
                        "warms up%s; lower warmup_steps for a decay", int(opt.warmup_steps),
                        opt.schedule, horizon,
                        "" if horizon >= int(num_steps) else ", then drops to its end value")
    decay_embeddings = bool(opt.get("weight_decay_embeddings", False))
    mask = lambda params: decay_mask(params, decay_embeddings)
    wd = float(opt.weight_decay)
    if opt.name == "adafactor":
        core = _adafactor(schedule, wd, mask)
    else:
        core = optax.adamw(learning_rate=schedule, b1=float(opt.b1), b2=float(opt.b2),
                           eps=float(opt.eps), weight_decay=wd, mask=mask)
    clip = grad_clip(opt)
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    return optax.chain(*parts, core), schedule
