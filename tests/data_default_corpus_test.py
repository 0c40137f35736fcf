"""Tests for the offline default corpus (stdlib docstrings) and the default vocabulary."""
import sysconfig
import time

import pytest

from t5x_lite.data import builders
from t5x_lite.data import default_corpus as dc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("default_corpus")


def test_looks_english():
    prose = ("Return the number of items in the container. If the container is empty this "
             "returns zero, and it never raises an exception for a valid object.")
    assert dc.looks_english(prose)
    assert not dc.looks_english("short text")
    assert not dc.looks_english("x = [1, 2, 3]; y = {a: b for a, b in z}; " * 5)


def test_extraction_is_deterministic_on_a_subpackage():
    root = sysconfig.get_paths()["stdlib"] + "/json"
    a, b = dc.extract_documents(root), dc.extract_documents(root)
    assert a == b and len(a) >= 5
    assert len(set(a)) == len(a)
    assert not any(line.lstrip().startswith(">>>") for d in a for line in d.splitlines())


def test_default_corpus_builds_fast_with_splits_and_is_reused(data_dir, monkeypatch):
    start = time.time()
    builder = dc.prepare_default_corpus(data_dir)
    elapsed = time.time() - start
    assert elapsed < 60, f"default corpus took {elapsed:.0f}s"
    md = builder.info.metadata
    assert md["characters"] > 1_500_000  # ~2 MB of prose
    train = builder.as_data_source("train")
    val = builder.as_data_source("validation")
    assert len(train) == md["split_sizes"]["train"] > 3000
    assert len(val) == md["split_sizes"]["validation"] > 50
    text = train[0]["text"].decode("utf-8")
    assert dc.looks_english(text)
    # Validation is the content-hash holdout.
    assert all(builders.record_hash({"text": val[i]["text"].decode()}) < dc.VALIDATION_FRACTION
               for i in range(len(val)))
    # A second call reuses the prepared files without re-extracting.
    monkeypatch.setattr(dc, "extract_documents", lambda *a: pytest.fail("re-extracted"))
    assert dc.prepare_default_corpus(data_dir).data_dir == builder.data_dir


def test_default_vocab_is_trained_once_and_cached(data_dir, monkeypatch):
    vocab = dc.default_vocab(data_dir)  # 8000 pieces: the quickstart's (faster than 1000)
    assert vocab.sp_size == 8000 and vocab.vocab_size == 8100 and vocab.padded_vocab_size == 8192
    assert vocab.path.name.endswith("-sp8000.model")
    text = "Return the number of items in the list."
    assert vocab.decode(vocab.encode(text)) == text
    monkeypatch.setattr(dc.vocab_lib, "train_vocab", lambda *a, **k: pytest.fail("retrained"))
    again = dc.default_vocab(data_dir)
    assert again.path == vocab.path and again.encode(text) == vocab.encode(text)
