"""The matrix products of a decode step on XLA:CPU, by weight dtype and rows per step. Run by hand.

    python benchmarks/cpu_products.py                      # rows 1 and 16, every weight form
    python benchmarks/cpu_products.py --rows=16 --forms=f32
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/cpu_products.py --rows=16

A decode step is a chain of [rows, d] x [d, f] products whose kernels are read once per step.
This times --layers pairs of [rows, 512] x [512, 2048] and [rows, 2048] x [2048, 512] products
(an MLP without biases; 4 MiB of float32 kernel each), chained so that no product can start
before the previous one ends, inside one jitted fori_loop of --loops iterations; best of
--repeats runs. The kernels (96 MiB at 12 layers) exceed the caches, so each product streams
its kernel from memory, as in decoding.

Weight forms:
  f32        float32 kernels (what decoding uses).
  bf16       bfloat16 kernels converted to float32 in the jitted function.
  bf16dot    bfloat16 activations x bfloat16 kernels, float32 accumulation.
  int8       int8 kernels with one float32 scale per output column, dequantized in the
             jitted function (what --quantize=int8 does).
  int8dot    int8 x int8 -> int32 on activations quantized per row, then both scales.

Columns: us per product, the kernel bytes of that form per second, and GFLOP/s.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_ROWS = flags.DEFINE_list("rows", ["1", "16"], "Rows per product (the decode batch).")
_FORMS = flags.DEFINE_list("forms", ["f32", "bf16", "bf16dot", "int8", "int8dot"], "Weight forms.")
_LAYERS = flags.DEFINE_integer("layers", 12, "Product pairs per loop iteration.")
_LOOPS = flags.DEFINE_integer("loops", 10, "fori_loop iterations per run.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed runs (best is reported).")

D, F = 512, 2048
_BYTES = {"f32": 4, "bf16": 2, "int8": 1}


def _quantize(w):
    scale = np.abs(w).max(0) / 127.0
    return jnp.asarray(np.round(w / scale).astype(np.int8)), jnp.asarray(scale, jnp.float32)


def _product(x, w, form):
    if form == "f32":
        return x @ w
    if form == "bf16":
        return x @ w.astype(jnp.float32)
    if form == "bf16dot":
        return jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
    value, scale = w
    if form == "int8":
        return (x @ value.astype(jnp.float32)) * scale
    x_scale = jnp.maximum(jnp.max(jnp.abs(x), -1, keepdims=True), 1e-30) / 127.0
    xq = jnp.round(x / x_scale).astype(jnp.int8)
    acc = jnp.dot(xq, value, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * x_scale * scale


def _storage(form):
    return form.replace("dot", "")


def _weights(storage, rng):
    out = []
    for _ in range(_LAYERS.value):
        pair = (rng.standard_normal((D, F), dtype=np.float32) / np.sqrt(D),
                rng.standard_normal((F, D), dtype=np.float32) / np.sqrt(F))
        if storage == "f32":
            out.append(tuple(jnp.asarray(w) for w in pair))
        elif storage == "bf16":
            out.append(tuple(jnp.asarray(w, jnp.bfloat16) for w in pair))
        else:
            out.append(tuple(_quantize(w) for w in pair))
    return out


def _time(form, weights, x):
    def run(weights, x):
        def body(_, x):
            for w_in, w_out in weights:
                x = (x + _product(jax.nn.gelu(_product(x, w_in, form)), w_out, form)) * 0.5
            return x
        return jax.lax.fori_loop(0, _LOOPS.value, body, x)

    fn = jax.jit(run)
    jax.block_until_ready(fn(weights, x))
    best = float("inf")
    for _ in range(_REPEATS.value):
        t = time.perf_counter()
        jax.block_until_ready(fn(weights, x))
        best = min(best, time.perf_counter() - t)
    return best / (_LOOPS.value * _LAYERS.value * 2)


def main(argv):
    del argv
    unknown = set(_FORMS.value) - {"f32", "bf16", "bf16dot", "int8", "int8dot"}
    if unknown:
        raise app.UsageError(f"unknown --forms {sorted(unknown)}")
    rng = np.random.default_rng(0)
    weights = {s: _weights(s, rng) for s in {_storage(f) for f in _FORMS.value}}
    print(f"devices: {jax.devices()}; products [rows, {D}] x [{D}, {F}] and back, "
          f"{_LAYERS.value * 2 * _LOOPS.value} per run, best of {_REPEATS.value}\n")
    print("| rows | form | us / product | kernel GB/s | GFLOP/s |")
    print("|---|---|---|---|---|")
    for rows in (int(r) for r in _ROWS.value):
        x = jnp.asarray(rng.standard_normal((rows, D), dtype=np.float32))
        for form in _FORMS.value:
            t = _time(form, weights[_storage(form)], x)
            gbs = D * F * _BYTES[_storage(form)] / t / 1e9
            print(f"| {rows} | {form} | {t * 1e6:.1f} | {gbs:.1f} | {2 * rows * D * F / t / 1e9:.1f} |",
                  flush=True)


if __name__ == "__main__":
    app.run(main)
