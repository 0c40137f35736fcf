"""Decoder-only language model (GPT-2 style or the modern RoPE/RMSNorm/SwiGLU variant).

Shape legend: B batch, T length, L cache length, D d_model, V vocab.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from t5x_lite.config import ModelConfig
from t5x_lite.layers import (Embed, attention_bias, constrain, dense_init, make_dropout, param,
                             vocab_logits)
from t5x_lite.transformer import (DecodeCursor, Stack, causal_mask, make_norm, prefix_lm_mask,
                                  segment_mask, window_mask)


class LearnedPositions(nn.Module):
    max_len: int
    features: int

    @nn.compact
    def __call__(self, positions_BxT):
        table = param(self, "embedding", nn.initializers.normal(stddev=0.02),
                      (self.max_len, self.features), ("max_len", "embed"))
        return jnp.take(table, positions_BxT, axis=0)


def lm_logits(module: nn.Module, cfg: ModelConfig, embedder: Embed, y_BxTxD):
    """Tied (embedding.attend) or untied ('lm_head' [D, V]) float32 logits."""
    if cfg.tie_embeddings:
        return embedder.attend(y_BxTxD)
    w = param(module, "lm_head", dense_init(cfg.d_model), (cfg.d_model, cfg.vocab_size),
              ("embed", "vocab"))
    return vocab_logits(y_BxTxD, w.astype(cfg.compute_dtype), "dv")


class GPT(nn.Module):
    """Causal LM. `decode=True` keeps a KV cache; rows may be left-padded (`token_valid`)."""

    config: ModelConfig
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, decoder_input_tokens, decoder_positions=None, decoder_segment_ids=None,
                 decoder_causal_attention=None, token_valid=None, last_only: bool = False):
        """Float32 logits [B, T, V] ([B, 1, V]: `last_only`).

        Args:
          decoder_input_tokens: [B, T] int.
          decoder_positions: [B, T] position ids (default 0..T-1); per-row for left padding.
          decoder_segment_ids: [B, T] packed segments; no attention across segments.
          decoder_causal_attention: [B, T] prefix-LM flags (bidirectional within the prefix;
            in decode mode, within the chunk: a prefix-LM model's prompt).
          token_valid: [B, T] False on padding keys (e.g. left padding when decoding).
          last_only: the logits of the last position only, e.g. of a decode's prefill: the
            head, most of a small model's FLOPs per token, runs for one position, not T.
        """
        cfg = self.config
        tokens_BxT = decoder_input_tokens
        b, t = tokens_BxT.shape
        if decoder_positions is None:
            decoder_positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        if token_valid is None:
            token_valid = jnp.ones((b, t), jnp.bool_)
        embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype, stddev=0.02,
                         name="token_embedder")
        x = embedder(tokens_BxT)
        # "rope" rotates queries and keys in attention; "none" (NoPE) leaves positions to what
        # the causal mask reveals.
        if cfg.position == "learned":
            x = x + LearnedPositions(cfg.max_len, cfg.d_model, name="position_embedder")(
                decoder_positions).astype(x.dtype)
        x = make_dropout(cfg)(x, deterministic=self.deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        decode_index = None
        if self.decode:
            mask, _, decode_index = DecodeCursor(window=cfg.sliding_window, name="cursor")(
                token_valid, decoder_causal_attention)
        else:
            mask = causal_mask(t)[None] & token_valid[:, None, :].astype(jnp.bool_)
            if decoder_causal_attention is not None:
                mask = mask | prefix_lm_mask(decoder_causal_attention)
            if decoder_segment_ids is not None:
                mask = mask & segment_mask(decoder_segment_ids, decoder_segment_ids)
            if cfg.sliding_window is not None:  # by index: within a segment, as by position
                mask = mask & window_mask(jnp.arange(t), jnp.arange(t), cfg.sliding_window)[None]
        # Prefix-LM rows see later prefix keys, so only a plain causal mask may skip them.
        x = Stack(cfg, cfg.num_layers, decode=self.decode, deterministic=self.deterministic,
                  causal=decoder_causal_attention is None, name="decoder")(
            x, attention_bias(mask), positions=decoder_positions, decode_index=decode_index)
        if last_only:
            x = x[:, -1:]
        x = make_norm(cfg, "decoder_norm")(x)  # no dropout after it (GPT-2's ln_f has none)
        return constrain(lm_logits(self, cfg, embedder, x), ("batch", "length", "vocab"))
