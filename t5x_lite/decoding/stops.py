"""Stop ids: a row ends at the first token that is any of them.

`eos_id` throughout decoding is one stop id or a tuple of them (a Llama 3 Instruct model ends a
turn at any of three); () means none (an HF model that names no stop id runs to
max_new_tokens, as HF does).
"""
from __future__ import annotations

from typing import Union

import jax.numpy as jnp

StopIds = Union[int, tuple[int, ...]]  # one stop id, or several


def stop_id_tuple(eos_id: StopIds) -> tuple[int, ...]:
    """`eos_id` as a tuple of ids (() = none)."""
    return (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)


def is_eos(tokens, eos_id: StopIds):
    """Whether each token is a stop id (`eos_id`: one id or a tuple of them)."""
    out = jnp.zeros(jnp.shape(tokens), jnp.bool_)
    for i in stop_id_tuple(eos_id):
        out = out | (tokens == i)
    return out
