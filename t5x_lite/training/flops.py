"""Model FLOPs per training step and peak FLOP/s per device, for MFU.

Model FLOPs count the matmuls the model needs, not what the hardware ran: remat recomputation is
excluded; a training step is 3x the forward pass (forward + two backward matmuls per forward
matmul). Attention scores count the full T x S square (the PaLM convention, also for causal
attention). Embedding lookups, norms, softmax and elementwise ops are ignored.
"""
from __future__ import annotations

from t5x_lite.config import MLP_ACTIVATIONS, ModelConfig

# Dense bf16 peak FLOP/s per device (one chip / GPU), matched against `device.device_kind`.
# Order matters: the first substring found in the lower-cased kind wins.
PEAK_FLOPS = (
    ("v6", 918e12),  # TPU v6e (Trillium)
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v4", 275e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("a100", 312e12),
)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override when > 0, else the table; None if unknown (CPU)."""
    if override and override > 0:
        return float(override)
    kind = device_kind.lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    return None


def _stack_flops(cfg: ModelConfig, tokens: int, q_len: int, cross_len: int = 0,
                 cross_tokens_kv: int = 0, layers: int = 1) -> float:
    """Forward FLOPs of `layers` blocks over `tokens` = batch * q_len tokens."""
    d, hk, f = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.d_ff
    n_in = len(MLP_ACTIVATIONS[cfg.mlp])
    per_token = 2 * d * hk * 4  # q, k, v, o projections
    per_token += 2 * 2 * q_len * hk  # q.k scores and probs.v
    per_token += 2 * d * f * (n_in + 1)  # MLP input projection(s) + output
    total = per_token * tokens
    if cross_len:
        total += (2 * d * hk * 2 + 2 * 2 * cross_len * hk) * tokens  # q, o; scores, values
        total += 2 * d * hk * 2 * cross_tokens_kv  # k, v over the encoder tokens
    return float(total * layers)


def forward_flops(cfg: ModelConfig, batch: int, length: int, targets_length: int | None = None,
                  predictions: int = 0) -> float:
    """Forward-pass model FLOPs for one batch (encoder `length`, decoder `targets_length`;
    BERT: the head on `predictions` positions per row when > 0, as the MLM loss runs it)."""
    logits = 2 * cfg.d_model * cfg.vocab_size
    if cfg.family == "t5":
        t = targets_length or length
        enc = _stack_flops(cfg, batch * length, length, layers=cfg.num_layers)
        dec = _stack_flops(cfg, batch * t, t, cross_len=length, cross_tokens_kv=batch * length,
                           layers=cfg.decoder_layers)
        return enc + dec + logits * batch * t
    scored = min(predictions, length) if cfg.family == "bert" and predictions else length
    return (_stack_flops(cfg, batch * length, length, layers=cfg.num_layers)
            + logits * batch * scored)


def train_step_flops(cfg: ModelConfig, batch: int, length: int,
                     targets_length: int | None = None, predictions: int = 0) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward)."""
    return 3.0 * forward_flops(cfg, batch, length, targets_length, predictions)


def param_count(params) -> int:
    import jax  # local: keep this module importable without touching devices
    return int(sum(x.size for x in jax.tree.leaves(params)))
