"""Knowledge distillation: train a student from a frozen teacher checkpoint in the same step.

    loss = label_weight * CE(labels, student)
         + kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

both per target token, weighted by the loss weights and divided by the same normaliser as the
plain loss (so gradient accumulation stays exact). The T^2 factor keeps the soft term's gradient
scale independent of the temperature (Hinton et al., 2015). The teacher runs deterministically
under `stop_gradient` inside the same jitted step; its params sit frozen next to the student's
in the train state (`compression.FrozenTrainablePlugin`) and checkpoints hold only the student,
so evaluate / infer / `t5x_lite.load` treat a distillation workdir like any other.

    python -m t5x_lite.train --config=configs/distill_tiny_t5.py --workdir=/tmp/student \\
        --config.distill.teacher=/tmp/tiny_t5

The trainer logs (and evaluates) the student's hard-label loss, comparable with plain training;
the optimised objective is the mix above. The teacher may have any size, but the same family and
vocabulary as the student. Combines with `prune` (a pruned student).

Shape legend: B batch, T length, V vocab.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from t5x_lite import checkpoints, compression
from t5x_lite.config import ModelConfig
from t5x_lite.losses import cross_entropy_sums
from t5x_lite.models import LossConfig, build_model
from t5x_lite.training import run_checks


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The run config's `distill` section."""

    teacher: str = ""  # teacher checkpoint: workdir, its checkpoints/ or checkpoints/<step>
    teacher_step: int = -1  # the teacher's step; -1: the one `teacher` names, pinned at the start
    temperature: float = 2.0
    kl_weight: float = 0.5
    label_weight: float = 0.5

    def __post_init__(self):
        if not 0 < self.temperature < math.inf:  # also NaN
            raise compression.CompressionError(f"distill.temperature must be positive and "
                                               f"finite, got {self.temperature}")
        weights = (self.kl_weight, self.label_weight)
        if not all(0 <= w < math.inf for w in weights) or sum(weights) <= 0:
            raise compression.CompressionError(
                f"distill.kl_weight and distill.label_weight must be finite, >= 0 and not both "
                f"0 (a zero loss trains nothing), got {self.kl_weight} and {self.label_weight}")

    @classmethod
    def from_dict(cls, d) -> "DistillConfig":
        return compression.section_config(cls, d, "distill")


def kl_sum(student_logits_BxTxV, teacher_logits_BxTxV, weights_BxT, temperature: float):
    """sum over tokens of weight * KL(p_teacher^T || p_student^T), float32 scalar."""
    t = jnp.float32(temperature)
    log_p_s = jax.nn.log_softmax(student_logits_BxTxV.astype(jnp.float32) / t, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits_BxTxV.astype(jnp.float32) / t, axis=-1)
    kl_BxT = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return jnp.sum(kl_BxT * weights_BxT.astype(jnp.float32))


class DistillModel(compression.ModelWrapper):
    """A model whose params are {'student': trainable, 'teacher': frozen}.

    `loss_fn` returns the distillation objective and the student's hard-label sums (the keys
    of `losses.cross_entropy_sums`, as every model's loss does); logits / scoring are the
    student's.
    """

    def __init__(self, student, teacher, cfg: DistillConfig):
        super().__init__(student)
        self.teacher, self.distill = teacher, cfg

    def init(self, rng, batch=None):
        return {"params": {"student": self.inner.init(rng, batch)["params"],
                           "teacher": self.teacher.init(rng, batch)["params"]}}

    def loss_fn(self, params, batch, rng=None, *, normalizer=None):
        inner = self.inner
        logits = inner.logits(params["student"], batch, rng=rng, deterministic=rng is None)
        weights = inner._weights(batch)
        sums = cross_entropy_sums(logits, batch[inner.target_feature], weights,
                                  z_loss=inner.loss.z_loss,
                                  label_smoothing=inner.loss.label_smoothing)
        if normalizer is None:
            normalizer = jnp.maximum(sums["weight_sum"], 1.0)
        teacher_logits = jax.lax.stop_gradient(self.teacher.logits(params["teacher"], batch))
        kl = kl_sum(logits, teacher_logits, weights, self.distill.temperature)
        t2 = self.distill.temperature ** 2
        loss = (self.distill.label_weight * (sums["loss_sum"] / normalizer)
                + self.distill.kl_weight * t2 * (kl / normalizer))
        return loss, sums

    def logits(self, params, batch, *, rng=None, deterministic: bool = True):
        return self.inner.logits(params["student"], batch, rng=rng, deterministic=deterministic)

    def score_batch(self, params, batch):
        return self.inner.score_batch(params["student"], batch)


def teacher_model(path, student_config: ModelConfig, step: int = -1, data=None):
    """(model, workdir, step) of a teacher checkpoint (`step` of it; -1: the step `path` names);
    checks it can teach this student (on rows of the data config section `data`)."""
    workdir, step = compression.frozen_checkpoint(path, step, f"The teacher is step {step} of")
    cfg = ModelConfig.from_dict(checkpoints.read_config(workdir).model)
    if cfg.family != student_config.family:
        raise compression.CompressionError(f"The teacher {workdir} is a {cfg.family} model but "
                                           f"the student is {student_config.family}")
    if cfg.vocab_size != student_config.vocab_size:
        raise compression.CompressionError(f"Teacher vocab_size {cfg.vocab_size} != student "
                                           f"vocab_size {student_config.vocab_size}: the KL term "
                                           "compares their distributions token by token")
    too_long = run_checks.rows_past_position_table(cfg, data)
    if too_long:
        raise compression.CompressionError(
            f"{too_long[0]}={too_long[1]} is longer than the teacher's max_len={cfg.max_len} "
            f"(its learned position table, {workdir}); set {too_long[0]} <= {cfg.max_len}")
    # The teacher runs deterministically in the student's compute dtype.
    cfg = dataclasses.replace(cfg, dropout_rate=0.0, dtype=student_config.dtype)
    return build_model(cfg, LossConfig()), workdir, step


def _require_teacher(cfg: DistillConfig) -> None:
    if not cfg.teacher:
        raise compression.CompressionError("distill.teacher is required: the checkpoint to "
                                           "distill from")


def pin_teacher_step(config, workdir=None) -> DistillConfig:
    """The run's DistillConfig with `teacher_step` pinned (`compression.pin_frozen_step`): a
    resumed student keeps learning from the teacher it started with, even when the teacher's
    run has saved later checkpoints since."""
    cfg = DistillConfig.from_dict(config.distill)
    _require_teacher(cfg)
    compression.pin_frozen_step(
        config, "distill", "teacher", "teacher_step", workdir,
        "the student in {workdir} was distilled from step {pinned} of teacher {path}; keep it, or "
        "distill in a new --workdir (train.init_from={workdir} starts from this student)")
    return DistillConfig.from_dict(config.distill)


class DistillPlugin(compression.FrozenTrainablePlugin):
    frozen_key, trainable_key = "teacher", "student"

    def __init__(self, cfg: DistillConfig, mesh, rules, inner: compression.Plugin | None = None,
                 data=None):
        super().__init__(mesh, rules)
        _require_teacher(cfg)
        self.cfg, self.inner, self.data = cfg, inner or compression.Plugin(), data

    def wrap(self, model, tx):
        model, tx = self.inner.wrap(model, tx)  # e.g. pruning: the student's optimizer
        return super().wrap(model, tx)

    def wrap_model(self, model):
        teacher, *self.frozen_from = teacher_model(self.cfg.teacher, model.config,
                                                   self.cfg.teacher_step, self.data)
        return DistillModel(model, teacher, self.cfg)

    def init_trainable(self, rng):
        return self.model.inner.init(rng)["params"]
