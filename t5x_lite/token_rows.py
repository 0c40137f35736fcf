"""Rows of token ids given as an argument (`generate(input_ids=)`, `score`, `logits`,
`detokenize`): what counts as one row or several, and one error line for anything else."""
from __future__ import annotations

import jax
import numpy as np


def kind(x) -> str:
    """A value's type for an error message (an array's dtype and shape)."""
    return type(x).__name__ if not isinstance(x, np.ndarray) else f"{x.dtype} array{x.shape}"


def as_list(x, name: str, error: type[Exception] = ValueError) -> list:
    """`x` as a list when it is a sequence (not text, bytes, a dict or a set)."""
    if isinstance(x, (str, bytes, dict, set)) or not hasattr(x, "__iter__"):
        raise error(f"{name} must be a list, got {kind(x)}")
    return list(x)


def is_id(t) -> bool:
    """An integer that is not a bool (a 0-d integer array too: `list(jnp.array([1, 2]))`)."""
    if isinstance(t, (np.ndarray, jax.Array)):
        return t.ndim == 0 and np.issubdtype(t.dtype, np.integer)
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))


def rows(x, name: str = "ids", error: type[Exception] = ValueError,
         text: str = "or text, with a vocabulary") -> list[list[int]]:
    """Python int rows from a 1-D / 2-D int array, a list of ids (one row) or a list of rows
    (each a list of ints or a 1-D int array); `text`: where text goes instead."""
    what = (f"{name}: token ids must be a 1-D or 2-D int array, a list of ints or a list of "
            f"lists of ints ({text})")
    if isinstance(x, (np.ndarray, jax.Array)):
        a = np.asarray(x)
        if a.ndim not in (1, 2) or not np.issubdtype(a.dtype, np.integer):
            raise error(f"{what}; got a {kind(a)}")
        return np.atleast_2d(a).tolist()
    x = as_list(x, name, error)
    if all(is_id(t) for t in x):
        return [[int(t) for t in x]] if x else []
    out = []
    for i, r in enumerate(x):
        r = np.asarray(r) if isinstance(r, jax.Array) else r
        if isinstance(r, np.ndarray) and r.ndim == 1 and np.issubdtype(r.dtype, np.integer):
            out.append(r.tolist())
            continue
        if isinstance(r, (str, bytes, dict, set, np.ndarray)) or not hasattr(r, "__iter__"):
            raise error(f"{what}; got {kind(r)} {r!r:.40} as row {i}")
        r = list(r)
        bad = next((t for t in r if not is_id(t)), None)
        if bad is not None:
            raise error(f"{what}; row {i} holds {kind(bad)} {bad!r:.40}")
        out.append([int(t) for t in r])
    return out
