"""Model FLOPs per training step and peak FLOP/s per device, for MFU.

The FLOPs are the estimator's (`estimate_flops.step_flops`, whose docstring states the
conventions): one function computes the pieces (dense, attention, output head) for both, so the
trainer's MFU and `python -m t5x_lite.estimate` cannot disagree. In short: matmuls only, a
training step is 3x the forward pass, remat recomputation is excluded, attention scores count
the full T x S square, and BERT's MLM head (its d x d dense and the d x V projection) is
counted on the positions the loss scores.
"""
from __future__ import annotations

import re

from absl import logging

from t5x_lite import estimate_flops
from t5x_lite.config import ModelConfig

# Dense bf16 peak FLOP/s per device (one chip / GPU), looked up by the *exact* normalized
# `device.device_kind` (`normalize_device_kind`); an unlisted kind gives None (no MFU), never a
# neighbour's figure. JAX's TPU kinds: v5e is "TPU v5 lite", v5p is "TPU v5", v6e "TPU v6 lite".
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5": 459e12,  # v5p
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "a100": 312e12,  # SXM4 and PCIe alike
    "a100 pcie": 312e12,
    "h100": 989e12,  # SXM5 ("NVIDIA H100 80GB HBM3")
    "h100 pcie": 756e12,
    "h200": 989e12,  # SXM
    "gh200": 989e12,
}
# Kinds whose dense bf16 peak differs from the family's SXM figure and is not in the table:
# None (no MFU) with this reason, rather than a wrong number.
UNLISTED = {
    "h100 nvl": "the H100 NVL runs below the SXM part's 989 TFLOP/s",
    "h200 nvl": "the H200 NVL runs below the SXM part's 989 TFLOP/s",
}
_SIZE = re.compile(r"^\d+gb$|^hbm\d*e?$|^sxm\d*$")  # memory size / type, SXM: same peak
_warned: set[str] = set()


def normalize_device_kind(device_kind: str) -> str:
    """`device_kind` as a PEAK_FLOPS key: lower case, single spaces, NVIDIA's vendor prefix,
    memory size / type and SXM form-factor tokens dropped ("NVIDIA A100-SXM4-80GB" -> "a100",
    "NVIDIA H100 PCIe" -> "h100 pcie", "TPU v5" stays "tpu v5")."""
    kind = " ".join(device_kind.lower().split())
    if not kind.startswith("nvidia "):
        return kind
    tokens = kind[len("nvidia "):].replace("-", " ").split()
    return " ".join(t for t in tokens if not _SIZE.match(t))


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override when > 0, else the table (exact normalized kind);
    None, with a logged reason, when the kind is not listed (CPU, H100 NVL, ...)."""
    if override and override > 0:
        return float(override)
    key = normalize_device_kind(device_kind)
    if key in PEAK_FLOPS:
        return PEAK_FLOPS[key]
    if key != "cpu" and device_kind not in _warned:
        _warned.add(device_kind)
        why = UNLISTED.get(key, "it is not in training/flops.py PEAK_FLOPS")
        logging.warning("No peak FLOP/s for device kind %r (%s): MFU is not reported; set "
                        "train.peak_flops to its dense bf16 peak per device to get it.",
                        device_kind, why)
    return None


def forward_flops(cfg: ModelConfig, batch: int, length: int, targets_length: int | None = None,
                  predictions: int = 0) -> float:
    """Forward-pass model FLOPs for one batch (encoder `length`, decoder `targets_length`;
    BERT: the head on `predictions` positions per row when > 0, as the MLM loss runs it)."""
    return estimate_flops.step_flops(cfg, batch, length, targets_length, predictions).forward


def train_step_flops(cfg: ModelConfig, batch: int, length: int,
                     targets_length: int | None = None, predictions: int = 0) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward)."""
    return estimate_flops.step_flops(cfg, batch, length, targets_length, predictions).train


def param_count(params) -> int:
    import jax  # local: keep this module importable without touching devices
    return int(sum(x.size for x in jax.tree.leaves(params)))
