"""The model configuration: one frozen dataclass, built from a config's `model` ConfigDict.

This is the only place a ConfigDict becomes a typed model config. Variants (eval without dropout,
decoding) are made with `dataclasses.replace(cfg, ...)`.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any, Mapping

import jax.numpy as jnp

from t5x_lite.errors import UserError

FAMILIES = ("t5", "gpt", "bert")
MLP_ACTIVATIONS = {
    # name -> (activation names of the input projections; >1 means gated, product of branches)
    "relu": ("relu",),
    "gelu": ("gelu_tanh",),
    "gated-gelu": ("gelu_tanh", "linear"),
    "swiglu": ("silu", "linear"),
    "gated-silu": ("silu", "linear"),
}
POSITIONS = ("relative", "learned", "rope")
NORMS = ("rms", "layer")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "dot_product_attention")


_FIELD_TYPES = {"bool": (bool,), "float": (numbers.Real,), "int": (numbers.Integral,),
                "int | None": (numbers.Integral, type(None)), "str": (str,)}


class ConfigError(UserError):
    """A configuration that cannot describe a valid model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a t5x_lite model.

    `vocab_size` is the number of embedding rows (a multiple of 128 by convention, see the data
    docs); `head_dim * num_heads` need not equal `d_model` (T5's d_kv).
    """

    family: str = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 8
    head_dim: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # T5 only; None = num_layers
    mlp: str = "relu"
    norm: str = "rms"
    norm_eps: float = 1e-6
    position: str = "relative"
    relative_buckets: int = 32
    relative_max_distance: int = 128
    max_len: int = 1024  # learned positions table size / RoPE table length hint
    rope_theta: float = 10000.0
    attention_scale: bool = False  # multiply q.k by 1/sqrt(head_dim) (GPT); T5 folds it into init
    use_bias: bool = False  # biases on projections (GPT-2)
    tie_embeddings: bool = True
    scale_logits: bool = False  # multiply final hidden states by d_model**-0.5 (T5 v1.0)
    dropout_rate: float = 0.0
    dtype: str = "float32"  # compute dtype; params are always float32
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "xla"
    # Causal self-attention (training / scoring, "xla" impl) in this many query blocks, each
    # attending only to the keys up to its end: 5/8 of the square's work at 4 (1 = the square).
    causal_blocks: int = 4

    def __post_init__(self):
        for f in dataclasses.fields(self):  # a hand-edited config.json: "d_model": "512"
            value, kinds = getattr(self, f.name), _FIELD_TYPES[f.type]
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                raise ConfigError(f"Invalid model config: {f.name} must be {f.type}, got "
                                  f"{value!r}")
        checks = [
            (self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}"),
            (self.mlp in MLP_ACTIVATIONS, f"mlp must be one of {tuple(MLP_ACTIVATIONS)}, got {self.mlp!r}"),
            (self.position in POSITIONS, f"position must be one of {POSITIONS}, got {self.position!r}"),
            (self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}"),
            (self.remat in REMAT_POLICIES, f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}"),
            (self.attention_impl in ATTENTION_IMPLS,
             f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"),
            (self.dtype in ("float32", "bfloat16", "float16"),
             f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}"),
            (min(self.vocab_size, self.d_model, self.num_heads, self.head_dim, self.d_ff,
                 self.num_layers) > 0, "sizes (vocab_size, d_model, num_heads, head_dim, d_ff, "
             "num_layers) must all be positive"),
            (not (self.position == "rope" and self.head_dim % 2), "rope needs an even head_dim"),
            (self.causal_blocks >= 1, f"causal_blocks must be >= 1, got {self.causal_blocks}"),
            (0.0 <= self.dropout_rate < 1.0, f"dropout_rate must be in [0, 1), got {self.dropout_rate}"),
            (self.family == "t5" or self.num_decoder_layers in (None, self.num_layers),
             "num_decoder_layers only applies to family 't5'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Invalid model config: {message}")

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.family == "t5"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a dict or ConfigDict; unknown keys are an error (typos must not pass)."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"Unknown model config keys {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def shape_signature(self) -> dict[str, Any]:
        """The fields that decide parameter shapes (a checkpoint must match these)."""
        keys = ("family", "vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers",
                "mlp", "norm", "position", "relative_buckets", "use_bias", "tie_embeddings",
                "scan_layers")
        sig = {k: getattr(self, k) for k in keys}
        sig["decoder_layers"] = self.decoder_layers if self.family == "t5" else None
        sig["max_len"] = self.max_len if self.position == "learned" else None
        return sig


def t5_1_0(**overrides) -> ModelConfig:
    """T5 v1.0: ReLU MLP, tied embeddings, logits scaled by d_model**-0.5."""
    base = dict(family="t5", mlp="relu", norm="rms", norm_eps=1e-6, position="relative",
                tie_embeddings=True, scale_logits=True, attention_scale=False, use_bias=False)
    return ModelConfig(**{**base, **overrides})


def t5_1_1(**overrides) -> ModelConfig:
    """T5 v1.1: gated-GELU MLP (tanh GELU), untied lm_head, no logit scaling."""
    base = dict(family="t5", mlp="gated-gelu", norm="rms", norm_eps=1e-6, position="relative",
                tie_embeddings=False, scale_logits=False, attention_scale=False, use_bias=False)
    return ModelConfig(**{**base, **overrides})


def gpt2(**overrides) -> ModelConfig:
    """GPT-2: learned positions, pre-LN LayerNorm, GELU, biases, tied head, 1/sqrt(d) scaling."""
    base = dict(family="gpt", mlp="gelu", norm="layer", norm_eps=1e-5, position="learned",
                tie_embeddings=True, scale_logits=False, attention_scale=True, use_bias=True)
    return ModelConfig(**{**base, **overrides})


def gpt_modern(**overrides) -> ModelConfig:
    """A modern decoder-only variant: RoPE, RMSNorm, SwiGLU, no biases."""
    base = dict(family="gpt", mlp="swiglu", norm="rms", norm_eps=1e-6, position="rope",
                tie_embeddings=False, scale_logits=False, attention_scale=True, use_bias=False)
    return ModelConfig(**{**base, **overrides})


def bert(**overrides) -> ModelConfig:
    """Encoder-only MLM (BERT-style) from the same parts: learned positions, post-LN free pre-LN."""
    base = dict(family="bert", mlp="gelu", norm="layer", norm_eps=1e-12, position="learned",
                tie_embeddings=True, scale_logits=False, attention_scale=True, use_bias=True)
    return ModelConfig(**{**base, **overrides})


PRESETS = {"t5_1_0": t5_1_0, "t5_1_1": t5_1_1, "gpt2": gpt2, "gpt_modern": gpt_modern, "bert": bert}


def from_preset(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ConfigError(f"Unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    return PRESETS[preset](**overrides)
