"""Metrics of decoded predictions against reference targets (seqio conventions: 0..100).

    scores = compute(predictions, targets, metrics=("exact_match", "bleu", "rouge"))

- `exact_match`: % of predictions equal to their target after `normalize` (Unicode NFKC,
  strip, collapse whitespace runs: sentencepiece's normalisation may change spacing and
  Unicode forms, never the words). Case and punctuation count.
- `bleu`: corpus BLEU of sacrebleu as T5 and seqio compute it (`t5.evaluation.metrics.bleu`:
  the "intl" tokeniser, which splits Unicode punctuation and symbols; exp smoothing; no
  lowercasing), one reference per prediction. Corpus-level: n-gram counts are summed over all
  examples first.
- `rouge1`, `rouge2`, `rougeL`: mean over examples of the rouge-score F-measure (Porter
  stemming on, the package's default tokeniser: lowercase, ASCII alphanumeric tokens), x100.
  As in T5 / seqio, text without ASCII letters or digits has no tokens and scores 0.
  No bootstrap resampling, so the number is exactly the mean and reproducible.
- `accuracy` (classification-style targets): % of predictions equal to their label after
  `normalize`, plus `invalid_prediction_rate`: % of predictions that are none of the labels
  seen in the targets. "auto" metrics add it when the targets look like labels: at most
  `MAX_LABELS` distinct values, each seen at least twice on average.

sacrebleu and rouge-score are dependencies of t5x_lite; they are imported
only when BLEU / ROUGE are asked for.
"""
from __future__ import annotations

import unicodedata
from typing import Mapping, Sequence

from t5x_lite.errors import UserError

METRICS = ("exact_match", "bleu", "rouge", "accuracy")
DEFAULT = ("exact_match", "bleu", "rouge")
MAX_LABELS = 20
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class MetricsError(UserError):
    """Predictions that cannot be scored (one line)."""


def normalize(text: str) -> str:
    """NFKC, then whitespace runs collapsed and the ends stripped. Sentencepiece vocabularies
    NFKC-normalise, so a model can only ever produce NFKC text: without it a target spelled
    "cafe" + U+0301 or "x²" could never be matched, however right the prediction."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def is_classification(targets: Sequence[str]) -> bool:
    """Targets that look like class labels (few distinct values, each repeated)."""
    labels = {normalize(t) for t in targets}
    return 0 < len(labels) <= MAX_LABELS and len(targets) >= 2 * len(labels)


def resolve_metrics(names: Sequence[str] | str, targets: Sequence[str]) -> tuple[str, ...]:
    """Metric names from a list or comma-separated string; "auto" = DEFAULT (+ accuracy for
    classification-style targets)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for name in names:
        if name == "auto":
            out += list(DEFAULT) + (["accuracy"] if is_classification(targets) else [])
        elif name in METRICS:
            out.append(name)
        else:
            raise MetricsError(f"unknown metric {name!r}; known: {', '.join(METRICS + ('auto',))}")
    return tuple(dict.fromkeys(out))


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
    return 100.0 * sum(normalize(p) == normalize(t) for p, t in zip(predictions, targets)) / len(
        targets)


def bleu(predictions: Sequence[str], targets: Sequence[str]) -> float:
    sacrebleu = _import("sacrebleu", "sacrebleu")
    return float(sacrebleu.corpus_bleu(
        list(predictions), [list(targets)], smooth_method="exp", smooth_value=0.0, force=False,
        lowercase=False, tokenize="intl", use_effective_order=False).score)


def rouge(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    rouge_scorer = _import("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for p, t in zip(predictions, targets):
        for name, score in scorer.score(t, p).items():  # score(target, prediction)
            totals[name] += score.fmeasure
    return {name: 100.0 * v / len(targets) for name, v in totals.items()}


def accuracy(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    labels = {normalize(t) for t in targets}
    invalid = sum(normalize(p) not in labels for p in predictions)
    return {"accuracy": exact_match(predictions, targets),
            "invalid_prediction_rate": 100.0 * invalid / len(targets)}


def compute(predictions: Sequence[str], targets: Sequence[str],
            metrics: Sequence[str] | str = ("auto",)) -> dict[str, float]:
    """Scores `predictions` against `targets` (same order, one target each).

    Raises:
      MetricsError: no predictions, different counts, non-string entries, unknown metric.
    """
    predictions, targets = list(predictions), list(targets)
    if not targets:
        raise MetricsError("no predictions to score (the evaluated split produced none)")
    if len(predictions) != len(targets):
        raise MetricsError(f"{len(predictions)} predictions for {len(targets)} targets")
    bad = next((i for i, x in enumerate(predictions + targets) if not isinstance(x, str)), None)
    if bad is not None:
        raise MetricsError(f"entry {bad % len(targets)} is not a string: "
                           f"{(predictions + targets)[bad]!r}")
    out: dict[str, float] = {}
    for name in resolve_metrics(metrics, targets):
        if name == "exact_match":
            out["exact_match"] = exact_match(predictions, targets)
        elif name == "bleu":
            out["bleu"] = bleu(predictions, targets)
        elif name == "rouge":
            out.update(rouge(predictions, targets))
        else:
            out.update(accuracy(predictions, targets))
    return out


def _import(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MetricsError(f"this metric needs the {package} package: pip install {package}") from None


def of_records(records: Sequence[Mapping], metrics: Sequence[str] | str = ("auto",)
               ) -> dict[str, float]:
    """`compute` over records holding "prediction" and "targets" (predictions.jsonl's)."""
    return compute([r["prediction"] for r in records], [r["targets"] for r in records], metrics)
