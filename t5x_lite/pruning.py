"""Magnitude pruning: unstructured or by attention head / MLP unit, one-shot or on a schedule.

    python -m t5x_lite.train --config=configs/prune_tiny_t5.py --workdir=/tmp/pruned \\
        --config.train.init_from=/tmp/tiny_t5 --config.prune.sparsity=0.5

`prune_optimizer(tx, cfg, axes)` wraps any optax optimizer; its state holds the boolean masks
(so they are in every checkpoint, sharded like their params) and its update makes pruned weights
exactly zero after every step (update = -w there) and keeps their gradients out of the inner
optimizer. Masks are computed from the params at `init` (one-shot: the target sparsity, e.g. of
a checkpoint loaded with train.init_from) and, with the polynomial schedule, again every
`frequency` steps from `begin_step` to `end_step`, at sparsity
    s(t) = s_final + (s_initial - s_final) * (1 - (t - begin) / (end - begin)) ** power
(Zhu & Gupta, 2017); weights pruned earlier stay pruned.

What is pruned (`structure`):
- unstructured: individual weights of the kernels matching `targets` (default: attention and
  MLP kernels; embeddings are left alone), smallest |w| first;
- heads: whole attention heads (the head's slices of query/key/value/out and per-head biases),
  smallest L2 norm of those slices first; under grouped-query attention its query/out slices
  (the shared key/value heads, logical axis kv_heads, are kept);
- mlp_units: whole MLP hidden units (a column of every wi*, a row of wo, the unit's biases).
`scope`: 'global' ranks everything together; 'layer' prunes the same fraction of every kernel
(unstructured) or every attention / MLP block (structured), per layer also in scanned stacks.
Exactly round(s * n) of the n candidates of each ranking are pruned (ties broken by position;
the count is computed on the host, also past 2**24 candidates, where float32 would be off). On
the polynomial schedule inside the update, s(t) is a traced float32: the counts at its initial
and final sparsity are still exact, those of the ramp in between are rounded in float32 (within
about n * 2**-23 of round(s(t) * n) past 2**24 candidates; see `prune_count`).

Shape legend: L layers (scanned stacks only), U units of a ranking (weights, heads or MLP units).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from t5x_lite import checkpoints, compression, selection

STRUCTURES = ("unstructured", "heads", "mlp_units")
SCOPES = ("global", "layer")
SCHEDULES = ("one_shot", "polynomial")
DEFAULT_TARGETS = r"(^|/)(query|key|value|out|wi|wi_\d+|wo)$"


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """The run config's `prune` section."""

    sparsity: float = 0.5  # final fraction of the candidates (weights / heads / units) pruned
    structure: str = "unstructured"
    scope: str = "global"
    schedule: str = "one_shot"
    initial_sparsity: float = 0.0  # polynomial schedule only
    begin_step: int = 0
    end_step: int = 0  # 0 = train.num_steps
    frequency: int = 100
    power: float = 3.0
    targets: str = DEFAULT_TARGETS  # unstructured only

    def __post_init__(self):
        checks = [
            (0.0 <= self.sparsity < 1.0, f"prune.sparsity must be in [0, 1), got {self.sparsity}"),
            (0.0 <= self.initial_sparsity <= self.sparsity,
             "prune.initial_sparsity must be in [0, prune.sparsity]"),
            (self.structure in STRUCTURES, f"prune.structure must be one of {STRUCTURES}"),
            (self.scope in SCOPES, f"prune.scope must be one of {SCOPES}"),
            (self.schedule in SCHEDULES, f"prune.schedule must be one of {SCHEDULES}"),
            (self.frequency > 0, "prune.frequency must be positive"),
            (self.power > 0, f"prune.power must be positive, got {self.power}"),
            (0 <= self.begin_step and (self.end_step == 0 or self.begin_step < self.end_step),
             f"prune.begin_step must be >= 0 and before prune.end_step (0: train.num_steps), "
             f"got begin_step={self.begin_step}, end_step={self.end_step}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise compression.CompressionError(msg)
        compression.check_pattern(self.targets, "prune.targets")

    @classmethod
    def from_dict(cls, d) -> "PruneConfig":
        return compression.section_config(cls, d, "prune")


def sparsity_at(step, cfg: PruneConfig, num_steps: int):
    """Target sparsity after `step` optimizer steps (0 before begin_step; constant for one-shot).

    A Python float for one-shot and for a static (int) step, computed on the host in float64, so
    its pruned counts are exact (`prune_count`); float32 for a traced step. The schedule is
    written s_f (1 - w) + s_i w, w = (1 - frac) ** power, which is s_f and s_i exactly at its
    ends also in float32.
    """
    if cfg.schedule == "one_shot":
        return cfg.sparsity
    end = cfg.end_step or num_steps
    static = isinstance(step, numbers.Integral)
    xp = np if static else jnp
    frac = xp.clip((step - cfg.begin_step) / max(end - cfg.begin_step, 1), 0.0, 1.0)
    w = (1.0 - frac) ** cfg.power
    s = cfg.sparsity * (1.0 - w) + cfg.initial_sparsity * w
    if static:
        return 0.0 if step < cfg.begin_step else float(s)
    return jnp.where(step < cfg.begin_step, 0.0, s).astype(jnp.float32)  # dense before begin


def is_mask_step(step, cfg: PruneConfig, num_steps: int):
    end = cfg.end_step or num_steps
    on_grid = ((step - cfg.begin_step) % cfg.frequency == 0) | (step == end)
    return (cfg.schedule == "polynomial") & (step >= cfg.begin_step) & (step <= end) & on_grid


# --------------------------------------------------------------------------- rankings


class Member(NamedTuple):
    path: str
    unit_dim: int | None  # structured: the head / unit dim; None: every weight is a unit
    scored: bool  # kernels are scored; biases only follow their unit's mask


class Ranking(NamedTuple):
    """Candidates ranked together (per layer when `layered` and scope == 'layer')."""

    members: tuple[Member, ...]
    layered: bool  # leading `layers` dim (scanned stack)


def rankings(axes, cfg: PruneConfig) -> list[Ranking]:
    """The groups of prunable params and how they are scored, from their paths and axes."""
    by_path = compression.axes_by_path(axes)
    out = []
    if cfg.structure == "unstructured":
        found = compression.target_kernels(by_path, cfg.targets, "prune.targets")
        return [Ranking((Member(path, None, True),), names[0] == "layers")
                for path, names in sorted(found.items())]
    unit_axis, module_re, kernel_re = (
        ("heads", r"(self|cross)_attention$", r"^(query|key|value|out)$")
        if cfg.structure == "heads"
        else ("mlp", r"(^|/)mlp$", r"^(wi|wi_\d+|wo)$"))
    modules: dict[str, list[Member]] = {}
    for path, names in sorted(by_path.items()):
        module, _, name = path.rpartition("/")
        if re.search(module_re, module) and unit_axis in names:
            is_kernel = bool(re.match(kernel_re, name))
            if is_kernel or name.endswith("_bias"):
                modules.setdefault(module, []).append(Member(path, names.index(unit_axis),
                                                             is_kernel))
    if not modules:
        raise compression.CompressionError(f"prune.structure={cfg.structure!r}: the model has no "
                                           "such blocks")
    for module, members in sorted(modules.items()):
        names = by_path[members[0].path]
        out.append(Ranking(tuple(members), names[0] == "layers"))
    return out


def _scores(params_flat, ranking: Ranking, layer_dim: bool):
    """Scores: |w| in the kernel's shape (unstructured; no reshape, so they stay sharded like
    the kernel), or the L2 norm of each head's / unit's weights, [L, U] (layered) or [U]."""
    first = ranking.members[0]
    if first.unit_dim is None:
        return jnp.abs(params_flat[first.path].astype(jnp.float32))
    total = 0.0
    for m in ranking.members:
        if m.scored:
            w = params_flat[m.path].astype(jnp.float32)
            keep = {m.unit_dim} | ({0} if layer_dim else set())
            total = total + jnp.sum(jnp.square(w), axis=tuple(d for d in range(w.ndim)
                                                               if d not in keep))
    return jnp.sqrt(total)


def prune_count(sparsity, n: int, anchors=()):
    """How many of `n` candidates `sparsity` prunes: round(sparsity * n), half to even (uint32).

    A Python / numpy number (one-shot pruning, `prune_params`, the schedule at a static step) is
    counted on the host, exactly: float32 (x64 is off) would be off by one or more past 2**24
    candidates (0.7 of 18.9M: 1 short). A traced sparsity (the polynomial schedule inside the
    optimizer update) is float32: where it equals float32(a) for one of the `anchors` (the
    schedule's initial and final sparsity, which it reaches exactly) the count is the host's
    round(a * n); in between it is rounded in float32, exact up to n = 2**24 and within about
    n * 2**-23 of round(s * n) above (a ramp point, itself a float32 value of the schedule).
    """
    if isinstance(sparsity, numbers.Real):
        return jnp.uint32(round(float(sparsity) * n))
    s = jnp.asarray(sparsity, jnp.float32)
    k_f32 = jnp.round(s * float(n))  # float: an int n past 2**31 - 1 overflows int32
    # float32(n) may round up past n (and past 2**32 - 1, which uint32 cannot hold).
    k = jnp.where(k_f32 >= jnp.float32(n), jnp.uint32(n), k_f32.astype(jnp.uint32))
    for a in anchors:
        k = jnp.where(s == jnp.float32(a), jnp.uint32(round(a * n)), k)
    return k


def _prune_smallest(scores, sparsity, anchors=()):
    """Keep masks with exactly round(sparsity * U) False at the smallest scores (see selection;
    the count: `prune_count(sparsity, U, anchors)`).

    `scores` is a list of arrays ranked together as one sequence (their ravelled concatenation,
    U entries in all); ties go in that order, as a stable sort would. No sort, no concatenation:
    a bisection over the scores' order-preserving uint32 keys finds the k-th smallest score (32
    counting passes), a second one over positions finds the last of its ties still to prune
    (log2(U) passes). Each pass is an elementwise compare and a sum, sharded like the scores; the
    keys (4 bytes per score) and a pass's counts (1 byte) are all it holds, where a sort held
    ~4 copies (global pruning, GPT-36M: 348 -> 74 MiB of temporaries, 7.8 -> 0.12 s on CPU).
    """
    n = sum(s.size for s in scores)
    if n >= 2**32:
        raise compression.CompressionError(f"{n} pruning candidates ranked together; at most "
                                           "2**32 - 1 (use prune.scope=layer)")
    keys = [selection.order_keys(s) for s in scores]
    offsets = [sum(s.size for s in scores[:i]) for i in range(len(scores))]

    def count(pred, keys):
        return sum(selection.count(pred(key, i)) for i, key in enumerate(keys))

    def before(i, p, shape):
        """Entries of keys[i] at global positions (offsets[i] + flat index) < p: the index
        compared digit by digit against p's, broadcast from one small iota per dim, so no
        array of positions as large as the keys is built (or hoisted out of the loops)."""
        local = jnp.where(p > offsets[i], p - jnp.uint32(offsets[i]), jnp.uint32(0))
        local = jnp.minimum(local, jnp.uint32(math.prod(shape)))  # past the end: all before
        lt, eq = jnp.bool_(False), jnp.bool_(True)  # index < / == local on the dims so far
        for d, size in enumerate(shape):
            stride = jnp.uint32(math.prod(shape[d + 1:]))
            digit = local // stride if d == 0 else local // stride % jnp.uint32(size)
            idx = jax.lax.broadcasted_iota(jnp.uint32, [size if e == d else 1
                                                        for e in range(len(shape))], d)
            lt, eq = lt | (eq & (idx < digit)), eq & (idx == digit)
        return lt

    def at_least(k, pred):  # the bisection test (count >= k, count)
        def test(x, keys):
            c = count(lambda key, i: pred(key, i, x), keys)
            return c >= k, c
        return test

    k = prune_count(sparsity, n, anchors)
    t, smaller, keys = selection.bisect(at_least(k, lambda key, _, x: key <= x), carry=keys)
    end, _, keys = selection.bisect(  # of the ties at t, those at positions < end are pruned
        at_least(k - smaller, lambda key, i, p: (key == t) & before(i, p, key.shape)),
        hi=n, carry=keys)
    return [(key > t) | ((key == t) & ~before(i, end, key.shape)) for i, key in enumerate(keys)]


def _member_mask(unit_mask, member: Member, shape, layer_dim: bool):
    """Broadcasts a unit mask [L?, U] onto a member param of `shape` (unstructured: the mask)."""
    if member.unit_dim is None:
        return unit_mask
    kept = ((0,) if layer_dim else ()) + (member.unit_dim,)
    expand = [d for d in range(len(shape)) if d not in kept]
    return jnp.broadcast_to(jnp.expand_dims(unit_mask, expand), shape)


def _unit_mask_of(masks_flat, member: Member, layer_dim: bool):
    """The unit mask [L?, U] a member's existing weight mask encodes (inverse of _member_mask)."""
    m = masks_flat[member.path]
    if member.unit_dim is None:
        return m
    kept = ((0,) if layer_dim else ()) + (member.unit_dim,)
    return jnp.all(m, axis=tuple(d for d in range(m.ndim) if d not in kept))


def compute_masks(params, axes, cfg: PruneConfig, sparsity, old_masks=None):
    """Boolean keep-masks {path...: mask} for every prunable param (nested like params).

    Args:
      sparsity: fraction to prune: a Python float (exact counts) or a traced float32 scalar
        (exact at cfg.sparsity and cfg.initial_sparsity, see `prune_count`).
      old_masks: previous masks; what they pruned is ranked first, and stays pruned even
        when `sparsity` is below theirs.
    """
    params_flat = compression.flat(params)
    old_flat = compression.flat(old_masks) if old_masks is not None else None
    groups = rankings(axes, cfg)
    per_layer = cfg.scope == "layer"
    scores = []
    for g in groups:
        s = _scores(params_flat, g, g.layered)  # per layer: leading L when layered
        if old_flat is not None:
            scored = next(m for m in g.members if m.scored)
            s = jnp.where(_unit_mask_of(old_flat, scored, g.layered), s, -1.0)
        scores.append(s)
    anchors = (cfg.sparsity, cfg.initial_sparsity)
    if per_layer:
        one = lambda s: _prune_smallest([s], sparsity, anchors)[0]
        unit_masks = [jax.vmap(one)(s) if g.layered else one(s) for g, s in zip(groups, scores)]
    else:
        unit_masks = _prune_smallest(scores, sparsity, anchors)
    masks = {}
    for g, um in zip(groups, unit_masks):
        if old_flat is not None:  # also when s(t) fell (a resume that moved the schedule's end)
            um = um & _unit_mask_of(old_flat, next(m for m in g.members if m.scored), g.layered)
        for m in g.members:
            masks[m.path] = _member_mask(um, m, params_flat[m.path].shape, g.layered)
    return compression.nested(masks)


def apply_masks(params, masks):
    """`params` (or a grads tree) with the masked-out entries set to zero."""
    flat = compression.flat(params)
    new = {p: jnp.where(m, flat[p], jnp.zeros_like(flat[p]))
           for p, m in compression.flat(masks).items()}
    return compression.replace_leaves(params, new)


def prune_params(params, axes, cfg: PruneConfig, sparsity: float | None = None):
    """One-shot: (pruned params, masks) at `sparsity` (default cfg.sparsity)."""
    s = cfg.sparsity if sparsity is None else sparsity
    masks = jax.jit(lambda p: compute_masks(p, axes, cfg, s))(params)
    return jax.jit(apply_masks)(params, masks), masks


def sparsity_report(params, axes, cfg: PruneConfig) -> dict[str, Any]:
    """Zero fraction of the prunable params, and whole heads / units that are zero."""
    params_flat = compression.flat(params)
    groups = rankings(axes, cfg)
    zeros = total = 0
    units_zero = units = 0
    for g in groups:
        for m in g.members:
            w = params_flat[m.path]
            zeros += int(jnp.sum(w == 0))
            total += w.size
        if g.members[0].unit_dim is not None:
            norms = _scores(params_flat, g, g.layered)
            units_zero += int(jnp.sum(norms == 0))
            units += norms.size
    out = {"sparsity": zeros / total, "prunable_params": total}
    if units:
        out.update(zero_units=units_zero, units=units, unit_sparsity=units_zero / units)
    return out


# --------------------------------------------------------------------------- optimizer


class PruneState(NamedTuple):
    count: jax.Array  # optimizer steps taken
    masks: Any  # bool, nested like the prunable params
    inner: Any


def prune_optimizer(tx: optax.GradientTransformation, cfg: PruneConfig, axes, num_steps: int
                    ) -> optax.GradientTransformation:
    """`tx` with pruning masks in its state, applied after every update (see module docstring)."""
    rankings(axes, cfg)  # fail early on a config that prunes nothing

    def init(params):
        masks = compute_masks(params, axes, cfg, sparsity_at(0, cfg, num_steps))
        return PruneState(jnp.zeros((), jnp.int32), masks, tx.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise compression.CompressionError("pruning needs the params in optimizer.update")
        grads = apply_masks(grads, state.masks)  # pruned weights do not steer the optimizer
        updates, inner = tx.update(grads, state.inner, params)
        count = state.count + 1
        masks = state.masks
        if cfg.schedule == "polynomial":
            new_params = optax.apply_updates(params, updates)
            masks = jax.lax.cond(
                is_mask_step(count, cfg, num_steps),
                lambda: compute_masks(new_params, axes, cfg, sparsity_at(count, cfg, num_steps),
                                      old_masks=state.masks),
                lambda: state.masks)
        p_flat, u_flat = compression.flat(params), compression.flat(updates)
        # w + (-w) == 0 exactly: pruned weights are zero after the step whatever they were.
        new = {p: jnp.where(m, u_flat[p], -p_flat[p]) for p, m in compression.flat(masks).items()}
        return compression.replace_leaves(updates, new), PruneState(count, masks, inner)

    return optax.GradientTransformation(init, update)


def check_resume(cfg: PruneConfig | None, workdir, num_steps: int | None = None) -> None:
    """Refuses to resume `workdir` with other pruning settings than its latest checkpoint was
    trained with (`cfg` None: no `prune` section). The masks live in that checkpoint's
    optimizer state, so a changed sparsity / structure / schedule would silently keep the old
    masks while config.json recorded the new settings; a section added or dropped would fail
    later as an optimizer-state mismatch that does not say why."""
    steps = checkpoints.all_steps(workdir) if workdir is not None else []
    saved = checkpoints.read_checkpoint_config(workdir, steps[-1]) if steps else None
    if saved is None:  # nothing to resume, or a params-only checkpoint (no optimizer state)
        return
    section = saved.get("prune")
    active = isinstance(section, dict) and section.get("enabled", True)
    old = PruneConfig.from_dict(section) if active else None
    if old == cfg:
        before = (saved.get("train") or {}).get("num_steps")
        if (cfg is not None and cfg.schedule == "polynomial" and not cfg.end_step
                and num_steps is not None and before is not None and int(before) != num_steps):
            logging.warning(
                "prune.end_step=0 ends the sparsity schedule at train.num_steps, which changed "
                "(%s -> %d): the ramp to prune.sparsity now ends at step %d; weights pruned so "
                "far stay pruned. Set --config.prune.end_step=%s to keep the old schedule",
                before, num_steps, num_steps, before)
        return
    where = f"{workdir}/{checkpoints.CHECKPOINT_DIR}/{steps[-1]}"
    if old is None or cfg is None:
        what = (f"{where} was trained without pruning" if old is None else
                f"{where} holds pruning masks (prune section {dataclasses.asdict(old)})")
    else:
        what = f"{where} was pruned with other settings (" + "; ".join(
            f"prune.{f.name}: {getattr(old, f.name)!r} -> {getattr(cfg, f.name)!r}"
            for f in dataclasses.fields(PruneConfig)
            if getattr(old, f.name) != getattr(cfg, f.name)) + ")"
    raise compression.CompressionError(
        f"{what}: resume with the saved prune section, or start a new --workdir with "
        f"--config.train.init_from={workdir} (its weights, fresh masks)")


class PruningPlugin(compression.Plugin):
    """Trainer plugin: the model is unchanged; the optimizer prunes."""

    def __init__(self, cfg: PruneConfig, num_steps: int):
        if cfg.schedule == "polynomial" and cfg.begin_step >= num_steps:
            end = (f"prune.end_step={cfg.end_step}" if cfg.end_step
                   else "prune.end_step=0: the end")
            raise compression.CompressionError(
                f"prune.begin_step={cfg.begin_step} is not before train.num_steps={num_steps} "
                f"({end}), so nothing would be pruned")
        self.cfg, self.num_steps = cfg, num_steps

    def wrap(self, model, tx):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0)))["params"]
        axes = compression.logical_axes(boxed)
        return model, prune_optimizer(tx, self.cfg, axes, self.num_steps)
