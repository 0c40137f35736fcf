"""Tests for t5x_lite.vocab: ids, sentinels, round trips, copy/pickle, training and errors."""
import gzip
import pickle
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from t5x_lite import vocab as vocab_lib
from t5x_lite.data import testing
from t5x_lite.vocab import Vocabulary, VocabularyError


@pytest.fixture(scope="module")
def vocab():
    return testing.tiny_vocab(400)


def test_special_ids_and_sizes(vocab):
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.sp_size == 400
    assert vocab.vocab_size == 500
    assert vocab.padded_vocab_size == 512
    assert vocab.padded_vocab_size % 128 == 0
    # The sentencepiece model itself agrees with the T5 convention.
    sp = spm.SentencePieceProcessor(model_proto=vocab.model_proto)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)


@pytest.mark.parametrize("sp_size_extra,padded", [((400, 100), 512), ((400, 112), 512),
                                                  ((400, 113), 640), ((400, 0), 512)])
def test_padded_vocab_size_rounds_up(vocab, sp_size_extra, padded):
    v = Vocabulary.from_proto(vocab.model_proto, extra_ids=sp_size_extra[1])
    assert v.vocab_size == sum(sp_size_extra)
    assert v.padded_vocab_size == padded


def test_sentinels_count_down_from_the_top(vocab):
    assert vocab.sentinel_id(0) == vocab.vocab_size - 1 == 499
    assert vocab.sentinel_id(1) == 498
    assert vocab.sentinel_id(99) == vocab.sp_size == 400
    assert vocab.is_sentinel(400) and vocab.is_sentinel(499)
    assert not vocab.is_sentinel(399) and not vocab.is_sentinel(500)
    with pytest.raises(VocabularyError, match="extra_ids"):
        vocab.sentinel_id(100)
    assert vocab.decode([499, 498, 400]) == "<extra_id_0> <extra_id_1> <extra_id_99>"


def test_encode_decode_round_trip(vocab):
    for text in testing.documents(20, seed=3):
        ids = vocab.encode(text)
        assert all(3 <= i < vocab.sp_size for i in ids)
        assert vocab.decode(ids) == text
    # Unknown characters survive through byte fallback.
    assert vocab.decode(vocab.encode("naïve café Ω")) == "naïve café Ω"


def test_decode_stops_at_eos_and_drops_pad(vocab):
    ids = vocab.encode("the first time")
    tail = vocab.encode("never shown")
    assert vocab.decode([0] + ids + [0, 1] + tail) == "the first time"
    assert vocab.decode(np.array(ids + [1, 0, 0], np.int32)) == "the first time"
    assert vocab.decode([]) == ""
    with pytest.raises(VocabularyError, match="^decode: id -100 is negative$"):
        vocab.decode(ids + [-100])  # HF's label padding; sentencepiece said OUT_OF_RANGE
    assert vocab.decode(np.array([ids])) == "the first time"  # one row, as [1, L]
    with pytest.raises(VocabularyError, match=r"^decode: ids of shape \(2, 2\) are more than one "
                       "row; decode_batch decodes rows$"):
        vocab.decode(np.array([ids[:2], ids[2:4]]))  # it read them as one row


def test_sentinel_strings_encode_and_render(vocab):
    text = "The <extra_id_0> walk in <extra_id_1> park"
    ids = vocab.encode(text)
    assert vocab.sentinel_id(0) in ids and vocab.sentinel_id(1) in ids
    assert vocab.decode(ids) == text
    with pytest.raises(VocabularyError):
        vocab.encode("<extra_id_100>")



def test_sentinel_strings_beyond_extra_ids_stay_text_when_not_strict(vocab):
    text = "T5 writes <extra_id_150> and <extra_id_3> here"
    ids = vocab.encode(text, strict=False)
    assert vocab.sentinel_id(3) in ids and max(ids) < vocab.vocab_size
    assert sum(vocab.is_sentinel(i) for i in ids) == 1  # <extra_id_150> is ordinary pieces
    assert vocab.decode(ids) == text
    assert vocab.encode("plain <extra_id_0>", strict=False) == vocab.encode("plain <extra_id_0>")


@pytest.mark.parametrize("text", ["a <extra_id_01> b", "a <extra_id_\u0663> b"])
def test_only_canonical_sentinel_strings_are_sentinels(vocab, text):
    """A leading zero or another script's digits is text (seqio knows only `<extra_id_N>`):
    it used to become sentinel 1 / 3 and decode as another string."""
    ids = vocab.encode(text)
    assert not any(vocab.is_sentinel(i) for i in ids)
    assert vocab.decode(ids) == text

def test_text_that_is_not_unicode_is_one_vocabulary_error(vocab):
    """A lone surrogate (JSON can hold one) was sentencepiece's bare RuntimeError."""
    for call, where in ((lambda: vocab.encode("caf\udce9 <extra_id_0>"), "the text"),
                        (lambda: vocab.encode_batch(["ok", "caf\ud800"]), "text 1 of 2")):
        with pytest.raises(VocabularyError, match=rf"^Cannot tokenize {where}: it holds a lone "
                                                  r"surrogate \(U\+D[C8]\w\w at character 3\)"):
            call()


def test_batched_equals_single(vocab):
    texts = testing.sentences(10, seed=5) + ["with <extra_id_3> sentinel"]
    assert vocab.encode_batch(texts) == [vocab.encode(t) for t in texts]
    assert vocab.encode_batch(texts[:5]) == [vocab.encode(t) for t in texts[:5]]
    ids = [vocab.encode(t) + [1] for t in texts]
    assert vocab.decode_batch(ids) == texts


def test_copy_to_and_pickle(vocab, tmp_path):
    path = vocab.copy_to(tmp_path / "workdir")
    assert path == tmp_path / "workdir" / "vocab.model"
    again = Vocabulary(path, extra_ids=100)
    text = "made after the state"
    assert again.encode(text) == vocab.encode(text)
    restored = pickle.loads(pickle.dumps(vocab))
    assert restored.encode(text) == vocab.encode(text)
    assert restored.vocab_size == vocab.vocab_size


def test_load_errors(tmp_path):
    with pytest.raises(VocabularyError, match="not found"):
        Vocabulary(tmp_path / "missing.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(VocabularyError, match="empty"):
        Vocabulary(tmp_path / "empty.model")
    (tmp_path / "junk.model").write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(VocabularyError, match="not a sentencepiece model"):
        Vocabulary(tmp_path / "junk.model")


def test_a_damaged_model_is_one_error_line_when_loaded(vocab, tmp_path):
    """One byte changed: a byte piece's "<" (sentencepiece refuses the model in a message
    holding that byte), or a piece's letter to a byte that is not UTF-8 (sentencepiece loads
    it, and decoding tripped on it later)."""
    data = vocab.path.read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=data)
    at = data.index(b"<0x80>")
    piece = next(p for p in map(sp.id_to_piece, range(sp.get_piece_size()))
                 if p[1:].isascii() and p[1:].isalpha() and data.count(p.encode()) == 1)
    at_piece = data.index(piece.encode()) + len(piece.encode()) - 1  # its last letter
    for name, damaged, message in (
            ("byte_piece", data[:at] + b"\x94" + data[at + 1:], "not a sentencepiece model"),
            ("piece", data[:at_piece] + b"\xff" + data[at_piece + 1:],
             rf"a damaged sentencepiece model: .* \(piece {sp.piece_to_id(piece)} is not UTF-8\)")):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(VocabularyError, match=message):
            Vocabulary(tmp_path / name)
        with pytest.raises(VocabularyError, match=message):
            vocab_lib.LlamaVocabulary(tmp_path / name)
        assert vocab_lib.sentencepiece_ids(damaged) in (None, (0, 1, 2))


def test_rejects_model_with_other_special_ids(tmp_path):
    spm.SentencePieceTrainer.train(  # sentencepiece defaults: unk 0, bos 1, eos 2
        sentence_iterator=iter(testing.sentences(500)), model_prefix=str(tmp_path / "other"),
        vocab_size=100, minloglevel=2)
    with pytest.raises(VocabularyError, match="pad/eos/unk"):
        Vocabulary(tmp_path / "other.model")


def test_train_errors_are_one_line(tmp_path):
    with pytest.raises(VocabularyError, match="empty input"):
        vocab_lib.train_vocab(["", "  \n"], tmp_path / "x", 300)
    with pytest.raises(VocabularyError, match=r"too large for this corpus.*at most \d+") as e:
        vocab_lib.train_vocab(testing.sentences(50), tmp_path / "x", 5000)
    assert "\n" not in str(e.value)
    with pytest.raises(VocabularyError, match="too small"):
        vocab_lib.train_vocab(testing.sentences(50), tmp_path / "x", 50)
    with pytest.raises(FileNotFoundError, match="no files match"):
        vocab_lib.train_vocab(str(tmp_path / "nothing*.txt"), tmp_path / "x", 300)
    # sentencepiece's ValueError (a traceback) / its INTERNAL check line
    with pytest.raises(VocabularyError, match=r"^input_sentence_size must be >= 0 \(0: every "
                                              r"line\), got -1$"):
        vocab_lib.train_vocab(testing.sentences(50), tmp_path / "x", 300, input_sentence_size=-1)
    with pytest.raises(VocabularyError, match="^vocab_size must be > 0, got 0$"):
        vocab_lib.train_vocab(testing.sentences(50), tmp_path / "x", 0)
    assert not (tmp_path / "x.model").exists()


def test_lines_that_are_not_utf8_are_left_out_of_training(tmp_path, caplog):
    """They were decoded with replacement characters and trained on, silently (the input
    pipeline skips such records)."""
    (tmp_path / "mixed.txt").write_bytes(b"good line one\ncaf\xe9 latin-1\ngood line two\n")
    assert list(vocab_lib._iter_lines(str(tmp_path / "mixed.txt"))) == ["good line one",
                                                                        "good line two"]
    assert "mixed.txt: 1 line(s) are not UTF-8 text" in caplog.text
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n\xe9l\xe8ve\n")
    with pytest.raises(VocabularyError, match=r"empty input; 2 line\(s\) left out: not UTF-8"):
        vocab_lib.train_vocab(str(tmp_path / "latin1.txt"), tmp_path / "x", 300)



def test_training_does_not_depend_on_the_cpu_count(tmp_path, monkeypatch):
    # sentencepiece's model depends on its thread count, which was os.cpu_count(): hosts
    # with different CPU counts trained different default vocabularies from the same corpus.
    texts = testing.sentences(1500, seed=3)
    models = []
    for cpus in (1, 4):
        monkeypatch.setattr(vocab_lib.os, "cpu_count", lambda cpus=cpus: cpus)
        models.append(vocab_lib.train_vocab(texts, tmp_path / f"c{cpus}", 400).read_bytes())
    assert models[0] == models[1]

def test_train_from_files_and_cli(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text("\n".join(testing.sentences(400, seed=i)))
    path = vocab_lib.train_vocab(str(tmp_path / "part*.txt"), tmp_path / "lib", 350)
    assert Vocabulary(path).sp_size == 350
    result = subprocess.run(
        [sys.executable, "-m", "t5x_lite.vocab", f"--input={tmp_path}/part*.txt",
         f"--model_prefix={tmp_path}/cli", "--vocab_size=320"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Vocabulary(tmp_path / "cli.model").sp_size == 320
    bad = subprocess.run(
        [sys.executable, "-m", "t5x_lite.vocab", f"--input={tmp_path}/none*.txt",
         f"--model_prefix={tmp_path}/cli2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no files match" in bad.stderr


def test_model_prefix_naming_a_directory_is_refused_before_training(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "afile").write_text("keep")
    for prefix, message in [(f"{tmp_path}/out/", "names a directory, not a file prefix"),
                            (f"{tmp_path}/afile/spm", "afile is a file, not a directory"),
                            ("", "--model_prefix is empty")]:
        with pytest.raises(VocabularyError, match=message):
            vocab_lib.train_vocab(testing.sentences(50), prefix, 300)
    assert list((tmp_path / "out").iterdir()) == [] and (tmp_path / "afile").read_text() == "keep"


def test_cli_refuses_a_directory_prefix_and_extra_arguments(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(testing.sentences(400)))
    (tmp_path / "out").mkdir()
    for args, message in [
        ([f"--model_prefix={tmp_path}/out/"], "names a directory, not a file prefix"),
        ([f"--model_prefix={tmp_path}/out/spm", "stray"], "unexpected arguments ['stray']"),
    ]:
        r = subprocess.run([sys.executable, "-m", "t5x_lite.vocab",
                            f"--input={tmp_path}/corpus.txt", "--vocab_size=320", *args],
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
        assert lines[0].startswith("vocab: error: ") and message in lines[0], lines[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_training_lines_drop_a_byte_order_mark(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello world\nsecond line\n")
    assert list(vocab_lib._iter_lines(str(tmp_path / "bom.txt"))) == ["hello world",
                                                                       "second line"]


def test_training_lines_of_compressed_and_utf16_files_and_binary_refused(tmp_path):
    text = "hello world\r\nsecond line é\n"
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "b.txt").write_bytes(text.encode("utf-16"))  # with a byte order mark
    for name in ("a.txt.gz", "b.txt"):
        assert list(vocab_lib._iter_lines(str(tmp_path / name))) == [
            "hello world", "second line é"], name
    (tmp_path / "c.bin").write_bytes(b"\x00\x01\x02binary\n")
    with pytest.raises(ValueError, match=r"c.bin: not UTF-8 text \(NUL byte") as e:
        vocab_lib.train_vocab(str(tmp_path / "c.bin"), tmp_path / "x", 300)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.model").exists()


def test_a_glob_matching_a_directory_means_the_files_under_it(tmp_path):
    # "/data/*" dropped the subdirectories it matched, with every file in them.
    (tmp_path / "sub" / ".git").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "sub" / ".hidden.txt").write_text("hidden")
    (tmp_path / "sub" / ".git" / "HEAD").write_text("ref")
    (tmp_path / "empty").mkdir()
    assert vocab_lib.expand_globs(str(tmp_path / "*")) == [tmp_path / "a.txt",
                                                           tmp_path / "sub" / "b.txt"]
    assert vocab_lib.expand_globs(str(tmp_path)) == [tmp_path / "a.txt",
                                                     tmp_path / "sub" / "b.txt"]
    with pytest.raises(FileNotFoundError, match="no files match"):
        vocab_lib.expand_globs(str(tmp_path / "emp*"))


def test_an_existing_path_with_glob_characters_is_that_file(tmp_path):
    # "notes [v2].txt" was taken as a glob ("[v2]" = one of v, 2) that matches nothing.
    (tmp_path / "notes [v2].txt").write_text("x")
    assert vocab_lib.expand_globs([str(tmp_path / "notes [v2].txt")]) == [
        tmp_path / "notes [v2].txt"]
    (tmp_path / "v.txt").write_text("y")
    assert vocab_lib.expand_globs([str(tmp_path / "[v].txt")]) == [tmp_path / "v.txt"]
