"""Local or remote (epath) file writes that never leave half a file, the path check that
turns mkdir's bare errno into a clear message, a lock for work done once per host, and the
line and Unicode checks of text read from files."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from typing import Iterator

from absl import logging
from etils import epath

from t5x_lite.errors import UserError


def write_atomic(path, data: str | bytes) -> None:
    """Writes `data` to `<path>.tmp` and renames it over `path`: a reader (or a killed run)
    sees the old file or the new one, never part of one. A local temp file is synced to disk
    before the rename, so that a host crash cannot leave an empty file under the new name. The
    temp file does not outlive a failure."""
    path = epath.Path(path)
    tmp = path.parent / (path.name + ".tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        if not is_remote(tmp):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            except OSError as e:  # a file system without fsync (some FUSE mounts) goes on
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
            finally:
                os.close(fd)
        tmp.replace(path)  # epath's rename refuses to overwrite an existing file
    finally:
        if tmp.exists():
            tmp.unlink()


def is_remote(path) -> bool:
    """Whether `path` names a remote file (gs://..., any scheme): os functions cannot take it."""
    return "://" in os.fspath(path)


def real(path) -> epath.Path:
    """`path` with a local one made absolute and its links resolved, so that two spellings of
    one file compare equal (a remote path as it is, checked by `check_remote`)."""
    text = os.fspath(path)
    if is_remote(text):
        check_remote(text)
        return epath.Path(text)
    return epath.Path(os.path.realpath(text))


def check_remote(path) -> None:
    """A UserError when remote `path` needs a package that is missing: epath reaches it with
    fsspec (unless tensorflow is installed), whose plugin for the scheme (gcsfs for gs://)
    would otherwise fail the first read with an ImportError at the end of a traceback."""
    text = os.fspath(path)
    if not is_remote(text) or importlib.util.find_spec("tensorflow") is not None:
        return
    scheme = text.split("://", 1)[0]
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except ValueError:  # a scheme fsspec does not know: epath names the known ones
        return
    except ImportError as e:
        package = getattr(e.__cause__, "name", None) or e.name or str(e)
        raise UserError(f"{scheme}:// paths need {package}: pip install {package}"
                        + (" (or pip install -e '.[gcs]')" if scheme in ("gs", "gcs") else "")
                        ) from None


class LockHeld(Exception):
    """`host_lock(..., wait=False)` found the lock taken; `holder` says by whom."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def host_lock(key, *, wait: bool = True) -> Iterator[None]:
    """Exclusive among one user's processes on this host holding `host_lock` of one `key` (e.g. a
    dataset's or a workdir's path): two trainers, test workers or an evaluator preparing the
    same dataset take turns, and the second finds it built. With `wait=False` a taken lock
    raises LockHeld naming the holder's pid and command line. An flock on a file in the temp
    dir, released when the holder exits or dies (kill -9 leaves no stale lock)."""
    digest = hashlib.sha1(os.fspath(key).encode()).hexdigest()[:16]
    # Per user: another user's lock folder in a shared /tmp would not be writable.
    directory = os.path.join(tempfile.gettempdir(), f"t5x_lite_locks-{os.getuid()}")
    path = os.path.join(directory, f"{digest}.lock")
    try:
        os.makedirs(directory, exist_ok=True)
        f = open(path, "a")
    except OSError as e:  # an unwritable temp dir: go on unguarded rather than fail the run
        logging.warning("no lock for %s (%s): concurrent runs are not detected", key, e)
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            with open(path, errors="replace") as held:
                raise LockHeld(held.read().strip() or "another process") from None
        try:
            f.truncate(0)
            f.write(f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def file_in_the_way(path) -> str | None:
    """The nearest existing ancestor of local `path` when it is a file (mkdir would say a bare
    '[Errno 17] File exists' / '[Errno 20] Not a directory'), else None."""
    if is_remote(path):
        return None
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
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


def not_unicode(text: str) -> str:
    """"" for text UTF-8 can encode, else what is wrong with it. JSON can escape a lone
    surrogate ("\\udce9": what Python writes for bytes it read with errors="surrogateescape"),
    which is no Unicode text: sentencepiece and every UTF-8 writer refuse it."""
    try:
        text.encode("utf-8")
        return ""
    except UnicodeEncodeError as e:
        return (f"a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), which "
                "is not Unicode text")


def json_line(text: str | bytes):
    """json.loads of one JSONL line. Every failure is a ValueError of one line ("<what> at
    column N" for bad syntax): a 5000-digit number or an array nested 100,000 deep also fail,
    as a multi-line ValueError or a RecursionError, in json itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg} at column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
