"""Tests for sources: any prepared tfds dataset by name, local builders, record decoding."""
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from t5x_lite.data import sources
from t5x_lite.data.config import DataConfig, DataConfigError


class T5xLiteTestArticles(tfds.core.GeneratorBasedBuilder):
    """A stand-in for a catalog dataset such as c4: several features, text under "body"."""

    VERSION = tfds.core.Version("1.2.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "body": tfds.features.Text(), "title": tfds.features.Text(),
            "year": tfds.features.Scalar(dtype=np.int32)}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10), "validation": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"body": f"body number {i} é", "title": f"t{i}", "year": 2000 + i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    with pytest.MonkeyPatch.context() as mp:
        # tfds leaves an empty temp directory behind for a catalog dataset it finds unprepared
        mp.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tfds_temp")))
        T5xLiteTestArticles(data_dir=str(data_dir),
                            file_format="array_record").download_and_prepare()
    return str(data_dir)


def test_tfds_source_by_name_with_text_key(tfds_dir):
    cfg = DataConfig(source="tfds", tfds_name="t5x_lite_test_articles:1.2.0", data_dir=tfds_dir,
                     text_key="body")
    src = sources.make_source(cfg, "train")
    assert len(src) == 10 and src.kind == "text"
    assert src.decoder.map(src.data_source[3]) == {"text": "body number 3 é"}
    val = sources.make_source(cfg, "validation[:2]")
    assert len(val) == 2
    title = sources.make_source(DataConfig(**{**cfg.to_dict(), "text_key": "title"}), "train")
    assert title.decoder.map(title.data_source[0]) == {"text": "t0"}


def test_tfds_source_errors_are_one_line(tfds_dir):
    with pytest.raises(DataConfigError, match="not found in data_dir") as e:
        sources.make_source(DataConfig(source="tfds", tfds_name="no_such_dataset_xyz",
                                       data_dir=tfds_dir), "train")
    assert "\n" not in str(e.value)
    with pytest.raises(DataConfigError, match=r"no feature 'text'.*\['body', 'title', 'year'\]"):
        sources.make_source(DataConfig(source="tfds", tfds_name="t5x_lite_test_articles",
                                       data_dir=tfds_dir), "train")
    with pytest.raises(DataConfigError, match="test"):
        sources.make_source(DataConfig(source="tfds", tfds_name="t5x_lite_test_articles",
                                       data_dir=tfds_dir, text_key="body"), "test")


def test_record_decoder_utf8_policy():
    dec = sources.RecordDecoder("text")
    assert dec.map({"text": b"caf\xc3\xa9"}) == {"text": "café"}
    assert dec.map({"text": b"caf\xe9"}) == {"text": "caf\ufffd"}  # replaced, counted
    assert dec.counter.count == 1
    with pytest.raises(DataConfigError, match="not valid UTF-8"):
        sources.RecordDecoder("text", strict_utf8=True).map({"text": b"\xff"})
    pairs = sources.RecordDecoder("pairs", inputs_key="q", targets_key="a")
    assert pairs.map({"q": b"x", "a": b"y", "other": b"z"}) == {"inputs": "x", "targets": "y"}


def test_local_source_split_names_and_missing_validation(tmp_path):
    (tmp_path / "a.tsv").write_text("q1\ta1\nq2\ta2\n")
    cfg = DataConfig(source="tsv", train_paths=str(tmp_path / "a.tsv"),
                     data_dir=str(tmp_path / "dd"), objective="seq2seq", eval_split="dev")
    src = sources.make_source(cfg, "train")
    assert src.kind == "pairs" and len(src) == 2
    assert src.decoder.map(src.data_source[1]) == {"inputs": "q2", "targets": "a2"}
    with pytest.raises(DataConfigError, match="no split 'validation'.*validation_paths"):
        sources.make_source(cfg, "dev")  # eval_split maps to the builder's validation split


def test_local_split_names_with_slices_and_one_name_for_both(tmp_path):
    """eval_split == train_split == 'train' read the validation files for training; custom
    names with a slice ('dev[:1]') were not mapped at all."""
    (tmp_path / "a.tsv").write_text("t1\ta1\nt2\ta2\nt3\ta3\n")
    (tmp_path / "b.tsv").write_text("v1\tb1\nv2\tb2\n")
    both = dict(source="tsv", train_paths=str(tmp_path / "a.tsv"), objective="seq2seq",
                validation_paths=str(tmp_path / "b.tsv"), data_dir=str(tmp_path / "dd"))

    def inputs(cfg, split):
        src = sources.make_source(cfg, split)
        return [src.decoder.map(src.data_source[i])["inputs"] for i in range(len(src))]

    same = DataConfig(**both, train_split="train", eval_split="train")
    assert inputs(same, "train") == ["t1", "t2", "t3"]
    custom = DataConfig(**both, train_split="trn", eval_split="dev[:1]")
    assert inputs(custom, "trn") == ["t1", "t2", "t3"] and inputs(custom, "dev[:1]") == ["v1"]
    assert inputs(DataConfig(**both, train_split="trn[:2]", eval_split="dev"),
                  "trn[:2]") == ["t1", "t2"]


def test_a_same_size_edit_within_the_second_is_a_fresh_build(tmp_path):
    """The prepared-data key held whole seconds: an edit that kept the size reused the stale
    build."""
    import os
    path = tmp_path / "a.tsv"
    cfg = DataConfig(source="tsv", train_paths=str(path), objective="seq2seq",
                     data_dir=str(tmp_path / "dd"))
    path.write_text("what is two plus two\tfour\n")
    os.utime(path, ns=(10**18, 10**18))
    src = sources.make_source(cfg, "train")
    assert src.decoder.map(src.data_source[0]) == {"inputs": "what is two plus two",
                                                   "targets": "four"}
    path.write_text("what is two plus one\tthre\n")  # the same size, the same second
    os.utime(path, ns=(10**18 + 1000, 10**18 + 1000))
    src = sources.make_source(cfg, "train")
    assert src.decoder.map(src.data_source[0]) == {"inputs": "what is two plus one",
                                                   "targets": "thre"}


def test_missing_local_path_is_a_config_error(tmp_path):
    cfg = DataConfig(source="text", paths=str(tmp_path / "nope" / "*.txt"),
                     data_dir=str(tmp_path / "dd"))
    with pytest.raises(DataConfigError, match="no files match"):
        sources.make_source(cfg, "train")


def _non_utf8_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "non-UTF-8" in r.getMessage()]


def test_non_utf8_skips_are_reported_once_per_file_set(tmp_path, caplog, monkeypatch):
    # It was logged by the counting pass, again by the pass writing each split, and again by
    # every make_source: five warnings for one bad line in a run that opens train and eval.
    from t5x_lite.data import builders

    caplog.set_level("WARNING")
    lines = [f"line number {i}".encode() for i in range(40)]
    (tmp_path / "a.txt").write_bytes(b"\n".join(lines[:5] + [b"caf\xe9 au lait"] + lines[5:]))
    cfg = DataConfig(source="text", paths=str(tmp_path / "a.txt"), document_per="line",
                     validation_fraction=0.3, objective="causal_lm",
                     data_dir=str(tmp_path / "dd"))
    assert len(sources.make_source(cfg, "train")) + len(sources.make_source(cfg, "validation")
                                                        ) == 40
    assert _non_utf8_warnings(caplog) == [
        "skipped 1 lines with non-UTF-8 bytes in the input files (data.strict_utf8=True to fail)"]

    # A later run (a new process) that finds it prepared reports it once, from the metadata.
    caplog.clear()
    monkeypatch.setattr(builders, "_reported", set())
    sources.make_source(cfg, "train")
    sources.make_source(cfg, "validation")
    assert len(_non_utf8_warnings(caplog)) == 1
    assert "preparation skipped 1 non-UTF-8 line(s)" in _non_utf8_warnings(caplog)[0]

    # Explicit splits: one warning per file set, each with its own count.
    caplog.clear()
    (tmp_path / "v.txt").write_bytes(b"ok\n\xff\n\xfe\nfine\n")
    cfg = DataConfig(source="text", train_paths=str(tmp_path / "a.txt"),
                     validation_paths=str(tmp_path / "v.txt"), document_per="line",
                     objective="causal_lm", data_dir=str(tmp_path / "dd"))
    sources.make_source(cfg, "train")
    sources.make_source(cfg, "validation")
    assert sorted(_non_utf8_warnings(caplog)) == [
        "skipped 1 lines with non-UTF-8 bytes in the train files (data.strict_utf8=True to fail)",
        "skipped 2 lines with non-UTF-8 bytes in the validation files "
        "(data.strict_utf8=True to fail)"]


def test_shared_train_and_validation_file_is_warned_about_once(tmp_path, caplog):
    # The paths are resolved again for every split a run opens: one warning each time.
    caplog.set_level("WARNING")
    (tmp_path / "a.tsv").write_text("q1\ta1\nq2\ta2\n")
    cfg = DataConfig(source="tsv", train_paths=str(tmp_path / "a.tsv"),
                     validation_paths=str(tmp_path / "a.tsv"), objective="seq2seq",
                     data_dir=str(tmp_path / "dd"))
    for split in ("train", "validation", "train"):
        sources.make_source(cfg, split)
    assert caplog.text.count("are both train and validation data") == 1
