"""SentencePiece vocabulary with T5 sentinels, and a CLI to train one; `LlamaVocabulary` reads
a converted Llama / Mistral's `tokenizer.model` (its own special ids) for decoding and scoring.

Id conventions (T5 / seqio): pad 0, eos 1, unk 2, no bos; decoder start id = pad = 0. The
sentencepiece model holds `sp_size` pieces; `extra_ids` sentinel ids are appended on top of it,
counting *down* from the top: `<extra_id_0>` is `vocab_size - 1`, `<extra_id_i>` is
`vocab_size - 1 - i`. Embedding tables use `padded_vocab_size` rows (a multiple of 128) so the
`vocab` dimension shards evenly; ids in [vocab_size, padded_vocab_size) are never produced.

Train a vocabulary (T5 conventions: unigram, byte fallback, character coverage 1.0):

    python -m t5x_lite.vocab --input='/data/*.txt' --model_prefix=/tmp/spm --vocab_size=32000
"""
from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Union

import numpy as np
import sentencepiece as spm
from absl import logging
from etils import epath

from t5x_lite import cli, errors, files

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
DEFAULT_EXTRA_IDS = 100
PAD_MULTIPLE = 128
# ASCII digits without leading zeros: only the canonical `<extra_id_N>` (seqio's pieces) is a
# sentinel; `<extra_id_01>` or other scripts' digits stay text and round-trip unchanged.
_SENTINEL_RE = re.compile(r"<extra_id_(0|[1-9][0-9]*)>")
_SP_MAX_SENTENCE_BYTES = 1 << 16
# sentencepiece's model depends on its thread count; a fixed one (not the CPU count) makes
# every machine (e.g. each host of a multi-host run) train the same model from the same input.
TRAIN_THREADS = 16

PathLike = Union[str, os.PathLike]


class VocabularyError(errors.UserError):
    """A one-line, user-facing problem with a vocabulary file or its training."""


def _refuse_non_unicode(texts: list) -> None:
    """A text sentencepiece could not take because it is not Unicode (a lone surrogate) is one
    VocabularyError line, not the binding's "Unable to cast Python instance" RuntimeError."""
    for i, text in enumerate(texts):
        problem = files.not_unicode(text) if isinstance(text, str) else ""
        if problem:
            where = "the text" if len(texts) == 1 else f"text {i} of {len(texts)}"
            raise VocabularyError(f"Cannot tokenize {where}: it holds {problem}") from None


class _SentencePieceModel:
    """Serialized sentencepiece model bytes, from a file (`path`) or memory, parsed once.

    Picklable (the model bytes travel with it), so it can be used inside grain worker
    processes. A subclass checks the model and takes its one setting in `_init_from_proto`.
    """

    def __init__(self, model_path: PathLike, setting):
        path = epath.Path(model_path)
        if not path.exists():
            raise VocabularyError(f"vocabulary file not found: {path}")
        if path.is_dir():
            raise VocabularyError(f"vocabulary path is a directory, not a .model file: {path}")
        self._init_from_proto(path.read_bytes(), setting, source=str(path))
        self.path = path

    @classmethod
    def _from_proto(cls, model_proto: bytes, setting):
        vocab = cls.__new__(cls)
        vocab._init_from_proto(model_proto, setting, source="<bytes>")
        vocab.path = None
        return vocab

    def _init_from_proto(self, proto: bytes, setting, source: str):
        raise NotImplementedError

    def _parse(self, proto: bytes, setting, source: str) -> spm.SentencePieceProcessor:
        """The parsed model (one VocabularyError line for empty or foreign bytes, and for a
        damaged model whose pieces are not all UTF-8, which decoding would trip on later);
        keeps the bytes and the setting for pickling."""
        if not proto:
            raise VocabularyError(f"vocabulary file is empty: {source}")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, UnicodeDecodeError):  # sentencepiece's message may hold the bytes
            raise VocabularyError(f"not a sentencepiece model: {source}") from None
        try:
            self._sp.id_to_piece(list(range(self._sp.get_piece_size())))
        except UnicodeDecodeError:
            bad = next(i for i in range(self._sp.get_piece_size()) if not _utf8_piece(self._sp, i))
            raise VocabularyError(f"a damaged sentencepiece model: {source} (piece {bad} is not "
                                  "UTF-8)") from None
        self._proto, self._setting = proto, setting
        self._token_bytes = None  # `token_bytes`, made when first asked for
        return self._sp

    def __getstate__(self):
        return {"proto": self._proto, "setting": self._setting,
                "path": None if self.path is None else str(self.path)}

    def __setstate__(self, state):
        self._init_from_proto(state["proto"], state["setting"], "<pickle>")
        self.path = None if state["path"] is None else epath.Path(state["path"])

    @property
    def sp_size(self) -> int:
        """Number of sentencepiece pieces; ids below this are ordinary tokens."""
        return self._sp.get_piece_size()

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def decode_batch(self, ids_batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in ids_batch]

    def token_bytes(self) -> tuple[bytes, ...]:
        """Each id's text as bytes, as HF's stop-string matching reads it (what stop strings
        match): a piece's "▁" as a space, a byte piece (<0x0A>) as its byte, control
        pieces and unk spelled as written ("</s>", "<unk>"). Cached."""
        if self._token_bytes is None:
            sp = self._sp
            self._token_bytes = tuple(
                bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i)
                else sp.id_to_piece(i).replace("▁", " ").encode("utf-8")
                for i in range(self.sp_size))
        return self._token_bytes


class Vocabulary(_SentencePieceModel):
    """A sentencepiece model plus `extra_ids` T5 sentinel ids on top of it (picklable)."""

    t5_convention = True  # what the data pipeline tokenizes with
    # A decoder-only model's text prompts begin with the decoder start id 0: t5x_lite's LM
    # objectives feed `[0] + targets[:-1]`.
    prompt_start_id = PAD_ID

    def __init__(self, model_path: PathLike, extra_ids: int = DEFAULT_EXTRA_IDS):
        super().__init__(model_path, extra_ids)

    @classmethod
    def from_proto(cls, model_proto: bytes, extra_ids: int = DEFAULT_EXTRA_IDS) -> "Vocabulary":
        """Builds a vocabulary from serialized sentencepiece model bytes."""
        return cls._from_proto(model_proto, extra_ids)

    def _init_from_proto(self, proto: bytes, extra_ids: int, source: str):
        if extra_ids < 0:
            raise VocabularyError(f"extra_ids must be >= 0, got {extra_ids}")
        sp = self._parse(proto, extra_ids, source)
        ids = (sp.pad_id(), sp.eos_id(), sp.unk_id())
        if ids != (PAD_ID, EOS_ID, UNK_ID):
            if sp.eos_id() >= 0:  # e.g. a converted Llama's tokenizer.model
                raise VocabularyError(
                    f"{source}: expected T5 ids pad/eos/unk = 0/1/2, got {ids}: a tokenizer with "
                    "its own special ids (as Llama's), which `t5x_lite.load` decodes and scores "
                    "with but the training and evaluation data pipelines do not take")
            raise VocabularyError(
                f"{source}: expected T5 ids pad/eos/unk = 0/1/2, got {ids}; "
                "train one with `python -m t5x_lite.vocab`")
        self._extra_ids = int(extra_ids)

    def __repr__(self):
        return f"Vocabulary(path={self.path}, sp_size={self.sp_size}, extra_ids={self.extra_ids})"

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def extra_ids(self) -> int:
        return self._extra_ids

    @property
    def vocab_size(self) -> int:
        return self.sp_size + self._extra_ids

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE

    def same_pieces(self, other: "Vocabulary") -> bool:
        """Whether the two sentencepiece models give every id the same piece."""
        return self.sp_size == other.sp_size and all(
            self._sp.id_to_piece(i) == other._sp.id_to_piece(i) for i in range(self.sp_size))

    def sentinel_id(self, i: int) -> int:
        """Id of `<extra_id_{i}>`; raises VocabularyError if there are too few sentinels."""
        if not 0 <= i < self._extra_ids:
            raise VocabularyError(
                f"<extra_id_{i}> needs at least {i + 1} extra_ids; this vocabulary has "
                f"{self._extra_ids}")
        return self.vocab_size - 1 - i

    def token_bytes(self) -> tuple[bytes, ...]:
        """The pieces' bytes (`_SentencePieceModel.token_bytes`), then `<extra_id_N>`'s."""
        return super().token_bytes() + tuple(
            self.piece(i).encode() for i in range(self.sp_size, self.vocab_size))

    def is_sentinel(self, token_id: int) -> bool:
        return self.sp_size <= token_id < self.vocab_size

    def piece(self, token_id: int) -> str:
        """The sentencepiece piece (or `<extra_id_N>`) of one id."""
        if self.is_sentinel(token_id):
            return f"<extra_id_{self.vocab_size - 1 - token_id}>"
        return self._sp.id_to_piece(int(token_id))

    def encode(self, text: str, *, strict: bool = True) -> list[int]:
        """Token ids of `text`, without EOS. Literal `<extra_id_N>` strings become sentinels.

        `<extra_id_N>` with N >= extra_ids raises VocabularyError, or with `strict=False` (the
        input pipeline: one document quoting it must not stop training) stays plain text,
        as in seqio, whose vocabulary only knows the `extra_ids` sentinel pieces.
        """
        try:
            return self._encode(text, strict)
        except (RuntimeError, TypeError):
            _refuse_non_unicode([text])
            raise

    def _encode(self, text: str, strict: bool) -> list[int]:
        if "<extra_id_" not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        pos = 0
        for m in _SENTINEL_RE.finditer(text):
            if not strict and int(m.group(1)) >= self._extra_ids:
                continue  # stays in the text encoded with the next piece
            ids += self._sp.encode(text[pos:m.start()])
            ids.append(self.sentinel_id(int(m.group(1))))
            pos = m.end()
        return ids + self._sp.encode(text[pos:])

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encodes many texts (plain ones through sentencepiece's multi-threaded C++ path)."""
        texts = list(texts)
        try:
            if any("<extra_id_" in t for t in texts):
                return [self._encode(t, True) for t in texts]
            return self._sp.encode(texts, num_threads=num_threads)
        except (RuntimeError, TypeError):
            _refuse_non_unicode(texts)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: stops at the first EOS, drops pad, renders sentinels as `<extra_id_N>`."""
        ids_L = ids_before_eos(ids, EOS_ID)
        ids_L = ids_L[(ids_L != PAD_ID) & (ids_L < self.vocab_size)]
        out: list[str] = []
        run: list[int] = []

        def flush():
            if run:
                text = self._sp.decode(run)
                # sentencepiece strips the leading "▁" of a run; keep the space after a sentinel.
                if out and self._sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                out.append(text)
                run.clear()

        for i in ids_L.tolist():
            if i >= self.sp_size:
                flush()
                out.append((" " if out else "") + self.piece(i))
            else:
                run.append(i)
        flush()
        return "".join(out)

    def copy_to(self, workdir: PathLike) -> epath.Path:
        """Writes `vocab.model` into `workdir` so a checkpoint directory is self-contained.

        Returns:
            The written path (load it back with `Vocabulary(path, extra_ids)`).
        """
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        dst = workdir / "vocab.model"
        dst.write_bytes(self._proto)
        return dst


class LlamaVocabulary(_SentencePieceModel):
    """A sentencepiece model with its own special ids, as Llama 2 and Mistral ship it in HF's
    `tokenizer.model` (unk 0, bos 1, eos 2, no pad): ids are its pieces, no sentinels on top.

    Text prompts of a decoder-only model begin with its BOS id when `add_bos` (HF's
    `add_bos_token`, LlamaTokenizer's default); `encode` itself adds nothing. `decode` ends at
    the EOS id and drops the control pieces (BOS, EOS, pad) and ids past the pieces (rows an
    embedding pads on). A text that spells a special piece (`<s>`) is encoded as plain text.
    t5x_lite loads, decodes and scores with it; its training pipelines take `Vocabulary`.
    """

    extra_ids = 0
    t5_convention = False

    def __init__(self, model_path: PathLike, add_bos: bool = True):
        super().__init__(model_path, add_bos)

    @classmethod
    def from_proto(cls, model_proto: bytes, add_bos: bool = True) -> "LlamaVocabulary":
        return cls._from_proto(model_proto, add_bos)

    def _init_from_proto(self, proto: bytes, add_bos: bool, source: str):
        sp = self._parse(proto, add_bos, source)
        if sp.eos_id() < 0 or (add_bos and sp.bos_id() < 0):
            raise VocabularyError(f"{source}: the sentencepiece model has no "
                                  f"{'EOS' if sp.eos_id() < 0 else 'BOS'} piece")
        self.add_bos = bool(add_bos)
        self._control = np.array([i for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()) if i >= 0])

    @property
    def prompt_start_id(self) -> int | None:
        """The id a decoder-only model's text prompts begin with: BOS when `add_bos`."""
        return self.bos_id if self.add_bos else None

    def __repr__(self):
        return (f"LlamaVocabulary(path={self.path}, sp_size={self.sp_size}, "
                f"add_bos={self.add_bos})")

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def vocab_size(self) -> int:
        return self.sp_size

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def encode(self, text: str, *, strict: bool = True) -> list[int]:
        """Token ids of `text`, without BOS or EOS (`strict` is Vocabulary's; unused here)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        texts = list(texts)
        try:
            return self._sp.encode(texts, num_threads=num_threads)
        except (RuntimeError, TypeError):
            _refuse_non_unicode(texts)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: ends at the first EOS; control pieces and ids past the pieces are
        dropped."""
        ids_L = ids_before_eos(ids, self.eos_id)
        ids_L = ids_L[(ids_L < self.sp_size) & ~np.isin(ids_L, self._control)]
        return self._sp.decode(ids_L.tolist())


def _utf8_piece(sp: spm.SentencePieceProcessor, i: int) -> bool:
    try:
        sp.id_to_piece(i)
    except UnicodeDecodeError:
        return False
    return True


def ids_before_eos(ids: Iterable[int], eos_id: int | None) -> np.ndarray:
    """`ids` as int64 [L], up to (not including) the first `eos_id` (None: all of them); a
    negative id (e.g. HF's -100 label padding) or more than one row of them (`decode_batch`
    decodes rows) is one VocabularyError line. What every vocabulary's `decode` starts with."""
    ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if ids.ndim > 1 and ids.size and ids.size != ids.shape[-1]:
        raise VocabularyError(f"decode: ids of shape {ids.shape} are more than one row; "
                              "decode_batch decodes rows")
    ids_L = ids.astype(np.int64).ravel()
    eos = np.flatnonzero(ids_L == eos_id) if eos_id is not None else np.zeros(0, np.int64)
    if eos.size:
        ids_L = ids_L[:eos[0]]
    if np.any(ids_L < 0):
        raise VocabularyError(f"decode: id {int(ids_L[ids_L < 0][0])} is negative")
    return ids_L


def byte_pieces(model_proto: bytes) -> int:
    """How many byte pieces (<0x00>..<0xFF>: byte fallback, which `train_vocab` trains with)
    serialized sentencepiece model bytes hold."""
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    return sum(map(sp.is_byte, range(sp.get_piece_size())))


def sentencepiece_ids(model_proto: bytes) -> tuple[int, int, int] | None:
    """(pad, eos, unk) ids of serialized sentencepiece model bytes (-1: none), or None for bytes
    that are no sentencepiece model (the vocabulary classes say so in one line)."""
    if not model_proto:
        return None
    try:
        sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except (RuntimeError, UnicodeDecodeError):
        return None
    return sp.pad_id(), sp.eos_id(), sp.unk_id()


def is_t5_convention(model_proto: bytes) -> bool:
    """Whether serialized sentencepiece model bytes have T5's ids (pad/eos/unk 0/1/2); False
    for bytes that are no sentencepiece model."""
    return sentencepiece_ids(model_proto) == (PAD_ID, EOS_ID, UNK_ID)


def expand_globs(patterns: PathLike | Sequence[PathLike]) -> list[epath.Path]:
    """Files matching glob patterns (comma-separated str or a list; gs:// works): each
    pattern's matches sorted, in pattern order, each file once.

    A path that exists is taken as it is, even with glob characters in its name. A directory,
    given or matched by a glob, means every file under it at any depth, except hidden ones
    (names starting with "."; `.DS_Store`, `.ipynb_checkpoints/`, `.git/`). Raises
    FileNotFoundError naming the first pattern that matches nothing.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = str(patterns).split(",")
    patterns = [str(p).strip() for p in patterns if str(p).strip()]
    if not patterns:
        raise FileNotFoundError("no input paths given")
    files: list[epath.Path] = []
    for pattern in patterns:
        # a path that exists is itself, glob characters in its name or not ("notes [v2].txt")
        if not any(c in pattern for c in "*?[") or epath.Path(pattern).exists():
            path = epath.Path(pattern)
            if not path.exists():
                raise FileNotFoundError(f"no such file or directory: {pattern}")
            if path.is_dir():
                under = sorted(_files_under(path))
                if not under:
                    raise FileNotFoundError(f"no files under directory {pattern}")
                files += under
            else:
                files.append(path)
            continue
        parts = pattern.split("/")
        first = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
        root = epath.Path("/".join(parts[:first]) or ("/" if pattern.startswith("/") else "."))
        matched = []
        for p in sorted(root.glob("/".join(parts[first:]))):
            # a matched directory was silently dropped, with every file under it
            matched += sorted(_files_under(p)) if p.is_dir() else [p] if p.is_file() else []
        if not matched:
            raise FileNotFoundError(f"no files match {pattern}")
        files += matched
    return _unique(files)


def file_key(f) -> str:
    """One spelling per file (for local paths the real path), to tell when two paths are one."""
    return str(files.real(f))


def _unique(files: list[epath.Path]) -> list[epath.Path]:
    """`files` without repeats (two patterns matching one file would read it twice), in order."""
    seen, out = set(), []
    for f in files:
        key = file_key(f)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _files_under(directory: epath.Path) -> Iterator[epath.Path]:
    """Every file under `directory`, at any depth, but hidden ones (epath refuses `rglob`:
    `**` on GCS)."""
    for p in directory.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_dir():
            yield from _files_under(p)
        elif p.is_file():
            yield p


def _file_text(path: epath.Path, skipped: list[int]) -> str:
    """A file's text; lines that are not UTF-8 are left out (counted in `skipped[0]`, and
    warned about per file), as the input pipeline skips such records: trained on, their
    replacement characters would only take vocabulary pieces."""
    # local: t5x_lite.data imports this module. Compressed and UTF-16 files are read as the
    # input pipeline reads them, and a binary file is refused, not trained on.
    from t5x_lite.data.local_files import read_utf8_bytes

    raw = read_utf8_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    kept, bad = [], 0
    for line in raw.splitlines():
        try:
            kept.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            bad += 1
    skipped[0] += bad
    logging.warning("%s: %d line(s) are not UTF-8 text; left out of the vocabulary's training "
                    "text", path, bad)
    return "\n".join(kept)


def _iter_lines(files_or_texts, skipped: list[int] | None = None) -> Iterator[str]:
    skipped = [0] if skipped is None else skipped
    if isinstance(files_or_texts, str):
        files_or_texts = expand_globs(files_or_texts)
    for item in files_or_texts:
        text = (_file_text(epath.Path(item), skipped) if isinstance(item, os.PathLike)
                else item)
        for line in text.splitlines():
            line = line.strip()
            if line:
                yield line[:_SP_MAX_SENTENCE_BYTES // 4]  # utf-8 is at most 4 bytes a char


def train_vocab(files_or_texts, model_prefix: PathLike, vocab_size: int, *,
                model_type: str = "unigram", input_sentence_size: int = 2_000_000,
                num_threads: int | None = None) -> epath.Path:
    """Trains a T5-convention sentencepiece model and writes `{model_prefix}.model`.

    Args:
        files_or_texts: a str of comma-separated glob patterns, or an iterable whose
            `os.PathLike` items are files and whose `str` items are texts. Each non-empty line
            is one training sentence.
        model_prefix: output prefix (local or gs://): `/tmp/spm` writes `/tmp/spm.model`; a
            prefix ending in `/` is refused (it would write a hidden `.model`).
        vocab_size: sentencepiece pieces, without sentinels. Byte fallback needs 256 + 3 +
            the corpus' distinct characters at least.
        num_threads: training threads, default `TRAIN_THREADS`; the model depends on it.

    Returns:
        Path of the written `.model` file.

    Raises:
        VocabularyError: empty input, a vocab_size the corpus cannot support, or a
            model_prefix that names a directory (checked before training).
        FileNotFoundError: a glob matched nothing.
    """
    out = _model_path(model_prefix)
    if vocab_size <= 0:
        raise VocabularyError(f"vocab_size must be > 0, got {vocab_size!r}")
    if input_sentence_size < 0:
        raise VocabularyError(f"input_sentence_size must be >= 0 (0: every line), got "
                              f"{input_sentence_size!r}")
    skipped = [0]
    lines = _iter_lines(files_or_texts, skipped)
    first = next(lines, None)
    if first is None:
        raise VocabularyError("no text to train a vocabulary on (empty input" + (
            f"; {skipped[0]} line(s) left out: not UTF-8)" if skipped[0] else ")"))

    def sentences():
        yield first
        yield from lines

    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # same input -> same model on every host
    try:
        with open(os.devnull, "w") as quiet:  # sentencepiece logs a page per training to stderr
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_writer=model, logstream=quiet,
                vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
                byte_fallback=True, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
                input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                max_sentence_length=_SP_MAX_SENTENCE_BYTES,
                num_threads=num_threads or TRAIN_THREADS)
    except RuntimeError as e:
        raise VocabularyError(_explain_training_error(str(e), vocab_size)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def _model_path(model_prefix: PathLike) -> epath.Path:
    """`{model_prefix}.model`, checked before training: a prefix that names a directory
    (`dir/`) would write a hidden `dir/.model`; a file among its parents fails to mkdir."""
    prefix = os.fspath(model_prefix)
    if not prefix.strip():
        raise VocabularyError("--model_prefix is empty; give e.g. /tmp/spm to write /tmp/spm.model")
    if prefix.endswith(("/", os.sep)):
        raise VocabularyError(f"--model_prefix {prefix!r} names a directory, not a file prefix; "
                              f"give e.g. {prefix.rstrip('/' + os.sep) + '/spm'!r} to write "
                              "spm.model there")
    out = epath.Path(prefix + ".model")
    if out.is_dir():
        raise VocabularyError(f"--model_prefix {prefix!r}: {out} is a directory")
    blocking = files.file_in_the_way(out)
    if blocking:
        raise VocabularyError(f"--model_prefix {prefix!r}: {blocking} is a file, not a directory")
    return out


def _explain_training_error(msg: str, vocab_size: int) -> str:
    m = re.search(r"Vocabulary size (?:is )?too high \((\d+)\)\D*<= (\d+)", msg)
    if m:
        return (f"vocab_size={vocab_size} is too large for this corpus: sentencepiece can build "
                f"at most {m.group(2)} pieces; lower --vocab_size or give more text")
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return (f"vocab_size={vocab_size} is too small: this corpus needs at least "
                f"{m.group(2)} pieces (its characters, 256 bytes and pad/eos/unk)")
    return "sentencepiece training failed: " + (msg.strip().splitlines() or ["?"])[-1]


def main(argv):
    from absl import flags  # only the CLI defines flags, so importing this module is free

    if len(argv) > 1:
        cli.exit_with("vocab", f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    try:
        path = train_vocab(f.input, f.model_prefix, f.vocab_size, model_type=f.model_type,
                           input_sentence_size=f.input_sentence_size)
    except cli.ERRORS as e:
        cli.exit_with("vocab", e)
    vocab = Vocabulary(path)
    print(f"wrote {path}: {vocab.sp_size} pieces + {vocab.extra_ids} sentinels = vocab_size "
          f"{vocab.vocab_size} (embedding rows {vocab.padded_vocab_size})")


def _define_flags():
    from absl import flags

    flags.DEFINE_string("input", None, "Comma-separated glob(s) of UTF-8 text files.")
    flags.DEFINE_string("model_prefix", None, "Output prefix; writes PREFIX.model (gs:// ok).")
    flags.DEFINE_integer("vocab_size", 32000, "Sentencepiece pieces, without the 100 sentinels.")
    flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "Sentencepiece model type.")
    flags.DEFINE_integer("input_sentence_size", 2_000_000, "Lines sampled for training (0: "
                         "every line).")
    flags.mark_flags_as_required(["input", "model_prefix"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=cli.flags_parser("vocab"))
