"""Local or remote (epath) file writes that never leave half a file, and the path check that
turns mkdir's bare errno into a clear message."""
from __future__ import annotations

import os

from etils import epath


def write_atomic(path, data: str | bytes) -> None:
    """Writes `data` to `<path>.tmp` and renames it over `path`: a reader (or a killed run)
    sees the old file or the new one, never part of one. The temp file does not outlive a
    failure."""
    path = epath.Path(path)
    tmp = path.parent / (path.name + ".tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        tmp.replace(path)  # epath's rename refuses to overwrite an existing file
    finally:
        if tmp.exists():
            tmp.unlink()


def real(path) -> epath.Path:
    """`path` with a local one made absolute and its links resolved, so that two spellings of
    one file compare equal (a remote path as it is)."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.realpath(text))


def file_in_the_way(path) -> str | None:
    """The nearest existing ancestor of local `path` when it is a file (mkdir would say a bare
    '[Errno 17] File exists' / '[Errno 20] Not a directory'), else None."""
    text = os.fspath(path)
    if "://" in text:
        return None
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    return parent if os.path.exists(parent) and not os.path.isdir(parent) else None


def split_lines(text: str) -> list[str]:
    """Lines ending at '\n' only: `str.splitlines` also splits at U+2028, U+2029, U+0085, form
    feeds, ..., which JSON keeps raw inside strings. A '\r' before the '\n' is dropped (CRLF),
    and a final '\n' does not start another line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]
