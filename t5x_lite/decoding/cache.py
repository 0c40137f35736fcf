"""KV-cache tree helpers: row gathers (beam search, repeats), the shared cursor, valid-key counts,
and decode loops over a cache grown in phases.

The 'cache' collection of a decode-mode module holds `cursor/{index [], key_valid [B, L]}` and,
per attention layer, `cached_key` / `cached_value` [B*H, L|S, K] (H the key / value heads: row
b's are entries b*H ... b*H + H - 1; see layers.Attention) -- with a leading layer axis
[N_layers, B*H, ...] under a scanned stack (`.../layers/block/...`). The cursor index is one
scalar for all rows: every row writes the same slot.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from t5x_lite.transformer import in_scanned_stack

Cache = dict


def _keys(path) -> tuple[str, ...]:
    return tuple(getattr(p, "key", getattr(p, "name", None)) for p in path)


def _batch_axis(path, leaf) -> int | None:
    """Which axis of a cache leaf holds rows (None for the scalar cursor index)."""
    if leaf.ndim == 0:
        return None
    return 1 if in_scanned_stack(path) else 0  # scanned stacks stack layers first


def take_rows(cache: Cache, rows_R) -> Cache:
    """The cache of rows `rows_R` (int [R]): reorders beams, or repeats rows (R may exceed B)."""
    b = cache["cursor"]["key_valid"].shape[0] if "cursor" in cache else None

    def take(path, leaf):
        axis = _batch_axis(path, leaf)
        if axis is None:
            return leaf
        per_row = leaf.shape[axis] // b if b else 1  # H for the K/V caches, 1 for the cursor
        entries = (rows_R[:, None] * per_row + jnp.arange(per_row)).reshape(-1)
        return jnp.take(leaf, entries, axis=axis)
    return jax.tree_util.tree_map_with_path(take, cache)


def grow(cache: Cache, length: int) -> Cache:
    """The cache with `length` slots: empty slots appended to every self-attention K/V and to
    the cursor's `key_valid` (invisible: not valid, after the cursor); the cross-attention K/V
    over the encoder stay as they are."""
    def pad(path, leaf):
        keys = _keys(path)
        if keys[-1] == "key_valid":
            axis = 1
        elif keys[-1] in ("cached_key", "cached_value") and "self_attention" in keys:
            axis = leaf.ndim - 2  # [(layers,) B*H, L, K]
        else:
            return leaf
        widths = [(0, 0)] * leaf.ndim
        widths[axis] = (0, length - leaf.shape[axis])
        return jnp.pad(leaf, widths)
    return jax.tree_util.tree_map_with_path(pad, cache)


def get_index(cache: Cache):
    return cache["cursor"]["index"]


def capacity(cache: Cache) -> int:
    """Slots the self-attention caches hold (static)."""
    return cache["cursor"]["key_valid"].shape[1]


def set_index(cache: Cache, index) -> Cache:
    """Moves the shared cursor (a rollback: slots at and after `index` become invisible to later
    queries by slot causality, and are overwritten by the next writes)."""
    cursor = dict(cache["cursor"], index=jnp.asarray(index, jnp.int32))
    return dict(cache, cursor=cursor)


def valid_before_cursor(cache: Cache):
    """Per row, how many real (non-padding) tokens the slots before the cursor hold: int32 [B].

    For a left-padded decoder-only prompt this is the position id of the next token.
    """
    key_valid_BxL = cache["cursor"]["key_valid"]
    before_L = jnp.arange(key_valid_BxL.shape[1]) < get_index(cache)
    return jnp.sum(key_valid_BxL & before_L, axis=1).astype(jnp.int32)


def zeros_like_abstract(abstract_cache) -> Cache:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_cache)


def while_in_phases(going, body, state, grow_to: tuple[int, ...], *, cache_of, grow_caches,
                    writes: int = 1):
    """`lax.while_loop(going, body, state)` over a cache that grows in phases.

    A step's attention reads every slot the cache has, so decoding can start on a short cache:
    the loop runs while a step's `writes` slots still fit (`cache_of(state)`: the cache whose
    cursor and capacity decide), then `grow_caches(state, length)` gives the state's caches
    the next of the `grow_to` lengths, and so on; the last loop runs until `going` is false.
    One loop body per phase to compile; the result is the same as with one cache of the last
    length.
    """
    for length in (*grow_to, None):
        room = None if length is None else capacity(cache_of(state))

        def cond(s, room=room):
            if room is None:
                return going(s)
            return going(s) & (get_index(cache_of(s)) + writes <= room)

        state = jax.lax.while_loop(cond, body, state)
        if length is not None:
            state = grow_caches(state, length)
    return state
