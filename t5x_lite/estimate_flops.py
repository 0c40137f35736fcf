"""Parameter counts, FLOPs, step time at a given MFU, and the Chinchilla token budget.

Conventions (stated once, used everywhere):
- FLOPs count matmuls only, 2 per multiply-add. Embedding lookups, norms, softmax, biases and
  other elementwise work are left out (they are well under 1% of the total for these models).
- A training step costs 3x the forward pass: the backward pass runs two matmuls (input grad and
  weight grad) for every forward one. Remat recomputation is *not* model FLOPs (MFU ignores it);
  it is reported separately as hardware FLOPs: `full` re-runs each layer's forward except the
  MLP output matmul (wo), `dots_no_batch` the attention matmuls, `dots` nothing (matches the
  matmuls of the traced gradient exactly; a test counts them).
- Attention scores and values cost 2 * 2 * Tq * Tk * H * K per layer forward (q.k and p.v); for
  training that is 12 * Tq * Tk * d_attn (d_attn = H * K): the "12 * L * T * d_attn per token"
  of the PaLM paper. Causal attention is counted on the full square (PaLM's convention, and
  the trainer's MFU), although `causal_blocks` > 1 makes XLA skip part of the masked half
  (and, with a `sliding_window`, the keys before the window).
- T5: encoder layers see S encoder tokens, decoder layers T decoder tokens; cross-attention
  projects keys / values from the S encoder outputs once per decoder layer, and its scores are
  T x S. "Tokens" of a T5 step are S + T per example (everything the model reads or predicts).
- Dense matmul params N_mm: every kernel (q, k, v, o, MLP, BERT's MLM dense; k and v with
  fewer heads under grouped-query attention, `num_kv_heads`) plus the output
  projection (the tied embedding counts once, as the head). So forward FLOPs per token of a
  decoder-only model = 2 * N_mm + 4 * L * T * d_attn, training = 6 * N_mm + 12 * L * T * d_attn.

Shape legend: B batch, S encoder / decoder-only length, T decoder length, D d_model, H heads,
K head dim, F d_ff, V vocab rows, R relative-position buckets, L layers.
"""
from __future__ import annotations

import dataclasses

from t5x_lite.config import MLP_ACTIVATIONS, ModelConfig

TB = 1e12


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    peak_bf16_flops: float  # dense bf16 FLOP/s of one device (chip / GPU)
    memory_bytes: float  # HBM per device


# One JAX device each: a TPU v4 / v5p chip (megacore), a v5e / v6e chip, a GPU.
ACCELERATORS = {a.name: a for a in (
    Accelerator("tpu_v4", 275 * TB, 32 * 2**30),
    Accelerator("tpu_v5e", 197 * TB, 16 * 2**30),
    Accelerator("tpu_v5p", 459 * TB, 95 * 2**30),
    Accelerator("tpu_v6e", 918 * TB, 32 * 2**30),
    Accelerator("a100", 312 * TB, 80e9),
    Accelerator("h100", 989 * TB, 80e9),
    Accelerator("h200", 989 * TB, 141e9),
)}

CHINCHILLA_TOKENS_PER_PARAM = 20


def _attention_kernels(cfg: ModelConfig) -> int:
    """q, k, v and out kernel params of one attention (k and v have kv_heads heads)."""
    return 2 * cfg.d_model * cfg.head_dim * (cfg.num_heads + cfg.kv_heads)


def _attention_params(cfg: ModelConfig) -> int:
    n = _attention_kernels(cfg)
    if cfg.has_qkv_bias:
        n += cfg.head_dim * (cfg.num_heads + 2 * cfg.kv_heads)
    if cfg.use_bias:
        n += cfg.d_model  # the out projection's
    return n


def _mlp_params(cfg: ModelConfig) -> int:
    n_in = len(MLP_ACTIVATIONS[cfg.mlp])
    n = (n_in + 1) * cfg.d_model * cfg.d_ff
    if cfg.use_bias:
        n += n_in * cfg.d_ff + cfg.d_model
    return n


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layer" else 1)


def block_params(cfg: ModelConfig, cross: bool = False) -> int:
    n = _attention_params(cfg) + _mlp_params(cfg) + 2 * _norm_params(cfg)
    if cross:
        n += _attention_params(cfg) + _norm_params(cfg)
    return n


def param_count_by_part(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part, from the architecture alone (tests check it against the real tree)."""
    d, v = cfg.d_model, cfg.vocab_size
    parts = {"embedding": v * d}
    if cfg.position == "learned":
        parts["positions"] = cfg.max_len * d
    if cfg.family == "t5":
        parts["positions"] = 2 * cfg.num_heads * cfg.relative_buckets
        parts["encoder"] = cfg.num_layers * block_params(cfg) + _norm_params(cfg)
        parts["decoder"] = cfg.decoder_layers * block_params(cfg, cross=True) + _norm_params(cfg)
    elif cfg.family == "gpt":
        parts["decoder"] = cfg.num_layers * block_params(cfg) + _norm_params(cfg)
    else:  # bert: embedding norm, encoder, final norm, MLM dense + norm + output bias
        parts["encoder"] = cfg.num_layers * block_params(cfg) + 2 * _norm_params(cfg)
        parts["mlm_head"] = d * d + _norm_params(cfg) + v
    if not cfg.tie_embeddings:  # (a BERT config is always tied: ModelConfig)
        parts["lm_head"] = d * v
    return parts


def param_count_formula(cfg: ModelConfig) -> int:
    return sum(param_count_by_part(cfg).values())


def count_params(model) -> int:
    """Exact parameter count from the model's abstract init (no memory allocated)."""
    import jax
    from flax.linen import meta
    from t5x_lite.models import abstract_variables

    params = meta.unbox(abstract_variables(model))["params"]
    return int(sum(x.size for x in jax.tree.leaves(params)))


def head_positions(cfg: ModelConfig, length: int, predictions: int = 0) -> int:
    """Positions per row the output head runs on in training: every one, except BERT with
    `predictions` = k > 0, whose MLM loss runs the head on k scored positions (all when k >= T,
    as `models.EncoderOnlyModel._scored`). `length`: decoder length for T5."""
    if cfg.family == "bert" and predictions > 0:
        return min(predictions, length)
    return length


def head_params(cfg: ModelConfig) -> int:
    """Matmul params of the output head, run once per head position: the d x V projection, and
    BERT's MLM dense (d x d; `bert.Bert`: dense -> gelu -> norm -> tied projection)."""
    d = cfg.d_model
    return d * cfg.vocab_size + (d * d if cfg.family == "bert" else 0)


def matmul_params(cfg: ModelConfig) -> int:
    """N_mm: params used as matmul weights per token, with the output head counted once."""
    d, hk = cfg.d_model, cfg.num_heads * cfg.head_dim
    kernels = _attention_kernels(cfg) + (len(MLP_ACTIVATIONS[cfg.mlp]) + 1) * d * cfg.d_ff
    n = cfg.num_layers * kernels + head_params(cfg)
    if cfg.family == "t5":
        n += cfg.decoder_layers * (kernels + 4 * d * hk)
    return n


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs of one global batch by kind; `train` = 3 x forward (model FLOPs)."""

    dense: float  # projections and MLPs
    attention: float  # q.k and p.v
    head: float  # output logits (+ BERT's MLM dense)
    recompute: float  # extra forward work remat adds in the backward pass (hardware only)
    tokens: int  # tokens per step (T5: encoder + decoder tokens)

    @property
    def forward(self) -> float:
        return self.dense + self.attention + self.head

    @property
    def train(self) -> float:
        return 3 * self.forward

    @property
    def hardware(self) -> float:
        return self.train + self.recompute

    @property
    def per_token(self) -> float:
        return self.train / self.tokens


def _stack(cfg: ModelConfig, layers: int, batch: int, tq: int, tk: int, cross_len: int = 0):
    """(dense, attention) forward FLOPs of `layers` blocks: projections + MLP, q.k + p.v."""
    d, hk = cfg.d_model, cfg.num_heads * cfg.head_dim
    n_in = len(MLP_ACTIVATIONS[cfg.mlp])
    dense = batch * tq * (2 * _attention_kernels(cfg) + 2 * (n_in + 1) * d * cfg.d_ff)
    attn = batch * 4 * tq * tk * hk
    if cross_len:
        dense += batch * (tq * 2 * 2 * d * hk + cross_len * 2 * 2 * d * hk)
        attn += batch * 4 * tq * cross_len * hk
    return layers * dense, layers * attn


def step_flops(cfg: ModelConfig, batch: int, length: int, targets_length: int | None = None,
               predictions: int = 0) -> StepFlops:
    """FLOPs of one training step on a global batch: the one count of model FLOPs, also the
    trainer's MFU (`training/flops.py` calls this).

    Args:
      length: encoder length S (T5, BERT) or sequence length (GPT).
      targets_length: decoder length T (T5 only).
      predictions: BERT's MLM head positions per row when > 0 (`LossConfig.mlm_predictions`).
    """
    if cfg.family == "t5":
        t = targets_length or length
        e_dense, e_attn = _stack(cfg, cfg.num_layers, batch, length, length)
        d_dense, d_attn = _stack(cfg, cfg.decoder_layers, batch, t, t, cross_len=length)
        dense, attn, tokens = e_dense + d_dense, e_attn + d_attn, batch * (length + t)
        head = 2 * batch * head_positions(cfg, t) * head_params(cfg)
        layer_tokens = batch * (cfg.num_layers * length + cfg.decoder_layers * t)
    else:
        dense, attn = _stack(cfg, cfg.num_layers, batch, length, length)
        head = 2 * batch * head_positions(cfg, length, predictions) * head_params(cfg)
        tokens, layer_tokens = batch * length, batch * cfg.num_layers * length
    # Remat re-runs (part of) each layer's forward inside the backward pass. `full` re-runs all
    # of it but the MLP's output matmul (wo, 2 * D * F per token and layer): the layer's
    # backward needs only its input, so JAX leaves that last matmul out of the recompute.
    wo = 2 * cfg.d_model * cfg.d_ff * layer_tokens
    recompute = {"none": 0.0, "full": dense + attn - wo, "dots": 0.0,
                 "dots_no_batch": attn}[cfg.remat]
    return StepFlops(dense=float(dense), attention=float(attn), head=float(head),
                     recompute=float(recompute), tokens=int(tokens))


def step_time(flops: StepFlops, num_devices: int, accelerator: Accelerator, mfu: float) -> float:
    """Seconds per step when the devices run model FLOPs at `mfu` of their bf16 peak."""
    return flops.train / (num_devices * accelerator.peak_bf16_flops * mfu)


@dataclasses.dataclass(frozen=True)
class ComputeOptimal:
    tokens: float  # Chinchilla: ~20 tokens per parameter
    steps: float  # at the config's tokens per step
    flops: float  # model FLOPs for that many steps


def chinchilla(num_params: int, flops: StepFlops) -> ComputeOptimal:
    tokens = CHINCHILLA_TOKENS_PER_PARAM * num_params
    steps = tokens / flops.tokens
    return ComputeOptimal(tokens=float(tokens), steps=float(steps), flops=steps * flops.train)
