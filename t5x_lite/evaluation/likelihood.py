"""Log-likelihood of many (prompt, continuation) pairs in fixed-shape batches.

`LoadedModel.score` compiles once per input shape, which for thousands of ragged multiple-choice
rows means many compilations. Here rows are sorted by length and packed into batches of a fixed
row count and power-of-two lengths, so a whole evaluation compiles a handful of shapes. The
numbers are those of `LoadedModel.score` (the tests check it):

- T5: sum of log p(continuation + EOS | prompt + EOS), the decoder fed the targets shifted right
  (EOS: the model's, `LoadedModel.eos_id`; 1 for T5).
- GPT: sum of log p(continuation | prompt) over the continuation tokens (no EOS); the prompt
  needs at least one token (callers prepend the decoder start id for t5x_lite models). A GPT
  trained with objective prefix_lm (`api.is_prefix_lm`) attends bidirectionally over the
  prompt (its prefix, `decoder_causal_attention`), as trained and as `LoadedModel.score` does.

Shape legend: B rows, S encoder length, T decoder length.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from t5x_lite import distributed, partitioning
from t5x_lite.api import is_prefix_lm, prefix_flags
from t5x_lite.config import ModelConfig
from t5x_lite.errors import UserError
from t5x_lite.models import LossConfig, build_model
from t5x_lite.vocab import EOS_ID  # models without `eos_id`

MIN_LENGTH = 8


class LikelihoodError(UserError):
    """Rows that cannot be scored (one line)."""


def bucket(n: int) -> int:
    return max(MIN_LENGTH, 1 << (max(n, 1) - 1).bit_length())


@functools.lru_cache(maxsize=8)
def _score_fn(cfg: ModelConfig):
    return jax.jit(build_model(cfg, LossConfig(0.0, 0.0)).score_batch)


def _gpt_rows(prompt: Sequence[int], cont: Sequence[int], t: int):
    seq = list(prompt) + list(cont)
    tokens = np.zeros(t + 1, np.int32)
    tokens[:len(seq)] = seq
    weights = np.zeros(t, np.float32)
    weights[len(prompt) - 1:len(seq) - 1] = 1.0
    return tokens[:-1], tokens[1:], weights


def _batch(cfg: ModelConfig, rows, prompts, conts, eos: int = EOS_ID, prefix_lm: bool = False):
    if cfg.family == "gpt":
        t = bucket(max(len(prompts[r]) + len(conts[r]) - 1 for r in rows))
        if cfg.position == "learned" and t > cfg.max_len:
            t = cfg.max_len  # the longest row fits (checked by the caller); its bucket may not
        parts = [_gpt_rows(prompts[r], conts[r], t) for r in rows]
        batch = {"decoder_input_tokens": np.stack([p[0] for p in parts]),
                 "decoder_target_tokens": np.stack([p[1] for p in parts]),
                 "decoder_loss_weights": np.stack([p[2] for p in parts])}
        if prefix_lm:  # absent otherwise: causal models compile and score as before
            batch["decoder_causal_attention"] = prefix_flags([len(prompts[r]) for r in rows], t)
        return batch
    s = bucket(max(len(prompts[r]) for r in rows) + 1)
    t = bucket(max(len(conts[r]) for r in rows) + 1)
    enc = np.zeros((len(rows), s), np.int32)
    tgt = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        enc[i, :len(prompts[r]) + 1] = list(prompts[r]) + [eos]
        tgt[i, :len(conts[r]) + 1] = list(conts[r]) + [eos]
    dec = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(np.float32)}


def log_likelihoods(loaded, prompts: Sequence[Sequence[int]],
                    continuations: Sequence[Sequence[int]], *, batch_size: int = 32
                    ) -> np.ndarray:
    """float64 [N]: sum of log p(continuation_i | prompt_i), see module docstring.

    Args:
      loaded: a `t5x_lite.api.LoadedModel` (model, params, mesh, rules).
      prompts, continuations: token id lists, without EOS (T5 rows get EOS appended).
      batch_size: rows per compiled batch (rounded up to a multiple of the data shards).
    """
    cfg = loaded.model.config
    if cfg.family not in ("t5", "gpt"):
        raise LikelihoodError(f"scoring needs a t5 or gpt model, not {cfg.family!r}")
    if len(prompts) != len(continuations):
        raise LikelihoodError(f"{len(prompts)} prompts for {len(continuations)} continuations")
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        if cfg.family == "gpt" and (not p or not c):
            raise LikelihoodError(f"row {i}: a decoder-only row needs >= 1 prompt and >= 1 "
                                  "continuation token")
        if cfg.family == "gpt" and cfg.position == "learned" and len(p) + len(c) - 1 > cfg.max_len:
            raise LikelihoodError(f"row {i}: {len(p) + len(c)} tokens exceed the model's "
                                  f"max length {cfg.max_len}")
    mesh = loaded.mesh
    shards = partitioning.batch_shards(mesh)
    b = -(-max(batch_size, 1) // shards) * shards
    order = sorted(range(len(prompts)), key=lambda r: len(prompts[r]) + len(continuations[r]))
    fn = _score_fn(cfg)
    eos = int(getattr(loaded, "eos_id", EOS_ID))
    prefix_lm = is_prefix_lm(loaded)
    sharding = partitioning.data_sharding(mesh)
    out = np.zeros(len(prompts), np.float64)
    pending = []
    for start in range(0, len(order), b):
        rows = order[start:start + b]
        padded = rows + [rows[-1]] * (b - len(rows))  # fixed row count: one compiled shape
        batch = {k: jax.device_put(v, sharding)
                 for k, v in _batch(cfg, padded, prompts, continuations, eos,
                                           prefix_lm).items()}
        with partitioning.activate(mesh, loaded.rules):
            pending.append((rows, fn(loaded.params, batch)))
    for rows, scores in pending:
        out[rows] = distributed.host_array(scores).astype(np.float64)[:len(rows)]
    return out
