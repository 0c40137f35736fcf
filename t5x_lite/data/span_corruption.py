"""T5 span corruption in numpy, exactly as `t5.data.preprocessors.span_corruption`.

`random_spans_noise_mask` follows T5's function step by step (including float32 rounding and
round-half-to-even), `span_corrupt` replaces every noise span by one sentinel in the inputs and
every non-noise span by one sentinel in the targets, sentinels counting down from the top of the
vocabulary (`<extra_id_0>` = vocab_size - 1 first), then appends EOS to both. Unlike T5, running
out of sentinels is an error instead of silently reusing ordinary vocabulary ids.

Shape legend: L raw (uncorrupted) tokens, I input tokens, T target tokens.
"""
from __future__ import annotations

import numpy as np

from t5x_lite.errors import UserError
from t5x_lite.vocab import EOS_ID


class SpanCorruptionError(UserError):
    """A span corruption setting that cannot be realised (e.g. too few sentinels)."""


# The most raw tokens one span-corrupted row may be cut from.
MAX_CHUNK_TOKENS = 1 << 24


def random_spans_helper(inputs_length: int = 512, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """Raw tokens per example and target length so corrupted inputs fit `inputs_length`.

    T5's `random_spans_helper` search (one sentinel per span, one EOS each side): the largest
    raw length whose corrupted inputs (with EOS) fit in `inputs_length`. The lengths are
    counted as `span_corrupt` makes them (float32 rounding, at least one noise token and one
    span), not with T5's float64 formula: for some lengths (e.g. 172 at density 0.15: 38
    targets, but the float32 mask makes 40) that formula undercounts, and every example would
    overflow its row. Where the two agree (512, 1024, 2048, ...) the result is T5's.

    Returns:
        (tokens_length, targets_length), e.g. (568, 114) for inputs_length 512.
    """
    if inputs_length < 2:
        raise SpanCorruptionError(f"inputs_length must be >= 2, got {inputs_length}")

    def lengths(tokens_length):
        return _t5_lengths(tokens_length, noise_density, mean_noise_span_length)

    # T5 steps one length at a time; blocks of lengths at once give the same answer without
    # a long Python loop for extreme densities (0.999 with long spans: ~1000x inputs_length).
    start, block = inputs_length, max(inputs_length, 1024)
    while True:
        over = np.flatnonzero(lengths(np.arange(start, start + block))[0] > inputs_length)
        if over.size:
            tokens_length = start + int(over[0]) - 1
            break
        start += block
        if start > MAX_CHUNK_TOKENS:  # a density within float32 rounding of 1, long spans
            raise SpanCorruptionError(
                f"data.noise_density={noise_density} with data.mean_noise_span_length="
                f"{mean_noise_span_length} keeps inputs of {inputs_length} tokens from more "
                f"than {MAX_CHUNK_TOKENS} raw tokens per row; lower the density")
    inputs_out, targets_length = (int(x) for x in lengths(tokens_length))
    # T5's hack: with density 0.5 make targets no longer than the (round) inputs length.
    if noise_density == 0.5 and targets_length > inputs_out:
        tokens_length -= 1
        targets_length = max(targets_length - 1, int(lengths(tokens_length)[1]))
    return tokens_length, targets_length


def check_settings(inputs_length: int, targets_length: int, noise_density: float = 0.15,
                   mean_noise_span_length: float = 3.0,
                   extra_ids: int | None = None) -> tuple[int, int]:
    """Checks that span corruption can fill rows of these lengths, before any data is read.

    Raises:
        SpanCorruptionError: one line naming the `data.*` keys and values when the settings
            are too dense for the chunk length (more noise spans than non-noise tokens to
            separate them), make longer targets than `targets_length`, or need more
            sentinels than `extra_ids` (None: not checked).

    Returns:
        `random_spans_helper(inputs_length, ...)`: (raw tokens per chunk, targets length).
    """
    raw, needed_targets = random_spans_helper(inputs_length, noise_density,
                                              mean_noise_span_length)
    settings = (f"data.noise_density={noise_density} with "
                f"data.mean_noise_span_length={mean_noise_span_length}")
    num_noise = _num_noise_tokens(max(raw, 2), noise_density)
    wanted = _t5_num_spans(raw, noise_density, mean_noise_span_length)
    if raw >= 2 and wanted > raw - num_noise:  # 1 token: no noise (see corrupted_lengths)
        raise SpanCorruptionError(
            f"{settings} is too dense for data.inputs_length={inputs_length}: a {raw}-token "
            f"chunk needs {wanted} noise spans but has only {raw - num_noise} non-noise tokens "
            "to separate them; lower data.noise_density or raise data.mean_noise_span_length")
    if needed_targets > targets_length:
        raise SpanCorruptionError(
            f"span corruption of data.inputs_length={inputs_length} ({settings}) makes targets "
            f"of {needed_targets} tokens but data.targets_length={targets_length}; set "
            f"data.targets_length={needed_targets}")
    spans = num_noise_spans(raw, noise_density, mean_noise_span_length)
    if extra_ids is not None and spans > extra_ids:
        raise SpanCorruptionError(
            f"span corruption of {raw}-token chunks (data.inputs_length={inputs_length}, "
            f"{settings}) needs {spans} sentinels but the vocabulary has extra_ids={extra_ids}; "
            "raise data.extra_ids or lower data.inputs_length")
    return raw, needed_targets


def _num_noise_tokens(length, noise_density: float):
    """T5's noise token count for `length` >= 2 tokens (float32, at least 1, at most length-1);
    `length` may be an array."""
    num_noise = np.round(np.float32(length) * np.float32(noise_density)).astype(np.int64)
    num_noise = np.minimum(np.maximum(num_noise, 1), np.asarray(length) - 1)
    return int(num_noise) if np.ndim(num_noise) == 0 else num_noise


def _t5_num_spans(length, noise_density: float, mean_noise_span_length: float):
    """T5's number of noise spans (`length` >= 2 or an array of such)."""
    num_noise = _num_noise_tokens(np.maximum(length, 2), noise_density)
    spans = np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)).astype(np.int64)
    spans = np.maximum(spans, 1)
    return int(spans) if np.ndim(spans) == 0 else spans


def _t5_lengths(length, noise_density: float, mean_noise_span_length: float):
    """(inputs, targets) with EOS by T5's span count (`length` an int or an array of ints >= 2)."""
    if np.ndim(length) == 0 and length < 2:
        return corrupted_lengths(length)
    num_noise = _num_noise_tokens(length, noise_density)
    spans = _t5_num_spans(length, noise_density, mean_noise_span_length)
    return length - num_noise + spans + 1, num_noise + spans + 1


def corrupted_lengths(length: int, noise_density: float = 0.15,
                      mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(inputs, targets) lengths, EOS included, that `span_corrupt` makes of `length` tokens."""
    if length < 2:  # the mask of one token is non-noise: [tok, EOS] and [<extra_id_0>, EOS]
        return length + 1, 2
    num_noise = _num_noise_tokens(length, noise_density)
    num_spans = num_noise_spans(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def num_noise_spans(length: int, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> int:
    """Number of noise spans (= sentinels used) T5 draws for a sequence of `length` tokens.

    Capped at the non-noise tokens that must separate the spans: T5's count can exceed them
    for a short sequence at a high density (e.g. 3 tokens at 0.5, spans of 1), which only the
    last, short chunk of a finite stream can be (`check_settings` refuses settings whose
    full-length chunks would need the cap).
    """
    length = max(length, 2)
    return min(_t5_num_spans(length, noise_density, mean_noise_span_length),
               length - _num_noise_tokens(length, noise_density))


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
    """Lengths of a uniformly random partition of `num_items` into `num_segments` non-empty runs."""
    first_in_segment = np.zeros(num_items, np.int32)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
    """Boolean noise mask of `length` tokens: alternating non-noise / noise spans, noise last.

    Returns:
        mask_L, True on noise tokens. round(length * density) of them (at least 1, at most
        length - 1), in max(round(num_noise / mean_span), 1) spans (no more than the non-noise
        tokens: see `num_noise_spans`); the mask starts non-noise.
    """
    orig_length = length
    length = max(length, 2)  # as T5: avoid degeneracy for 1-token sequences
    num_noise = _num_noise_tokens(length, noise_density)
    num_spans = num_noise_spans(length, noise_density, mean_noise_span_length)
    num_nonnoise = length - num_noise
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros(length, np.int32)
    span_start_indicator[span_starts] = 1
    is_noise = np.cumsum(span_start_indicator) % 2 == 1
    return is_noise[:orig_length]


def _spans_to_sentinels(tokens_L: np.ndarray, mask_L: np.ndarray, vocab_size: int) -> np.ndarray:
    """Replaces each run of masked tokens by one sentinel, sentinels counting down from the top."""
    prev_masked = np.concatenate([[False], mask_L[:-1]])
    first = mask_L & ~prev_masked
    sentinels = vocab_size - np.cumsum(first)
    out = np.where(first, sentinels, tokens_L)
    return out[~(mask_L & prev_masked)]


def span_corrupt(tokens: np.ndarray, *, seed=None, rng: np.random.Generator | None = None,
                 vocab_size: int, extra_ids: int = 100, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0) -> dict[str, np.ndarray]:
    """T5 span corruption of one raw token sequence (no EOS in it).

    Args:
        tokens: 1-D int array of raw tokens (one chunk of `random_spans_helper` length).
        seed: anything `np.random.default_rng` accepts, e.g. (global_seed, example_index);
            or pass `rng` directly. Same seed -> same corruption.
        vocab_size: sp pieces + extra_ids; `<extra_id_0>` = vocab_size - 1.
        extra_ids: sentinels available; more spans than this raises SpanCorruptionError.

    Returns:
        {"inputs": int32[I], "targets": int32[T]}, both ending in EOS. Merging them (each
        sentinel in inputs replaced by the target tokens following that sentinel) gives back
        `tokens`.
    """
    if rng is None:
        if seed is None:
            raise ValueError("span_corrupt needs a seed or an rng")
        rng = np.random.default_rng(seed)
    tokens_L = np.asarray(tokens, np.int32)
    if tokens_L.ndim != 1 or tokens_L.size == 0:
        raise SpanCorruptionError(f"span_corrupt needs a non-empty 1-D array, got {tokens_L.shape}")
    spans = num_noise_spans(tokens_L.size, noise_density, mean_noise_span_length)
    if spans > extra_ids:
        raise SpanCorruptionError(
            f"{tokens_L.size} tokens need {spans} sentinels but the vocabulary has only "
            f"extra_ids={extra_ids}; use a larger extra_ids or shorter inputs")
    mask_L = random_spans_noise_mask(tokens_L.size, rng, noise_density, mean_noise_span_length)
    eos = np.array([EOS_ID], np.int32)
    inputs_I = _spans_to_sentinels(tokens_L, mask_L, vocab_size).astype(np.int32)
    targets_T = _spans_to_sentinels(tokens_L, ~mask_L, vocab_size).astype(np.int32)
    return {"inputs": np.concatenate([inputs_I, eos]), "targets": np.concatenate([targets_T, eos])}


def merge_inputs_and_targets(inputs: np.ndarray, targets: np.ndarray,
                             sentinel_floor: int) -> np.ndarray:
    """Inverse of `span_corrupt` (for tests and debugging): the original raw tokens.

    Args:
        sentinel_floor: smallest sentinel id (= sp_size); ids >= it are sentinels.
    """
    def strip_eos(x):
        x = np.asarray(x)
        return x[:-1] if x.size and x[-1] == EOS_ID else x

    inputs, targets = strip_eos(inputs), strip_eos(targets)
    # targets = [s0, span0..., s1, span1, ...]: map each sentinel to the span that follows it.
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets.tolist():
        if t >= sentinel_floor:
            current = spans.setdefault(t, [])
        elif current is None:
            raise ValueError("targets must start with a sentinel")
        else:
            current.append(t)
    out: list[int] = []
    for t in inputs.tolist():
        out += spans[t] if t >= sentinel_floor else [t]
    return np.asarray(out, np.int32)
