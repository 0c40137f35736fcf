"""Argmax over the last axis (the vocabulary), exactly `jnp.argmax`, in one vectorised pass.

XLA:CPU lowers `jnp.argmax` to a variadic (value, index) reduction that it does not vectorise:
~250 ms for the [4096, 32128] logits of a GPT-36M training step (accuracy), ~1 ms per batch-16
decode step, against ~21 ms / ~0.06 ms for a plain max over the same array (2-core Xeon, AVX-512).
`argmax` below takes the max of each chunk of `CHUNK` entries (a plain max, vectorised), the first
chunk holding the row max (a small argmax over V / CHUNK entries), then the first position of the
max inside that chunk (an argmax over CHUNK entries): ~11x faster there, same result.

Same semantics as `jnp.argmax`, ties and NaNs included: the first chunk whose max equals the row
max holds the first index of that max, and NaN propagates through max the way argmax ranks it
(a NaN is the max; the first NaN wins).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 128


def argmax(x):
    """Index of the first maximum along the last axis, int32 (as `jnp.argmax(x, -1)`)."""
    v = x.shape[-1]
    if v <= 2 * CHUNK:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    pad = -v % CHUNK
    if pad:  # -inf never beats a real entry (an all -inf row still gives index 0, as argmax)
        fill = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=fill)
    chunks = x.reshape(*x.shape[:-1], -1, CHUNK)
    first_chunk = jnp.argmax(jnp.max(chunks, axis=-1), axis=-1)
    inside = jnp.take_along_axis(chunks, first_chunk[..., None, None], axis=-2)[..., 0, :]
    return (first_chunk * CHUNK + jnp.argmax(inside, axis=-1)).astype(jnp.int32)
