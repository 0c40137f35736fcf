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
from absl import logging

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
POSITIONS = ("relative", "learned", "rope", "none")
# RoPE frequency scaling (context extension of a model pretrained at a shorter length):
# "linear" divides every frequency by rope_scaling_factor (position interpolation); "llama3"
# (Llama 3.1's) divides the low frequencies by it, keeps the high ones and blends those between;
# "yarn" blends by pair index and scales cos / sin (`layers.rope_inv_freq`, `rope_attention_scale`).
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
# The position schemes each family builds, its default first. T5 has only its relative position
# bias; a decoder-only model may have none at all (the causal mask alone tells positions apart,
# "NoPE"); an encoder without positions would see a bag of words.
FAMILY_POSITIONS = {"t5": ("relative",), "gpt": ("learned", "rope", "none"),
                    "bert": ("learned", "rope")}
NORMS = ("rms", "layer")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "dot_product_attention")


_FIELD_TYPES = {"bool": (bool,), "float": (numbers.Real,), "int": (numbers.Integral,),
                "int | None": (numbers.Integral, type(None)), "str": (str,),
                "str | None": (str, type(None))}

# Settings that older versions accepted and ignored for a family: (family, key, value, what the
# model was built as). A saved config holding one (an old checkpoint) is read as the model it
# trained (`from_dict`); anything new must say what it means (ModelConfig refuses them).
_IGNORED_BEFORE = (
    ("gpt", "position", "relative", "none"),  # a GPT never had a relative position bias
    ("t5", "position", "learned", "relative"),  # T5 built no position table
    ("bert", "tie_embeddings", False, True),  # BERT's MLM output was always the embedding
    ("gpt", "scale_logits", True, False),  # only T5's head scales
    ("bert", "scale_logits", True, False),
)
# Settings a model uses only in some configurations: (key, whether this config uses it, when it
# is used). Elsewhere a value other than the default is refused (it would change nothing); a
# saved config holding one is read with the default and a warning (`from_dict`).
_USED_ONLY_WITH = (
    ("rope_theta", lambda c: c.position == "rope", "position='rope'"),
    ("relative_buckets", lambda c: c.family == "t5", "family 't5'"),
    ("relative_max_distance", lambda c: c.family == "t5", "family 't5'"),
)
_warned: set[str] = set()


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
    # Key / value heads (GPT only): fewer than num_heads, each shared by num_heads / num_kv_heads
    # query heads, is grouped-query attention (1: multi-query); None = num_heads.
    num_kv_heads: int | None = None
    # Sliding-window attention (GPT only, Mistral's): each query sees itself and the
    # sliding_window - 1 keys before it; None = every earlier key.
    sliding_window: int | None = None
    num_decoder_layers: int | None = None  # T5 only; None = num_layers
    mlp: str = "relu"
    norm: str = "rms"
    norm_eps: float = 1e-6
    position: str | None = None  # None = the family's default, FAMILY_POSITIONS[family][0]
    relative_buckets: int = 32  # T5 only, as relative_max_distance
    relative_max_distance: int = 128
    max_len: int = 1024  # learned positions table size; the longest prompt decoding takes
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # ROPE_SCALINGS; the fields below are its parameters
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / this are scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / this are kept
    rope_original_max_len: int = 8192  # llama3, yarn: the context length of pretraining
    rope_beta_fast: float = 32.0  # yarn: pairs turning more often than this over it are kept
    rope_beta_slow: float = 1.0  # yarn: pairs turning less often than this are scaled
    rope_attention_factor: float = 0.0  # yarn: cos / sin factor; 0 = 0.1 ln(factor) + 1
    rope_truncate: bool = True  # yarn: the ramp's ends rounded to whole pairs
    attention_scale: bool = False  # multiply q.k by 1/sqrt(head_dim) (GPT); T5 folds it into init
    use_bias: bool = False  # biases on projections (GPT-2)
    qkv_bias: bool = False  # biases on the query / key / value projections only (Qwen2)
    tie_embeddings: bool = True  # BERT: always (its MLM output is the embedding)
    scale_logits: bool = False  # multiply final hidden states by d_model**-0.5 (T5 v1.0 only)
    dropout_rate: float = 0.0
    # Share each dropout mask along the sequence, as T5X does (README "Dropout"); False draws
    # every element's own, as HF does.
    dropout_broadcast: bool = False
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
        if self.position is None and self.family in FAMILY_POSITIONS:
            object.__setattr__(self, "position", FAMILY_POSITIONS[self.family][0])
        if self.num_kv_heads == self.num_heads:  # one spelling of "as many as the queries"
            object.__setattr__(self, "num_kv_heads", None)
        t5 = self.family == "t5"
        supported = FAMILY_POSITIONS.get(self.family, POSITIONS)
        checks = [
            (self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}"),
            (self.mlp in MLP_ACTIVATIONS, f"mlp must be one of {tuple(MLP_ACTIVATIONS)}, got {self.mlp!r}"),
            (self.position in POSITIONS, f"position must be one of {POSITIONS}, got {self.position!r}"),
            (self.position in supported,
             f"position={self.position!r} is not supported for family {self.family!r}; "
             f"supported: {', '.join(map(repr, supported))}"),
            (self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}"),
            (self.remat in REMAT_POLICIES, f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}"),
            (self.attention_impl in ATTENTION_IMPLS,
             f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"),
            (self.dtype in ("float32", "bfloat16", "float16"),
             f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}"),
            (min(self.vocab_size, self.d_model, self.num_heads, self.head_dim, self.d_ff,
                 self.num_layers, self.max_len) > 0, "sizes (vocab_size, d_model, num_heads, "
             "head_dim, d_ff, num_layers, max_len) must all be positive"),
            (self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}"),
            (not (self.position == "rope" and self.head_dim % 2), "rope needs an even head_dim"),
            (self.position != "rope" or self.rope_theta > 0,
             f"rope_theta must be > 0, got {self.rope_theta}"),
            # YaRN's correction range divides by log(rope_theta)
            (self.position != "rope" or self.rope_scaling != "yarn" or self.rope_theta > 1,
             f"rope_scaling='yarn' needs rope_theta > 1, got {self.rope_theta}"),
            (self.rope_scaling in ROPE_SCALINGS,
             f"rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}"),
            (self.rope_scaling_factor > 0,
             f"rope_scaling_factor must be > 0, got {self.rope_scaling_factor}"),
            (min(self.rope_low_freq_factor, self.rope_high_freq_factor) > 0,
             "rope_low_freq_factor and rope_high_freq_factor must be > 0, got "
             f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}"),
            (self.rope_original_max_len > 0,
             f"rope_original_max_len must be positive, got {self.rope_original_max_len}"),
            (min(self.rope_beta_fast, self.rope_beta_slow) > 0 and self.rope_attention_factor >= 0,
             "rope_beta_fast and rope_beta_slow must be > 0 and rope_attention_factor >= 0, got "
             f"{self.rope_beta_fast}, {self.rope_beta_slow} and {self.rope_attention_factor}"),
            # Fewer buckets leave the encoder's bidirectional half no exact bucket; a distance
            # not past the decoder's exact buckets makes the log spacing divide by log(<= 1).
            (not t5 or self.relative_buckets >= 4,
             f"relative_buckets must be >= 4, got {self.relative_buckets}"),
            (not t5 or self.relative_max_distance > self.relative_buckets // 2,
             f"relative_max_distance must be > relative_buckets // 2 = "
             f"{self.relative_buckets // 2}, got {self.relative_max_distance}"),
            (self.causal_blocks >= 1, f"causal_blocks must be >= 1, got {self.causal_blocks}"),
            (0.0 <= self.dropout_rate < 1.0, f"dropout_rate must be in [0, 1), got {self.dropout_rate}"),
            (t5 or self.num_decoder_layers in (None, self.num_layers),
             "num_decoder_layers only applies to family 't5'"),
            (self.num_kv_heads is None or self.family == "gpt",
             "num_kv_heads only applies to family 'gpt'; leave it None"),
            (self.num_kv_heads is None or (0 < self.num_kv_heads <= self.num_heads
                                           and self.num_heads % self.num_kv_heads == 0),
             f"num_kv_heads must divide num_heads={self.num_heads} (or be None), got "
             f"{self.num_kv_heads}"),
            (self.sliding_window is None or self.family == "gpt",
             "sliding_window only applies to family 'gpt'; leave it None"),
            (self.sliding_window is None or self.sliding_window > 0,
             f"sliding_window must be positive (or None), got {self.sliding_window}"),
            (not (self.qkv_bias and self.use_bias), "qkv_bias=True adds no bias that "
             "use_bias=True does not (it has them on every projection); leave it False"),
            (self.num_decoder_layers is None or self.num_decoder_layers > 0,
             f"num_decoder_layers must be positive (or None), got {self.num_decoder_layers}"),
            (self.family != "bert" or self.tie_embeddings,
             "tie_embeddings=False is not supported for family 'bert' (its MLM output is "
             "always the token embedding); set tie_embeddings=True"),
            (t5 or not self.scale_logits,
             f"scale_logits=True only applies to family 't5' (T5 v1.0's head), not "
             f"{self.family!r}; set scale_logits=False"),
        ] + [(used(self) or getattr(self, key) == _DEFAULTS[key],
              f"{key}={getattr(self, key)!r} only applies with {when} (this model: family "
              f"{self.family!r}, position {self.position!r}); leave it at {_DEFAULTS[key]!r}")
             for key, used, when in _USED_ONLY_WITH]
        for ok, message in checks + self._rope_scaling_checks():
            if not ok:
                raise ConfigError(f"Invalid model config: {message}")

    def _rope_scaling_checks(self) -> list[tuple[bool, str]]:
        """rope_scaling needs RoPE, and each of its parameters other than its default needs a
        scaling that reads it."""
        used = {"rope_scaling_factor": ("linear", "llama3", "yarn"),
                "rope_low_freq_factor": ("llama3",), "rope_high_freq_factor": ("llama3",),
                "rope_original_max_len": ("llama3", "yarn"), "rope_beta_fast": ("yarn",),
                "rope_beta_slow": ("yarn",), "rope_attention_factor": ("yarn",),
                "rope_truncate": ("yarn",)}
        return [(self.position == "rope" or self.rope_scaling == "none",
                 f"rope_scaling={self.rope_scaling!r} only applies with position='rope' (this "
                 f"model: family {self.family!r}, position {self.position!r}); leave it at "
                 "'none'")] + [
            (self.rope_scaling in kinds or getattr(self, key) == _DEFAULTS[key],
             f"{key}={getattr(self, key)!r} only applies with rope_scaling "
             f"{' / '.join(map(repr, kinds))} (this model: {self.rope_scaling!r}); leave it at "
             f"{_DEFAULTS[key]!r}") for key, kinds in used.items()]

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def has_qkv_bias(self) -> bool:
        """Biases on the query / key / value projections (use_bias or qkv_bias)."""
        return self.use_bias or self.qkv_bias

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.family == "t5"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, upgrade: bool = True) -> "ModelConfig":
        """Builds from a dict or ConfigDict; unknown keys are an error (typos must not pass).

        With `upgrade`, a setting older versions accepted and ignored (`_IGNORED_BEFORE`, e.g.
        a saved GPT config with position='relative', which built no positions) is read as the
        model it built, with a warning, so old checkpoints load; without it (a new run,
        training.run_checks) it is an error like any unsupported setting, which says what to
        set instead.
        """
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"Unknown model config keys {unknown}; known: {sorted(names)}")
        for family, key, old, built in _IGNORED_BEFORE:
            value = d.get(key)
            if d.get("family") != family or value != old or type(value) is not type(old):
                continue
            if not upgrade:
                try:
                    cls(**d)
                except ConfigError as e:
                    raise ConfigError(f"{e} (older versions ignored {key}={old!r} and built "
                                      f"{key}={built!r}: set that to train on from a "
                                      "checkpoint saved with it)") from None
            d[key] = built
            message = (f"model.{key}={old!r} is not supported for family {family!r}; older "
                       f"versions ignored it and built {key}={built!r}, so this config is read "
                       f"as that (set {key}={built!r} to silence this)")
            if message not in _warned:
                _warned.add(message)
                logging.warning("%s", message)
        if upgrade:  # a value older versions accepted where nothing reads it
            try:
                probe = cls(**{**d, **{key: _DEFAULTS[key] for key, _, _ in _USED_ONLY_WITH}})
            except ConfigError:
                probe = None  # refused for another reason below
            for key, used, when in _USED_ONLY_WITH:
                if probe is not None and not used(probe) and d.get(key, _DEFAULTS[key]) != (
                        _DEFAULTS[key]):
                    message = (f"model.{key}={d[key]!r} only applies with {when}; this model "
                               "never used it, so the config is read with the default")
                    d[key] = _DEFAULTS[key]
                    if message not in _warned:
                        _warned.add(message)
                        logging.warning("%s", message)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def differences(self, other: "ModelConfig") -> list[str]:
        """`name: self's vs other's` for each field in which the two compute different
        functions of the same weights; compute dtype, dropout and remat may differ (fine-tuning
        or evaluating a model trained with other ones)."""
        free = dict(dtype="float32", dropout_rate=0.0, dropout_broadcast=False, remat="none")
        a, b = dataclasses.replace(self, **free), dataclasses.replace(other, **free)
        return [f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
                for f in dataclasses.fields(ModelConfig) if getattr(a, f.name) != getattr(b, f.name)]

    def shape_signature(self) -> dict[str, Any]:
        """The fields that decide parameter shapes (a checkpoint must match these)."""
        keys = ("family", "vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers",
                "mlp", "norm", "position", "use_bias", "qkv_bias", "tie_embeddings",
                "scan_layers")
        sig = {k: getattr(self, k) for k in keys}
        sig["relative_buckets"] = self.relative_buckets if self.family == "t5" else None
        sig["decoder_layers"] = self.decoder_layers if self.family == "t5" else None
        sig["max_len"] = self.max_len if self.position == "learned" else None
        sig["kv_heads"] = self.kv_heads
        return sig


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


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
    """Encoder-only MLM (BERT-style) from the same parts: learned positions, pre-LN LayerNorm
    eps 1e-12 (HF RobertaPreLayerNorm's layout, not BERT's post-LN), GELU, biases, tied head."""
    base = dict(family="bert", mlp="gelu", norm="layer", norm_eps=1e-12, position="learned",
                tie_embeddings=True, scale_logits=False, attention_scale=True, use_bias=True)
    return ModelConfig(**{**base, **overrides})


PRESETS = {"t5_1_0": t5_1_0, "t5_1_1": t5_1_1, "gpt2": gpt2, "gpt_modern": gpt_modern, "bert": bert}


def from_preset(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ConfigError(f"Unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    return PRESETS[preset](**overrides)
