"""Text metrics: definitions, equality with sacrebleu / rouge-score run directly, errors."""
import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from t5x_lite.evaluation import text_metrics as tm

PREDS = ["the cat sat on the mat", "a quick brown fox", "hello  world ", "completely wrong"]
TARGETS = ["the cat sat on the mat", "the quick brown fox jumps", "hello world", "right answer"]


def test_exact_match_normalizes_whitespace_only():
    assert tm.exact_match(PREDS, TARGETS) == 50.0  # 1st, and 3rd after whitespace collapse
    assert tm.exact_match(["Hello"], ["hello"]) == 0.0  # case matters


def test_exact_match_and_accuracy_compare_unicode_forms_as_the_vocabulary_does():
    """Sentencepiece NFKC-normalises, so predictions are NFKC: a target in NFD or with
    compatibility characters must still match the same text (before: 0 %)."""
    preds = ["caf\u00e9", "x2", "fine", "a b", "A"]
    targets = ["cafe\u0301", "x\u00b2", "\ufb01ne", "a\u3000b", "\uff21"]
    assert tm.exact_match(preds, targets) == 100.0
    got = tm.compute(["caf\u00e9", "no"] * 2, ["cafe\u0301", "no"] * 2, "accuracy")
    assert got == {"accuracy": 100.0, "invalid_prediction_rate": 0.0}
    assert tm.exact_match(["Cafe"], ["caf\u00e9"]) == 0.0  # accents and case still count


def test_empty_strings_and_whitespace():
    preds, targets = ["", " \n", "a", "b c"], ["", "", " a\t", "b  c d"]
    assert tm.exact_match(preds, targets) == 75.0
    got = tm.compute(preds, targets, "bleu,rouge")
    assert got["bleu"] == pytest.approx(_t5_bleu(preds, targets))
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    assert got["rouge1"] == pytest.approx(
        100 * np.mean([scorer.score(t, p)["rouge1"].fmeasure for p, t in zip(preds, targets)]))


def _t5_bleu(predictions, targets):
    """t5.evaluation.metrics.bleu (and seqio's): sacrebleu with these arguments."""
    return sacrebleu.corpus_bleu(predictions, [targets], smooth_method="exp", smooth_value=0.0,
                                 force=False, lowercase=False, tokenize="intl",
                                 use_effective_order=False).score


def test_bleu_equals_t5s_sacrebleu_call():
    want = _t5_bleu(PREDS, TARGETS)
    assert tm.compute(PREDS, TARGETS, "bleu") == {"bleu": pytest.approx(want, abs=1e-12)}
    assert 0 < want < 100
    # Unicode punctuation: the "intl" tokeniser splits it off, sacrebleu's default "13a" not
    # (10.3 there for what T5 scores as a perfect match).
    hyp, ref = ["the cat–dog sat « here »", "x"], ["the cat – dog sat «here»", "x"]
    assert tm.bleu(hyp, ref) == pytest.approx(_t5_bleu(hyp, ref)) == pytest.approx(100)
    assert sacrebleu.corpus_bleu(hyp, [ref]).score < 20


def test_rouge_is_mean_fmeasure_of_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per = [scorer.score(t, p) for p, t in zip(PREDS, TARGETS)]
    got = tm.compute(PREDS, TARGETS, ["rouge"])
    for name in ("rouge1", "rouge2", "rougeL"):
        assert got[name] == pytest.approx(100 * np.mean([s[name].fmeasure for s in per]))
    assert got["rouge1"] > got["rouge2"]


def test_accuracy_and_invalid_predictions_for_labels():
    targets = ["positive", "negative"] * 4
    preds = ["positive", "negative", "positive", "positive", "maybe", "negative", "positive",
             "negative"]
    got = tm.compute(preds, targets, "auto")
    assert set(got) == {"exact_match", "bleu", "rouge1", "rouge2", "rougeL", "accuracy",
                        "invalid_prediction_rate"}
    assert got["accuracy"] == 75.0 and got["invalid_prediction_rate"] == 12.5
    assert "accuracy" not in tm.compute(PREDS, TARGETS, "auto")  # free text: no accuracy


def test_perfect_predictions_score_100():
    targets = ["a b c d e", "f g h i j k"]
    got = tm.compute(targets, targets, "exact_match,bleu,rouge")
    assert all(v == pytest.approx(100.0) for v in got.values()), got


@pytest.mark.parametrize("preds, targets, metrics, message", [
    ([], [], "auto", "no predictions to score"),
    (["a"], ["a", "b"], "auto", "1 predictions for 2 targets"),
    (["a"], ["a"], "bleu,meteor", "unknown metric 'meteor'"),
    ([None], ["a"], "exact_match", "not a string"),
])
def test_errors_are_one_line(preds, targets, metrics, message):
    with pytest.raises(tm.MetricsError, match=message) as e:
        tm.compute(preds, targets, metrics)
    assert "\n" not in str(e.value)
