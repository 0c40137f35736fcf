"""Training objectives: tokenized documents / pairs -> seqio/T5X-named int32 features.

Per-example transforms (grain `Map` / `RandomMap` / `FlatMap`), then `pack_or_pad`, then
`AddDecoderInputs`. Features by family:

- encoder-decoder (span_corruption, seq2seq): encoder_input_tokens, decoder_input_tokens,
  decoder_target_tokens, decoder_loss_weights (+ encoder_/decoder_segment_ids and
  encoder_/decoder_positions when packed).
- decoder-only (causal_lm, prefix_lm, prompt_completion): decoder_input_tokens,
  decoder_target_tokens, decoder_loss_weights (+ decoder_segment_ids, decoder_positions when
  packed; + decoder_causal_attention for prefix_lm). prompt_completion: pairs as prompt +
  completion + EOS with causal attention and the loss on completion + EOS only.
- encoder-only (mlm): encoder_input_tokens, encoder_target_tokens, encoder_loss_weights
  (+ encoder_segment_ids, encoder_positions when packed); masked after `pack_or_pad`, per row.

`decoder_input_tokens` is `decoder_target_tokens` shifted right with 0 (the decoder start id)
per segment. Randomness comes from grain's `random_map`: a Philox generator keyed by (seed,
example counter), so a restored iterator continues with exactly the same draws.

Shape legend: L example length (variable before packing).
"""
from __future__ import annotations

import numpy as np
from absl import logging
import grain

from t5x_lite.data import packing
from t5x_lite.data import span_corruption as sc
from t5x_lite.errors import UserError
from t5x_lite.vocab import EOS_ID, UNK_ID, Vocabulary


class ObjectiveError(UserError):
    """An objective and data / lengths / vocabulary that do not go together (one line)."""


OBJECTIVES = ("span_corruption", "causal_lm", "prefix_lm", "mlm", "seq2seq", "prompt_completion")
ENCODER_DECODER = ("span_corruption", "seq2seq")
DECODER_ONLY = ("causal_lm", "prefix_lm", "prompt_completion")
ENCODER_ONLY = ("mlm",)
NEEDS_PAIRS = ("seq2seq", "prompt_completion")
NEEDS_TEXT = ("span_corruption", "causal_lm", "mlm")


class LoggedCounter:
    """Counts a decision and logs it at 1, 10, 100, ... occurrences (per process / worker)."""

    def __init__(self, message: str):
        self.message = message
        self.count = 0

    def add(self, n: int = 1):
        before = self.count
        self.count += n
        if len(str(self.count)) > len(str(before)) or before == 0:
            logging.warning("%s (%d so far in this process)", self.message, self.count)


def _eos_terminated(tokens: np.ndarray, max_length: int) -> np.ndarray:
    """tokens + EOS, truncated to `max_length` (keeping the EOS)."""
    return np.concatenate([tokens[:max_length - 1], [EOS_ID]]).astype(np.int32)


def _eos_terminated_pair(inputs, targets, inputs_length: int, targets_length: int,
                         counter: LoggedCounter) -> tuple[np.ndarray, np.ndarray]:
    """(`_eos_terminated` inputs, targets), the pair counted once if either was cut."""
    if inputs.size >= inputs_length or targets.size >= targets_length:
        counter.add()
    return _eos_terminated(inputs, inputs_length), _eos_terminated(targets, targets_length)


class Tokenize(grain.transforms.Map):
    """{"text": str} -> {"tokens": int32[L]}; {"inputs", "targets": str} -> int32 arrays.

    `<extra_id_N>` in the text is sentinel N while N < extra_ids, plain text beyond.
    """

    def __init__(self, vocab: Vocabulary):
        self._vocab = vocab

    def map(self, example):
        return {"tokens" if k == "text" else k:
                np.asarray(self._vocab.encode(v, strict=False), np.int32)
                for k, v in example.items()}


class TakeTokens(grain.transforms.Map):
    def map(self, example):
        return example["tokens"]


class SplitLongDocuments(grain.experimental.FlatMapTransform):
    """Document tokens + EOS -> consecutive pieces of at most `length` tokens (never dropped)."""

    max_fan_out = 1 << 20

    def __init__(self, length: int):
        self._length = length
        self.counter = LoggedCounter(f"documents longer than {length} tokens were split")

    def flat_map(self, example):
        tokens = np.concatenate([example["tokens"], [EOS_ID]]).astype(np.int32)
        if tokens.size <= self._length:
            return [tokens]
        self.counter.add()
        return [tokens[i:i + self._length] for i in range(0, tokens.size, self._length)]


class AppendEos(grain.transforms.Map):
    def map(self, example):
        return np.concatenate([example["tokens"], [EOS_ID]]).astype(np.int32)


class SpanCorrupt(grain.transforms.RandomMap):
    """Raw chunk -> T5 span-corrupted encoder-decoder example."""

    def __init__(self, vocab: Vocabulary, noise_density: float, mean_noise_span_length: float):
        self._vocab_size = vocab.vocab_size
        self._extra_ids = vocab.extra_ids
        self._density = noise_density
        self._mean_span = mean_noise_span_length

    def random_map(self, chunk_L, rng):
        out = sc.span_corrupt(chunk_L, rng=rng, vocab_size=self._vocab_size,
                              extra_ids=self._extra_ids, noise_density=self._density,
                              mean_noise_span_length=self._mean_span)
        return {"encoder_input_tokens": out["inputs"], "decoder_target_tokens": out["targets"],
                "decoder_loss_weights": np.ones_like(out["targets"])}


class CausalLM(grain.transforms.Map):
    def map(self, piece_L):
        return {"decoder_target_tokens": piece_L, "decoder_loss_weights": np.ones_like(piece_L)}


def _prefix_lm_example(prefix_len: int, tokens_L: np.ndarray):
    """T5X PrefixLM features; causal attention covers BOS + prefix in input alignment."""
    n = tokens_L.size
    causal = np.zeros(n, np.int32)
    causal[:min(prefix_len + 1, n)] = 1
    weights = np.zeros(n, np.int32)
    weights[prefix_len:] = 1
    return {"decoder_target_tokens": tokens_L.astype(np.int32),
            "decoder_loss_weights": weights, "decoder_causal_attention": causal}


class PrefixLMFromText(grain.transforms.RandomMap):
    """Splits each piece at a uniformly random point into prefix (no loss) and suffix."""

    def random_map(self, piece_L, rng):
        n = piece_L.size
        prefix_len = int(rng.integers(1, n)) if n >= 2 else 0
        return _prefix_lm_example(prefix_len, piece_L)


class PrefixLMFromPairs(grain.transforms.Map):
    """(inputs + EOS) as the prefix, (targets + EOS) as the suffix, within `length` tokens."""

    def __init__(self, length: int):
        self._length = length
        self.counter = LoggedCounter(f"prefix_lm pairs longer than {length} tokens were truncated")

    def map(self, example):
        inputs, targets = example["inputs"], example["targets"]
        room_for_targets = self._length - min(inputs.size + 1, self._length // 2)
        room_for_inputs = self._length - min(targets.size + 1, room_for_targets)
        inputs_L, targets_L = _eos_terminated_pair(inputs, targets, room_for_inputs,
                                                   room_for_targets, self.counter)
        return _prefix_lm_example(inputs_L.size, np.concatenate([inputs_L, targets_L]))


class Seq2Seq(grain.transforms.Map):
    """Pairs -> encoder-decoder example with EOS on both sides; over-long sides are truncated."""

    def __init__(self, inputs_length: int, targets_length: int):
        self._lengths = (inputs_length, targets_length)
        self.counter = LoggedCounter(
            f"seq2seq pairs longer than inputs/targets lengths {self._lengths} were truncated")

    def map(self, example):
        inputs_L, targets_L = _eos_terminated_pair(example["inputs"], example["targets"],
                                                   *self._lengths, self.counter)
        return {"encoder_input_tokens": inputs_L,
                "decoder_target_tokens": targets_L,
                "decoder_loss_weights": np.ones_like(targets_L)}


def maskable(tokens_L: np.ndarray, sp_size: int) -> np.ndarray:
    """Where MLM may select a token: ordinary pieces only, never padding, EOS, UNK or a
    sentinel (a literal `<extra_id_N>` in the text reads as [MASK] and is left alone)."""
    return (tokens_L > UNK_ID) & (tokens_L < sp_size)


class HasMaskable(grain.transforms.Filter):
    """Drops the pieces BertMask could not mask (EOS only: the end of a document whose length
    is a multiple of the row length, or an empty one; or only special tokens), so every row
    has a loss weight."""

    def __init__(self, vocab: Vocabulary):
        self._sp_size = vocab.sp_size

    def filter(self, piece_L):
        return bool(np.any(maskable(piece_L, self._sp_size)))


def mlm_predictions(tokens: int, mask_rate: float) -> int:
    """Tokens BertMask predicts in a row of `tokens` maskable ones: round(rate x n), at least
    1. Non-decreasing in n, so a row of length L never has more than mlm_predictions(L) (what
    the MLM loss projects to the vocabulary)."""
    return max(1, int(round(tokens * mask_rate)))


class BertMask(grain.transforms.RandomMap):
    """BERT masking of a whole (packed or padded) row: round(`mask_rate` x its maskable
    tokens), at least 1, are predicted (Google BERT's count per sequence); of those 80% become
    [MASK] (= `<extra_id_0>`), 10% a uniformly random ordinary token, 10% stay unchanged.

    Done per row, not per document piece, so short documents are not over-masked: one token
    of a 3-token document would be 33% of it.
    """

    def __init__(self, vocab: Vocabulary, mask_rate: float):
        self._mask_id = vocab.sentinel_id(0)
        self._sp_size = vocab.sp_size
        self._low, self._high = UNK_ID + 1, vocab.sp_size  # random replacements: ordinary pieces
        self._rate = mask_rate

    def random_map(self, row, rng):
        tokens_L = np.asarray(row["encoder_input_tokens"], np.int32)
        candidates = np.flatnonzero(maskable(tokens_L, self._sp_size))
        inputs_L = tokens_L.copy()
        weights_L = np.zeros_like(tokens_L)
        if candidates.size:
            k = mlm_predictions(candidates.size, self._rate)
            chosen = rng.choice(candidates, size=k, replace=False)
            action = rng.random(k)
            random_ids = rng.integers(self._low, self._high, size=k)
            inputs_L[chosen] = np.where(action < 0.8, self._mask_id,
                                        np.where(action < 0.9, random_ids, tokens_L[chosen]))
            weights_L[chosen] = 1
        return {**row, "encoder_input_tokens": inputs_L, "encoder_target_tokens": tokens_L,
                "encoder_loss_weights": weights_L}


class MlmPiece(grain.transforms.Map):
    def map(self, piece_L):
        return {"encoder_input_tokens": piece_L}


class AddDecoderInputs(grain.transforms.Map):
    """decoder_input_tokens = targets shifted right with 0, per segment when packed."""

    def map(self, row):
        if "decoder_target_tokens" in row:
            row = dict(row)
            row["decoder_input_tokens"] = packing.shift_right_by_segment(
                row["decoder_target_tokens"], row.get("decoder_segment_ids"))
        return row


def row_lengths(objective: str, *, inputs_length: int, targets_length: int,
                seq_len: int) -> dict[str, int]:
    """Row length of every per-example feature that gets packed / padded."""
    if objective in ENCODER_DECODER:
        return {"encoder_input_tokens": inputs_length, "decoder_target_tokens": targets_length,
                "decoder_loss_weights": targets_length}
    if objective in ("causal_lm", "prompt_completion"):
        return {"decoder_target_tokens": seq_len, "decoder_loss_weights": seq_len}
    if objective == "prefix_lm":
        return {"decoder_target_tokens": seq_len, "decoder_loss_weights": seq_len,
                "decoder_causal_attention": seq_len}
    if objective == "mlm":  # the unmasked pieces; BertMask adds targets and weights per row
        return {"encoder_input_tokens": inputs_length}
    raise ObjectiveError(f"unknown objective {objective!r}; known: {OBJECTIVES}")


def row_features(objective: str) -> frozenset[str]:
    """The per-row features `objective` packs or pads: two objectives with the same set make
    batches of one layout (and may be mixed)."""
    return frozenset(row_lengths(objective, inputs_length=2, targets_length=2, seq_len=2))


def apply_objective(ds: grain.IterDataset, objective: str, vocab: Vocabulary, *, kind: str,
                    seed: int, inputs_length: int, targets_length: int, seq_len: int,
                    noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                    mask_rate: float = 0.15, pack: bool = True, pack_method: str = "first_fit",
                    num_packing_bins: int = 32) -> grain.IterDataset:
    """Tokenized examples -> fixed-length feature rows for `objective`.

    Args:
        ds: IterDataset of {"tokens": int32[L]} (kind "text") or {"inputs", "targets"}
            (kind "pairs"), as produced by `Tokenize`.
        seed: seeds the random objectives (combine it with the process index beforehand).
        pack_method: "first_fit" or, for causal_lm only, "concat" (GPT-style full rows).

    Returns:
        IterDataset of rows of int32 [length] arrays with the features in the module doc.
    """
    if objective not in OBJECTIVES:
        raise ObjectiveError(f"unknown objective {objective!r}; known: {OBJECTIVES}")
    if objective in NEEDS_PAIRS and kind != "pairs":
        raise ObjectiveError(f"objective {objective!r} needs inputs/targets pairs, got text "
                             "data")
    if objective in NEEDS_TEXT and kind != "text":
        raise ObjectiveError(f"objective {objective!r} needs text documents, got inputs/targets "
                             "pairs")
    lengths = row_lengths(objective, inputs_length=inputs_length, targets_length=targets_length,
                          seq_len=seq_len)
    if pack_method == "concat":
        if objective != "causal_lm" or not pack:
            raise ObjectiveError("pack_method='concat' is for objective='causal_lm' with "
                                 "pack=True")
        ds = packing.ChunkTokensIterDataset(ds.map(AppendEos()), seq_len)
        return ds.map(packing.ConcatRow(seq_len)).map(AddDecoderInputs())
    if pack_method != "first_fit":
        raise ObjectiveError(f"unknown pack_method {pack_method!r}; use 'first_fit' or 'concat'")

    if objective == "span_corruption":
        raw_length, _ = sc.check_settings(inputs_length, targets_length, noise_density,
                                          mean_noise_span_length, vocab.extra_ids)
        ds = packing.ChunkTokensIterDataset(ds.map(TakeTokens()), raw_length)
        ds = ds.random_map(SpanCorrupt(vocab, noise_density, mean_noise_span_length), seed=seed)
    elif objective == "seq2seq":
        ds = ds.map(Seq2Seq(inputs_length, targets_length))
    elif objective == "prompt_completion":  # GPT fine-tuning; see t5x_lite/finetune_templates.py
        from t5x_lite.finetune_templates import PromptCompletion

        ds = ds.map(PromptCompletion(seq_len))
    elif kind == "pairs":  # prefix_lm on inputs/targets
        ds = ds.map(PrefixLMFromPairs(seq_len))
    else:
        length = inputs_length if objective == "mlm" else seq_len
        ds = grain.experimental.FlatMapIterDataset(ds, SplitLongDocuments(length))
        if objective == "causal_lm":
            ds = ds.map(CausalLM())
        elif objective == "prefix_lm":
            ds = ds.random_map(PrefixLMFromText(), seed=seed)
        else:
            if vocab.extra_ids < 1:
                raise ObjectiveError("mlm uses <extra_id_0> as [MASK]; the vocabulary has "
                                     "extra_ids=0")
            ds = ds.filter(HasMaskable(vocab)).map(MlmPiece())
    ds = packing.pack_or_pad(ds, lengths, pack=pack, num_packing_bins=num_packing_bins)
    if objective == "mlm":
        return ds.random_map(BertMask(vocab, mask_rate), seed=seed)
    return ds.map(AddDecoderInputs())
