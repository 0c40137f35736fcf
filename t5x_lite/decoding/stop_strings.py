"""Stop strings: a row ends at the first generated token that completes one of them.

HF `generate(stop_strings=...)`'s rule (`StopStringCriteria`), run in the decode loop. A stop
string matches when it lies in the generated text and overlaps the last token, which may run
past either end of it: "st" + "op", "sto" + "pper" and "las" + "topper" complete "stop", and
"stop" + "at" has stopped at "stop". The row keeps the token that completed it (its `ids` and
`text` hold the stop string, as HF's output does) and is `finished`.

Text is bytes here, each token's as HF's matching reads it (`token_bytes` of `vocab`,
`hf_tokenizer`: a byte-level BPE's raw bytes, a sentencepiece piece with its leading space, a
byte-fallback piece's byte, special tokens spelled as written, so "<|im_end|>" stops at that
token); stop strings are matched as UTF-8.

As in HF, the text read is the whole sequence: a string that begins in a GPT's prompt and
ends in a generated token stops the row there (`after_prompt`); one that lies within the
prompt does not. Differences from HF: a GPT row's left padding is never read as text (HF's is,
so there a short prompt's output could depend on its batch), nor is a T5's decoder start id
(HF reads its text, "<pad>", before the first generated token).

How: for a stop string s of L bytes (1 <= L <= `MAX_BYTES`), a row's state is a bitmask whose
bit p (0 < p < L) says the text so far ends with s[:p]. A token of bytes b then

  completes s  if b contains s, or b starts with s[p:] for a set bit p      FINISH[b] & (state | 1)
  next state   {q : b ends with s[:q]} | {p + len(b) : s[p:p + len(b)] == b, p set}
                                                     START[b] | (state & INSIDE[b]) << len(b)

so a step is one [V, S, 3] table gather and a few integer ops per row. The tables are built
once per (vocabulary, strings, size) on the host.

Shape legend: B rows, S stop strings, V vocab.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MAX_BYTES = 32  # a state is one uint32 (bits 1..L-1)


def fits(text: str) -> bool:
    """Whether `text` is 1 to `MAX_BYTES` bytes of UTF-8 (a lone surrogate counts as one
    replacement character): a stop string the tables can hold."""
    return 0 < len(text.encode("utf-8", "replace")) <= MAX_BYTES


class StopStrings(NamedTuple):
    """The device tables of a decode's stop strings (a pytree: a traced jit argument)."""

    table_VxSx3: jax.Array  # uint32: START, INSIDE, FINISH (bit 0: the token holds s) bitmasks
    shift_V: jax.Array  # uint32: each token's length in bytes, at most 31
    start_RxS: jax.Array | None = None  # each row's state after its prompt (`after_prompt`)


def _masks(tokens: Sequence[bytes | None], s: bytes) -> np.ndarray:
    """[V, 3] uint32: START, INSIDE and FINISH bitmasks of every token for stop string s (an
    empty token keeps a row's state; an id without one, None, ends every partial match)."""
    n_s = len(s)
    out = np.zeros((len(tokens), 3), np.uint32)
    at: dict[int, list[int]] = {}  # byte -> its positions in s
    for i, c in enumerate(s):
        at.setdefault(c, []).append(i)
    empty_inside = sum(1 << p for p in range(1, n_s))  # no text: the state stays
    for t, b in enumerate(tokens):
        if b is None:  # an id without a token: HF's criterion reads one that matches nothing
            continue
        n = len(b)
        if not n:
            out[t, 1] = empty_inside
            continue
        start = inside = finish = 0
        for j in at.get(b[-1], ()):  # b ends with s[:q], q = j + 1
            q = j + 1
            if q < n_s and q <= n and b[n - q:] == s[:q]:
                start |= 1 << q
        for p in at.get(b[0], ()):  # b begins at s[p]
            if p == 0:
                continue
            if p + n < n_s:
                if s[p:p + n] == b:
                    inside |= 1 << p
            elif b[:n_s - p] == s[p:]:
                finish |= 1 << p
        if s in b:
            finish |= 1
        out[t] = start, inside, finish
    return out


@functools.lru_cache(maxsize=8)
def host_tables(tokens: tuple[bytes | None, ...], strings: tuple[str, ...]
                ) -> tuple[np.ndarray, np.ndarray]:
    """([V, S, 3] uint32 masks, [V] uint32 shifts) for `strings` over tokens of these bytes."""
    bad = next((s for s in strings if not fits(s)), None)
    if bad is not None:
        raise ValueError(f"a stop string must be 1 to {MAX_BYTES} bytes of UTF-8, got {bad!r}")
    table = np.stack([_masks(tokens, s.encode("utf-8")) for s in strings], 1)
    shift = np.minimum([len(b or b"") for b in tokens], 31).astype(np.uint32)
    return table, shift


def tables(tokens: Sequence[bytes | None], strings: Sequence[str], size: int) -> StopStrings:
    """The tables for `strings` over a model of `size` ids whose ids have `tokens` as bytes
    (None, and ids past them: no token, which no text matches across, as in HF)."""
    padded = tuple(tokens[:size]) + (None,) * max(0, size - len(tokens))
    table, shift = host_tables(padded, tuple(strings))
    return StopStrings(jnp.asarray(table), jnp.asarray(shift))


def initial_state(stops: StopStrings | None, shape: tuple[int, ...]) -> jax.Array | None:
    """The rows' states before their first generated token, [*shape, S]: after their prompts
    (`after_prompt`; rows in order, prod(shape) of them), else no text matched yet (zeros).
    None without stop strings."""
    if stops is None:
        return None
    s = stops.table_VxSx3.shape[1]
    if stops.start_RxS is not None:
        return stops.start_RxS.reshape(*shape, s)
    return jnp.zeros((*shape, s), jnp.uint32)


def after_prompt(stops: StopStrings | None, tokens_RxP, valid_RxP=None) -> StopStrings | None:
    """`stops` whose rows start from their state after `tokens_RxP` (where `valid_RxP`, default
    all): the text before each row's first generated token. A completion within these tokens
    does not count (HF's criterion only asks whether a sequence ends a stop string)."""
    if stops is None:
        return None
    valid_RxP = jnp.ones(tokens_RxP.shape, jnp.bool_) if valid_RxP is None else valid_RxP

    def read(state_RxS, column):
        tok_R, ok_R = column
        return jnp.where(ok_R[:, None], advance(stops, state_RxS, tok_R)[0], state_RxS), None

    zeros = jnp.zeros((tokens_RxP.shape[0], stops.table_VxSx3.shape[1]), jnp.uint32)
    state, _ = jax.lax.scan(read, zeros, (tokens_RxP.T, valid_RxP.T))
    return stops._replace(start_RxS=state)


def advance(stops: StopStrings | None, state, tok):
    """(next state, whether `tok` completes a stop string) for tokens `tok` [...] appended to
    rows in `state` [..., S]. Without stop strings: (None, all False)."""
    if stops is None:
        return None, jnp.zeros(jnp.shape(tok), jnp.bool_)
    masks = stops.table_VxSx3[tok]  # [..., S, 3]
    start, inside, finish = masks[..., 0], masks[..., 1], masks[..., 2]
    hit = jnp.any((finish & (state | jnp.uint32(1))) != 0, -1)
    return start | jnp.left_shift(state & inside, stops.shift_V[tok][..., None]), hit



def advance_all(stops: StopStrings | None, state_BxS, tokens_BxT):
    """`advance` over T tokens in turn: ([B, T, S] the state after each (None without stop
    strings), [B, T] whether each completes a stop string)."""
    if stops is None:
        return None, jnp.zeros(tokens_BxT.shape, jnp.bool_)
    states, hits = [], []
    for t in range(tokens_BxT.shape[1]):
        state_BxS, hit_B = advance(stops, state_BxS, tokens_BxT[:, t])
        states.append(state_BxS)
        hits.append(hit_B)
    return jnp.stack(states, 1), jnp.stack(hits, 1)
