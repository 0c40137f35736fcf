"""End to end: the seq2seq fine-tuning recipe trains a tiny T5 on a synthetic task, `evaluate
--checkpoint=all` scores every checkpoint once, the numbers equal sacrebleu / rouge-score on the
written predictions, and `init_from` fine-tuning starts from the trained params."""
import json

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from t5x_lite import checkpoints
from t5x_lite.evaluation import EvalSettings, outputs, run, testing
from t5x_lite.training import train


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    paths = testing.write_sort_task(d / "data", num_train=2000, num_validation=100)
    config = testing.sort_task_config(paths, steps=200, save_every=100, data_dir=str(d / "tfds"))
    train(config, d / "wd")
    results = run(None, d / "wd", EvalSettings(checkpoint="all"))
    return d, paths, results


def test_finetuned_t5_reaches_high_exact_match_and_bleu(finetuned):
    _, _, results = finetuned
    assert [r["step"] for r in results] == [100, 200]
    final = results[-1]
    print("\nsort task, held-out:", {r["step"]: {k: float(f"{r[k]:.4g}") for k in (
        "loss", "token_accuracy", "exact_match", "bleu", "rougeL")} for r in results})
    assert final["examples"] == final["num_predictions"] == 100
    assert final["exact_match"] >= 90 and final["bleu"] >= 90 and final["rougeL"] >= 95
    assert final["token_accuracy"] >= 98 and final["loss"] < 0.1
    assert final["exact_match"] >= results[0]["exact_match"]


def test_metrics_equal_sacrebleu_and_rouge_score_on_written_predictions(finetuned):
    d, paths, _ = finetuned
    for step in (100, 200):
        metrics = outputs.read_metrics(d / "wd" / "eval", step)
        preds = outputs.read_predictions(d / "wd" / "eval", step)
        want_targets = [line.split("\t")[1] for line in
                        open(paths["validation"]).read().splitlines()]
        assert [p["targets"] for p in preds] == want_targets  # every example, in order
        hyp, ref = [p["prediction"] for p in preds], [p["targets"] for p in preds]
        assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(
            hyp, [ref], tokenize="intl").score)  # T5's / seqio's tokeniser
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        scores = [scorer.score(r, h) for h, r in zip(hyp, ref)]
        for name in ("rouge1", "rouge2", "rougeL"):
            assert metrics[name] == pytest.approx(100 * np.mean([s[name].fmeasure for s in scores]))
        assert metrics["exact_match"] == pytest.approx(
            100 * np.mean([" ".join(h.split()) == r for h, r in zip(hyp, ref)]))


def test_all_evaluates_each_checkpoint_exactly_once(finetuned):
    d, _, _ = finetuned
    out = d / "wd" / "eval"
    before = {s: (out / str(s) / "metrics.json").stat().st_mtime_ns for s in (100, 200)}
    assert run(None, d / "wd", EvalSettings(checkpoint="all")) == []
    assert {s: (out / str(s) / "metrics.json").stat().st_mtime_ns for s in (100, 200)} == before
    assert outputs.done_steps(out) == [100, 200]
    assert not list(out.rglob("*.tmp"))
    events = b"".join(p.read_bytes() for p in (out / "events").iterdir())
    assert events.count(b"eval/exact_match") == 2 and events.count(b"eval/loss") == 2


def test_init_from_recipe_fine_tunes_from_the_trained_params(finetuned):
    d, paths, results = finetuned
    # Nearly zero learning rate: the fine-tuned run's first checkpoint must score like the
    # source checkpoint (a fresh init would have loss ~ln(384) = 6).
    config = testing.sort_task_config(paths, steps=2, save_every=2, lr=1e-9,
                                      init_from=str(d / "wd"), data_dir=str(d / "tfds"))
    saved = checkpoints.read_config(d / "wd")
    assert config.model.to_dict() == saved.model.to_dict()
    assert config.data.vocab_path == str(d / "wd" / "vocab.model") and config.data.extra_ids == 0
    assert config.train.init_from == str(d / "wd")
    train(config, d / "ft")
    (got,) = run(None, d / "ft", EvalSettings(checkpoint="latest", predict="false"))
    assert got["step"] == 2 and "exact_match" not in got
    assert got["loss"] == pytest.approx(results[-1]["loss"], rel=0.05, abs=1e-3)
    assert json.loads((d / "ft" / "eval" / "2" / "metrics.json").read_text())["loss"] == got["loss"]
    assert not (d / "ft" / "eval" / "2" / "predictions.jsonl").exists()
