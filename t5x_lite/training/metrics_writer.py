"""Training metrics to `metrics.jsonl`, TensorBoard event files and the console.

TensorBoard files are written without TensorFlow or tensorboardX: an event file is a TFRecord
stream of `Event` protos, and the few fields we need (wall_time, step, file_version, a summary of
scalar `simple_value`s, session_log START) are encoded by hand below. Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import socket
import struct
import time
from typing import Mapping

from absl import logging
from etils import epath

from t5x_lite import files

METRICS_FILE = "metrics.jsonl"
EVENTS_DIR = "events"

# --- TFRecord framing: length, masked crc32c(length), data, masked crc32c(data). ---------------


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", _masked_crc(length)) + data
            + struct.pack("<I", _masked_crc(data)))


# --- Protobuf wire encoding of the Event fields we use. ------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int) -> bytes:
    return _varint((num << 3) | wire)


def _bytes_field(num: int, payload: bytes) -> bytes:
    return _field(num, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None, session_start: bool = False) -> bytes:
    """Serialized tensorflow.Event (wall_time=1 double, step=2 int64, file_version=3,
    summary=5 {value=1 {tag=1, simple_value=2 float}}, session_log=7 {status=1})."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5)
                         + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out += _bytes_field(5, values)
    if session_start:
        out += _bytes_field(7, _field(1, 0) + _varint(1))  # SessionLog.START
    return out


class EventFileWriter:
    """Appends scalar summaries to one `events.out.tfevents.*` file (TensorBoard reads it)."""

    def __init__(self, logdir, start_step: int | None = None):
        logdir = epath.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.t5x_lite"
        self.path = logdir / name
        self._f = self.path.open("ab")
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))
        if start_step is not None:
            # The points of the interrupted run logged after its last checkpoint go; the
            # checkpoint step's own points stay (as in metrics.jsonl).
            self.session_start(start_step + 1)

    def session_start(self, step: int) -> None:
        """A SessionLog.START of `step`: TensorBoard then drops the points it has read of step
        >= `step` (it keeps `x.step < step`), all tags, so what follows replaces them. Its
        current EventAccumulator ignores the first START of a run (an older one does not), so
        every file starts with one: a later file's START is never a run's first."""
        self._write(encode_event(time.time(), step, session_start=True))
        self._f.flush()

    def _write(self, event: bytes):
        self._f.write(tfrecord(event))

    def scalars(self, step: int, values: Mapping[str, float]):
        self._write(encode_event(time.time(), step, scalars=values))
        self._f.flush()

    def close(self):
        self._f.close()


def _finite_or_none(v):
    v = float(v)
    return v if math.isfinite(v) else None


class MetricsWriter:
    """Writes logged metrics; a no-op on processes other than 0 (except console lines)."""

    def __init__(self, workdir, *, is_main: bool = True, start_step: int = 0,
                 total_steps: int | None = None):
        self.is_main = is_main
        self.total_steps = total_steps
        self._t0 = time.time()
        self._mark = None  # (time, step) of the first line with a step_time
        self._start_step = start_step
        self._jsonl = self._events = None
        if not is_main:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl_path = workdir / METRICS_FILE
        truncate_jsonl(self._jsonl_path, start_step)
        self._jsonl = self._jsonl_path.open("a")
        self._events = EventFileWriter(workdir / EVENTS_DIR, start_step=start_step)

    def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "") -> None:
        values = {f"{prefix}{k}": v for k, v in metrics.items() if v is not None}
        if self.is_main:
            self._jsonl.write(json.dumps({"step": int(step), **{
                k: _finite_or_none(v) for k, v in values.items()}}) + "\n")
            self._jsonl.flush()
            self._events.scalars(step, {k: v for k, v in values.items() if math.isfinite(v)})
        logging.info("%s", self.console_line(step, values))

    def console_line(self, step: int, values: Mapping[str, float]) -> str:
        parts = [f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        parts += [f"{k}={_fmt(v)}" for k, v in values.items()]
        per_step = self._seconds_per_step(step, values)
        if self.total_steps and per_step is not None and step < self.total_steps:
            parts.append(f"eta {_duration(per_step * (self.total_steps - step))}")
        return "  ".join(parts)

    def _seconds_per_step(self, step: int, values: Mapping[str, float]) -> float | None:
        """Wall seconds per step since the first line with a `step_time` (so the first step's
        compilation is not spread over the rest, while evals and saves are counted), that
        line's `step_time` until then; else since this writer started."""
        now = time.time()
        if self._mark is None and values.get("step_time") is not None:
            self._mark = (now, step)
            return float(values["step_time"])
        if self._mark is not None:
            t, s = self._mark
            return (now - t) / (step - s) if step > s else None
        done = step - self._start_step
        return (now - self._t0) / done if done > 0 else None

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
            self._events.close()


def _records(path) -> list[tuple[str, dict | None]]:
    """(line, its record; None for one a kill cut short or left as NUL bytes) of each line of
    metrics.jsonl `path`."""
    out = []
    for line in files.split_lines(epath.Path(path).read_bytes().decode("utf-8", "replace")):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        out.append((line, record if isinstance(record, dict) else None))
    return out


def truncate_jsonl(path, after_step: int) -> None:
    """Drops lines logged after `after_step` (left by a run that died after its last
    checkpoint) and lines a kill cut short, so a resumed run's metrics.jsonl reads like an
    uninterrupted one."""
    path = epath.Path(path)
    if not path.exists():
        return
    kept = [line for line, r in _records(path) if r is not None and r.get("step", 0) <= after_step]
    files.write_atomic(path, "".join(line + "\n" for line in kept))


def has_metric(path, step: int, key: str) -> bool:
    """Whether metrics.jsonl `path` holds `key` at `step` (False when there is no file; lines
    a kill cut short are not read)."""
    path = epath.Path(path)
    return path.exists() and any(r is not None and r.get("step") == step and key in r
                                 for _, r in _records(path))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in files.split_lines(epath.Path(path).read_text())
            if line]


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
