"""Tests for the local-file tfds builders: formats, splits, caching, bad input."""
import bz2
import codecs
import gzip
import json
import lzma
import os
import random
import re
import tempfile
import threading
import time
import tracemalloc
import zipfile

import pytest

from t5x_lite import files as t5x_files
from t5x_lite.data import builders
from t5x_lite.data import local_files
from t5x_lite.data import testing


def _read_all(builder, split):
    src = builder.as_data_source(split)
    return [{k: v.decode("utf-8") for k, v in src[i].items()} for i in range(len(src))]


def _prepare(tmp_path, fmt, **kwargs):
    config = builders.local_files_config(fmt, **kwargs)
    return builders.prepare_local_files(config, tmp_path / "data_dir")


def test_text_one_document_per_file_with_holdout(tmp_path):
    docs = testing.documents(60)
    for i, d in enumerate(docs):
        (tmp_path / f"doc{i:03d}.txt").write_text(d + "\n")
    b = _prepare(tmp_path, "text", paths=[str(tmp_path / "doc*.txt")], validation_fraction=0.2)
    train, val = _read_all(b, "train"), _read_all(b, "validation")
    assert sorted(r["text"] for r in train + val) == sorted(docs)
    assert 3 <= len(val) <= 25
    assert {r["text"] for r in val} == {d for d in docs
                                        if builders.record_hash({"text": d}) < 0.2}
    assert b.info.metadata["split_sizes"] == {"train": len(train), "validation": len(val)}


def test_preparing_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    """tfds' builder asks for GCS metadata of a dataset it finds unprepared, which leaves an
    empty tmp*tfds directory behind each time; local corpora skip that call."""
    temp = tmp_path / "system_temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    (tmp_path / "a.txt").write_text("one document\n")
    b = _prepare(tmp_path, "text", paths=[str(tmp_path / "a.txt")], validation_fraction=0.0)
    assert _read_all(b, "train") == [{"text": "one document"}]
    # the one thing kept there: the per-user directory of preparation locks
    assert [p.name for p in temp.iterdir()] == [f"t5x_lite_locks-{os.getuid()}"]


def test_text_paragraphs_and_lines(tmp_path):
    (tmp_path / "a.txt").write_text("First para\nstill first.\n\n\nSecond para.\n  \nThird.\n")
    b = _prepare(tmp_path, "text", train_paths=[str(tmp_path / "a.txt")],
                 document_per="paragraph")
    assert [r["text"] for r in _read_all(b, "train")] == [
        "First para\nstill first.", "Second para.", "Third."]
    b = _prepare(tmp_path, "text", train_paths=[str(tmp_path / "a.txt")], document_per="line")
    assert [r["text"] for r in _read_all(b, "train")] == [
        "First para", "still first.", "Second para.", "Third."]
    assert b.info.metadata["skipped_blank"] == 3


def test_jsonl_text_and_pairs_and_tsv_with_explicit_splits(tmp_path):
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"body": f"text {i}", "x": i})
                                                for i in range(5)) + "\n")
    b = _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "t.jsonl")], text_key="body")
    assert [r["text"] for r in _read_all(b, "train")] == [f"text {i}" for i in range(5)]
    assert b.info.metadata["kind"] == "text"

    (tmp_path / "p.jsonl").write_text(json.dumps({"inputs": "q1", "targets": "a1"}) + "\n" +
                                      json.dumps({"inputs": "q2", "targets": "a2"}) + "\n")
    (tmp_path / "v.tsv").write_text("vq\tva\n")
    b = _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "p.jsonl")])
    assert _read_all(b, "train") == [{"inputs": "q1", "targets": "a1"},
                                     {"inputs": "q2", "targets": "a2"}]
    b = _prepare(tmp_path, "tsv", train_paths=[str(tmp_path / "v.tsv")],
                 validation_paths=[str(tmp_path / "v.tsv")])
    assert _read_all(b, "validation") == [{"inputs": "vq", "targets": "va"}]
    assert b.info.metadata["kind"] == "pairs"


def test_prepared_data_is_reused_and_rebuilt_when_inputs_change(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text("one\n\ntwo\n")
    kwargs = dict(train_paths=[str(path)], document_per="paragraph")
    b1 = _prepare(tmp_path, "text", **kwargs)
    calls = []
    original = builders.LocalFiles._plan
    monkeypatch.setattr(builders.LocalFiles, "_plan",
                        lambda self: calls.append(1) or original(self))
    b2 = _prepare(tmp_path, "text", **kwargs)
    assert b2.data_dir == b1.data_dir and calls == []  # cached: nothing re-read

    path.write_text("one\n\ntwo\n\nthree\n")
    os.utime(path, (1, 1))  # mtime and size change -> new config
    b3 = _prepare(tmp_path, "text", **kwargs)
    assert b3.data_dir != b1.data_dir and calls == [1]
    assert [r["text"] for r in _read_all(b3, "train")] == ["one", "two", "three"]
    b4 = _prepare(tmp_path, "text", **{**kwargs, "document_per": "line"})  # options matter too
    assert b4.data_dir not in (b1.data_dir, b3.data_dir)


def test_two_runs_preparing_the_same_data_at_once_build_it_once(tmp_path, monkeypatch):
    """Two trainers (here threads) started together on one host: the second waits for the
    first's preparation and reuses it (it used to build it too, and fail renaming its copy
    over the first's: FileExistsError)."""
    (tmp_path / "c.txt").write_text("one\n\ntwo\n")
    kwargs = dict(train_paths=[str(tmp_path / "c.txt")], document_per="paragraph")
    calls, original = [], builders.LocalFiles._plan

    def slow_plan(self):  # both pass the "is it prepared?" check before either is done
        calls.append(1)
        time.sleep(0.5)
        return original(self)

    monkeypatch.setattr(builders.LocalFiles, "_plan", slow_plan)
    results, gate = [None, None], threading.Barrier(2)

    def prepare(i):
        gate.wait()
        try:
            results[i] = _read_all(_prepare(tmp_path, "text", **kwargs), "train")
        except Exception as e:  # pylint: disable=broad-except
            results[i] = e

    threads = [threading.Thread(target=prepare, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[{"text": "one"}, {"text": "two"}]] * 2 and calls == [1]


def test_a_lock_folder_that_cannot_be_made_leaves_runs_unguarded_not_failed(tmp_path,
                                                                            monkeypatch, caplog):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    monkeypatch.setattr(t5x_files.tempfile, "gettempdir", lambda: str(in_the_way))
    ran = False
    with caplog.at_level("WARNING"):
        with t5x_files.host_lock("key", wait=False):
            ran = True
    assert ran and "no lock for key" in caplog.text


def test_non_utf8_is_skipped_and_counted_or_fails_when_strict(tmp_path):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "bad.txt").write_bytes(b"latin-1 caf\xe9")
    b = _prepare(tmp_path, "text", train_paths=[str(tmp_path / "*.txt")])
    assert [r["text"] for r in _read_all(b, "train")] == ["fine text"]
    assert b.info.metadata["skipped_non_utf8"] == 1
    assert "skipped 1 non-UTF-8 file(s)" in builders.skipped_summary(b)

    (tmp_path / "lines.tsv").write_bytes(b"a\tb\nc\xff\td\ne\tf\n")
    b = _prepare(tmp_path, "tsv", train_paths=[str(tmp_path / "lines.tsv")])
    assert _read_all(b, "train") == [{"inputs": "a", "targets": "b"},
                                     {"inputs": "e", "targets": "f"}]
    assert b.info.metadata["skipped_non_utf8"] == 1
    with pytest.raises(local_files.DataFormatError, match=r"lines.tsv:2: not valid UTF-8"):
        _prepare(tmp_path, "tsv", train_paths=[str(tmp_path / "lines.tsv")], strict_utf8=True)

    # JSON escapes such bytes as lone surrogates ("\udce9", Python's surrogateescape): valid
    # JSON, no Unicode text (the dataset build failed on it with a traceback)
    (tmp_path / "recs.jsonl").write_text('{"text": "one"}\n{"text": "caf\\udce9"}\n'
                                         '{"text": "three"}\n')
    b = _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "recs.jsonl")])
    assert [r["text"] for r in _read_all(b, "train")] == ["one", "three"]
    assert b.info.metadata["skipped_non_utf8"] == 1
    with pytest.raises(local_files.DataFormatError, match=r"recs.jsonl:2: a JSON string holds a "
                                                          r"lone surrogate \(U\+DCE9"):
        _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "recs.jsonl")], strict_utf8=True)



def test_utf8_byte_order_mark_is_not_text(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.txt").write_bytes(bom + b"Hello there.\r\n\r\nSecond one.\r\n")
    for per in ("file", "paragraph", "line"):
        records = [r for _, r in local_files.read_file(tmp_path / "a.txt", "text",
                                                        document_per=per)]
        assert records[0]["text"].startswith("Hello"), per
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "a b"}\r\n{"text": "c"}\r\n')
    b = _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "a.jsonl")])  # was invalid JSON
    assert [r["text"] for r in _read_all(b, "train")] == ["a b", "c"]
    (tmp_path / "a.tsv").write_bytes(bom + b"q1\ta1\r\nq2\ta2\r\n")
    assert [r for _, r in local_files.read_file(tmp_path / "a.tsv", "tsv", kind="pairs")] == [
        {"inputs": "q1", "targets": "a1"}, {"inputs": "q2", "targets": "a2"}]


def test_lines_ended_by_cr_only_are_lines(tmp_path):
    # Classic Mac OS files end lines in CR alone: they were one line (and one JSON error).
    (tmp_path / "mac.txt").write_bytes(b"one\rtwo\r\rthree\r")
    for per, docs in {"line": ["one", "two", "three"], "paragraph": ["one\ntwo", "three"]}.items():
        assert [r["text"] for _, r in local_files.read_file(
            tmp_path / "mac.txt", "text", document_per=per)] == docs, per
    (tmp_path / "mac.jsonl").write_bytes(b'{"text": "a b"}\r{"text": "c"}\r')
    b = _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "mac.jsonl")])
    assert [r["text"] for r in _read_all(b, "train")] == ["a b", "c"]
    (tmp_path / "mac.tsv").write_bytes(b"q1\ta1\rq2\ta2")
    assert [r for _, r in local_files.read_file(tmp_path / "mac.tsv", "tsv", kind="pairs")] == [
        {"inputs": "q1", "targets": "a1"}, {"inputs": "q2", "targets": "a2"}]


def test_paragraph_line_numbers(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\n\none\r\n\r\n\r\n\r\n  two\n2b\n \t\n\n\n\nthree\n\n")
    counts = local_files.ReadCounts()
    units = list(local_files.read_file(tmp_path / "a.txt", "text", document_per="paragraph",
                                       counts=counts))
    assert [(line, r["text"]) for line, r in units] == [
        (3, "one"), (7, "two\n2b"), (13, "three")]
    assert counts.skipped_blank == 0  # runs of blank lines were counted as blank documents
    # Line numbers of many paragraphs (counted per paragraph now; counting from the start of
    # the file for each one was quadratic: ~15 s for 2 MB, measured by hand, not timed here).
    (tmp_path / "big.txt").write_text(("word " * 20 + "\n\n") * 2000)
    units = list(local_files.read_file(tmp_path / "big.txt", "text", document_per="paragraph"))
    assert [line for line, _ in units] == list(range(1, 4000, 2))


def test_bad_input_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        builders.local_files_config("text", paths=[str(tmp_path / "missing.txt")])
    with pytest.raises(FileNotFoundError, match="no files match"):
        builders.local_files_config("text", paths=[str(tmp_path / "*.none")])
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(builders.EmptyCorpusError, match="empty corpus") as e:
        _prepare(tmp_path, "text", paths=[str(tmp_path / "blank.txt")])
    assert "\n" not in str(e.value)
    # nothing half-written, not even the empty dataset folders tfds makes before preparing
    # (its shared downloads/ folder stays)
    assert not [p for p in (tmp_path / "data_dir").rglob("*") if p.is_file() or
                p.name not in ("t5x_lite_local_files", "downloads", "extracted")]
    (tmp_path / "blank.tsv").write_text("\n  \n\n")  # blank TSV lines are not records
    with pytest.raises(builders.EmptyCorpusError, match="the files are empty or hold only blank"):
        _prepare(tmp_path, "tsv", train_paths=[str(tmp_path / "blank.tsv")])
    (tmp_path / "x.tsv").write_text("a\tb\nno tab here\n")
    with pytest.raises(local_files.DataFormatError, match=r"x.tsv:2: expected 'inputs<TAB>"):
        _prepare(tmp_path, "tsv", train_paths=[str(tmp_path / "x.tsv")])
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(local_files.DataFormatError, match=r"x.jsonl:2: fields"):
        _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "x.jsonl")])
    (tmp_path / "y.jsonl").write_text('{"body": "a"}\n')
    with pytest.raises(local_files.DataFormatError, match="neither 'text'"):
        _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "y.jsonl")])
    with pytest.raises(ValueError, match="either data.paths"):
        builders.local_files_config("text")


def test_preparation_prints_nothing_and_warns_about_nothing(tmp_path, capfd, caplog):
    # tfds prints "Downloading and preparing dataset ..." for every dataset and warns that the
    # folder it just made has no dataset_info.json; neither belongs in a train log
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    caplog.set_level("WARNING")
    b = _prepare(tmp_path, "text", train_paths=[str(tmp_path / "a.txt")],
                 document_per="paragraph")
    assert builders.is_prepared(b) and b.is_prepared()
    assert capfd.readouterr().out == ""
    assert not [r for r in caplog.records if r.levelname == "WARNING"
                and "custom data configuration" not in r.getMessage()], caplog.text


def test_tiny_corpus_holdout_keeps_both_splits_nonempty(tmp_path):
    (tmp_path / "two.txt").write_text("alpha\n\nbeta\n")
    b = _prepare(tmp_path, "text", paths=[str(tmp_path / "two.txt")], document_per="paragraph",
                 validation_fraction=0.01)
    assert len(_read_all(b, "train")) == 1 and len(_read_all(b, "validation")) == 1
    (tmp_path / "one.txt").write_text("alone\n")
    b = _prepare(tmp_path, "text", paths=[str(tmp_path / "one.txt")], validation_fraction=0.5)
    assert len(_read_all(b, "train")) == 1 and "validation" not in b.info.splits


def test_holdout_overrides():
    assert builders.holdout_overrides([0.5, 0.7], 0.1) == (0.5, None)
    assert builders.holdout_overrides([0.05, 0.07], 0.1) == (None, 0.07)
    assert builders.holdout_overrides([0.05, 0.7], 0.1) == (None, None)
    assert builders.holdout_overrides([0.7], 0.1) == (None, None)


def test_a_directory_means_every_file_under_it_at_any_depth(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("two")
    (tmp_path / "d" / "sub" / "a.txt").write_text("three")
    (tmp_path / "d" / "a.txt").write_text("one")
    b = _prepare(tmp_path, "text", train_paths=[str(tmp_path / "d")])
    assert [r["text"] for r in _read_all(b, "train")] == ["one", "two", "three"]  # path order
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no files under directory"):
        builders.local_files_config("text", train_paths=[str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="no input paths given"):
        builders.local_files_config("text", train_paths=["", " "])


def test_a_file_two_patterns_match_is_read_once(tmp_path, caplog):
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"document {name}\n")
    # a.txt by a glob, by name and by a relative spelling: one copy of its document.
    patterns = [str(tmp_path / "*.txt"), str(tmp_path / "a.txt"), str(tmp_path / "." / "a.txt")]
    b = _prepare(tmp_path, "text", train_paths=patterns,
                 validation_paths=[str(tmp_path / "b.txt")])
    assert sorted(r["text"] for r in _read_all(b, "train")) == ["document a", "document b"]
    # b.txt is also the validation file: kept (evaluating on train data can be deliberate),
    # with a warning.
    assert "1 file(s) are both train and validation data" in caplog.text


_WIDE = [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
         ("utf-32-le", codecs.BOM_UTF32_LE), ("utf-32-be", codecs.BOM_UTF32_BE)]


@pytest.mark.parametrize("encoding, bom", _WIDE)
def test_utf16_and_utf32_files_with_a_byte_order_mark_are_decoded(tmp_path, encoding, bom):
    # Line mode split UTF-16 at b"\n" and kept the pieces that happened to be valid UTF-8:
    # "\x00S\x00e..." documents, and a "\x00" one after the last newline.
    text = "First line é\r\nSecond line\n\nThird ☃\n"
    (tmp_path / "w.txt").write_bytes(bom + text.encode(encoding))
    expected = {"line": ["First line é", "Second line", "Third ☃"],
                "paragraph": ["First line é\r\nSecond line", "Third ☃"],
                "file": [text.strip()]}
    for per, docs in expected.items():
        records = [r["text"] for _, r in local_files.read_file(tmp_path / "w.txt", "text",
                                                                document_per=per)]
        assert records == docs, per
    b = _prepare(tmp_path, "text", train_paths=[str(tmp_path / "w.txt")], document_per="line")
    assert [r["text"] for r in _read_all(b, "train")] == expected["line"]
    assert b.info.metadata["skipped_non_utf8"] == 0
    (tmp_path / "p.jsonl").write_bytes(bom + '{"inputs": "q", "targets": "é"}\n'.encode(encoding))
    b = _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "p.jsonl")])
    assert _read_all(b, "train") == [{"inputs": "q", "targets": "é"}]


def test_utf16_without_a_byte_order_mark_and_binary_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "w.txt").write_bytes("hello\nworld\n".encode("utf-16-le"))
    with pytest.raises(local_files.DataFormatError,
                       match=r"w.txt: not UTF-8 text \(NUL byte at offset 1: UTF-16") as e:
        _prepare(tmp_path, "text", train_paths=[str(tmp_path / "w.txt")], document_per="line")
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "data_dir").rglob("*.array_record*"))  # nothing half-written
    (tmp_path / "w.jsonl").write_bytes('{"text": "a"}\n'.encode("utf-16-be"))
    with pytest.raises(local_files.DataFormatError, match="w.jsonl: not UTF-8 text"):
        builders.local_files_config("jsonl", train_paths=[str(tmp_path / "w.jsonl")])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("text\n")
    (tmp_path / "d" / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(local_files.DataFormatError, match=r"d/img.png: not UTF-8 text"):
        _prepare(tmp_path, "text", train_paths=[str(tmp_path / "d")], document_per="line")
    (tmp_path / "bad16.txt").write_bytes(codecs.BOM_UTF16_LE + b"h\x00i")  # odd length
    with pytest.raises(local_files.DataFormatError, match="not valid UTF-16"):
        list(local_files.read_file(tmp_path / "bad16.txt", "text"))
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("a.txt", "text")
    with pytest.raises(local_files.DataFormatError, match="a.zip: a zip archive; decompress"):
        list(local_files.read_file(tmp_path / "a.zip", "text"))


def test_hidden_files_under_a_directory_are_not_data(tmp_path):
    (tmp_path / "d" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("the text\n")
    (tmp_path / "d" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1\x00")
    (tmp_path / "d" / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("old copy\n")
    b = _prepare(tmp_path, "text", train_paths=[str(tmp_path / "d")])
    assert [r["text"] for r in _read_all(b, "train")] == ["the text"]


def test_compressed_files_are_read_by_their_first_bytes(tmp_path):
    text = b"one two\n\nthree\n"
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "b.txt.bz2").write_bytes(bz2.compress(text))
    (tmp_path / "c.txt.xz").write_bytes(lzma.compress(text))
    (tmp_path / "no_suffix").write_bytes(gzip.compress(text))
    for name in ("a.txt.gz", "b.txt.bz2", "c.txt.xz", "no_suffix"):
        records = [r["text"] for _, r in local_files.read_file(tmp_path / name, "text",
                                                                document_per="paragraph")]
        assert records == ["one two", "three"], name
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(
        b'{"inputs": "q1", "targets": "a1"}\n' + b'{"inputs": "q2", "targets": "a2"}\n' * 3))
    b = _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "p.jsonl.gz")])
    assert b.info.metadata["kind"] == "pairs" and len(_read_all(b, "train")) == 4
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(text * 100)[:40])
    with pytest.raises(local_files.DataFormatError, match="cut.txt.gz: corrupt gzip data") as e:
        _prepare(tmp_path, "text", train_paths=[str(tmp_path / "cut.txt.gz")])
    assert "\n" not in str(e.value)
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:30])
    with pytest.raises(local_files.DataFormatError, match="cut.jsonl.gz: corrupt gzip data"):
        _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "cut.jsonl.gz")])


def test_nul_characters_past_the_sniffed_bytes_are_not_documents(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 9000 + b"\n\x00\n \x00 \nlast\n")
    records = [r["text"] for _, r in local_files.read_file(tmp_path / "a.txt", "text",
                                                            document_per="line")]
    assert records == ["x" * 9000, "last"]


def test_holdout_keeps_train_nonempty_for_one_document_or_only_copies(tmp_path):
    # Forcing the smallest hash into validation moved every copy of it: train was empty and
    # tfds failed with 'Failed to finalize writing of split "train"' (an AssertionError).
    (tmp_path / "same.txt").write_text("the same text\n\n" * 5)
    b = _prepare(tmp_path, "text", paths=[str(tmp_path / "same.txt")],
                 document_per="paragraph", validation_fraction=0.01)
    assert len(_read_all(b, "train")) == 5 and "validation" not in b.info.splits
    # One document whose hash falls in the holdout went to validation alone: the same failure.
    h = builders.record_hash({"text": "alone"})
    (tmp_path / "one.txt").write_text("alone\n")
    b = _prepare(tmp_path, "text", paths=[str(tmp_path / "one.txt")],
                 validation_fraction=min(h + 0.01, 0.99))
    assert len(_read_all(b, "train")) == 1 and "validation" not in b.info.splits
    assert builders.holdout_overrides([0.3, 0.3], 0.1) == (None, None)
    assert builders.holdout_overrides([0.05], 0.1) == (None, 0.05)


def test_prepared_data_inside_an_input_directory_is_not_input(tmp_path):
    # data_dir under the corpus directory: the second run read the first run's array_record
    # files as text, and, its inputs having changed, prepared another copy.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("one\n\ntwo\n")
    data_dir = corpus / "cache"
    dirs = []
    for _ in range(2):
        config = builders.local_files_config("text", train_paths=[str(corpus)],
                                             document_per="paragraph", data_dir=data_dir)
        b = builders.prepare_local_files(config, data_dir)
        assert [r["text"] for r in _read_all(b, "train")] == ["one", "two"]
        dirs.append(b.data_dir)
    assert dirs[0] == dirs[1]
    with pytest.raises(FileNotFoundError, match="only prepared datasets under data_dir"):
        builders.local_files_config("text", train_paths=[str(data_dir)], data_dir=data_dir)


def test_jsonl_kind_comes_from_the_first_file_with_a_record(tmp_path):
    # An empty first shard failed the run with "no JSON records".
    (tmp_path / "a.jsonl").write_text("\n")
    (tmp_path / "b.jsonl").write_text('{"inputs": "q", "targets": "a"}\n')
    b = _prepare(tmp_path, "jsonl", train_paths=[str(tmp_path / "*.jsonl")])
    assert _read_all(b, "train") == [{"inputs": "q", "targets": "a"}]
    with pytest.raises(local_files.DataFormatError, match=r"a.jsonl: no JSON records$"):
        builders.local_files_config("jsonl", train_paths=[str(tmp_path / "a.jsonl")])
    # a file none of whose lines is JSON names the first of them
    (tmp_path / "c.jsonl").write_bytes(b'\n{\n  "text": "caf\xe9"\n}\n')
    with pytest.raises(local_files.DataFormatError, match=r"c.jsonl: no JSON records \(the first "
                       r"line that is not one: .*c.jsonl:2: Expecting property name enclosed in "
                       r"double quotes at column 2\)$"):
        builders.local_files_config("jsonl", train_paths=[str(tmp_path / "c.jsonl")])


def test_holdout_tally_counts_what_a_list_of_the_hashes_would():
    # The holdout kept a list of every record's hash (~32 bytes a record); the tally counts.
    rng = random.Random(0)
    for _ in range(300):
        hashes = [rng.choice([0.01, 0.02, 0.5, 0.7]) if rng.random() < 0.5 else rng.random()
                  for _ in range(rng.randrange(1, 6))]
        fraction = rng.choice([0.0, 0.015, 0.1, 0.6, 0.99, 1.0])
        tally = builders.HoldoutTally(fraction)
        for h in hashes:
            tally.add(h)
        overrides = tally.overrides()
        assert overrides == builders.holdout_overrides(hashes, fraction)
        assert tally.num_validation() == sum(builders.in_validation(h, fraction, overrides)
                                             for h in hashes), (hashes, fraction)
        assert tally.num_validation() < len(hashes)  # train never empty


# --- Streamed reading: the same records as decoding a whole file and splitting it. ---

_ASCII_SPACE = b" \t\n\r\x0b\x0c"
_TEXT_PIECES = [b"word", b"two words", b" ", b"\t", b"\xc3\xa9", b"\xe2\x98\x83",
                b"\xf0\x9f\x98\x80", b"\xc2\xa0", b"\x0c", b"\xff", b"\xc3", b"\xed\xa0\x80",
                b"\r", b"\x00"]


def _reference_read(content: bytes, fmt: str, document_per: str, strict: bool):
    """The documented rules applied to a whole file's text (decompressed, decoded, a byte
    order mark dropped): ([(line, record)], (documents, non-UTF-8, blank)) or the error.

    Lines end in LF (a CR LF's CR staying with its line), or in CR in a file without LF. A
    paragraph break is a line end, a line of spaces / tabs (and a CR LF's CR) and its line
    end; breaks do not overlap, the first wins; a paragraph is numbered by the line of its
    first non-whitespace byte, and a unit of ASCII whitespace only is no paragraph.
    """
    nul = content.find(b"\x00", 0, 8000)
    if nul >= 0:
        return f"not UTF-8 text (NUL byte at offset {nul}"
    lines = content.split(b"\r" if b"\n" not in content and b"\r" in content else b"\n")
    if fmt == "text" and document_per == "file":
        units = [(1, b"\n".join(lines))]
    elif fmt == "text" and document_per == "line":
        units = list(enumerate(lines, 1))[:len(lines) - (len(lines) > 1 and not lines[-1])]
    elif fmt == "text":
        bounds, start = [], 0
        for i in range(1, len(lines) - 1):
            if i > start and re.fullmatch(rb"[ \t]*\r?", lines[i]):
                bounds.append((start, i))
                start = i + 1
        bounds.append((start, len(lines)))
        units = []
        for a, b in bounds:
            unit = b"\n".join(lines[a:b])
            unit = unit.removesuffix(b"\r") if b < len(lines) else unit
            first = next((j for j in range(a, b) if lines[j].strip(_ASCII_SPACE)), None)
            if first is not None:
                units.append((first + 1, unit))
    else:
        units = [(i, line) for i, line in enumerate(lines, 1) if line.strip(_ASCII_SPACE)]
    records, documents, non_utf8, blank = [], 0, 0, 0
    for line, unit in units:
        try:
            text = unit.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                return f":{line}: not valid UTF-8 (byte {e.start})"
            non_utf8 += 1
            continue
        if fmt == "tsv":
            fields = text.rstrip("\r").split("\t")
            if len(fields) != 2:
                return f":{line}: expected 'inputs<TAB>targets', found {len(fields)} fields"
            record = {"inputs": fields[0], "targets": fields[1]}
        elif fmt == "jsonl":
            try:
                record = {"text": json.loads(text)["text"]}
            except json.JSONDecodeError:
                return f":{line}: invalid JSON"
        else:
            record = {"text": text.strip()}
        if not any(v.replace("\x00", "").strip() for v in record.values()):
            blank += 1
            continue
        documents += 1
        records.append((line, record))
    return records, (documents, non_utf8, blank)


def _random_content(rng: random.Random, fmt: str) -> bytes:
    cr_only = rng.random() < 0.25
    ends = [b"\r"] if cr_only else [b"\n", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n", b"\n \t\n"]
    lines = []
    for _ in range(rng.choice([0, 1, 2, 5, 20, 80])):
        if fmt == "jsonl":
            pieces = [rng.choice([b"a", b"\xc3\xa9", b" ", b"\xff", b"\\u0000"])
                      for _ in range(rng.randrange(3))]
            line = rng.choice([b'{"text": "%s"}' % b"".join(pieces), b"", b" \t", b"\r"])
        elif fmt == "tsv":
            line = rng.choice([b"q\ta", b"q \t\xc3\xa9", b"\t", b" \t ", b"", b"\xff\ta",
                               b"q\ta\r", b"\x0c"])
        else:
            line = b"".join(rng.choice(_TEXT_PIECES[:-1] if rng.random() < 0.97
                                       else _TEXT_PIECES)
                            for _ in range(rng.choice([0, 0, 1, 2, 4])))
        lines += [line, rng.choice(ends)]
    long_line = {"text": b"x" * 9000, "jsonl": b'{"text": "%s"}' % (b"x" * 9000),
                 "tsv": b"x" * 9000 + b"\ty"}[fmt]
    if rng.random() < 0.15:  # no line end in the first 8000 bytes: whole-file CR rule
        lines.insert(0, long_line + (b"\r" if cr_only else b""))
    if rng.random() < 0.1:  # a NUL past the first 8000 bytes is no binary file
        lines[:0] = [long_line, b"\n"]
        lines.append(b"\x00")
    if fmt == "tsv" and rng.random() < 0.05:
        lines.append(b"\nno tab\n")
    return b"".join(lines)


def _containers(rng: random.Random, content: bytes):
    """(name, the file's bytes, the text reading them should give)."""
    yield "plain", content, content
    yield "utf-8 bom", codecs.BOM_UTF8 + content, content
    for name, compress in (("gzip", gzip.compress), ("bzip2", bz2.compress),
                           ("xz", lzma.compress)):
        bom = codecs.BOM_UTF8 if rng.random() < 0.3 else b""
        yield name, compress(bom + content), content
    text = content.decode("utf-8", errors="replace")  # no invalid UTF-8 in a UTF-16 file
    for encoding, bom in (("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE)):
        yield encoding, bom + text.encode(encoding), text.encode("utf-8")
    yield "gzip utf-16", gzip.compress(codecs.BOM_UTF16_LE + text.encode("utf-16-le")), \
        text.encode("utf-8")


def _read_or_error(path, fmt, **kwargs):
    counts = local_files.ReadCounts()
    try:
        records = list(local_files.read_file(path, fmt, counts=counts, **kwargs))
    except local_files.DataFormatError as e:
        return str(e)
    return records, (counts.documents, counts.skipped_non_utf8, counts.skipped_blank)


@pytest.mark.parametrize("fmt", ["text", "jsonl", "tsv"])
def test_streamed_reading_matches_decoding_the_whole_file(tmp_path, monkeypatch, fmt):
    # Files were read whole (and split in memory), a 30 GB corpus ran out of memory; they are
    # streamed now, in chunks of any size (small ones put lines, CR LFs, UTF-8 and UTF-16
    # characters across chunk ends).
    rng = random.Random(fmt)
    path = tmp_path / "f"
    modes = ["line", "paragraph", "file"] if fmt == "text" else ["line"]
    for case in range(80 if fmt == "text" else 50):
        content = _random_content(rng, fmt)
        for name, data, text in _containers(rng, content):
            path.write_bytes(data)
            chunk_bytes = max(rng.choice([1, 5, 64, 1 << 16]), len(data) // 200)  # time
            monkeypatch.setattr(local_files, "_CHUNK_BYTES", chunk_bytes)
            for per in modes:
                strict = rng.random() < 0.3
                got = _read_or_error(path, fmt, kind="text" if fmt == "jsonl" else "pairs",
                                     document_per=per, strict_utf8=strict)
                want = _reference_read(text, fmt, per, strict)
                if isinstance(want, str):
                    assert isinstance(got, str) and got.startswith(f"{path}"), (case, name, per)
                    assert want in got, (case, name, per, got)
                else:
                    assert got == want, (case, name, per, local_files._CHUNK_BYTES)


def test_streamed_errors_are_those_of_the_whole_file(tmp_path, monkeypatch):
    good = "a é ☃ 😀\n".encode("utf-16-le") * 50
    cases = [good + b"x", good[:100] + b"\x00\xdc" + good[100:],  # odd length, lone surrogate
             good[:102] + b"\x3d\xd8a\x00" + good[102:]]  # high surrogate, no low one
    for chunk_bytes in (1, 3, 64):
        monkeypatch.setattr(local_files, "_CHUNK_BYTES", chunk_bytes)
        for data in cases:
            (tmp_path / "w.txt").write_bytes(codecs.BOM_UTF16_LE + data)
            with pytest.raises(UnicodeDecodeError) as whole:
                (codecs.BOM_UTF16_LE + data).decode("utf-16")
            for per in ("line", "paragraph", "file"):
                with pytest.raises(local_files.DataFormatError,
                                   match=re.escape(f"not valid UTF-16 (byte {whole.value.start}: "
                                                   f"{whole.value.reason})")):
                    list(local_files.read_file(tmp_path / "w.txt", "text", document_per=per))
        (tmp_path / "cut.txt.xz").write_bytes(lzma.compress(b"line\n" * 2000)[:-30])
        with pytest.raises(local_files.DataFormatError, match="cut.txt.xz: corrupt xz data"):
            list(local_files.read_file(tmp_path / "cut.txt.xz", "text", document_per="line"))


def test_a_file_with_lf_only_past_the_first_8000_bytes_keeps_its_crs(tmp_path):
    # Whether CR alone ends lines is the whole file's question (no LF anywhere), not that of
    # the first bytes read.
    (tmp_path / "a.txt").write_bytes(b"x" * 9000 + b"\ra\rb\nc\n")
    (tmp_path / "b.txt").write_bytes(b"x" * 9000 + b"\ra\rb\rc\r")
    for name, lines in (("a.txt", ["x" * 9000 + "\ra\rb", "c"]),
                        ("b.txt", ["x" * 9000, "a", "b", "c"])):
        records = list(local_files.read_file(tmp_path / name, "text", document_per="line"))
        assert [r["text"] for _, r in records] == lines, name


def test_reading_a_large_file_holds_a_few_megabytes(tmp_path):
    # read_file read the whole file and split it in memory: for this 40 MB file a peak of
    # 117 MB (lines) and 40 MB / 85 MB (paragraphs, plain / gzip).
    block = b"".join(b"word%d " % i * 400 + b"\n" + b"\n" * (i % 5 == 4) for i in range(250))
    data = block * (40_000_000 // len(block) + 1)
    (tmp_path / "big.txt").write_bytes(data)
    (tmp_path / "big.txt.gz").write_bytes(gzip.compress(data, compresslevel=1))
    num_lines = data.count(b"\n") - data.count(b"\n\n")
    del data
    for name in ("big.txt", "big.txt.gz"):
        for per, expected in (("line", num_lines), ("paragraph", num_lines // 5)):
            counts = local_files.ReadCounts()
            tracemalloc.start()
            try:
                for _ in local_files.read_file(tmp_path / name, "text", document_per=per,
                                               counts=counts):
                    pass
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert counts.documents == expected, (name, per)
            assert peak < 8 * 2**20, (name, per, peak)
