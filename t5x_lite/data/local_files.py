"""Reading local (or gs://) text, JSONL and TSV files into documents or inputs/targets pairs.

Formats:
  text   one document per file, per blank-line-separated paragraph, or per line
         (`document_per`); records {"text": str}.
  jsonl  one JSON object per line with a `text_key` field, or with `inputs_key` and
         `targets_key` (detected from the first record; all records must agree).
  tsv    `inputs<TAB>targets` per line; records {"inputs": str, "targets": str}.

Non-UTF-8 bytes: by default the offending unit is skipped and counted (a whole file for
`document_per="file"`, otherwise the paragraph / line), with a warning giving the count;
`strict_utf8=True` raises instead. Blank documents are skipped and counted. Malformed JSON or
TSV lines raise `DataFormatError` naming file and line.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import re
from collections.abc import Iterator, Sequence

from absl import logging
from etils import epath

from t5x_lite.errors import UserError

# Part of the prepared datasets' cache key: bump when the records read from the same files
# change (2: a UTF-8 byte order mark is dropped), so no stale prepared copy is reused.
READER_VERSION = 2
FORMATS = ("text", "jsonl", "tsv")
DOCUMENT_PER = ("file", "paragraph", "line")
_PARAGRAPH_BREAK = re.compile(rb"\r?\n[ \t]*\r?\n")


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


def detect_jsonl_kind(path: epath.Path, text_key: str, inputs_key: str, targets_key: str) -> str:
    """"text" or "pairs", from the first parsable JSON object of a JSONL file."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
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
    raise DataFormatError(f"{path}: no JSON records")


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
    # A UTF-8 byte order mark (Windows editors) is not text: it would start the first
    # document / TSV input, and makes the first JSONL line invalid JSON.
    raw_file = path.read_bytes().removeprefix(codecs.BOM_UTF8)
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
        if not any(v.strip() for v in record.values()):
            counts.skipped_blank += 1
            continue
        counts.documents += 1
        yield line, record


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


def read_files(paths: Sequence[epath.Path], fmt: str, *, what: str = "", **kwargs
               ) -> Iterator[tuple[str, dict[str, str]]]:
    """`read_file` over many files with int keys (file index << 32 | line), in input order;
    logs one warning with the count if records were skipped."""
    counts = kwargs.pop("counts", None)
    counts = counts if counts is not None else ReadCounts()
    for i, path in enumerate(paths):
        for key, record in read_file(path, fmt, counts=counts, **kwargs):
            yield (i << 32) | key, record
    if counts.skipped_non_utf8:
        per = kwargs.get("document_per", "file") if fmt == "text" else "line"
        unit = {"file": "files", "paragraph": "paragraphs", "line": "lines"}[per]
        logging.warning("skipped %d %s with non-UTF-8 bytes%s (data.strict_utf8=True to fail)",
                        counts.skipped_non_utf8, unit, f" in {what}" if what else "")
