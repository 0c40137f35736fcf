"""The train state and its sharded creation.

The state is created directly sharded: `eval_shape` gives shapes, the params' logical axis names
give their shardings, the optimizer state's shardings are derived from the params' (see
`opt_state_shardings`), and one `jit(init, out_shardings=...)` materialises every array on the
devices that own it: nothing is ever gathered onto a single device.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5x_lite import partitioning
from t5x_lite.models import BaseModel


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # float32 tree (unboxed)
    opt_state: Any


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _common_spec(specs: list[tuple], ndim: int) -> P:
    """Per dimension, the mesh axes all candidate specs agree on (else replicated)."""
    out = []
    for d in range(ndim):
        axes = {s[d] if d < len(s) else None for s in specs}
        out.append(axes.pop() if len(axes) == 1 else None)
    return P(*out)


def derive_spec(leaf_shape: tuple[int, ...], param_shape: tuple[int, ...], param_spec: P) -> P:
    """PartitionSpec of an optimizer-state leaf that belongs to a param.

    Same shape -> the param's spec (Adam moments, Adafactor's unfactored v). One dimension fewer
    -> the param's spec with the reduced dimension dropped (Adafactor's factored row/column
    statistics); when several dropped dimensions fit the shape and disagree, only the agreed part
    is kept. Anything else (scalars, Adafactor's (1,) placeholders, the moments of attention
    kernels it factors as [embed, heads*kv] matrices: short vectors) is replicated.
    """
    spec = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
    if tuple(leaf_shape) == tuple(param_shape):
        return P(*spec)
    if len(leaf_shape) == len(param_shape) - 1 and len(leaf_shape) > 0:
        candidates = [spec[:d] + spec[d + 1:] for d in range(len(param_shape))
                      if param_shape[:d] + param_shape[d + 1:] == tuple(leaf_shape)]
        if candidates:
            return _common_spec(candidates, len(leaf_shape))
    return P()


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
    """NamedShardings for any optax state, matched to params by key path.

    Optax states hold trees shaped like the params (possibly nested in named tuples); a state
    leaf belongs to the param whose dict-key path is the longest suffix of the leaf's dict-key
    path. Leaves that belong to no param are replicated.
    """
    by_path = {}
    for (path, p), (_, sh) in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                  jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
        by_path[_dict_keys(path)] = (tuple(p.shape), sh.spec)

    def leaf_sharding(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            if keys[start:] in by_path:
                shape, spec = by_path[keys[start:]]
                return NamedSharding(mesh, derive_spec(tuple(leaf.shape), shape, spec))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def state_shardings(model: BaseModel, tx: optax.GradientTransformation, mesh: Mesh, rules):
    """(abstract TrainState, TrainState of NamedShardings) without allocating anything."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0)))["params"]
    param_sh = partitioning.shardings(boxed, mesh, rules)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = opt_state_shardings(abstract_opt, abstract_params, param_sh, mesh)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=abstract_opt)
    shardings = TrainState(step=partitioning.replicated(mesh), params=param_sh, opt_state=opt_sh)
    return abstract, shardings


def create_train_state(model: BaseModel, tx: optax.GradientTransformation, mesh: Mesh, rules,
                       rng, params=None):
    """A freshly initialised, sharded TrainState (optionally around given, already placed params).

    Returns:
      (state, shardings): the state and a TrainState of its NamedShardings.
    """
    _, shardings = state_shardings(model, tx, mesh, rules)

    def init(rng, params):
        if params is None:
            params = nn.meta.unbox(model.init(rng)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    with partitioning.activate(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)(rng, params)
    return state, shardings
