r"""Evaluate checkpoints: teacher-forced loss / perplexity / token accuracy over the eval split,
decoded predictions scored by exact match, BLEU, ROUGE (and accuracy), or few-shot prompting.

    python -m t5x_lite.evaluate --workdir=/tmp/ft [--config=configs/finetune_t5_seq2seq.py:...] \
        [--checkpoint=latest|all|STEP|PATH] [--follow --follow_timeout=600] \
        [--predict=auto|true|false] [--metrics=auto|exact_match,bleu,rouge,accuracy] \
        [--config.decode.method=beam --config.decode.num_beams=4]
    # in-context learning (decoder-only): 3-shot multiple choice over the labels of the pool
    python -m t5x_lite.evaluate --workdir=/tmp/gpt --few_shot_k=3 --few_shot_scoring=choice \
        --few_shot_queries=dev.jsonl --few_shot_pool=train.jsonl --name=3shot

Writes WORKDIR/eval[/NAME]/<step>/{metrics.json,predictions.jsonl} (atomically: temp file +
rename) and TensorBoard scalars under WORKDIR/eval[/NAME]/events. --config defaults to the
workdir's config.json. Multi-process: `launch/cpu_local.sh --module=t5x_lite.evaluate -- ...`
or a TPU VM pod (see t5x_lite/distributed.py). See README.md. Bad input stops with one
error line, exit 1.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from t5x_lite import cli, mesh_flag  # light: no jax
from t5x_lite.mesh_flag import MESH

cli.check_flagfiles("evaluate")  # config_flags reads them when a flag is defined
_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py file (default: the "
                                          "workdir's config.json).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints and eval/ outputs.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest | all | STEP | PATH.")
_FOLLOW = flags.DEFINE_bool("follow", False, "Keep evaluating new checkpoints as they land.")
_FOLLOW_TIMEOUT = flags.DEFINE_float("follow_timeout", 600.0,
                                     "--follow: stop after this many seconds without a new one.")
_POLL = flags.DEFINE_float("poll_interval", 10.0, "--follow: seconds between directory scans.")
_PREDICT = flags.DEFINE_enum("predict", "auto", ["auto", "true", "false"],
                             "Decode the split and score the text (auto: seq2seq, "
                             "prompt_completion, and prefix_lm pairs).")
_METRICS = flags.DEFINE_string("metrics", "auto", "auto or exact_match,bleu,rouge,accuracy.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Teacher-forced global batch (0: "
                              "config.train.batch_size).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 0, "Decode length (0: T5 targets_length, GPT "
                                "config.decode.max_new_tokens).")
_NAME = flags.DEFINE_string("name", "", "Write to WORKDIR/eval/NAME/<step> (e.g. test; few-shot "
                            "and --quantize default to 3shot, 0shot_choice, int8, ...).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Re-evaluate checkpoints already done.")
_K = flags.DEFINE_integer("few_shot_k", -1, "Shots per prompt; >= 0 turns on few-shot eval.")
_SCORING = flags.DEFINE_enum("few_shot_scoring", "generate", ["generate", "choice"],
                             "Few-shot scoring: generation + text metrics, or multiple choice.")
_TEMPLATE = flags.DEFINE_string("few_shot_template", "Q: {inputs} A: {targets}",
                                "One solved example; the query is cut before {targets}.")
_SEPARATOR = flags.DEFINE_string("few_shot_separator", "\n", "Between prefix, shots and query.")
_PREFIX = flags.DEFINE_string("few_shot_prefix", "", "Instructions before the shots.")
_SEED = flags.DEFINE_integer("few_shot_seed", None, "Shot sampling seed (default config.seed).")
_QUERIES = flags.DEFINE_string("few_shot_queries", "", "JSONL {inputs, targets[, choices]} "
                               "(default: the eval split).")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8"],
                              "int8: evaluate per-channel int8 weights (outputs named int8 by "
                              "default).")
_POOL = flags.DEFINE_string("few_shot_pool", "", "JSONL to draw shots from (default: the train "
                            "split).")
flags.adopt_module_key_flags(mesh_flag)  # --mesh (default: the run config's mesh section)


def _few_shot_flags_problem() -> str:
    """What is wrong with the few-shot flags on their own ("" if nothing): a k below -1, or
    few-shot flags without k, which a plain evaluation would silently ignore."""
    if _K.value < -1:
        return (f"--few_shot_k must be >= 0 (shots per prompt) or -1 (no few-shot evaluation), "
                f"got {_K.value}")
    given = [f"--{f.name}" for f in (_SCORING, _TEMPLATE, _SEPARATOR, _PREFIX, _SEED, _QUERIES,
                                     _POOL) if flags.FLAGS[f.name].present]
    if given and _K.value < 0:
        return (f"{', '.join(given)} without --few_shot_k (shots per prompt, 0 for zero-shot) "
                "would be ignored")
    return ""


def _settings(config):
    from t5x_lite.evaluation import few_shot
    from t5x_lite.evaluation.runner import EvalSettings

    opts = None
    if _K.value >= 0:
        seed = _SEED.value if _SEED.value is not None else int(config.get("seed", 0))
        opts = few_shot.FewShotOptions(
            k=_K.value, scoring=_SCORING.value, seed=seed, metrics=_METRICS.value,
            max_new_tokens=_MAX_NEW.value,  # 0: as plain evaluation (the runner)
            template=few_shot.FewShotTemplate(_TEMPLATE.value, _SEPARATOR.value, _PREFIX.value))
    return EvalSettings(
        checkpoint=_CHECKPOINT.value, predict=_PREDICT.value, metrics=_METRICS.value,
        batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value, name=_NAME.value,
        overwrite=_OVERWRITE.value, follow=_FOLLOW.value, follow_timeout=_FOLLOW_TIMEOUT.value,
        poll_interval=_POLL.value, few_shot=opts, few_shot_queries=_QUERIES.value,
        few_shot_pool=_POOL.value, quantize=_QUANTIZE.value)


def main(argv):
    if len(argv) > 1:
        cli.exit_with("evaluate", f"unexpected arguments {argv[1:]}")
    if not _WORKDIR.value:
        cli.exit_with("evaluate", "--workdir is required")
    if _few_shot_flags_problem():
        cli.exit_with("evaluate", _few_shot_flags_problem())
    if not flags.FLAGS["verbosity"].present:
        cli.quiet_console(logging.INFO)
    from t5x_lite import distributed  # before any device is touched

    # Multi-process (launch/cpu_local.sh --module=t5x_lite.evaluate, TPU VM pods): T5X_LITE_*
    # environment / cluster auto-detection, as for training. Only process 0 writes.
    try:
        distributed.maybe_initialize()
    except distributed.DistributedError as e:
        cli.exit_with("evaluate", e)
    from t5x_lite.evaluation import outputs
    from t5x_lite.evaluation.runner import EvalSettings, results_dir, run, wait_for_config

    try:
        config = _CONFIG.value if _CONFIG.value is not None else wait_for_config(
            _WORKDIR.value, EvalSettings(follow=_FOLLOW.value, poll_interval=_POLL.value,
                                         follow_timeout=_FOLLOW_TIMEOUT.value))
        if MESH.value is not None:  # e.g. fewer devices than the run trained on
            from t5x_lite import partitioning
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = partitioning.parse_mesh(
                MESH.value)
        settings = _settings(config)
        results = run(config, _WORKDIR.value, settings)
    except cli.ERRORS as e:
        cli.exit_with("evaluate", e)
    final = int(config.train.num_steps)
    if not results and _FOLLOW.value and outputs.is_done(results_dir(_WORKDIR.value, settings),
                                                         final):
        print(f"evaluate: nothing to do (the final step {final} (train.num_steps) is already "
              "evaluated; --overwrite redoes it)")
    elif not results and _FOLLOW.value:
        print(f"evaluate: nothing evaluated (no checkpoint that was not evaluated already landed "
              f"within --follow_timeout={_FOLLOW_TIMEOUT.value:g}s; --overwrite redoes them)")
    elif not results:
        print("evaluate: nothing to do (every selected checkpoint is already evaluated; "
              "--overwrite redoes them)")
    for m in results:
        keys = [k for k in ("loss", "perplexity", "token_accuracy", "exact_match", "bleu",
                            "rougeL", "accuracy", "accuracy_norm") if k in m]
        print(f"evaluate: step {m['step']}: " + "  ".join(f"{k}={m[k]:.4g}" for k in keys))


if __name__ == "__main__":
    from t5x_lite import host_memory
    host_memory.reexec_with_huge_pages()
    app.run(main, flags_parser=cli.flags_parser("evaluate"))
