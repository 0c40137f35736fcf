"""Eval outputs: `metrics.json` and `predictions.jsonl` per checkpoint, written atomically, and
the same metrics as TensorBoard scalars.

    OUT/<step>/predictions.jsonl     one JSON object per example (written first)
    OUT/<step>/metrics.json          {"step", ..., metric: value}; its presence marks the step done
    OUT/events/events.out.tfevents.* scalars "<tag_prefix><metric>" at the checkpoint's step
                                     (TensorBoard shows each step's latest evaluation once)

OUT is `WORKDIR/eval` (or `WORKDIR/eval/<name>`). Each file is written to `<file>.tmp` and
renamed, so a reader (or a killed evaluator) never sees half a file. Re-evaluating a step first
removes its metrics.json (the step is not done until the new one lands), and a stale
predictions file of an earlier evaluation is removed when the new one has none.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

from etils import epath

from t5x_lite import files

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
EVENTS_DIR = "events"


def step_dir(out_root, step: int) -> epath.Path:
    return epath.Path(out_root) / str(step)


def is_done(out_root, step: int) -> bool:
    return (step_dir(out_root, step) / METRICS_FILE).exists()


def done_steps(out_root) -> list[int]:
    root = epath.Path(out_root)
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and is_done(root, int(
        p.name)))


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN / inf
    return v


def write_step(out_root, step: int, metrics: Mapping[str, Any],
               predictions: Iterable[Mapping[str, Any]] | None) -> epath.Path:
    """Writes one checkpoint's outputs (predictions first, metrics.json last); returns the dir."""
    # Serialise first: values JSON cannot hold fail here, before any file is touched.
    metrics_text = json.dumps({k: _json_value(v) for k, v in metrics.items()}, indent=2,
                              ensure_ascii=False) + "\n"
    pred_text = None if predictions is None else "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in predictions)
    d = step_dir(out_root, step)
    d.mkdir(parents=True, exist_ok=True)
    metrics_path, pred_path = d / METRICS_FILE, d / PREDICTIONS_FILE
    # Re-evaluating (--overwrite): the step stops being done before its predictions change, so
    # an evaluator killed in between leaves a step to redo, never new predictions under the
    # previous metrics.
    if metrics_path.exists():
        metrics_path.unlink()
    if pred_text is not None:
        files.write_atomic(pred_path, pred_text)
    elif pred_path.exists():
        pred_path.unlink()
    files.write_atomic(metrics_path, metrics_text)
    return d


def read_metrics(out_root, step: int) -> dict[str, Any]:
    return json.loads((step_dir(out_root, step) / METRICS_FILE).read_text())


def read_predictions(out_root, step: int) -> list[dict[str, Any]]:
    text = (step_dir(out_root, step) / PREDICTIONS_FILE).read_text()
    return [json.loads(line) for line in files.split_lines(text) if line]


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries (what TensorBoard gets)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            and math.isfinite(float(v))}


class EventsWriter:
    """Lazily opened TensorBoard event file under OUT/events (the trainer's writer format).

    A step is written as a session restart at that step followed by its scalars and those of
    every later done step (read back from their metrics.json), so that TensorBoard, which
    drops the points of step >= S at a restart of step S, shows each step once and with its
    latest values, also when an earlier step is re-evaluated after later ones."""

    def __init__(self, out_root, tag_prefix: str):
        self._root = epath.Path(out_root)
        self._prefix = tag_prefix
        self._writer = None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        from t5x_lite.training.metrics_writer import EventFileWriter

        if self._writer is None:
            self._writer = EventFileWriter(self._root / EVENTS_DIR)
        self._writer.session_start(step)
        later = [s for s in done_steps(self._root) if s > step]
        for s, m in [(step, metrics)] + [(s, read_metrics(self._root, s)) for s in later]:
            self._writer.scalars(s, {self._prefix + k: v for k, v in scalar_metrics(m).items()})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
