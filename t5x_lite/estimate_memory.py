"""Training memory per device: params, gradients, optimizer state, batch, activations.

Params and optimizer state are exact: the trainer's own optimizer (`training.optimizers`) is
initialised abstractly, and every leaf is sharded the way the trainer shards it (the params'
logical axes through the mesh rules; optimizer leaves via `training.train_state.derive_spec`).
A param or optimizer-state dimension its mesh axes do not divide is refused (`partitioning`
raises MeshError, as for the trainer); an activation dimension split over n devices that n does
not divide counts ceil(dim / n), as XLA pads.

Activations are a model of what the backward pass keeps, counted in four tensor kinds per
layer (per device, per microbatch; b = rows per device, s / k = query / key length):

    X = b*s*D   (residual stream, norm outputs; compute dtype)
    Q = b*s*H*K (q, k, v, attention output; compute dtype; H split over `tensor`)
    A = b*H*s*k (attention scores / probabilities; float32)
    F = b*s*F   (MLP hidden; compute dtype; F split over `tensor`)

How many of each a layer keeps depends on the remat policy and on whether layers are scanned.
Without remat, unscanned layers let XLA fuse elementwise chains across forward and backward
(it recomputes e.g. GELU's tanh from the saved pre-activation), while a scanned stack must
store every residual the jaxpr names. The counts below were measured with XLA's
`memory_analysis()` on CPU for each case (see README.md); the remat rows follow the policy
definitions (`full`: layer input only; `dots`: matmul outputs; `dots_no_batch`: weight-matmul
outputs). Causal self-attention computed in query blocks (`causal_blocks`) keeps only the
blocks' scores, (n + 1) / 2n of the square.

On top of the saved tensors the peak holds the larger of two working sets, which are never
alive together: the loss's (two float32 [b, T, V] buffers: logits and the fused
softmax-minus-targets gradient of the custom-VJP loss; the 2-D vocab projection needs no
transposed copy of it), or one layer's backward pass. A scanned stack runs its backward pass as
a while loop whose stacked residual buffers are freed only after the loop, so while the loop
body builds a layer's gradients (dprobs, dscores, the MLP hidden's gradient, copies of the
sliced residuals) every layer's residuals are still alive; remat puts the layer's recomputed
forward activations there too. The unscanned counts cover this themselves (a layer's residuals
are freed as its gradients are built). GPT's loss over every position hides the layer term;
BERT's (scored positions only) and T5's (decoder positions only) do not.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from t5x_lite import layers, partitioning
from t5x_lite.config import MLP_ACTIVATIONS, ModelConfig
from t5x_lite.estimate_xla import batch_features, sequence_lengths
from t5x_lite.models import LossConfig, abstract_variables, build_model

# Saved tensors per layer: (X, Q, A) by remat policy (and scan for 'none'); F counts below.
_SELF_COUNTS = {
    ("none", False): (6, 4, 3.5),
    # Scanned: XLA's buffer assignment holds 11 X-sized stacked residuals per layer in GPT, BERT
    # and T5 alike (the model had 8, a shortfall GPT's large loss term used to cover).
    ("none", True): (11, 4, 2),
    ("full", False): (1, 0, 0), ("full", True): (1, 0, 0),
    ("dots", False): (2, 4, 1), ("dots", True): (2, 4, 1),
    ("dots_no_batch", False): (2, 3, 0), ("dots_no_batch", True): (2, 3, 0),
}
# MLP hidden tensors kept without remat: fused (unscanned, measured) vs every residual the jaxpr
# names (scanned; relu: its output plus a bool mask).
_MLP_COUNTS = {
    False: {"relu": 1, "gelu": 3, "gated-gelu": 2.5, "swiglu": 5, "gated-silu": 5},
    True: {"relu": 1.25, "gelu": 6, "gated-gelu": 8, "swiglu": 6, "gated-silu": 6},
}
# Cross-attention (T5 decoder), per layer: (X, Q on decoder tokens, Q on encoder tokens, A).
_CROSS_COUNTS = {
    ("none", False): (2, 2, 2, 3.5), ("none", True): (4, 2, 2, 2),
    ("full", False): (0, 0, 0, 0), ("full", True): (0, 0, 0, 0),
    ("dots", False): (1, 2, 2, 1), ("dots", True): (1, 2, 2, 1),
    ("dots_no_batch", False): (1, 1, 2, 0), ("dots_no_batch", True): (1, 1, 2, 0),
}
_RELPOS_EXTRA_A = 0.5  # unscanned T5 self-attention: the per-head position bias joins the scores
# One layer's backward pass in a scanned stack or under remat, on top of an unscanned layer's
# counts (which already hold its gradient temporaries): `full` remat rebuilds the scores and
# probabilities (2 A) beside the gradients; T5's per-head position bias [b, H, s, s] collects
# its gradient from every layer in one float32 accumulator (1 A) alive through the backward loop.
_FULL_REMAT_EXTRA_A = 2
_RELPOS_GRAD_A = 1
_STACK_EDGE_X = 3  # per stack: embedding output, final norm input / output
_DROPOUT_BYTES = 6  # per dropped element, unscanned (measured: mask + random bits)
_SHARED_MASK_BYTES = 1  # per element of a mask shared along the sequence (its bool broadcast)
_LOSS_BUFFERS = {"t5": 2, "gpt": 2, "bert": 2}


@dataclasses.dataclass(frozen=True)
class MeshSizes:
    data: int
    fsdp: int
    tensor: int

    @property
    def num_devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:
        return self.data * self.fsdp

    def size(self, axes) -> int:
        if axes is None:
            return 1
        axes = axes if isinstance(axes, tuple) else (axes,)
        return math.prod(getattr(self, a) for a in axes)

    def abstract(self):
        return jax.sharding.AbstractMesh(
            (self.data, self.fsdp, self.tensor), partitioning.MESH_AXES,
            axis_types=(jax.sharding.AxisType.Auto,) * 3)


def resolve_mesh(data: int, fsdp: int, tensor: int, num_devices: int) -> MeshSizes:
    return MeshSizes(*partitioning.mesh_shape(data, fsdp, tensor, num_devices))


def _shard_bytes(shape, dtype, spec, mesh: MeshSizes) -> int:
    spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    n = 1
    for dim, axes in zip(shape, spec):
        n *= -(-dim // mesh.size(axes))
    return n * np.dtype(dtype).itemsize


def state_bytes(config: ml_collections.ConfigDict, mesh: MeshSizes) -> dict[str, int]:
    """Exact bytes per device of params and optimizer state, sharded like the trainer does."""
    from t5x_lite.training import optimizers, train_state

    cfg = ModelConfig.from_dict(config.model)
    model = build_model(cfg, LossConfig())
    boxed = abstract_variables(model)["params"]
    abstract = nn.meta.unbox(boxed)
    rules = partitioning.rules_from_config(config.mesh.get("rules"))
    amesh = mesh.abstract()
    param_sh = partitioning.shardings(boxed, amesh, rules)
    tx, _ = optimizers.make_optimizer(config.optimizer, int(config.train.num_steps))
    abstract_opt = jax.eval_shape(tx.init, abstract)
    opt_sh = train_state.opt_state_shardings(abstract_opt, abstract, param_sh, amesh)

    def total(tree, shardings):
        return sum(_shard_bytes(x.shape, x.dtype, s.spec, mesh)
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))

    return {"params": total(abstract, param_sh), "optimizer": total(abstract_opt, opt_sh),
            "gathered": _gathered_bytes(cfg, abstract, param_sh, mesh)}


def _gathered_bytes(cfg: ModelConfig, abstract_params, shardings, mesh: MeshSizes) -> int:
    """Bytes of FSDP-all-gathered weight copies alive at the peak (compute dtype).

    Measured on XLA:CPU: unscanned, the forward pass's gathered copy of every weight is kept
    for the backward pass; a scanned stack gathers one layer at a time (the largest stack's
    layer counts). Outside the stack, a tied embedding (lookup table and output head at once)
    stayed gathered, while untied tables and heads were used sharded (XLA split the matmul and
    reduced its output instead). These are the partitioner's choices, so treat the figure as
    the likely one, not a certain one.
    """
    if mesh.fsdp == 1:
        return 0
    per_stack: dict[str, int] = {}
    total = 0
    for (path, x), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                             jax.tree.leaves(shardings)):
        dims = [ax if isinstance(ax, tuple) else (ax,) if ax else () for ax in tuple(sh.spec)]
        if not any("fsdp" in axes for axes in dims):
            continue  # not sharded over fsdp (maybe over tensor): nothing to gather
        spec = [tuple(a for a in axes if a != "fsdp") or None for axes in dims]
        n = _shard_bytes(x.shape, cfg.dtype, spec, mesh)
        keys = [str(getattr(k, "key", k)) for k in path]
        if cfg.scan_layers and "layers" in keys:
            stack = keys[0]
            per_stack[stack] = per_stack.get(stack, 0) + n // x.shape[0]
        elif not cfg.scan_layers or cfg.tie_embeddings:
            total += n
    return total + max(per_stack.values(), default=0)


def _layer_counts(mlp: str, policy: str, scanned: bool) -> tuple[float, float, float, float]:
    """(X, Q, A, F) tensors a self-attention block keeps for its backward pass."""
    x, q, a = _SELF_COUNTS[(policy, scanned)]
    if policy == "none":
        f = _MLP_COUNTS[scanned][mlp]
    else:  # full keeps no MLP tensor; the dots policies keep the input projections' outputs
        f = 0 if policy == "full" else len(MLP_ACTIVATIONS[mlp])
    return x, q, a, f


def causal_score_fraction(cfg: ModelConfig, q_len: int) -> float:
    """Share of the T x T score square causal self-attention computes in training
    (layers.dot_product_attention with `causal_blocks` n: (n + 1) / 2n when n divides T, less
    the keys before a sliding window; else the whole square). The `dot_product_attention` impl
    takes the blocks path only with dropout."""
    n = cfg.causal_blocks
    if n <= 1 or q_len % n or (cfg.attention_impl != "xla" and cfg.dropout_rate == 0):
        return 1.0
    c = q_len // n
    firsts = layers.causal_block_first_keys(q_len, n, cfg.sliding_window)
    return c * sum((i + 1) * c - lo for i, lo in enumerate(firsts)) / q_len ** 2


def _act_bytes(cfg: ModelConfig) -> int:
    return np.dtype(cfg.dtype).itemsize


def activation_bytes(config: ml_collections.ConfigDict, mesh: MeshSizes) -> dict[str, float]:
    """Modelled activation bytes per device: saved for backward + the peak working set, the
    larger of the loss buffers ("loss") and one layer's backward pass ("layer_backward":
    scanned stacks and remat only)."""
    cfg = ModelConfig.from_dict(config.model)
    s, t = sequence_lengths(config)
    micro = max(int(config.train.microbatches), 1)
    b = -(-int(config.train.batch_size) // mesh.batch_shards)
    b = -(-b // micro)
    ceil_t = lambda n: -(-n // mesh.tensor)
    d, h, kd = cfg.d_model, ceil_t(cfg.num_heads), cfg.head_dim
    f, v = ceil_t(cfg.d_ff), ceil_t(cfg.vocab_size)
    a = _act_bytes(cfg)

    def layer(q_len, k_len, cross_len, policy, scanned):
        cx, cq, ca, cf = _layer_counts(cfg.mlp, policy, scanned)
        # Causal self-attention in query blocks keeps only the blocks' lower-triangle scores.
        ca *= causal_score_fraction(cfg, q_len) if causal(cross_len) else 1.0
        if cfg.position == "relative" and (policy, scanned) == ("none", False):
            ca += _RELPOS_EXTRA_A
        n = (cx * b * q_len * d + cq * b * q_len * h * kd + cf * b * q_len * f) * a
        n += ca * b * h * q_len * k_len * 4
        if cross_len:
            xx, xq, xs, xa = _CROSS_COUNTS[(policy, scanned)]
            n += (xx * b * q_len * d + (xq * q_len + xs * cross_len) * b * h * kd) * a
            n += xa * b * h * q_len * cross_len * 4
        return n

    t5 = cfg.family == "t5"

    def dropout_bytes(q_len, probs, acts):
        """What the backward pass keeps of masks over `probs` attention-probability and `acts`
        activation elements. Per element: _DROPOUT_BYTES each. Shared along the sequence
        (dropout_broadcast): one row's draws, the activation masks broadcast to full size
        (_SHARED_MASK_BYTES each) and the dropped probs (float32: the mask multiplies them)."""
        if not cfg.dropout_broadcast:
            return _DROPOUT_BYTES * (probs + acts)
        return _DROPOUT_BYTES * (probs + acts) // q_len + _SHARED_MASK_BYTES * acts + 4 * probs

    def dropout_layer_bytes(q_len, k_len, cross_len):
        """One layer's: attention probs (causal query blocks: only theirs), each branch
        output, and in T5 the MLP hidden."""
        frac = causal_score_fraction(cfg, q_len) if causal(cross_len) else 1.0
        probs = int(b * h * q_len * (k_len * frac + cross_len))
        acts = b * q_len * ((3 if cross_len else 2) * d + (f if t5 else 0))
        return dropout_bytes(q_len, probs, acts)

    # The GPT stack and the T5 decoder (the one with cross-attention) are causal; a prefix-LM
    # batch (decoder_causal_attention) lets prefix rows see later keys, so GPT then computes
    # the whole square (gpt.GPT: causal only without that feature).
    prefix_lm = "decoder_causal_attention" in batch_features(config)
    causal = lambda cross_len: (cfg.family == "gpt" and not prefix_lm) or bool(cross_len)
    if cfg.family == "t5":
        stacks = [(cfg.num_layers, s, s, 0), (cfg.decoder_layers, t, t, s)]
        out_len = t
    else:
        stacks = [(cfg.num_layers, s, s, 0)]
        out_len = LossConfig.for_run(config).mlm_predictions or s  # BERT: the scored positions
    saved = sum(n * layer(q, k, c, cfg.remat, bool(cfg.scan_layers)) for n, q, k, c in stacks)
    saved += sum(_STACK_EDGE_X * b * q * d * a for _, q, _, _ in stacks)
    def dropout_edge_bytes(q_len, cross_len):
        """A stack's embedding output mask, and T5's final norm output mask (after the encoder
        per element even when shared: T5X's layout)."""
        n = dropout_bytes(q_len, 0, b * q_len * d)
        if t5:
            n += dropout_bytes(q_len, 0, b * q_len * d) if cross_len else \
                _DROPOUT_BYTES * b * q_len * d
        return n

    if cfg.dropout_rate > 0:
        saved += sum(dropout_layer_bytes(q, k, c) * n + dropout_edge_bytes(q, c)
                     for n, q, k, c in stacks)
    loss = _LOSS_BUFFERS[cfg.family] * b * out_len * v * 4

    def backward_working(q_len, k_len, cross_len):
        """One layer's backward-pass working set (scanned or remat): the tensors an unscanned
        layer holds (its gradient temporaries: dprobs, dscores, the MLP hidden's gradient; under
        remat also its recomputed activations), plus the terms in _FULL_REMAT_EXTRA_A /
        _RELPOS_GRAD_A, all float32 [b, H, s, k] score-sized."""
        n = layer(q_len, k_len, cross_len, "none", False)
        score = b * h * q_len * k_len * 4
        if cfg.remat == "full":
            frac = causal_score_fraction(cfg, q_len) if causal(cross_len) else 1.0
            n += _FULL_REMAT_EXTRA_A * (score * frac + b * h * q_len * cross_len * 4)
        if cfg.position == "relative":
            n += _RELPOS_GRAD_A * score
        return n

    # The backward pass of one layer while every layer's residuals are alive: scanned stacks
    # (stacked residuals outlive the backward loop) and remat (the layer is rebuilt first).
    # Unscanned layers without remat free residuals as they go; their counts include this.
    layer_backward = 0.0
    if cfg.scan_layers or cfg.remat != "none":
        layer_backward = max(backward_working(q, k, c) for _, q, k, c in stacks)
    return {"saved": float(saved), "working": float(max(loss, layer_backward)),
            "loss": float(loss), "layer_backward": float(layer_backward)}


def batch_bytes(config: ml_collections.ConfigDict, mesh: MeshSizes) -> int:
    return sum(-(-shape[0] // mesh.batch_shards) * math.prod(shape[1:]) * 4
               for shape in batch_features(config).values())


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device."""

    params: int
    gradients: int
    optimizer: int
    fsdp_gathered: int  # all-gathered weight copies (FSDP only)
    batch: int
    activations_saved: float
    activations_working: float

    @property
    def activations(self) -> float:
        return self.activations_saved + self.activations_working

    @property
    def total(self) -> float:
        return (self.params + self.gradients + self.optimizer + self.fsdp_gathered + self.batch
                + self.activations)

    def as_dict(self) -> dict[str, float]:
        d = dataclasses.asdict(self)
        d.update(activations=self.activations, total=self.total)
        return d


def estimate_memory(config: ml_collections.ConfigDict, mesh: MeshSizes) -> MemoryEstimate:
    """Per-device training memory for `config` on a (data, fsdp, tensor) mesh of that size."""
    state = state_bytes(config, mesh)
    grads = state["params"]  # float32 gradients, sharded like the params
    if int(config.train.microbatches) > 1:
        grads *= 2  # the accumulator plus one microbatch's gradients
    act = activation_bytes(config, mesh)
    return MemoryEstimate(params=state["params"], gradients=grads, optimizer=state["optimizer"],
                          fsdp_gathered=state["gathered"], batch=batch_bytes(config, mesh),
                          activations_saved=act["saved"], activations_working=act["working"])


def rule_of_thumb(num_params: int) -> dict[str, float]:
    """The folk numbers, for the whole model: 4 B/param to store fp32 weights; ~16 B/param to
    train with Adam in fp32 (weights 4 + gradients 4 + two moments 8); ~24 with the extra bf16
    weights / gradients of mixed precision. They ignore activations, the optimizer's real
    state, and how the mesh divides each piece."""
    return {"store": 4.0 * num_params, "train_adam": 16.0 * num_params,
            "train_mixed": 24.0 * num_params}
