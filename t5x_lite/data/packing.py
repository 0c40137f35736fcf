"""Chunking, packing and padding of variable-length examples into fixed-length rows.

- `ChunkTokensIterDataset`: concatenates token arrays (documents) and cuts the stream into
  chunks of exactly `chunk_length` tokens (the last one of a finite stream may be shorter).
  T5's `reduce_concat_tokens` + `split_tokens`, resumable from a small JSON state.
- `pack_or_pad`: `pack=True` packs examples first-fit into rows (grain's
  `FirstFitPackIterDataset`; state = parent state + row index, so resume is exact) and adds
  `*_segment_ids` (1-based, 0 = padding) and `*_positions` (0 at each segment start);
  `pack=False` pads each example to the row length.
- `ConcatRow`: GPT-style rows from `ChunkTokensIterDataset` chunks of the EOS-separated
  document stream: one segment per row (attention crosses documents), no padding but the last.
- `shift_right_by_segment`: decoder inputs = targets shifted right with 0 per segment.
- `stack_and_pad_batch`: batches rows and pads a short final batch with all-zero rows.

Shape legend: B batch, L row length.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

# Which packed feature provides each side's segment ids / positions.
SEGMENT_SOURCES = {
    "encoder_input_tokens": "encoder",
    "decoder_target_tokens": "decoder",
}


class _ChunkTokensIterator(grain.DatasetIterator):
    """See ChunkTokensIterDataset. State: parent state before the current document + offset."""

    def __init__(self, parent: grain.DatasetIterator, chunk_length: int):
        super().__init__(parent)
        self._chunk_length = chunk_length
        self._doc = None  # current document's tokens, consumed up to self._offset
        self._doc_parent_state = None
        self._offset = 0

    def __next__(self) -> np.ndarray:
        pieces = []
        need = self._chunk_length
        while need > 0:
            if self._doc is None:
                self._doc_parent_state = self._parent.get_state()
                try:
                    self._doc = np.asarray(next(self._parent), np.int32)
                except StopIteration:
                    self._doc = None
                    break
                self._offset = 0
            piece = self._doc[self._offset:self._offset + need]
            pieces.append(piece)
            self._offset += piece.size
            need -= piece.size
            if self._offset >= self._doc.size:
                self._doc = None
        if need == self._chunk_length:
            raise StopIteration
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0}
        return {"parent": self._doc_parent_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]):
        self._parent.set_state(state["parent"])
        self._doc = None
        self._offset = 0
        if state["offset"]:
            self._doc_parent_state = state["parent"]
            self._doc = np.asarray(next(self._parent), np.int32)
            self._offset = state["offset"]


class ChunkTokensIterDataset(grain.IterDataset):
    """Concatenates 1-D token arrays and yields consecutive `chunk_length` chunks."""

    def __init__(self, parent: grain.IterDataset, chunk_length: int):
        super().__init__(parent)
        if chunk_length < 1:
            raise ValueError(f"chunk_length must be >= 1, got {chunk_length}")
        self._chunk_length = chunk_length

    def __iter__(self) -> _ChunkTokensIterator:
        return _ChunkTokensIterator(self._parent.__iter__(), self._chunk_length)


def shift_right_by_segment(targets_L: np.ndarray, segment_ids_L: np.ndarray | None = None
                           ) -> np.ndarray:
    """Autoregressive inputs: targets shifted right by one, 0 at the start of every segment.

    As T5X's `make_autoregressive_inputs`: with segment ids, a position whose left neighbour
    belongs to another segment (or is padding) gets 0 (the decoder start id).
    """
    inputs_L = np.zeros_like(targets_L)
    inputs_L[..., 1:] = targets_L[..., :-1]
    if segment_ids_L is not None:
        same = np.zeros(segment_ids_L.shape, bool)
        same[..., 1:] = segment_ids_L[..., 1:] == segment_ids_L[..., :-1]
        inputs_L = np.where(same, inputs_L, 0)
    return inputs_L


def _pad_to(x: np.ndarray, length: int) -> np.ndarray:
    if x.shape[0] > length:
        raise ValueError(f"example of length {x.shape[0]} exceeds row length {length}")
    return np.pad(x, (0, length - x.shape[0]))


class PadExample(grain.transforms.Map):
    """Pads every feature to its length in `lengths` with zeros (`pack=False`)."""

    def __init__(self, lengths: Mapping[str, int]):
        self._lengths = dict(lengths)

    def map(self, example):
        return {k: _pad_to(np.asarray(v, np.int32), self._lengths[k]).astype(np.int32)
                for k, v in example.items()}


class RenamePacked(grain.transforms.Map):
    """Keeps one segment-ids/positions pair per side, named as T5X expects; casts to int32.

    `encoder_input_tokens_segment_ids` -> `encoder_segment_ids`, and the same for positions
    and the decoder side; the duplicate pairs of the other features are dropped.
    """

    def __init__(self, features: Sequence[str]):
        self._features = tuple(features)

    def map(self, row):
        out = {k: np.asarray(row[k], np.int32) for k in self._features}
        for source, side in SEGMENT_SOURCES.items():
            if source in self._features:
                out[f"{side}_segment_ids"] = np.asarray(row[f"{source}_segment_ids"], np.int32)
                out[f"{side}_positions"] = np.asarray(row[f"{source}_positions"], np.int32)
        return out


class ConcatRow(grain.transforms.Map):
    """A token chunk -> one decoder-only row that is a single segment (GPT-style packing)."""

    def __init__(self, length: int):
        self._length = length

    def map(self, chunk_L):
        n = chunk_L.shape[0]
        return {
            "decoder_target_tokens": _pad_to(chunk_L.astype(np.int32), self._length),
            "decoder_loss_weights": _pad_to(np.ones(n, np.int32), self._length),
            "decoder_segment_ids": _pad_to(np.ones(n, np.int32), self._length),
            "decoder_positions": _pad_to(np.arange(n, dtype=np.int32), self._length),
        }


def pack_or_pad(ds: grain.IterDataset, lengths: Mapping[str, int], *, pack: bool,
                num_packing_bins: int = 32) -> grain.IterDataset:
    """Turns variable-length examples into fixed-length int32 rows.

    Args:
        ds: examples, dicts of 1-D int arrays no longer than `lengths`.
        lengths: row length per feature, e.g. {"encoder_input_tokens": 512,
            "decoder_target_tokens": 114, "decoder_loss_weights": 114}.
        pack: first-fit pack several examples per row (adds `encoder_/decoder_segment_ids`
            and `_positions`) or pad each example to its own row.
        num_packing_bins: rows filled at once by first-fit; more bins waste less padding.

    Returns:
        An IterDataset of rows (dicts of int32 [L] arrays).
    """
    if not pack:
        return ds.map(PadExample(lengths))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=dict(lengths), num_packing_bins=num_packing_bins, shuffle_bins=False)
    return ds.map(RenamePacked(list(lengths)))


def stack_and_pad_batch(batch_size: int):
    """A grain `batch_fn`: stacks rows and pads a short (final) batch with all-zero rows.

    All-zero rows have zero loss weights and zero segment ids, so they add nothing to losses
    or metrics; a real row always has a nonzero loss weight.
    """
    def batch_fn(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        out = {}
        for k in rows[0]:
            x_BxL = np.stack([r[k] for r in rows])
            if x_BxL.shape[0] < batch_size:
                pad = [(0, batch_size - x_BxL.shape[0])] + [(0, 0)] * (x_BxL.ndim - 1)
                x_BxL = np.pad(x_BxL, pad)
            out[k] = x_BxL
        return out

    return batch_fn
