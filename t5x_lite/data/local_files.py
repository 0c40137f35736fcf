"""Reading local (or gs://) text, JSONL and TSV files into documents or inputs/targets pairs.

Formats:
  text   one document per file, per blank-line-separated paragraph, or per line
         (`document_per`); records {"text": str}.
  jsonl  one JSON object per line with a `text_key` field, or with `inputs_key` and
         `targets_key` (detected from the first record; all records must agree).
  tsv    `inputs<TAB>targets` per line; records {"inputs": str, "targets": str}.

Encodings: gzip, bzip2 and xz files (told by their first bytes, not their names) are
decompressed; a UTF-8 byte order mark is dropped; UTF-16 / UTF-32 files with a byte order mark
are decoded; a file without LF whose lines end in CR (classic Mac OS) has its CRs read as
LFs. A NUL byte in the first 8000 bytes (git's test for binary files) means UTF-16 without a
byte order mark or a binary file, and raises `DataFormatError` (one line) rather than turning
it into documents of NULs and fragments; so do zip / zstd files.

Memory: files are streamed a chunk at a time (decompressed and decoded on the way), so reading
lines, paragraphs or JSONL / TSV records of a file of any size holds about one record; only
`document_per="file"` reads a whole file, its one document.

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
import io
import itertools
import lzma
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence

from etils import epath

from t5x_lite import files
from t5x_lite.errors import UserError

# Part of the prepared datasets' cache key: bump when the records read from the same files
# change (2: a UTF-8 byte order mark is dropped; 3: compressed and UTF-16/32 files are
# decoded; 4: lines of a file that ends them in CR only are lines), so no stale prepared copy
# is reused.
READER_VERSION = 4
FORMATS = ("text", "jsonl", "tsv")
DOCUMENT_PER = ("file", "paragraph", "line")
# A line that, with the line ends on either side, breaks paragraphs: spaces / tabs only (and
# the CR of a CR LF).
_BLANK_LINE = re.compile(rb"[ \t]*\r?")
# magic bytes -> (name, open a decompressing stream over a binary file)
_COMPRESSIONS = ((b"\x1f\x8b", "gzip", lambda f: gzip.GzipFile(fileobj=f)),
                 (b"BZh", "bzip2", bz2.BZ2File),
                 (b"\xfd7zXZ\x00", "xz", lzma.LZMAFile))
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)
_UNREADABLE = ((b"\x28\xb5\x2f\xfd", "zstd-compressed"), (b"PK\x03\x04", "a zip archive"))
# UTF-32 first: its little-endian mark starts with UTF-16's.
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
              (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_BINARY_SNIFF_BYTES = 8000  # as git: a NUL byte among the first 8000 bytes means "binary"
# Files are read this much at a time: memory does not grow with the file (but with its
# longest line / paragraph, a document anyway), except for document_per="file".
_CHUNK_BYTES = 1 << 16


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


def _decode(raw: bytes, where: str, strict: bool, counts: ReadCounts, offset: int = 0
            ) -> str | None:
    """`offset`: where `raw` starts in the unit the error message counts bytes from."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise DataFormatError(
                f"{where}: not valid UTF-8 (byte {offset + e.start}); fix the file or set "
                "data.strict_utf8=False to skip such records") from None
        counts.skipped_non_utf8 += 1
        return None


def _mark_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """(item, whether it is the last one)."""
    items = iter(items)
    for previous in items:
        for item in items:
            yield previous, False
            previous = item
        yield previous, True


def _file_unit(path) -> Iterator[tuple[int, bytes, int]]:
    yield 1, read_utf8_bytes(path), 0  # not kept here: read_file drops it once decoded


def _line_units(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes, int]]:
    """(1-based line number, line, 0): every line, but the empty one after a final line end."""
    for i, (line, last) in enumerate(_mark_last(lines), 1):
        if not (last and i > 1 and not line):
            yield i, line, 0


def _paragraph_units(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes, int]]:
    """(line of its first non-whitespace byte, paragraph, offset of that line in the unit).

    A break is a line end, a line of spaces / tabs (a CR before its line end allowed) and that
    line's line end; breaks do not overlap, the first one found wins (so in a run of blank
    lines every other one is a break, the others whitespace at the start of a unit). A unit of
    ASCII whitespace only is no document, neither kept nor counted. A unit's leading
    whitespace lines are not kept, only their length: error messages count their bytes.
    """
    body, first, lead, started = [], 0, 0, False  # started: the unit has a line to end
    for i, (line, last) in enumerate(_mark_last(lines), 1):
        if started and not last and _BLANK_LINE.fullmatch(line):
            if body:
                body[-1] = body[-1].removesuffix(b"\r")  # the break's CR LF
                yield first, b"\n".join(body), lead
            body, lead, started = [], 0, False
            continue
        started = True
        if body or line.lstrip():
            first = first if body else i
            body.append(line)
        else:
            lead += len(line) + 1
    if body:
        yield first, b"\n".join(body), lead


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


def _head(chunks: Iterator[bytes], size: int) -> tuple[bytes, bool]:
    """The first chunks of `chunks`, joined, up to `size` bytes or more; and whether that was
    all of them. `chunks` goes on after them."""
    parts, n = [], 0
    for chunk in chunks:
        parts.append(chunk)
        n += len(chunk)
        if n >= size:
            return b"".join(parts), False
    return b"".join(parts), True


def _decompressed_chunks(path: epath.Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        compression = _compression(path, f.read(6))
        f.seek(0)
        if compression is None:
            yield from iter(lambda: f.read(_CHUNK_BYTES), b"")
            return
        with compression[2](f) as stream:
            while True:
                try:
                    chunk = stream.read(_CHUNK_BYTES)
                except _DECOMPRESS_ERRORS as e:
                    raise DataFormatError(f"{path}: corrupt {compression[1]} data ({e})"
                                          ) from None
                if not chunk:
                    return
                yield chunk


def _reencoded(path, chunks: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """UTF-16/32 `chunks` (byte order mark first) as UTF-8."""
    decoder = codecs.getincrementaldecoder(encoding)()  # it consumes the byte order mark
    fed = 0  # bytes given to the decoder so far
    for chunk, final in _mark_last(itertools.chain(chunks, [b""])):
        held = len(decoder.getstate()[0])  # an incomplete character it decodes with `chunk`
        try:
            text = decoder.decode(chunk, final)
        except UnicodeDecodeError as e:
            raise DataFormatError(
                f"{path}: starts with a {encoding.upper()} byte order mark but is not valid "
                f"{encoding.upper()} (byte {fed - held + e.start}: {e.reason})") from None
        fed += len(chunk)
        yield text.encode("utf-8")


def _utf8_chunks(path) -> Iterator[bytes]:
    """A file's text as UTF-8, in chunks: decompressed, UTF-16/32 decoded, a UTF-8 byte order
    mark dropped (see `read_utf8_bytes`)."""
    path = epath.Path(path)
    if path.is_dir():
        raise DataFormatError(f"{path} is a directory, not a file")
    chunks = _decompressed_chunks(path)
    head, _ = _head(chunks, len(codecs.BOM_UTF32_LE))
    chunks = itertools.chain([head], chunks)
    encoding = _wide_encoding(head)
    if encoding:
        chunks = _reencoded(path, chunks, encoding)
    # A UTF-8 byte order mark (Windows editors) is not text: it would start the first
    # document / TSV input, and makes the first JSONL line invalid JSON.
    head, _ = _head(chunks, len(codecs.BOM_UTF8))
    yield head.removeprefix(codecs.BOM_UTF8)
    yield from chunks


def read_utf8_bytes(path: epath.Path, *, refuse_binary: bool = True) -> bytes:
    """A text file's content as UTF-8 bytes (see the module doc: decompressed, a byte order
    mark dropped, UTF-16/32 decoded, CR line ends of a file without LF made LF); invalid UTF-8
    is left for the caller to find. The whole file: `_utf8_lines` streams it.
    `refuse_binary=False` leaves the NUL check (`check_not_binary`) to the caller too.

    Raises:
        DataFormatError: a binary or BOM-less UTF-16 file, zip / zstd, corrupt compressed data
            or invalid UTF-16/32.
    """
    buffer = io.BytesIO()  # its getvalue() is the buffer itself, not a copy
    for chunk in _utf8_chunks(path):
        buffer.write(chunk)
    raw = buffer.getvalue()
    if b"\n" not in raw and b"\r" in raw:  # classic Mac OS line ends: one line otherwise
        raw = raw.replace(b"\r", b"\n")
    if refuse_binary:
        check_not_binary(path, raw)
    return raw


def _ends_lines_in_cr(path) -> bool:
    """Whether the file has a CR and no LF; reads it up to its first LF."""
    cr = False
    for chunk in _utf8_chunks(path):
        if b"\n" in chunk:
            return False
        cr = cr or b"\r" in chunk
    return cr


def _utf8_lines(path) -> Iterator[bytes]:
    """`read_utf8_bytes(path).split(b"\\n")`, a chunk at a time (bounded memory).

    Whether a CR alone ends lines (no LF in the whole file) is told by the first 8000 bytes
    when they hold an LF or are the whole file; otherwise the file is read once more up to
    its first LF to tell (all of it only for a file with CR line ends).
    """
    chunks = _utf8_chunks(path)
    head, whole = _head(chunks, _BINARY_SNIFF_BYTES)
    check_not_binary(path, head)
    chunks = itertools.chain([head], chunks)
    if b"\n" not in head and (b"\r" in head if whole else _ends_lines_in_cr(path)):
        chunks = (chunk.replace(b"\r", b"\n") for chunk in chunks)
    pending = []  # the start of a line that goes on in the next chunk
    for chunk in chunks:
        *complete, last = chunk.split(b"\n")
        if complete:
            pending.append(complete[0])
            complete[0] = b"".join(pending)
            yield from complete
            pending = []
        pending.append(last)
    yield b"".join(pending)


def detect_jsonl_kind(paths: epath.Path | Sequence[epath.Path], text_key: str, inputs_key: str,
                      targets_key: str) -> str:
    """"text" or "pairs", from the first parsable JSON object of the first JSONL file that has
    one (an empty first shard is no reason to fail; when none has one, the error names the
    first line that is no JSON)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    first_bad = ""
    for path in paths:
        for i, raw in enumerate(_utf8_lines(path), 1):
            try:
                record = files.json_line(raw)
            except ValueError as e:  # not UTF-8, not JSON: read_file names it
                if raw.strip() and not first_bad:
                    first_bad = f" (the first line that is not one: {path}:{i}: {e})"
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
    raise DataFormatError(f"{where}: no JSON records{first_bad}")


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
    if fmt == "text" and document_per == "file":
        units = _file_unit(path)
    elif fmt == "text":
        split = _line_units if document_per == "line" else _paragraph_units
        units = split(_utf8_lines(path))
    elif fmt in ("jsonl", "tsv"):
        units = ((i, line, 0) for i, line in enumerate(_utf8_lines(path), 1))
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
    for line, raw, offset in units:
        if fmt != "text" and not raw.strip():
            continue  # blank lines of JSONL / TSV are not records
        text = _decode(raw, f"{path}:{line}", strict_utf8, counts, offset)
        del raw  # a whole file's bytes need not outlive its text
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
            problem = next(filter(None, map(files.not_unicode, record.values())), "")
            if problem:  # escaped non-UTF-8 bytes: skipped and counted as the raw ones are
                if strict_utf8:
                    raise DataFormatError(f"{path}:{line}: a JSON string holds {problem}; fix "
                                          "the file or set data.strict_utf8=False to skip such "
                                          "records")
                counts.skipped_non_utf8 += 1
                continue
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
        obj = files.json_line(text)
    except ValueError as e:
        raise DataFormatError(f"{where}: invalid JSON ({e})") from None
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
