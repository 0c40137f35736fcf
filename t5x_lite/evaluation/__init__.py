"""Evaluation: teacher-forced metrics over a split, decoding + text metrics, few-shot prompting.

    from t5x_lite.evaluation import run, EvalSettings
    run(config, workdir, EvalSettings(checkpoint="all"))   # what `python -m t5x_lite.evaluate` runs

Modules: teacher_forced (loss / perplexity / token accuracy, exact over the split),
predictions (decode a split of pairs), text_metrics (exact match, BLEU, ROUGE, accuracy),
few_shot (in-context prompts; generation or multiple-choice log-likelihood), likelihood
(batched log p(continuation | prompt)), outputs (atomic metrics.json / predictions.jsonl,
TensorBoard), runner (checkpoint selection, --follow). See README.md.
"""
from t5x_lite.evaluation.runner import EvalError, EvalSettings, run

__all__ = ["EvalError", "EvalSettings", "run"]
