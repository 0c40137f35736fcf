"""Reading local (or gs://) text, JSONL and TSV files into documents or inputs/targets pairs.

Formats:
  text   one document per file, per blank-line-separated paragraph, or per line
         (`document_per`); records {"text": str}.
  jsonl  one JSON object per line with a `text_key` field, or with `inputs_key` and
         `targets_key` (detected from the first record; all records must agree).
  tsv    `inputs<TAB>targets` per line; records {"inputs": str, "targets": str}.

Encodings: gzip, bzip2 and xz files (told by their first bytes, not their names) are
decompressed; a UTF-8 byte order mark is dropped; UTF-16 / UTF-32 files with a byte order mark
are decoded; a file without LF whose lines end in CR (classic Mac OS) has its CRs read as LFs. A NUL byte in the first 8000 bytes (git's test for binary files) means UTF-16
without a byte order mark or a binary file, and raises `DataFormatError` (one line) rather than
turning it into documents of NULs and fragments; so do zip / zstd files.

Non-UTF-8 bytes: by default the offending unit is skipped and counted (a whole file for
`document_per="file"`, otherwise the paragraph / line); the caller reports the count once
(see `skipped_message`); `strict_utf8=True` raises instead. Blank documents are skipped and
counted. Malformed JSON or TSV lines raise `DataFormatError` naming file and line.
"""
from __future__ import annotations

import bz2
import codecs
import dataclasses
import gzip
import json
import lzma
import os
import re
import zlib
from collections.abc import Iterator, Sequence

from etils import epath

from t5x_lite.errors import UserError

# Part of the prepared datasets' cache key: bump when the records read from the same files
# change (2: a UTF-8 byte order mark is dropped; 3: compressed and UTF-16/32 files are
# decoded; 4: lines of a file that ends them in CR only are lines), so no stale prepared copy
# is reused.
READER_VERSION = 4
FORMATS = ("text", "jsonl", "tsv")
DOCUMENT_PER = ("file", "paragraph", "line")
_PARAGRAPH_BREAK = re.compile(rb"\r?\n[ \t]*\r?\n")
# magic bytes -> (name, decompress bytes, open a decompressing stream over a binary file)
_COMPRESSIONS = ((b"\x1f\x8b", "gzip", gzip.decompress, lambda f: gzip.GzipFile(fileobj=f)),
                 (b"BZh", "bzip2", bz2.decompress, bz2.BZ2File),
                 (b"\xfd7zXZ\x00", "xz", lzma.decompress, lzma.LZMAFile))
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)
_UNREADABLE = ((b"\x28\xb5\x2f\xfd", "zstd-compressed"), (b"PK\x03\x04", "a zip archive"))
# UTF-32 first: its little-endian mark starts with UTF-16's.
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
              (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_BINARY_SNIFF_BYTES = 8000  # as git: a NUL byte among the first 8000 bytes means "binary"


class DataFormatError(UserError):
    """Malformed input data (one line: what, where, how to fix)."""


@dataclasses.dataclass
class ReadCounts:
    """What reading skipped; logged and stored with the prepared dataset."""

    documents: int = 0
    skipped_non_utf8: int = 0
    skipped_blank: int = 0

    def merge(self, other: "ReadCounts") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _decode(raw: bytes, where: str, strict: bool, counts: ReadCounts) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise DataFormatError(
                f"{where}: not valid UTF-8 (byte {e.start}); fix the file or set "
                "data.strict_utf8=False to skip such records") from None
        counts.skipped_non_utf8 += 1
        return None


def _units(raw: bytes, document_per: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of each document unit of a text file."""
    if document_per == "file":
        yield 1, raw
    elif document_per == "line":
        yield from enumerate(raw.removesuffix(b"\n").split(b"\n"), 1)
    else:
        # Newlines are counted paragraph by paragraph: counting from the start of the file
        # for each paragraph made large files quadratic (a minute for 4 MB).
        pos, line = 0, 1  # line of raw[pos]
        breaks = [(m.start(), m.end()) for m in _PARAGRAPH_BREAK.finditer(raw)]
        for end, next_pos in breaks + [(len(raw), len(raw))]:
            unit = raw[pos:end]
            first = pos + len(unit) - len(unit.lstrip())
            if first < end:  # blank lines around paragraphs are separators, not blank documents
                yield line + raw.count(b"\n", pos, first), unit
            line += raw.count(b"\n", pos, next_pos)
            pos = next_pos


def _compression(path, magic: bytes):
    for m, what in _UNREADABLE:
        if magic.startswith(m):
            raise DataFormatError(f"{path}: {what}; decompress it first (gzip, bzip2 and xz "
                                  "files are read directly)")
    return next((c for c in _COMPRESSIONS if magic.startswith(c[0])), None)


def _wide_encoding(head: bytes) -> str | None:
    return next((enc for bom, enc in _WIDE_BOMS if head.startswith(bom)), None)


def check_not_binary(path, head: bytes) -> None:
    """Raises DataFormatError if a NUL byte is among the first 8000 bytes of `head`."""
    nul = head.find(b"\x00", 0, _BINARY_SNIFF_BYTES)
    if nul >= 0:
        raise DataFormatError(
            f"{path}: not UTF-8 text (NUL byte at offset {nul}: UTF-16 without a byte order "
            "mark, or a binary file); convert it to UTF-8 (e.g. iconv -f UTF-16LE -t UTF-8) "
            "or leave it out of the data paths")


def read_utf8_bytes(path: epath.Path, *, refuse_binary: bool = True) -> bytes:
    """A text file's content as UTF-8 bytes (see the module doc: decompressed, a byte order
    mark dropped, UTF-16/32 decoded); invalid UTF-8 is left for the caller to find.
    `refuse_binary=False` leaves the NUL check (`check_not_binary`) to the caller too.

    Raises:
        DataFormatError: a binary or BOM-less UTF-16 file, zip / zstd, corrupt compressed data
            or invalid UTF-16/32.
    """
    path = epath.Path(path)
    if path.is_dir():
        raise DataFormatError(f"{path} is a directory, not a file")
    raw = path.read_bytes()
    compression = _compression(path, raw[:6])
    if compression:
        try:
            raw = compression[2](raw)
        except _DECOMPRESS_ERRORS as e:
            raise DataFormatError(f"{path}: corrupt {compression[1]} data ({e})") from None
    encoding = _wide_encoding(raw)
    if encoding:
        try:
            raw = raw.decode(encoding).encode("utf-8")  # the codec consumes the byte order mark
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path}: starts with a {encoding.upper()} byte order mark but "
                                  f"is not valid {encoding.upper()} (byte {e.start}: {e.reason})"
                                  ) from None
    # A UTF-8 byte order mark (Windows editors) is not text: it would start the first
    # document / TSV input, and makes the first JSONL line invalid JSON.
    raw = raw.removeprefix(codecs.BOM_UTF8)
    if b"\n" not in raw and b"\r" in raw:  # classic Mac OS line ends: one line otherwise
        raw = raw.replace(b"\r", b"\n")
    if refuse_binary:
        check_not_binary(path, raw)
    return raw


def _iter_utf8_lines(path: epath.Path) -> Iterator[bytes]:
    """`read_utf8_bytes(path).split(b"\\n")`, streamed where it can be (plain and compressed
    UTF-8): reading a whole large file only to look at its first record would be slow."""
    with path.open("rb") as f:
        compression = _compression(path, f.read(6))
        f.seek(0)
        if compression is None:
            yield from _utf8_lines(path, f)
            return
        try:
            with compression[3](f) as stream:
                yield from _utf8_lines(path, stream)
        except UserError:
            raise
        except _DECOMPRESS_ERRORS as e:
            raise DataFormatError(f"{path}: corrupt {compression[1]} data ({e})") from None


def _utf8_lines(path, stream) -> Iterator[bytes]:
    first = stream.readline(_BINARY_SNIFF_BYTES)
    if _wide_encoding(first) or b"\n" not in first and b"\r" in first:  # rare: whole file
        yield from read_utf8_bytes(path).split(b"\n")
        return
    first = first.removeprefix(codecs.BOM_UTF8)
    check_not_binary(path, first)
    if not first.endswith(b"\n"):
        first += stream.readline()
    yield first
    yield from stream


def detect_jsonl_kind(paths: epath.Path | Sequence[epath.Path], text_key: str, inputs_key: str,
                      targets_key: str) -> str:
    """"text" or "pairs", from the first parsable JSON object of the first JSONL file that has
    one (an empty first shard is no reason to fail)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    for path in paths:
        for i, raw in enumerate(_iter_utf8_lines(epath.Path(path)), 1):
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}:{i}: expected a JSON object, got {type(record)}")
            if inputs_key in record and targets_key in record:
                return "pairs"
            if text_key in record:
                return "text"
            raise DataFormatError(
                f"{path}:{i}: record has neither {text_key!r} nor {inputs_key!r}+{targets_key!r} "
                f"(keys: {sorted(record)[:8]}); set data.text_key / inputs_key / targets_key")
    where = paths[0] if len(paths) == 1 else f"{len(paths)} files (first: {paths[0]})"
    raise DataFormatError(f"{where}: no JSON records")


def read_file(path: epath.Path, fmt: str, *, kind: str = "text", document_per: str = "file",
              text_key: str = "text", inputs_key: str = "inputs", targets_key: str = "targets",
              strict_utf8: bool = False, counts: ReadCounts | None = None
              ) -> Iterator[tuple[str, dict[str, str]]]:
    """Yields (key, record) for every document / pair of one file.

    Args:
        fmt: "text", "jsonl" or "tsv".
        kind: "text" or "pairs" (jsonl only; text is always "text", tsv always "pairs").
        counts: updated with documents read and units skipped.

    Yields:
        The 1-based line number where the record starts, and {"text": ...} or
        {"inputs", "targets"}.
    """
    counts = counts if counts is not None else ReadCounts()
    raw_file = read_utf8_bytes(path)
    if fmt == "text":
        units = _units(raw_file, document_per)
    elif fmt in ("jsonl", "tsv"):
        units = enumerate(raw_file.split(b"\n"), 1)
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
    for line, raw in units:
        if fmt != "text" and not raw.strip():
            continue  # blank lines of JSONL / TSV are not records
        text = _decode(raw, f"{path}:{line}", strict_utf8, counts)
        if text is None:
            continue
        if fmt == "text":
            record = {"text": text.strip()}
        elif fmt == "tsv":
            fields = text.rstrip("\r").split("\t")
            if len(fields) != 2:
                raise DataFormatError(
                    f"{path}:{line}: expected 'inputs<TAB>targets', found {len(fields)} fields")
            record = {"inputs": fields[0], "targets": fields[1]}
        else:
            record = _jsonl_record(text, f"{path}:{line}", kind, text_key, inputs_key, targets_key)
        if not any(_is_text(v) for v in record.values()):
            counts.skipped_blank += 1
            continue
        counts.documents += 1
        yield line, record


def _is_text(value: str) -> bool:
    """Not blank: NUL characters (past the first 8000 bytes a file may still hold some) are
    no more a document than spaces are."""
    return bool(value.replace("\x00", "").strip())


def _jsonl_record(text, where, kind, text_key, inputs_key, targets_key) -> dict[str, str]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: invalid JSON ({e.msg})") from None
    keys = (text_key,) if kind == "text" else (inputs_key, targets_key)
    names = ("text",) if kind == "text" else ("inputs", "targets")
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise DataFormatError(f"{where}: expected a JSON object with keys {list(keys)}")
    values = [obj[k] for k in keys]
    if not all(isinstance(v, str) for v in values):
        raise DataFormatError(f"{where}: fields {list(keys)} must be strings")
    return dict(zip(names, values))


def read_files(paths: Sequence[epath.Path], fmt: str, **kwargs
               ) -> Iterator[tuple[str, dict[str, str]]]:
    """`read_file` over many files with int keys (file index << 32 | line), in input order.
    Logs nothing: the caller reports skipped records once (`skipped_message`), not once per
    pass over the files."""
    for i, path in enumerate(paths):
        for key, record in read_file(path, fmt, **kwargs):
            yield (i << 32) | key, record


def skipped_message(counts: ReadCounts, fmt: str, document_per: str, what: str) -> str:
    """The warning about non-UTF-8 units `counts` skipped in `what`; "" if none."""
    if not counts.skipped_non_utf8:
        return ""
    unit = {"file": "files", "paragraph": "paragraphs", "line": "lines"}[
        document_per if fmt == "text" else "line"]
    return (f"skipped {counts.skipped_non_utf8} {unit} with non-UTF-8 bytes in {what} "
            "(data.strict_utf8=True to fail)")
