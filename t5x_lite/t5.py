"""T5 encoder-decoder (v1.0 and v1.1 by config).

Shape legend: B batch, S encoder length, T decoder length, L decoder cache length, D d_model,
V vocab. Token id 0 is padding in the encoder and the start token of the decoder.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from t5x_lite.config import ModelConfig
from t5x_lite.layers import (Embed, RelativePositionBias, attention_bias, constrain, dense_init,
                             make_dropout, param, vocab_logits)
from t5x_lite.transformer import DecodeCursor, Stack, causal_mask, make_norm, segment_mask


def _positions(tokens_BxT, positions_BxT):
    if positions_BxT is not None:
        return positions_BxT
    return jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)


class T5(nn.Module):
    """Encoder-decoder. `decode=True` builds the KV-cached decoder used by generation."""

    config: ModelConfig
    decode: bool = False
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype)
        self.encoder_relpos = RelativePositionBias(
            cfg.relative_buckets, cfg.relative_max_distance, cfg.num_heads, bidirectional=True)
        self.decoder_relpos = RelativePositionBias(
            cfg.relative_buckets, cfg.relative_max_distance, cfg.num_heads, bidirectional=False)
        self.encoder = Stack(cfg, cfg.num_layers, deterministic=self.deterministic)
        self.decoder = Stack(cfg, cfg.decoder_layers, cross=True, decode=self.decode,
                             deterministic=self.deterministic, causal=True)
        self.encoder_norm = make_norm(cfg)
        self.decoder_norm = make_norm(cfg)
        self.dropout = make_dropout(cfg)
        if cfg.dropout_broadcast:  # per element after the encoder's final norm, as in T5X
            self.encoded_dropout = make_dropout(cfg, along_sequence=False)
        if self.decode:
            self.cursor = DecodeCursor()
        if not cfg.tie_embeddings:
            self.lm_head = param(self, "lm_head", dense_init(cfg.d_model),
                                 (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def _lm_head(self, y_BxTxD):
        cfg = self.config
        if cfg.scale_logits:
            y_BxTxD = y_BxTxD * (cfg.d_model ** -0.5)
        if cfg.tie_embeddings:
            return self.token_embedder.attend(y_BxTxD)
        return vocab_logits(y_BxTxD, self.lm_head.astype(cfg.compute_dtype), "dv")

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None):
        """Returns encoded [B, S, D] in the compute dtype."""
        tokens_BxS = encoder_input_tokens
        x = self.dropout(self.token_embedder(tokens_BxS), deterministic=self.deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        s = tokens_BxS.shape[1]
        mask = jnp.broadcast_to((tokens_BxS > 0)[:, None, :], (tokens_BxS.shape[0], s, s))
        if encoder_segment_ids is not None:
            mask = mask & segment_mask(encoder_segment_ids, encoder_segment_ids)
        pos = jnp.arange(s)
        bias = attention_bias(mask, self.encoder_relpos(pos, pos))
        x = self.encoder(x, bias, positions=_positions(tokens_BxS, encoder_positions))
        # (without shared masks, self.dropout: a module of its own would draw other masks)
        drop = self.encoded_dropout if self.config.dropout_broadcast else self.dropout
        return drop(self.encoder_norm(x), deterministic=self.deterministic)

    def decode_logits(self, decoder_input_tokens, encoded, encoder_mask,
                      decoder_segment_ids=None, encoder_segment_ids=None, decoder_positions=None):
        """Float32 logits [B, T, V].

        Args:
          decoder_input_tokens: [B, T] targets shifted right (start token 0).
          encoded: [B, S, D] encoder output; in decode mode, None after the first (prefill)
            call, whose projected cross-attention K/V are kept in the cache.
          encoder_mask: [B, S] True on real encoder tokens.
        """
        tokens_BxT = decoder_input_tokens
        b, t = tokens_BxT.shape
        y = self.dropout(self.token_embedder(tokens_BxT), deterministic=self.deterministic)
        y = constrain(y, ("batch", "length", "embed"))
        decode_index = None
        if self.decode:
            mask, q_slots, decode_index = self.cursor(jnp.ones((b, t), jnp.bool_))
            k_slots = jnp.arange(mask.shape[-1])
        else:
            mask = jnp.broadcast_to(causal_mask(t)[None], (b, t, t))
            if decoder_segment_ids is not None:
                mask = mask & segment_mask(decoder_segment_ids, decoder_segment_ids)
            q_slots = k_slots = jnp.arange(t)
        bias = attention_bias(mask, self.decoder_relpos(q_slots, k_slots))
        cross_mask = jnp.broadcast_to(encoder_mask[:, None, :].astype(jnp.bool_),
                                      (b, t, encoder_mask.shape[1]))
        if decoder_segment_ids is not None and encoder_segment_ids is not None:
            cross_mask = cross_mask & segment_mask(decoder_segment_ids, encoder_segment_ids)
        y = self.decoder(y, bias, encoded, attention_bias(cross_mask),
                         positions=_positions(tokens_BxT, decoder_positions),
                         decode_index=decode_index)
        y = self.dropout(self.decoder_norm(y), deterministic=self.deterministic)
        return constrain(self._lm_head(y), ("batch", "length", "vocab"))

    def __call__(self, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids=None,
                 decoder_segment_ids=None, encoder_positions=None, decoder_positions=None):
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions)
        return self.decode_logits(decoder_input_tokens, encoded, encoder_input_tokens > 0,
                                  decoder_segment_ids, encoder_segment_ids, decoder_positions)
