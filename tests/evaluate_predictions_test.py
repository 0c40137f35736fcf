"""Decoding a split: prompts built like the training objective saw them, one record per
example in order, and clear errors."""
import copy

import numpy as np
import pytest

from t5x_lite.data import DataConfig
from t5x_lite.decoding import generate as gen
from t5x_lite.evaluation import predictions, testing
from t5x_lite.evaluation.predictions import Example, PredictionError
from t5x_lite.vocab import Vocabulary

DATA = DataConfig(objective="seq2seq", inputs_length=6, targets_length=5, seq_len=16)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    paths = testing.write_sort_task(tmp_path_factory.mktemp("v"), num_train=10, num_validation=2)
    return Vocabulary(paths["vocab"], extra_ids=0)


@pytest.fixture(scope="module")
def t5(vocab):
    return testing.random_loaded(testing.tiny_t5(), vocab, scale=3.0)


@pytest.fixture(scope="module")
def gpt(vocab):
    return testing.random_loaded(testing.tiny_gpt(max_len=16), vocab, scale=3.0)


def test_prompt_ids(t5, gpt, vocab):
    ids = vocab.encode("a b c d e f g h")
    assert len(ids) >= 8
    assert predictions.prompt_ids(t5, "a b", data_cfg=DATA, max_new_tokens=5) == \
        vocab.encode("a b") + [1]
    # T5: truncated to inputs_length, EOS kept.
    assert predictions.prompt_ids(t5, "a b c d e f g h", data_cfg=DATA, max_new_tokens=5) == \
        ids[:5] + [1]
    # ... with the model's EOS (an HF T5's config could name another).
    t5_eos = copy.copy(t5)
    t5_eos.eos_id = 7
    assert predictions.prompt_ids(t5_eos, "a b", data_cfg=DATA, max_new_tokens=5) == \
        vocab.encode("a b") + [7]
    # GPT: decoder start id first; an over-long prompt keeps its end: 16 - (10 - 1) - 1 = 6
    # tokens, as many as generate allows (the last new token is never fed back).
    assert predictions.prompt_ids(gpt, "a b", data_cfg=DATA, max_new_tokens=10) == \
        [0] + vocab.encode("a b")
    longest = predictions.prompt_ids(gpt, "a b c d e f g h", data_cfg=DATA, max_new_tokens=10)
    assert longest == [0] + ids[-6:]
    gen.check_prompts(gpt.config, [longest], gen.DecodeOptions(max_new_tokens=10))
    assert predictions.uses_start_token(gpt) and not predictions.uses_start_token(t5)
    no_vocab = copy.copy(gpt)
    no_vocab.vocab = None  # e.g. an HF GPT-2, where id 0 is a real token
    assert not predictions.uses_start_token(no_vocab)
    with pytest.raises(PredictionError, match="leaves no room"):
        predictions.prompt_ids(gpt, "a", data_cfg=DATA, max_new_tokens=16)


def test_prefix_lm_prompts_are_the_prefix_the_pipeline_trains_on(gpt, vocab):
    """A prefix_lm pair trains on [0] + inputs + EOS as its prefix (the flagged decoder
    inputs); the prompt left the EOS off, so the first new token came from a position the
    model never learned to predict from."""
    from t5x_lite.data import objectives
    plm = DataConfig(objective="prefix_lm", seq_len=16)
    for text in ("a b", "a b c d e f g h"):
        row = objectives.PrefixLMFromPairs(16).map(
            {"inputs": np.array(vocab.encode(text), np.int32),
             "targets": np.array(vocab.encode("c"), np.int32)})
        inputs = np.concatenate([[0], row["decoder_target_tokens"][:-1]])
        prefix = inputs[row["decoder_causal_attention"].astype(bool)].tolist()
        assert predictions.prompt_ids(gpt, text, data_cfg=plm, max_new_tokens=2) == prefix
    # Over-long: the end is kept, EOS included.
    assert predictions.prompt_ids(gpt, "a b c d e f g h", data_cfg=plm, max_new_tokens=10) == \
        [0] + (vocab.encode("a b c d e f g h") + [1])[-6:]


@pytest.mark.parametrize("family", ["t5", "gpt"])
def test_predict_returns_generate_output_per_example(family, t5, gpt):
    lm = t5 if family == "t5" else gpt
    examples = [Example(i, x, "a b") for i, x in enumerate(["c a", "j b e", "d", "a b c"])]
    records = predictions.predict(lm, examples, data_cfg=DATA, max_new_tokens=5)
    ids = [predictions.prompt_ids(lm, e.inputs, data_cfg=DATA, max_new_tokens=5)
           for e in examples]
    want = gen.generate(lm, input_ids=ids, max_new_tokens=5)
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    for r, w, e in zip(records, want, examples):
        assert r["prediction"] == w["text"] and r["score"] == pytest.approx(w["score"])
        assert (r["inputs"], r["targets"]) == (e.inputs, e.targets)
    # Defaults: T5 decodes data.targets_length tokens at most.
    assert predictions.default_max_new_tokens(t5, DATA) == 5


def test_errors(t5, tmp_path):
    with pytest.raises(PredictionError, match="no examples to decode"):
        predictions.predict(t5, [], data_cfg=DATA)
    (tmp_path / "docs.txt").write_text("just text\n\nmore text\n")
    text = DataConfig(source="text", train_paths=(str(tmp_path / "docs.txt"),),
                      validation_paths=(str(tmp_path / "docs.txt"),), objective="causal_lm",
                      data_dir=str(tmp_path / "tfds"))
    with pytest.raises(PredictionError, match="holds text documents, not inputs/targets pairs"):
        predictions.read_examples(text, "validation")
    with pytest.raises(PredictionError, match="num_beams must be >= 1"):
        predictions.predict(t5, [Example(0, "a", "b")], data_cfg=DATA, max_new_tokens=5,
                            method="beam", num_beams=0)
