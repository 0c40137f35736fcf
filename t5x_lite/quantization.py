"""INT8 weight-only quantization for inference: per-output-channel symmetric int8 + float scales.

    params_q = quantize_params(params, axes)        # kernels -> Int8Weight(value, scale) boxes
    model.logits(params_q, batch)                   # unchanged model code

An `Int8Weight` is a flax `AxisMetadata` box, the mechanism flax already uses for
`nn.Partitioned`: when a layer reads its parameter, flax calls `unbox()`, which returns
`value.astype(f32) * scale`. That happens inside the jitted function, at the layer that uses the
kernel (inside the decode loop's body, inside a layer scan), so the arrays passed to jit and kept
in device memory are the int8 values; XLA fuses the convert and multiply into the consumer of
the dequantized kernel. No model code knows about quantization.

The scale is max|w| / 127 over each output channel's inputs (`compression.kernel_dims`), so
every weight is represented with error <= scale / 2 (round to nearest), i.e. <= 1/254 of its
channel's largest magnitude; 127 (not 128) keeps the grid symmetric. The token embedding gets one
scale per row (its `attend` output channel is the vocabulary row).

Shape legend: see compression.kernel_dims; scales keep size-1 dims at the input dims.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from t5x_lite import compression

METHODS = ("int8",)
# Projection kernels and the token embedding; norms, biases and position tables stay float
# (they are a rounding error of the size and some, like norm scales, are precision-sensitive).
DEFAULT_PATTERN = (r"(^|/)(query|key|value|out|wi|wi_\d+|wo|lm_head|mlm_dense)$"
                   r"|token_embedder/embedding$")


@flax.struct.dataclass
class Int8Weight(nn.meta.AxisMetadata):
    """A kernel stored as int8 `value` with float32 `scale` (size 1 on the input dims)."""

    value: jax.Array
    scale: jax.Array

    def unbox(self):
        return self.value.astype(self.scale.dtype) * self.scale

    def replace_boxed(self, val):
        raise TypeError("Int8Weight holds quantized inference weights; it cannot be updated")

    # nn.scan slices the leading layer axis of `value` and `scale` itself (they are this box's
    # pytree leaves); the box carries no axis names to update.
    def add_axis(self, index, params):
        return self

    def remove_axis(self, index, params):
        return self

    @property
    def shape(self):
        return self.value.shape


def is_quantized(x) -> bool:
    return isinstance(x, Int8Weight)


def quantize_array(w, input_dims: tuple[int, ...]) -> Int8Weight:
    """Symmetric per-channel int8: reduces |w| over `input_dims` for each output channel."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=input_dims, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)  # an all-zero channel (pruned) stays zero
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return Int8Weight(q, scale)


def check_method(method: str | None) -> str | None:
    """None / '' / 'none' -> None; 'int8' -> 'int8'; anything else raises."""
    if method in (None, "", "none"):
        return None
    if method not in METHODS:
        raise compression.CompressionError(f"quantize must be one of {METHODS} or none, got "
                                           f"{method!r}")
    return method


def _plan(params, axes, pattern: str) -> dict[str, compression.KernelDims]:
    """{path: KernelDims} of the params to quantize (works on abstract trees too)."""
    targets = compression.select(params, pattern)
    if not targets:
        raise compression.CompressionError(f"No parameter matches the quantization pattern "
                                           f"{pattern!r}")
    axes_flat = compression.axes_by_path(axes)
    return {path: compression.kernel_dims(path, axes_flat[path]) for path in targets}


def _scale_sharding(sh: NamedSharding, ndim: int, dims: compression.KernelDims):
    spec = tuple(sh.spec) + (None,) * (ndim - len(sh.spec))
    return NamedSharding(sh.mesh, P(*(None if d in dims.inputs else s
                                      for d, s in enumerate(spec))))


def quantized_shardings(params, axes, shardings, *, pattern: str = DEFAULT_PATTERN):
    """The shardings tree of `quantize_params(params, ...)`: each int8 value keeps its param's
    sharding, each scale the same with its (size-1) input dims unsharded. For jit in_shardings
    of functions that take quantized params."""
    plan = _plan(params, axes, pattern)
    sh_flat, p_flat = compression.flat(shardings), compression.flat(params)
    return compression.replace_leaves(shardings, {
        path: Int8Weight(sh_flat[path], _scale_sharding(sh_flat[path], p_flat[path].ndim, dims))
        for path, dims in plan.items()})


def quantize_params(params, axes, *, pattern: str = DEFAULT_PATTERN, shardings=None):
    """Replaces the kernels matching `pattern` by Int8Weight boxes.

    Args:
      params: float params tree (unboxed).
      axes: tree of logical axis-name tuples (`compression.logical_axes(boxed)`).
      pattern: regex over '/'-joined param paths.
      shardings: optional tree of NamedShardings of `params`; the result is placed per
        `quantized_shardings`.

    Returns:
      The params tree with `Int8Weight` leaves where quantized (same paths).
    """
    plan = _plan(params, axes, pattern)
    targets = {path: x for path, x in compression.flat(params).items() if path in plan}
    out_sh = None
    if shardings is not None:
        q_sh = compression.flat(quantized_shardings(params, axes, shardings, pattern=pattern),
                                is_leaf=is_quantized)
        out_sh = {path: q_sh[path] for path in plan}
    quantize_all = lambda t: {path: quantize_array(w, plan[path].inputs) for path, w in t.items()}
    new = jax.jit(quantize_all, out_shardings=out_sh)(targets)  # one program for all kernels
    return compression.replace_leaves(params, new)


def quantized_bytes(boxed_params, *, pattern: str = DEFAULT_PATTERN) -> int:
    """Bytes `quantize_params` holds for these boxed params, abstract ones too (nothing is
    allocated): int8 kernels, their float32 scales, every other param as it is."""
    axes = compression.logical_axes(boxed_params)
    held = jax.eval_shape(lambda p: quantize_params(p, axes, pattern=pattern),
                          nn.meta.unbox(boxed_params))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(held)))


def unbox_float(tree):
    """`nn.meta.unbox` that keeps Int8Weight boxes: for code that strips nn.Partitioned boxes
    outside jit and must not dequantize there (that would put float weights in memory)."""
    return jax.tree.map(lambda x: x if is_quantized(x) else nn.meta.unbox(x), tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def quantize_loaded(params, boxed, shardings, method: str | None):
    """What `t5x_lite.load(..., quantize=...)` calls: quantizes placed params (or no-op)."""
    if check_method(method) is None:
        return params
    return quantize_params(params, compression.logical_axes(boxed), shardings=shardings)


def shardings_for(boxed, shardings, method: str | None):
    """The shardings of what `quantize_loaded(..., method)` returns, for jit in_shardings."""
    if check_method(method) is None:
        return shardings
    return quantized_shardings(nn.meta.unbox(boxed), compression.logical_axes(boxed), shardings)


def memory_report(params_float, params_q) -> dict[str, Any]:
    """Bytes of the float and the quantized trees (all params, including those kept float)."""
    fb, qb = compression.param_bytes(params_float), compression.param_bytes(params_q)
    n_q = sum(is_quantized(x) for x in jax.tree.leaves(params_q, is_leaf=is_quantized))
    return {"float_bytes": fb, "quantized_bytes": qb, "ratio": qb / fb, "quantized_kernels": n_q}
