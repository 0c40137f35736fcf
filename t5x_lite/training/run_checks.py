"""Guards around the training loop: workdir/config compatibility, a model that fits its data,
divergence, preemption, and the per-window metric summary.
"""
from __future__ import annotations

import math
import signal
import threading

import jax
from absl import logging
from etils import epath

from t5x_lite import checkpoints
from t5x_lite.config import ConfigError, ModelConfig
from t5x_lite.data import objectives
from t5x_lite.errors import UserError


class ConfigMismatchError(UserError):
    """A workdir whose saved config describes a differently shaped model."""


class DivergenceError(UserError):
    """A non-finite loss."""


def check_workdir_config(workdir, saved, config, override: bool) -> None:
    """Refuses to continue a workdir trained with another model shape unless `override`;
    `saved` is its config.json (`checkpoints.saved_config`; None: a new run)."""
    if saved is None:
        return
    path = epath.Path(workdir) / checkpoints.CONFIG_FILE
    old = ModelConfig.from_dict(saved.model).shape_signature()
    new = ModelConfig.from_dict(config.model).shape_signature()
    diffs = [f"{k}: {old[k]} -> {new[k]}" for k in sorted(new) if old.get(k) != new[k]]
    if diffs and not override:
        steps = checkpoints.all_steps(workdir)
        hint = ("use a new --workdir, or pass --override_config to replace the saved config"
                if not steps else
                f"use a new --workdir; --override_config replaces the saved config, but "
                f"checkpoints/{steps[-1]} holds the old model, so a resume works only when "
                "every param keeps its shape (e.g. another activation)")
        raise ConfigMismatchError(
            f"{path} was written for a model of another shape ({'; '.join(diffs)}); {hint}")
    if diffs:
        logging.warning("Overriding the saved config's model shape: %s", "; ".join(diffs))


def check_loop_numbers(config, error: type[UserError]) -> None:
    """Raises `error` for settings the trainer cannot run: counts below their least value, a
    batch that microbatches do not divide, and a model that cannot train on the data
    (`check_model_for_data`). Trainer and estimate check the same."""
    tc = config.train
    for key, value, least in (("train.num_steps", int(tc.num_steps), 0),
                              ("train.batch_size", int(tc.batch_size), 1),
                              ("train.microbatches", int(tc.microbatches), 1),
                              ("train.eval_every", int(tc.eval_every), 0),
                              ("train.log_every", int(tc.get("log_every", 1)), 1),
                              ("checkpoint.save_every", int(config.checkpoint.save_every), 1),
                              ("checkpoint.keep", int(config.checkpoint.keep), 0)):
        if value < least:
            raise error(f"{key} must be >= {least}, got {value}")
    if int(tc.batch_size) % int(tc.microbatches):
        raise error(f"train.batch_size={tc.batch_size} is not divisible by "
                    f"train.microbatches={tc.microbatches}")
    _check_loss_and_optimizer_numbers(config, error)
    check_model_for_data(config, error)


def check_batch_shards(batch: int, microbatches: int, shards: int, processes: int,
                       error: type[UserError]) -> None:
    """Raises `error` unless every microbatch splits evenly over the batch shards (data x fsdp)
    and the batch over the processes: XLA pads an uneven split with copies of rows, which cost
    compute and memory that the step count and estimate miss (batch 16 in 4 microbatches over
    8 shards used more memory than in 2). Trainer and estimate check the same."""
    if batch % processes or (batch // microbatches) % shards:
        per = "" if microbatches == 1 else (f" in train.microbatches={microbatches} of "
                                            f"{batch // microbatches} rows")
        raise error(f"train.batch_size={batch}{per} must split evenly over the batch shards "
                    f"data*fsdp={shards}" + (f" and the {processes} processes"
                                             if processes > 1 else ""))


def _check_loss_and_optimizer_numbers(config, error: type[UserError]) -> None:
    """Values that would train silently wrong (a negative normaliser or learning rate ascends
    the loss, a negative label smoothing was ignored, Adam's b1 / b2 outside [0, 1)) or stop
    with a misleading "diverged" (label_smoothing 1, normaliser 0, b2 = 1, Adam's eps = 0)."""
    at_least_0 = (lambda x: x >= 0, "a number >= 0")
    tc, opt = config.train, config.get("optimizer")
    checks = [("train.eval_batches", tc.get("eval_batches", 0), at_least_0),
              ("train.z_loss", tc.get("z_loss", 0.0), at_least_0),
              ("train.peak_flops", tc.get("peak_flops", 0.0), at_least_0),
              ("train.label_smoothing", tc.get("label_smoothing", 0.0),
               (lambda x: 0 <= x < 1, "in [0, 1)"))]
    if tc.get("loss_normalizer", "tokens") != "tokens":  # a number, often as a string
        try:
            normalizer = float(tc.loss_normalizer)
        except (TypeError, ValueError):
            normalizer = tc.loss_normalizer
        checks.append(("train.loss_normalizer", normalizer,
                       (lambda x: x > 0, "'tokens' or a number > 0")))
    if opt is not None:
        checks += [(f"optimizer.{key}", opt.get(key, 0), at_least_0)
                   for key in ("learning_rate", "warmup_steps", "decay_steps", "weight_decay",
                               "grad_clip")
                   if not (key == "grad_clip" and opt.get(key) is None)]  # None: the default
        checks.append(("optimizer.end_lr_fraction", opt.get("end_lr_fraction", 0.0),
                       (lambda x: 0 <= x <= 1, "in [0, 1]")))
        if opt.get("name", "adamw") == "adamw":  # b2 = 1: Adam's bias correction divides by 0
            checks += [(f"optimizer.{key}", opt.get(key, 0.9), (lambda x: 0 <= x < 1, "in [0, 1)"))
                       for key in ("b1", "b2")]
            # eps = 0: a param whose gradient is exactly 0 (GPT-2's key bias) updates by 0 / 0
            checks.append(("optimizer.eps", opt.get("eps", 1e-8),
                           (lambda x: x > 0, "a number > 0")))
    for key, value, (ok, what) in checks:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and ok(value)):
            raise error(f"{key} must be {what}, got {value!r}")


_FAMILY_OBJECTIVES = {"t5": objectives.ENCODER_DECODER, "gpt": objectives.DECODER_ONLY,
                      "bert": objectives.ENCODER_ONLY}


def check_model_for_data(config, error: type[UserError]) -> None:
    """Raises `error` for a model a new run cannot train on its data: a setting the model would
    not use (strict `ModelConfig.from_dict`: what an old saved config may still hold is read
    leniently when loading, never started anew), an objective that makes another family's
    batches, or rows longer than the learned position table (positions past it read NaN
    embeddings: the first step would look like a divergence), and float16 compute, whose
    backward pass underflows without loss scaling, which training does not do."""
    try:
        cfg = ModelConfig.from_dict(config.model, upgrade=False)
    except ConfigError as e:
        raise error(str(e)) from None
    if cfg.dtype == "float16":
        # The loss is divided by the batch's token count before the backward pass, so its
        # float16 cotangents flush to zero: at 1M tokens a step, nearly every gradient.
        raise error("model.dtype='float16' cannot train: without loss scaling (not "
                    "implemented) its gradients underflow; use 'bfloat16' (float16 serves "
                    "inference: t5x_lite.load(path, dtype='float16'))")
    data = config.get("data")
    if data is None:
        return
    # Raw values: DataConfig (built later) reports malformed ones in its own words.
    objective = data.get("objective")
    if objective in objectives.OBJECTIVES and objective not in _FAMILY_OBJECTIVES[cfg.family]:
        raise error(f"data.objective={objective!r} does not fit model.family={cfg.family!r}; "
                    f"its objectives: {', '.join(map(repr, _FAMILY_OBJECTIVES[cfg.family]))}")
    too_long = rows_past_position_table(cfg, data)
    if too_long:
        key, length = too_long
        raise error(f"{key}={length} is longer than model.max_len={cfg.max_len}, the "
                    f"model's learned position table; set {key} <= {cfg.max_len} (or, for "
                    f"a new model, model.max_len >= {length})")


def rows_past_position_table(cfg: ModelConfig, data) -> tuple[str, int] | None:
    """(length key, length) of `data` (a data config section, or None) when its rows are longer
    than `cfg`'s learned position table, else None. Positions past the table read NaN
    embeddings: training, evaluation and a distillation teacher would all report NaN."""
    if cfg.position != "learned" or data is None:
        return None
    key = "data.seq_len" if cfg.family == "gpt" else "data.inputs_length"
    length = data.get(key.split(".")[1])  # raw: DataConfig reports malformed ones itself
    return (key, length) if isinstance(length, int) and length > cfg.max_len else None


def check_finite(fetched, *, saved_steps, workdir) -> None:
    """Raises DivergenceError naming the first step whose loss or gradient norm is NaN / inf
    (non-finite gradients make non-finite params: the step must not be saved)."""
    for step, m in fetched:
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
        if math.isfinite(loss) and math.isfinite(grad_norm):
            continue
        # Step N starts from the params of checkpoint N-1: those gave the bad numbers, so the
        # last good checkpoint is an earlier one.
        good = [s for s in saved_steps if s < step - 1]
        keep = (f"the last good checkpoint is {workdir}/checkpoints/{good[-1]}" if good
                else "no good checkpoint was saved before it")
        if step - 1 in saved_steps:
            keep += (f"; {workdir}/checkpoints/{step - 1} holds the params this step started "
                     "from (a re-run resumes from the latest checkpoint: remove it first)")
        raise DivergenceError(
            f"Training diverged: loss is {loss} at step {step} (grad norm {grad_norm}); "
            f"stopped without saving, {keep}. Lower the learning rate, or set train.debug=True "
            "to find the first NaN")


def window_metrics(window, step_time: float | None, tokens_per_step: int, step_flops: float,
                   peak_flops_total: float | None) -> dict[str, float]:
    """Summary of the steps since the last log: mean loss, token accuracy over all weighted
    tokens, mean grad norm, the last learning rate, and speed (step_time excludes compilation)."""
    ms = [m for _, m in window]
    weights = sum(float(m["weight_sum"]) for m in ms)
    out = {
        "loss": sum(float(m["loss"]) for m in ms) / len(ms),
        "accuracy": sum(float(m["correct_sum"]) for m in ms) / max(weights, 1.0),
        "z_loss": sum(float(m["z_loss_sum"]) for m in ms) / max(weights, 1.0),
        "grad_norm": sum(float(m["grad_norm"]) for m in ms) / len(ms),
        "learning_rate": float(ms[-1]["learning_rate"]),
        "target_tokens": weights / len(ms),
    }
    if step_time:
        out["step_time"] = step_time
        out["tokens_per_s"] = tokens_per_step / step_time
        if peak_flops_total:
            out["mfu"] = step_flops / step_time / peak_flops_total
    return out


class PreemptionFlag:
    """SIGTERM -> save and stop. One process: our own handler, and Ctrl-C (SIGINT) does the
    same, once: a second Ctrl-C stops at once, without saving. Several processes: jax's
    preemption sync point, which has every process agree on the same step (the coordination
    service listens for the signal)."""

    def __init__(self):
        self._event = threading.Event()
        self._multi = jax.process_count() > 1
        self._previous = self._previous_int = None
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
            self._previous_int = signal.signal(signal.SIGINT, self._interrupted)

    def _interrupted(self, *_):
        self._event.set()
        signal.signal(signal.SIGINT, self._previous_int)  # the next Ctrl-C stops at once
        logging.warning("Interrupted: saving a checkpoint after this step, then stopping "
                        "(Ctrl-C again to stop without saving)")

    def check(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self._event.set()
        return self._event.is_set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            signal.signal(signal.SIGINT, self._previous_int)
            self._previous = self._previous_int = None
