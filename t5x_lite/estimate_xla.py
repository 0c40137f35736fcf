"""XLA's own numbers for a config's training step, to check the estimator against.

`compiled_train_step(config, mesh)` lowers and compiles exactly what `t5x_lite.train` runs (the
trainer's sharded, donated `train_step` from `t5x_lite.training`) on abstract inputs: nothing is
allocated, so even a large config compiles on a laptop CPU. `xla_stats` reads
`compiled.memory_analysis()` (the peak a device needs is arguments + outputs - aliased (donated)
buffers + temporaries) and `compiled.cost_analysis()` (FLOPs per device, counting the body of
a while loop once).

Shape legend: B global batch, S encoder / decoder-only length, T decoder (targets) length.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from t5x_lite import partitioning
from t5x_lite.config import ModelConfig
from t5x_lite.models import LossConfig, build_model


def sequence_lengths(config: ml_collections.ConfigDict) -> tuple[int, int | None]:
    """(encoder or decoder-only length, decoder length for T5 else None), as the trainer reads."""
    family = config.model.family
    if family == "t5":
        return int(config.data.inputs_length), int(config.data.targets_length)
    if family == "bert":
        return int(config.data.inputs_length), None
    return int(config.data.seq_len), None


def batch_features(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Global-batch feature shapes the data pipeline yields for this config (all int32)."""
    b = int(config.train.batch_size)
    s, t = sequence_lengths(config)
    family = config.model.family
    packing = ["segment_ids", "positions"] if config.data.pack else []
    sides = {"t5": [("encoder", s, ["input_tokens"]),
                    ("decoder", t, ["input_tokens", "target_tokens", "loss_weights"])],
             "gpt": [("decoder", s, ["input_tokens", "target_tokens", "loss_weights"])],
             "bert": [("encoder", s, ["input_tokens", "target_tokens", "loss_weights"])]}[family]
    shapes = {f"{side}_{kind}": (b, length)
              for side, length, kinds in sides for kind in kinds + packing}
    if family == "gpt" and config.data.objective == "prefix_lm":
        shapes["decoder_causal_attention"] = (b, s)
    return shapes


@dataclasses.dataclass(frozen=True)
class XlaStats:
    """Per device: bytes from `compiled.memory_analysis()`, FLOPs from `cost_analysis()`."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    flops: float  # everything XLA counts, elementwise included; a loop body (scanned layers,
    # the microbatch loop) once, not once per trip (`estimate.xla_loops`)

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compiled_train_step(config: ml_collections.ConfigDict, mesh=None):
    """The trainer's jitted train step for `config`, compiled for abstract inputs on `mesh`.

    Args:
      config: a full run config (configs/*.py get_config()).
      mesh: a jax Mesh; default `config.mesh` over all local devices.
    Returns:
      the jax `Compiled` object.
    """
    from t5x_lite.training import optimizers, train_state, train_step

    if mesh is None:
        mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = partitioning.rules_from_config(config.mesh.get("rules"))
    tc = config.train
    model = build_model(ModelConfig.from_dict(config.model), LossConfig.for_run(config))
    tx, schedule = optimizers.make_optimizer(config.optimizer, int(tc.num_steps))
    abstract, shardings = train_state.state_shardings(model, tx, mesh, rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
    data_sh = partitioning.data_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=data_sh)
             for k, shape in batch_features(config).items()}
    step = train_step.jit_train_step(
        train_step.make_train_step(model, tx, schedule, microbatches=int(tc.microbatches),
                                   loss_normalizer=tc.loss_normalizer),
        shardings, mesh, rules)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    with partitioning.activate(mesh, rules):
        return step.jitted.lower(state, batch, rng).compile()


def xla_stats(config: ml_collections.ConfigDict, mesh=None) -> XlaStats:
    compiled = compiled_train_step(config, mesh)
    ma = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    return XlaStats(arguments=int(ma.argument_size_in_bytes), outputs=int(ma.output_size_in_bytes),
                    aliased=int(ma.alias_size_in_bytes), temporaries=int(ma.temp_size_in_bytes),
                    flops=float(cost.get("flops", float("nan"))))


def with_overrides(config: ml_collections.ConfigDict, **model_overrides: Any
                   ) -> ml_collections.ConfigDict:
    """A copy of `config` with `model.<key>` replaced (e.g. dtype='float32' for a CPU check)."""
    c = ml_collections.ConfigDict(config.to_dict())
    for k, v in model_overrides.items():
        c.model[k] = v
    return c
