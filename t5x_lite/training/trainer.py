"""The training loop: `train(config, workdir)`; re-running it on the same workdir resumes.

One run = mesh + sharded train state (fresh, resumed, or params from `train.init_from`) + grain
iterator, then `num_steps` calls of one jitted `train_step`. Device metrics are kept as arrays
and fetched only at log / save steps, so the host never waits on the device in between. A
checkpoint (params, optimizer state, iterator state, config) lands every `save_every` steps
(async) and at the end; the loop stops on a non-finite loss before it could save bad state,
and on SIGTERM saves and returns.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from t5x_lite import checkpoints, compression, distributed, files, partitioning
from t5x_lite.config import ModelConfig
from t5x_lite.data import DataConfig, load_vocab, make_dataset, make_global_batch
from t5x_lite.errors import UserError
from t5x_lite.hf_interop import HF_TOKENIZER_JSON, workdir_vocabulary
from t5x_lite.models import LossConfig, build_model
from t5x_lite.training import flops as flops_lib
from t5x_lite.training import eval_sums, metrics_writer, optimizers, train_state, train_step
from t5x_lite.training.metrics_writer import MetricsWriter
from t5x_lite.training.run_checks import (ConfigMismatchError, DivergenceError, PreemptionFlag,
                                          check_batch_shards, check_finite, check_loop_numbers,
                                          check_workdir_config, window_metrics)
from t5x_lite.vocab import Vocabulary


class TrainingError(UserError):
    """A run that cannot start or continue (bad settings, incompatible workdir, divergence)."""


@dataclasses.dataclass
class TrainResult:
    step: int  # steps completed
    last_metrics: dict  # the last logged metrics (host floats)
    preempted: bool = False


def _lengths(model_cfg: ModelConfig, data: DataConfig) -> tuple[int, int | None]:
    if model_cfg.family == "t5":
        return data.inputs_length, data.targets_length
    if model_cfg.family == "bert":
        return data.inputs_length, None
    return data.seq_len, None


def _tokens_per_batch(model_cfg: ModelConfig, batch_size: int, data: DataConfig) -> int:
    length, targets = _lengths(model_cfg, data)
    return batch_size * (length + (targets or 0))


def _check_vocab(vocab, workdir: epath.Path, saved_run, override: bool) -> bool:
    """Refuses to continue a workdir whose vocab.model has other pieces than this run's
    vocabulary (data.vocab_path / data.vocab_size changed), or whose config.json has other
    data.extra_ids, unless `override`: its checkpoints' ids would mean other tokens, and
    infer / evaluate decode with the workdir's file. Returns whether to replace it (done
    with the config, once the run has been built: a run that fails before then leaves the
    old file). `saved_run`: the workdir's config.json (None: a new run)."""
    config = workdir / checkpoints.CONFIG_FILE
    extra_ids = None if saved_run is None else saved_run.get("data", {}).get("extra_ids")
    if extra_ids is not None and int(extra_ids) != getattr(vocab, "extra_ids", extra_ids):
        # the sentinels count down from the vocabulary's end: every one of them would move
        if not override:
            raise TrainingError(
                f"{config} was written with data.extra_ids={extra_ids}, this run has "
                f"{vocab.extra_ids}: its checkpoints' sentinel ids would mean other tokens; set "
                f"--config.data.extra_ids={extra_ids}, or pass --override_config")
        logging.warning("Overriding the saved data.extra_ids=%s with %d", extra_ids,
                        vocab.extra_ids)
    saved = workdir / checkpoints.VOCAB_FILE
    if not saved.exists() or getattr(vocab, "path", None) is None:
        return False
    old = Vocabulary(saved)
    if old.same_pieces(vocab):
        return False
    if not override:
        raise TrainingError(
            f"{saved} ({old.sp_size} pieces) is not this run's vocabulary ({vocab.path}, "
            f"{vocab.sp_size} pieces): data.vocab_path or data.vocab_size changed; use a new "
            "--workdir, or pass --override_config to replace it")
    return True


def _check_source_vocab(vocab, src, what: str) -> None:
    """Refuses weights from the workdir `src` (`what`: "train.init_from", a teacher, a LoRA
    base) trained on another vocabulary than this run's: the same ids would mean other tokens
    to them and to this run's data."""
    saved = workdir_vocabulary(src)  # vocab.model, or a converted model's tokenizer.json
    if saved.name == HF_TOKENIZER_JSON:
        raise TrainingError(f"The {what} {src} has an HF tokenizer.json (a converted model's), "
                            "which the training data pipeline does not take: its ids would mean "
                            "other tokens to this run's data")
    if not saved.exists():  # e.g. a converted checkpoint without its tokenizer: ids only
        return
    extra_ids = int(checkpoints.read_config(src).get("data", {}).get("extra_ids", vocab.extra_ids))
    old = Vocabulary(saved, extra_ids=extra_ids)
    if old.same_pieces(vocab) and old.extra_ids == vocab.extra_ids:
        return
    raise TrainingError(
        f"The {what} {src} was trained on another vocabulary ({saved}: "
        f"{old.sp_size} pieces + {old.extra_ids} extra ids) than this run's "
        f"({getattr(vocab, 'path', None) or 'data.vocab_size'}: {vocab.sp_size} pieces + "
        f"{vocab.extra_ids} extra ids); set --config.data.vocab_path={saved} and "
        f"--config.data.extra_ids={old.extra_ids}")


def _copy_vocab(vocab, workdir: epath.Path, replace: bool) -> None:
    src = getattr(vocab, "path", None)
    dst = workdir / checkpoints.VOCAB_FILE
    if src is not None and (replace or not dst.exists()):
        if replace:
            logging.warning("Replacing %s with this run's vocabulary %s", dst, src)
        files.write_atomic(dst, epath.Path(src).read_bytes())


def _pin_grad_clip(config, saved_run) -> None:
    """An unset `optimizer.grad_clip` becomes a number in the run's config: the one in a
    resumed run's config.json `saved_run` (runs saved before the per-optimizer default clipped
    Adafactor at 1.0, and their optimizer state holds that clipping), else the optimizer's
    default."""
    if config.optimizer.get("grad_clip") is not None:
        return
    saved = None if saved_run is None else saved_run.get("optimizer", {}).get("grad_clip")
    with config.unlocked():
        config.optimizer.grad_clip = (float(saved) if saved is not None
                                      else optimizers.grad_clip(config.optimizer))


def _optimizer_changed(error, workdir, step: int, config) -> str:
    """The error line for a checkpoint whose optimizer state this run's optimizer cannot take,
    naming the optimizer settings changed since it was saved."""
    saved = checkpoints.read_checkpoint_config(workdir, step) or {}
    old, new = saved.get("optimizer") or {}, config.optimizer.to_dict()
    changed = [f"optimizer.{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(new)
               if k in old and old[k] != new[k]]
    fresh = (f"start a new --workdir with --config.train.init_from={workdir} (params only, a "
             "fresh optimizer state)")
    if not changed:  # same settings: the state's layout changed (Adafactor's factored kernels)
        return (f"{error}; the optimizer settings are the ones it was saved with, so its state "
                f"comes from an older t5x_lite with another state layout: {fresh}")
    return (f"{error}; the optimizer settings changed since it was saved "
            f"({'; '.join(changed)}): resume with the saved ones, or {fresh}")


def resumed_lr_change(saved: dict | None, config, step: int) -> str | None:
    """A warning when the learning rate at the resume `step` differs from what the checkpoint's
    run would have used (changed lr settings, or an extended run whose decay follows
    train.num_steps), else None."""
    if not saved or "optimizer" not in saved or "train" not in saved:
        return None
    old_steps, new_steps = int(saved["train"]["num_steps"]), int(config.train.num_steps)
    try:
        old = float(optimizers.make_schedule(ml_collections.ConfigDict(saved["optimizer"]),
                                             old_steps)(step))
    except (optimizers.OptimizerError, AttributeError, KeyError, TypeError, ValueError):
        return None  # an older config without some key (ConfigDict: AttributeError)
    new = float(optimizers.make_schedule(config.optimizer, new_steps)(step))
    if abs(new - old) <= 1e-6 * max(abs(old), 1e-12):
        return None
    opt = config.optimizer
    why = ""
    if (opt.schedule in ("cosine", "linear") and not int(opt.decay_steps)
            and old_steps != new_steps):
        why = (f": the {opt.schedule} decay follows train.num_steps ({old_steps} -> {new_steps}) "
               f"while optimizer.decay_steps=0; set --config.optimizer.decay_steps={old_steps} "
               "to keep the old decay")
    return f"The learning rate at the resume step {step} changes from {old:.4g} to {new:.4g}{why}"


def evaluate(eval_fn, params, config, vocab, mesh, per_process_batch: int) -> dict[str, float]:
    """Loss / accuracy over the first `train.eval_batches` batches of the eval split (all of it
    when 0), the same steps on every process (`eval_sums`). With a `data.mixture`, each entry
    is evaluated on its own split (`<name>/loss`, `<name>/accuracy`) and `loss` / `accuracy`
    cover them all."""
    total, per_entry = eval_sums.mixture_sums(
        eval_fn, params, DataConfig.from_dict(config.data), vocab, config.data.eval_split,
        batch_size=per_process_batch, seed=config.seed, mesh=mesh,
        limit=int(config.train.eval_batches))
    metrics = _eval_metrics(total)
    for name, sums in per_entry.items():
        metrics.update({f"{name}/{k}": v for k, v in _eval_metrics(sums).items()})
    return metrics


def _eval_metrics(sums: eval_sums.Sums) -> dict[str, float]:
    if sums.tokens <= 0:  # an empty split
        return {}
    t = sums.totals
    return {"loss": (t["loss_sum"] - t["z_loss_sum"]) / t["weight_sum"],
            "accuracy": t["correct_sum"] / t["weight_sum"]}


def _check_same_checkpoints(latest: int | None, ckpt_dir) -> None:
    """Every process must resume from one step. A --workdir on each host's own disk (not a
    bucket or a shared file system) lists process 0's checkpoints there alone: the others
    would start afresh, then wait for it in collectives that never match."""
    seen = distributed.every_process(-1 if latest is None else latest)
    if len(set(seen)) > 1:
        found = ", ".join(f"process {i}: {f'step {s}' if s >= 0 else 'none'}"
                          for i, s in enumerate(seen))
        raise TrainingError(f"the processes see different checkpoints in {ckpt_dir} ({found}): "
                            "--workdir must be one directory that every host shares (a bucket "
                            "or a shared file system)")


def train(config: ml_collections.ConfigDict, workdir, *, override_config: bool = False
          ) -> TrainResult:
    """Trains (or resumes) per `config` in `workdir`. Raises TrainingError / CheckpointError."""
    if not str(workdir).strip():  # `--workdir=$UNSET`: would train into the current directory
        raise TrainingError("--workdir is empty; give the run's directory")
    workdir = epath.Path(workdir)
    # The same command started twice would resume from the same step and overwrite the first
    # run's checkpoints and metrics.
    # Across hosts (a workdir on a bucket or a shared file system), a heartbeat lease.
    with distributed.exclusive(workdir, lambda holder: TrainingError(
            f"--workdir {workdir} is in use by another training run ({holder}); wait for it to "
            "finish or stop it"), lease=True) as lease_lost:
        return _train(config, workdir, override_config, lease_lost)


def _data_changes(saved: dict | None, data: DataConfig) -> str:
    """'; data.x, data.y changed' against the checkpoint's config, or ''."""
    if not saved or not isinstance(saved.get("data"), dict):
        return ""
    now = data.to_dict()
    try:
        before = DataConfig.from_dict(saved["data"]).to_dict()
    except UserError:
        return ""
    changed = [k for k in now if now[k] != before.get(k)]
    return f"; data.{', data.'.join(changed)} changed" if changed else ""


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, override_config: bool,
           lease_lost=lambda: None) -> TrainResult:
    is_main = jax.process_index() == 0
    tc = config.train
    log_every = 1 if tc.debug else int(tc.log_every)  # >= 1: check_loop_numbers
    num_steps = int(tc.num_steps)
    check_loop_numbers(config, TrainingError)
    if workdir.exists() and not workdir.is_dir():
        raise TrainingError(f"--workdir {workdir} is a file, not a directory")
    stored = checkpoints.all_steps(workdir)
    if num_steps == 0 and not stored:  # before anything is written
        raise TrainingError(f"train.num_steps=0 and --workdir {workdir} holds no checkpoint: "
                            "nothing to train; set --config.train.num_steps >= 1")
    model_cfg = ModelConfig.from_dict(config.model)
    data_cfg = DataConfig.from_dict(config.data)
    saved_run = checkpoints.saved_config(workdir)  # read once: the checks below see one file
    try:
        check_workdir_config(workdir, saved_run, config, override_config)
    except ConfigMismatchError as e:
        raise TrainingError(str(e)) from None
    _pin_grad_clip(config, saved_run)

    mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = partitioning.rules_from_config(config.mesh.get("rules"))
    partitioning.check_process_rows(mesh)
    batch_shards = partitioning.batch_shards(mesh)
    global_batch = int(tc.batch_size)
    check_batch_shards(global_batch, int(tc.microbatches), batch_shards, jax.process_count(),
                       TrainingError)
    per_process_batch = global_batch // jax.process_count()

    loss = LossConfig.for_run(config)
    model = build_model(model_cfg, loss)
    tx, schedule = optimizers.make_optimizer(config.optimizer, num_steps)
    # Compression hook (README.md): the `lora` / `distill` / `prune` config sections
    # change the params tree, the optimizer and what checkpoints hold; identity without them.
    plugin = compression.from_config(config, mesh, rules, workdir)
    model, tx = plugin.wrap(model, tx)
    vocab = load_vocab(config.data)
    replace_vocab = _check_vocab(vocab, workdir, saved_run, override_config)
    frozen = getattr(plugin, "frozen_from", None)  # a teacher / LoRA base
    if frozen is not None:
        _check_source_vocab(vocab, frozen[0], plugin.frozen_key)
    if vocab.vocab_size > model_cfg.vocab_size:
        raise TrainingError(f"The vocabulary has {vocab.vocab_size} ids but model.vocab_size is "
                            f"{model_cfg.vocab_size}; set model.vocab_size >= "
                            f"{vocab.padded_vocab_size}")
    train_iter = make_dataset(config.data, vocab, split=data_cfg.train_split,
                              batch_size=per_process_batch, seed=int(config.seed))
    if tc.eval_every:  # a split the in-loop eval cannot read fails now, not after training
        eval_sums.check_splits(data_cfg, vocab, data_cfg.eval_split,
                               batch_size=per_process_batch, seed=int(config.seed))
    abstract, shardings = train_state.state_shardings(model, tx, mesh, rules)
    init_rng, dropout_rng = jax.random.split(jax.random.key(int(config.seed)))
    if tc.init_from and not stored:
        # a bad init_from (missing, another model, a LoRA run) fails before the workdir is made
        src, src_step = checkpoints.resolve(tc.init_from)
        checkpoints.check_params_match(src, src_step, plugin.checkpointed(abstract.params))
        _check_source_vocab(vocab, src, "train.init_from")
    # Made here by process 0 so that a failure (a --workdir below a file) stops every process
    # with one line; orbax's manager would make it with the others waiting in a barrier.
    ckpt_dir = workdir / checkpoints.CHECKPOINT_DIR
    distributed.on_process_0(lambda: ckpt_dir.mkdir(parents=True, exist_ok=True),
                             f"make {ckpt_dir}")
    mngr = checkpoints.make_train_manager(workdir, keep=int(config.checkpoint.keep),
                                          async_save=bool(config.checkpoint.async_save))
    start = mngr.latest_step()
    _check_same_checkpoints(start, ckpt_dir)
    if start is not None:
        logging.info("Resuming from %s/checkpoints/%d", workdir, start)
        saved = checkpoints.read_checkpoint_config(workdir, start)
        restore = functools.partial(
            checkpoints.restore_train_state, mngr, start,
            plugin.checkpointed(checkpoints.abstract_with_shardings(abstract.params,
                                                                    shardings.params)),
            checkpoints.abstract_with_shardings(abstract.opt_state, shardings.opt_state))
        try:
            params, opt_state = restore(data_iterator=train_iter)
        except checkpoints.OptimizerStateMismatch as e:
            raise TrainingError(_optimizer_changed(e, workdir, start, config)) from None
        except checkpoints.DataStateMismatch as e:
            # The data config changed on purpose (a new mixture, another objective or
            # packing): the model and optimizer go on, the new data from its start.
            logging.warning("%s%s: params and optimizer state are restored; the data starts "
                            "from the beginning of its seeded order", e,
                            _data_changes(saved, data_cfg))
            train_iter = make_dataset(config.data, vocab, split=data_cfg.train_split,
                                      batch_size=per_process_batch, seed=int(config.seed))
            params, opt_state = restore()
        params = plugin.full_params(params, init_rng)  # compression hook
        note = resumed_lr_change(saved, config, start)
        if note:
            logging.warning("%s", note)
        state = train_state.TrainState(
            step=jax.device_put(jnp.int32(start), shardings.step), params=params,
            opt_state=opt_state)
    else:
        start, params = 0, None
        if tc.init_from:
            src, src_step = checkpoints.resolve(tc.init_from)
            logging.info("Initialising params from %s/checkpoints/%d", src, src_step)
            params = checkpoints.restore_params(
                src, src_step, plugin.checkpointed(checkpoints.abstract_with_shardings(
                    abstract.params, shardings.params)))
        params = plugin.full_params(params, init_rng)  # compression hook
        state, _ = train_state.create_train_state(model, tx, mesh, rules, init_rng, params=params)

    step_fn = train_step.jit_train_step(
        train_step.make_train_step(model, tx, schedule, microbatches=int(tc.microbatches),
                                   loss_normalizer=tc.loss_normalizer),
        shardings, mesh, rules)
    eval_fn = train_step.jit_eval_step(train_step.make_eval_step(model), shardings.params, mesh,
                                       rules)
    length, targets = _lengths(model_cfg, data_cfg)
    step_flops = flops_lib.train_step_flops(model_cfg, global_batch, length, targets,
                                            loss.mlm_predictions)
    peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, float(tc.peak_flops))
    tokens_per_step = _tokens_per_batch(model_cfg, global_batch, data_cfg)
    if is_main:  # only now: a config that fails above leaves no saved config to disagree with
        workdir.mkdir(parents=True, exist_ok=True)
    # The lease is written now that the workdir exists, before anything goes into it: a run on
    # another host that started on the same fresh workdir and wrote its lease first wins.
    taken = lease_lost()
    if taken:
        raise TrainingError(f"--workdir {workdir} is in use by another training run ({taken}); "
                            "wait for it to finish or stop it")
    def eval_due(s: int) -> bool:
        return bool(tc.eval_every) and (s % int(tc.eval_every) == 0 or s == num_steps)

    # A run stopped at a checkpoint step before that step's in-loop eval was written (SIGTERM
    # skips it; a kill during it) has it run now, so the metrics read as an uninterrupted run's.
    redo_eval = bool(distributed.agree(int(
        start > 0 and eval_due(start) and is_main
        and not metrics_writer.has_metric(workdir / metrics_writer.METRICS_FILE, start,
                                          "eval/loss"))))
    idle = start >= num_steps and not redo_eval
    # A resumed run with no step to train (at most an eval to redo) leaves the saved config as
    # it was: evaluate --follow reads the run's final step (train.num_steps) from it.
    if is_main and not (start >= num_steps and start > 0):
        checkpoints.write_config(workdir, config)
        _copy_vocab(vocab, workdir, replace_vocab)
    if idle:
        logging.warning("%s is already at step %d (train.num_steps=%d): nothing to train; "
                        "set --config.train.num_steps higher to continue", workdir, start,
                        num_steps)
        mngr.close()
        return TrainResult(step=start, last_metrics={})
    writer = MetricsWriter(workdir, is_main=is_main, start_step=start, total_steps=num_steps)
    if redo_eval:
        logging.info("Evaluating step %d, whose in-loop eval the stopped run did not write",
                     start)
        writer.write(start, evaluate(eval_fn, state.params, config, vocab, mesh,
                                     per_process_batch), prefix="eval/")
    if start >= num_steps:
        writer.close()
        mngr.close()
        return TrainResult(step=start, last_metrics={})
    logging.info("Training %s (%.2fM trained params) on mesh %s from step %d to %d; %.3g model "
                 "FLOPs/step", model_cfg.family,
                 flops_lib.param_count(plugin.checkpointed(abstract.params)) / 1e6,
                 dict(mesh.shape), start, num_steps, step_flops)

    def save(step: int, force: bool = False):
        checkpoints.save_train_state(mngr, step, plugin.checkpointed(state.params),
                                     state.opt_state,
                                     data_iterator=train_iter, config=config, force=force)

    preemption = PreemptionFlag()
    debug_nans_before = jax.config.jax_debug_nans
    if tc.debug:  # re-runs a step op by op at the first NaN and names the op that made it
        jax.config.update("jax_debug_nans", True)
    pending, window, last = [], [], {}
    t_mark, step_mark = time.time(), start
    step = start
    try:
        while step < num_steps:
            batch = make_global_batch(next(train_iter), mesh)
            state, metrics = step_fn(state, batch, dropout_rng)
            pending.append((step + 1, metrics))
            step += 1
            if step == start + 1:
                # Compilation happens in the first step: keep it out of step times.
                jax.block_until_ready(metrics)
                t_mark, step_mark = time.time(), step
            preempted = preemption.check(step)
            is_save = (step % int(config.checkpoint.save_every) == 0 or step == num_steps
                       or preempted)
            # Every checkpoint step closes a log window: a run resumed from it logs the same
            # windows as an uninterrupted one, and a preempted run loses no step's metrics.
            is_log = step % log_every == 0 or is_save
            if is_log:
                fetched = jax.device_get(pending)
                pending = []
                check_finite(fetched, saved_steps=mngr.all_steps(), workdir=workdir)
                window.extend(fetched)
                now = time.time()
                dt_step = (now - t_mark) / (step - step_mark) if step > step_mark else None
                last = window_metrics(window, dt_step, tokens_per_step, step_flops,
                                      peak * jax.device_count() if peak else None)
                writer.write(step, last)
                window, t_mark, step_mark = [], now, step
            if is_save:  # before the eval: an eval that fails cannot cost the step
                taken = lease_lost()  # two runs saving into one workdir would corrupt it
                if taken:
                    raise TrainingError(f"--workdir {workdir} was taken over by another training "
                                        f"run ({taken}); stopped at step {step} without saving")
                save(step, force=preempted or step == num_steps)
            if eval_due(step) and not preempted:
                # The steps queued before it are training time, not the eval's.
                jax.block_until_ready(state.params)
                t_eval = time.time()
                writer.write(step, evaluate(eval_fn, state.params, config, vocab, mesh,
                                            per_process_batch), prefix="eval/")
                # Eval time is not training time; shifted, not reset, since an eval between
                # log steps must not drop the steps before it from the window's time.
                t_mark += time.time() - t_eval
            if preempted:
                logging.warning("SIGTERM received: saved checkpoint %d, exiting", step)
                break
    except DivergenceError as e:
        raise TrainingError(str(e)) from None
    except FloatingPointError as e:  # train.debug: jax_debug_nans found the first NaN
        raise TrainingError(f"NaN in step {step + 1} (train.debug): {e}") from None
    finally:
        jax.config.update("jax_debug_nans", debug_nans_before)
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
        preemption.restore()
    return TrainResult(step=step, last_metrics=last, preempted=preemption.is_set())
