"""What `python -m t5x_lite.evaluate` runs: pick checkpoints, evaluate each, write the outputs.

    results = run(config, workdir, EvalSettings(checkpoint="all"))

Checkpoint selection (`EvalSettings.checkpoint`):
  latest   the newest complete checkpoint in WORKDIR/checkpoints
  all      every checkpoint there not evaluated yet (each exactly once; --overwrite redoes them)
  STEP     that step (an integer)
  PATH     a checkpoint elsewhere: a workdir, its checkpoints/ dir or checkpoints/<step>
`follow=True` keeps polling WORKDIR/checkpoints and evaluates every checkpoint that is not done
yet, oldest first, until the run's final step (config.train.num_steps) is done or nothing new
has landed for `follow_timeout` seconds while no training run holds the workdir's lease (see
lease.py: a live run's checkpoints may be further apart). A checkpoint the trainer deletes
(checkpoint.keep) before it is read is skipped with a warning.

Per checkpoint: teacher-forced loss / perplexity / token accuracy over the whole eval split,
then (for seq2seq / prompt_completion data, or predict="true") greedy/beam decoding of the split
per `config.decode` and the text metrics -- or, with `few_shot` set, in-context-learning
evaluation instead of plain decoding. Outputs: see outputs.py. Multi-process runs agree on
what to evaluate through process 0; only process 0 writes.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from etils import epath

from t5x_lite import (checkpoints, distributed, files, hf_interop, lease, lora,
                      partitioning, quantization)
from t5x_lite.api import LoadedModel, checkpoint_eos, load_vocabulary
from t5x_lite.config import ModelConfig
from t5x_lite.data import DataConfig, load_vocab
from t5x_lite.errors import UserError
from t5x_lite.evaluation import few_shot, outputs, predictions, text_metrics
from t5x_lite.evaluation.teacher_forced import TeacherForcedScorer
from t5x_lite.models import abstract_variables, build_model
from t5x_lite.training import run_checks

PREDICT_OBJECTIVES = ("seq2seq", "prompt_completion")  # and prefix_lm on pairs (auto)


class EvalError(UserError):
    """Bad evaluation settings or workdir (one line)."""


RUN_SECTIONS = ("model", "data", "train", "mesh")  # what an evaluation reads of a run config


def wait_for_config(workdir, settings: "EvalSettings") -> ml_collections.ConfigDict:
    """The workdir's run config; with --follow, waits up to follow_timeout for the trainer
    started beside it to write one (it does so once its train state is built)."""
    path = checkpoints.local_or_remote(workdir) / checkpoints.CONFIG_FILE
    start = time.time()
    # process 0 decides (after the timeout, read_config says what is missing)
    while settings.follow and not distributed.agree(
            int(path.exists() or time.time() - start >= settings.follow_timeout)):
        logging.info("follow: waiting for %s", path)
        time.sleep(settings.poll_interval)
    return checkpoints.read_config(workdir)


MAX_POLL_INTERVAL = 86400  # a day


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    checkpoint: str = "latest"
    predict: str = "auto"  # auto | true | false
    metrics: str = "auto"  # comma-separated text_metrics names, or auto
    batch_size: int = 0  # teacher-forced global batch; 0 = config.train.batch_size
    max_new_tokens: int = 0  # 0 = T5: data.targets_length, GPT: config.decode.max_new_tokens
    name: str = ""  # outputs in WORKDIR/eval/<name>/<step>, TensorBoard tags eval_<name>/...
    overwrite: bool = False
    follow: bool = False
    follow_timeout: float = 600.0  # follow: stop after this long without a new checkpoint
    poll_interval: float = 10.0
    quantize: str = "none"  # none | int8: weights quantized after loading (compression)
    few_shot: few_shot.FewShotOptions | None = None
    few_shot_queries: str = ""  # JSONL; "" = the eval split's pairs
    few_shot_pool: str = ""  # JSONL; "" = the train split's pairs

    def __post_init__(self):
        if not self.name and (self.few_shot is not None or self.quantize != "none"):
            # Apart from the plain evaluation, whose metrics (and done steps) they would replace.
            object.__setattr__(self, "name", default_name(self.few_shot, self.quantize))
        if self.batch_size < 0 or self.max_new_tokens < 0:
            raise EvalError(f"batch_size and max_new_tokens must be >= 0 (0: the config's), got "
                            f"{self.batch_size} and {self.max_new_tokens}")
        if self.predict not in ("auto", "true", "false"):
            raise EvalError(f"predict must be auto, true or false, got {self.predict!r}")
        text_metrics.resolve_metrics(self.metrics, [])  # unknown names fail before any work
        if self.name and not self.name.replace("_", "").replace("-", "").isalnum():
            raise EvalError(f"name must be letters, digits, '-' or '_', got {self.name!r}")
        if self.name.isdigit():
            raise EvalError("name must not be a number (step directories are numbers)")
        if self.name == "events":
            raise EvalError("name must not be 'events' (the unnamed evaluation's TensorBoard "
                            "directory)")
        # poll_interval goes to time.sleep, which refuses inf and huge values with a traceback
        if not (0 < self.poll_interval <= MAX_POLL_INTERVAL and self.follow_timeout >= 0):
            raise EvalError(f"poll_interval must be in (0, {MAX_POLL_INTERVAL}] seconds and "
                            f"follow_timeout >= 0 (inf: no limit), got {self.poll_interval} "
                            f"and {self.follow_timeout}")


def default_name(options: few_shot.FewShotOptions | None, quantize: str) -> str:
    """The outputs' name of a few-shot or quantized evaluation given none: "3shot",
    "0shot_choice", "int8", "3shot_int8"."""
    parts = []
    if options is not None:
        parts.append(f"{options.k}shot" + ("_choice" if options.scoring == "choice" else ""))
    if quantize != "none":
        parts.append(quantize)
    return "_".join(parts)


def foreign_name(ckpt_workdir) -> str:
    """The outputs' name of an evaluation of another run's checkpoint given none:
    "from_<that workdir's name>" (letters, digits, '-' and '_' kept, others '_')."""
    base = epath.Path(ckpt_workdir).name
    return "from_" + ("".join(c if c.isalnum() or c in "-_" else "_" for c in base) or "run")


class Evaluator:
    """Model, mesh and compiled functions for one config, reused across checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, settings: EvalSettings):
        self.config, self.settings = config, settings
        self.data = DataConfig.from_dict(config.data)
        self.model_cfg = ModelConfig.from_dict(config.model)
        too_long = run_checks.rows_past_position_table(self.model_cfg, config.data)
        if too_long:
            raise EvalError(f"{too_long[0]}={too_long[1]} is longer than model.max_len="
                            f"{self.model_cfg.max_len}, the model's learned position table; "
                            f"evaluate with {too_long[0]} <= {self.model_cfg.max_len}")
        if settings.few_shot is not None and self.model_cfg.family == "bert":
            # before any data is read: the query / pool errors would suggest other fixes
            raise EvalError("few-shot evaluation needs a t5 or gpt model; this one is 'bert' "
                            "(encoder-only MLM): evaluate without --few_shot_k")
        try:
            self.mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp,
                                               config.mesh.tensor)
        except partitioning.MeshError as e:
            raise partitioning.MeshError(f"{e} (the run config's mesh.*; evaluate "
                                         "--mesh=data,fsdp,tensor sets another)") from None
        self.rules = partitioning.rules_from_config(config.mesh.get("rules"))
        self.model = build_model(self.model_cfg)
        boxed = abstract_variables(self.model)["params"]
        self.param_shardings = partitioning.shardings(boxed, self.mesh, self.rules)
        self.abstract = checkpoints.abstract_with_shardings(nn.meta.unbox(boxed),
                                                            self.param_shardings)
        self.boxed = boxed
        self.scorer = TeacherForcedScorer(self.model_cfg, self.mesh, self.rules,
                                          quantize=settings.quantize)
        self.batch_size = int(settings.batch_size or config.train.batch_size)
        self._vocab = None
        self._examples = None

    def vocab(self, ckpt_workdir):
        if self._vocab is None:
            in_workdir = hf_interop.workdir_vocabulary(ckpt_workdir)
            if not self.data.vocab_path and in_workdir.exists():
                # a converted Llama / Mistral's tokenizer too (LlamaVocabulary: few-shot only)
                self._vocab = load_vocabulary(
                    in_workdir, self.model_cfg, {"data": {"extra_ids": self.data.extra_ids}},
                    epath.Path(ckpt_workdir) / hf_interop.TOKENIZER_SOURCE_CONFIG)
            else:
                self._vocab = load_vocab(self.data)
            if self._vocab.vocab_size > self.model_cfg.vocab_size:
                raise EvalError(f"the vocabulary has {self._vocab.vocab_size} ids but the model "
                                f"only {self.model_cfg.vocab_size} embedding rows")
        return self._vocab

    def load(self, ckpt_workdir, step: int) -> LoadedModel:
        # Compression hooks: a LoRA run's adapters are merged into its base; --quantize=int8.
        # The stop ids read the same run config as the params (a LoRA run's step 0 is its base).
        run = self._run_config(ckpt_workdir)
        params = lora.restore_params(ckpt_workdir, step, run, self.abstract)
        params = quantization.quantize_loaded(params, self.boxed, self.param_shardings,
                                              self.settings.quantize)
        return LoadedModel(self.model_cfg, self.config, self.model, params,
                           self.vocab(ckpt_workdir), self.mesh, self.rules,
                           *checkpoint_eos(ckpt_workdir, step, self.model_cfg, run))

    def _run_config(self, ckpt_workdir):
        """The run config the checkpoint's params are read with: where a LoRA run is involved,
        the checkpoint's own (its adapters belong to the base step that run recorded; another
        LoRA run's would merge them into the wrong base), else the evaluated config."""
        if not (epath.Path(ckpt_workdir) / checkpoints.CONFIG_FILE).exists():
            return self.config
        run = checkpoints.read_config(ckpt_workdir)
        if not (lora.is_lora_run(run) or lora.is_lora_run(self.config)):
            return self.config
        diffs = ModelConfig.from_dict(run.model).differences(self.model_cfg)
        if diffs:
            raise EvalError(f"--checkpoint {ckpt_workdir} holds another model than the one "
                            f"evaluated: {'; '.join(diffs[:3])} (its config.json vs the "
                            "evaluated config)")
        return run

    def wants_predictions(self) -> bool:
        s = self.settings
        return s.few_shot is not None or s.predict == "true" or (
            s.predict == "auto" and any(
                part.config.objective in PREDICT_OBJECTIVES
                or (part.config.objective == "prefix_lm" and self._holds_pairs(part))
                for part in self.data.components()))

    def _holds_pairs(self, part) -> bool:
        """Whether the entry's eval split holds inputs/targets pairs (prefix_lm also trains on
        text documents, which have nothing to decode and compare)."""
        from t5x_lite.data import sources  # tfds import: only when a split is actually read
        from t5x_lite.data.loader import entry_errors

        with entry_errors(part):
            split = part.split(self.data, self.data.eval_split)
            return sources.make_source(part.config, split).kind == "pairs"

    def examples(self, instead: str = "use --predict=false"):
        if self._examples is None:
            self._examples = predictions.read_examples(self.data, self.data.eval_split, instead)
        return self._examples

    def reads_data_splits(self) -> bool:
        """Whether this evaluation reads the data pipeline's splits (teacher-forced metrics,
        decoded eval examples, a few-shot pool from the train split), not only jsonl files."""
        s = self.settings
        if s.few_shot is None:
            return True
        return not s.few_shot_queries or (s.few_shot.k > 0 and not s.few_shot_pool)

    def evaluate(self, ckpt_workdir, step: int) -> tuple[dict[str, Any], list | None]:
        t0 = time.time()
        loaded = self.load(ckpt_workdir, step)
        # a converted model's HF tokenizer (LlamaVocabulary, TokenizerJsonVocabulary)
        if not getattr(loaded.vocab, "t5_convention", True) and self.reads_data_splits():
            raise EvalError(
                f"{ckpt_workdir} has an HF tokenizer (a Llama-style vocab.model or a "
                "tokenizer.json), which the data pipeline's splits do not use (T5 conventions: "
                "start id 0, eos 1); evaluate it few-shot from files: --few_shot_k=K "
                "--few_shot_queries=FILE.jsonl --few_shot_pool=FILE.jsonl")
        metrics: dict[str, Any] = {"step": step, "checkpoint": f"{ckpt_workdir}/"
                                   f"{checkpoints.CHECKPOINT_DIR}/{step}",
                                   "split": self.data.eval_split}
        if self.settings.few_shot_queries:
            metrics["split"] = str(files.real(self.settings.few_shot_queries))  # what was scored
        records = None
        if self.settings.few_shot is None:
            metrics.update(self.scorer.evaluate(loaded.params, self.data, loaded.vocab,
                                                batch_size=self.batch_size,
                                                seed=int(self.config.seed)))
        if self.wants_predictions():
            scores, records = (self._few_shot(loaded) if self.settings.few_shot is not None
                               else self._decode(loaded))
            metrics.update(scores)
            metrics["num_predictions"] = len(records)
        metrics["time_s"] = round(time.time() - t0, 3)
        return metrics, records

    def _decode(self, loaded):
        records = predictions.predict(loaded, self.examples(), data_cfg=self.data,
                                      max_new_tokens=self.settings.max_new_tokens or None)
        metrics_of = functools.partial(text_metrics.of_records, metrics=self.settings.metrics)
        return _with_entries(metrics_of(records), metrics_of, records), records

    def _few_shot(self, loaded):
        s, opts = self.settings, self.settings.few_shot
        if not opts.max_new_tokens:  # as plain evaluation: data.targets_length / decode's
            opts = dataclasses.replace(opts, max_new_tokens=predictions.default_max_new_tokens(
                loaded, self.data))
        if s.few_shot_queries:
            recs = few_shot.read_jsonl(s.few_shot_queries)
            queries = [predictions.Example(i, r["inputs"], r["targets"])
                       for i, r in enumerate(recs)]
            choices = [r["choices"] for r in recs]  # None: the pool's and queries' targets
        else:
            queries, choices = self.examples("give --few_shot_queries=FILE.jsonl"), None
        if s.few_shot_pool:
            pool = [predictions.Example(i, r["inputs"], r["targets"])
                    for i, r in enumerate(few_shot.read_jsonl(s.few_shot_pool))]
            same = bool(s.few_shot_queries) and files.real(s.few_shot_pool) == files.real(
                s.few_shot_queries)  # however the one file is spelled: no query is its own shot
        else:
            pool = predictions.read_examples(
                self.data, self.data.train_split, "give --few_shot_pool=FILE.jsonl, or "
                "--few_shot_k=0") if opts.k else []
            # data.eval_split == data.train_split: the queries are the pool, in the same order
            same = not s.few_shot_queries and self.data.eval_split == self.data.train_split
        if opts.scoring == "choice":
            scores, records = few_shot.evaluate_choice(loaded, queries, pool, opts,
                                                       choices=choices, same_split=same)
            return _with_entries(scores, few_shot.choice_metrics, records), records
        scores, records = few_shot.evaluate_generation(loaded, queries, pool, opts,
                                                       same_split=same)
        return _with_entries(scores, functools.partial(text_metrics.of_records,
                                                       metrics=opts.metrics), records), records


def _with_entries(scores, metrics_of, records) -> dict[str, float]:
    """`scores` (of all the records), and with records of two or more data.mixture entries,
    `metrics_of` each entry's alone as "<name>/<metric>"."""
    scores = dict(scores)
    entries = sorted({r["entry"] for r in records if "entry" in r})
    if len(entries) > 1:
        for name in entries:
            scores.update({f"{name}/{k}": v for k, v in metrics_of(
                [r for r in records if r.get("entry") == name]).items()})
    return scores


def _selection(workdir: epath.Path, spec: str) -> tuple[epath.Path, list[int]]:
    """(checkpoint workdir, steps) for latest / all / STEP / PATH."""
    if spec in ("latest", "all") or spec.isdigit():
        steps = checkpoints.agreed_steps(workdir)
        if not steps:
            raise EvalError(f"No checkpoint in {workdir}/{checkpoints.CHECKPOINT_DIR} (train "
                            "first, or pass --checkpoint=PATH)")
        if spec == "latest":
            return workdir, steps[-1:]
        if spec == "all":
            return workdir, steps
        if int(spec) not in steps:
            raise EvalError(f"No checkpoint for step {spec} in {workdir}; available: {steps}")
        return workdir, [int(spec)]
    try:
        ckpt_workdir, step = checkpoints.resolve(spec)
    except checkpoints.CheckpointError as e:
        raise EvalError(f"--checkpoint={spec}: {e}") from None
    return ckpt_workdir, [step]


def run(config: ml_collections.ConfigDict | None, workdir, settings: EvalSettings = EvalSettings()
        ) -> list[dict[str, Any]]:
    """Evaluates the selected checkpoints; returns the metrics of each evaluated step in order.

    Args:
      config: the run config (model, data, decode, mesh, train.batch_size); None = the
        workdir's config.json.
      workdir: where the checkpoints are and where eval/ outputs go.

    Raises:
      EvalError, CheckpointError, DataConfigError, ... (all ValueErrors with a one-line
      message): see `evaluate.py` for the ones the CLI turns into an error line.
    """
    workdir = epath.Path(workdir)
    if config is None:
        config = wait_for_config(workdir, settings)
    missing = [s for s in RUN_SECTIONS if not hasattr(config.get(s), "keys")]
    if missing:
        raise EvalError(f"the run config ({workdir}/{checkpoints.CONFIG_FILE} or --config) has "
                        f"no {', '.join(missing)} section; evaluation needs "
                        f"{', '.join(RUN_SECTIONS)}")
    is_main = jax.process_index() == 0
    if settings.follow:
        if settings.checkpoint not in ("latest", "all"):
            raise EvalError("--follow evaluates the workdir's checkpoints as they land; use it "
                            f"with --checkpoint=latest or all, not {settings.checkpoint!r}")
        ckpt_workdir, steps = workdir, []
    else:
        ckpt_workdir, steps = _selection(workdir, settings.checkpoint)
    if not settings.name and files.real(ckpt_workdir) != files.real(workdir):
        # Another run's step N is not this workdir's: its results (and "done") stay apart.
        settings = dataclasses.replace(settings, name=foreign_name(ckpt_workdir))
    out_root = results_dir(workdir, settings)
    tag_prefix = f"eval_{settings.name}/" if settings.name else "eval/"
    if not settings.follow:
        if settings.checkpoint == "all" and not settings.overwrite:
            steps = [s for s in steps
                     if distributed.agree(int(outputs.is_done(out_root, s))) == 0]
    evaluator = Evaluator(config, settings)
    events = outputs.EventsWriter(out_root, tag_prefix) if is_main else None
    results: list[dict[str, Any]] = []

    def evaluate(step: int) -> None:
        metrics, records = evaluator.evaluate(ckpt_workdir, step)
        if is_main:
            # TensorBoard first: metrics.json marks the step done, so a kill between the two
            # re-runs the step (its restart at the step replaces the points written).
            events.write(step, metrics)
            outputs.write_step(out_root, step, metrics, records)
        logging.info("eval step %d: %s", step, "  ".join(
            f"{k}={v:.4g}" for k, v in outputs.scalar_metrics(metrics).items()))
        results.append(metrics)

    try:
        if settings.follow:
            _follow(workdir, out_root, int(config.train.num_steps), settings, evaluate)
        else:
            for step in steps:
                evaluate(step)
    finally:
        if events is not None:
            events.close()
    return results


def results_dir(workdir, settings: EvalSettings) -> epath.Path:
    """Where the results of `settings` go: WORKDIR/eval, or WORKDIR/eval/<name>."""
    root = epath.Path(workdir) / "eval"
    return root / settings.name if settings.name else root


def _deleted(workdir, step: int, wait_s: float = 5.0) -> bool:
    """Whether checkpoint `step` failed to read because it is being deleted (`checkpoint.keep`):
    orbax removes its files before its directory, so a step still listed gets a few seconds
    to go before the failure counts as damage."""
    deadline = time.time() + wait_s
    while step in checkpoints.all_steps(workdir):
        if time.time() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _follow(workdir, out_root, final_step: int, settings: EvalSettings, evaluate) -> None:
    attempted: set[int] = set()
    last_new = time.time()
    while True:
        step = -1
        if jax.process_index() == 0:
            pending = [s for s in checkpoints.all_steps(workdir) if s not in attempted and (
                settings.overwrite or not outputs.is_done(out_root, s))]
            step = pending[0] if pending else -1
        step = distributed.agree(step)
        if step >= 0:
            attempted.add(step)
            try:
                evaluate(step)
            except (OSError, ValueError) as e:
                if not _deleted(workdir, step):
                    raise
                logging.warning("checkpoint %d was deleted before it could be evaluated (%s); "
                                "skipped", step, str(e).splitlines()[0][:200])
            last_new = time.time()
            continue
        # A live training run may go past the final step its config.json said when this
        # started (resumed with a higher train.num_steps): not finished while it runs.
        live = lease.live(workdir)
        finished = not live and (outputs.is_done(out_root, final_step) or final_step in attempted)
        if live:
            last_new = time.time()  # a training run is on: wait however long its saves take
        idle = time.time() - last_new
        if distributed.agree(int(finished or idle >= settings.follow_timeout)):
            logging.info("follow: %s", "final step %d evaluated" % final_step if finished
                         else f"no new checkpoint for {idle:.0f}s; stopping")
            return
        time.sleep(settings.poll_interval)
