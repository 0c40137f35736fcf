"""Encoder-only masked language model (BERT-style) built from the shared parts.

Shape legend: B batch, T length, D d_model, V vocab. Token id 0 is padding.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite.config import ModelConfig
from t5x_lite.gpt import LearnedPositions
from t5x_lite.layers import Embed, attention_bias, constrain, dense, dense_init, make_dropout, param
from t5x_lite.transformer import Stack, make_norm, segment_mask


class Bert(nn.Module):
    """Bidirectional encoder + MLM head (dense, GELU, norm, tied output + bias; the config
    refuses an untied one).

    Pre-LN, not BERT's post-LN: HF `RobertaPreLayerNormForMaskedLM`'s layout (embedding norm,
    norm before each sublayer, final norm), equal to it in tests/bert_test.py except that the
    head dense has no bias and its GELU is tanh; no token types, pooler or NSP head.
    """

    config: ModelConfig
    decode: bool = False  # accepted for a uniform constructor; an encoder never decodes
    deterministic: bool = True

    @nn.compact
    def __call__(self, encoder_input_tokens, encoder_positions=None, encoder_segment_ids=None,
                 predict_positions=None):
        """Logits [B, T, V], or [B, K, V] at `predict_positions` [B, K] (the MLM loss's)."""
        cfg = self.config
        dtype = cfg.compute_dtype
        tokens_BxT = encoder_input_tokens
        b, t = tokens_BxT.shape
        if encoder_positions is None:
            encoder_positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        embedder = Embed(cfg.vocab_size, cfg.d_model, dtype, stddev=0.02, name="token_embedder")
        x = embedder(tokens_BxT)
        if cfg.position == "learned":  # "rope" rotates queries and keys in attention
            x = x + LearnedPositions(cfg.max_len, cfg.d_model, name="position_embedder")(
                encoder_positions).astype(dtype)
        x = make_norm(cfg, "embedding_norm")(x)
        x = make_dropout(cfg)(x, deterministic=self.deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        mask = jnp.broadcast_to((tokens_BxT > 0)[:, None, :], (b, t, t))
        if encoder_segment_ids is not None:
            mask = mask & segment_mask(encoder_segment_ids, encoder_segment_ids)
        x = Stack(cfg, cfg.num_layers, deterministic=self.deterministic, name="encoder")(
            x, attention_bias(mask), positions=encoder_positions)
        x = make_norm(cfg, "encoder_norm")(x)
        if predict_positions is not None:
            x = jnp.take_along_axis(x, predict_positions[..., None], axis=1)
        w = param(self, "mlm_dense", dense_init(cfg.d_model), (cfg.d_model, cfg.d_model),
                  ("embed", "mlp"))
        h = jax.nn.gelu(dense(x, w.astype(dtype)), approximate=True)
        # Back to the residual layout before the norm: left sharded on `tensor` (the kernel's
        # "mlp" output), a (2, 2, 2) mesh gave wrong gradients (right loss) when every position
        # is scored (XLA's partitioning of norm + tied projection).
        h = constrain(h, ("batch", "length", "embed"))
        h = make_norm(cfg, "mlm_norm")(h)
        logits = embedder.attend(h) + param(self, "mlm_bias", nn.initializers.zeros,
                                            (cfg.vocab_size,), ("vocab",))
        return constrain(logits, ("batch", "length", "vocab"))
