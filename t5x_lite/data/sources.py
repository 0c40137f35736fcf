"""Random-access text sources for grain: prepared tfds datasets, local files, default corpus.

`make_source(cfg, split)` returns a `Source`: an array_record data source (`len`, `[i]`,
picklable, read with no TensorFlow) plus a `RecordDecoder` turning its records into
{"text": str} or {"inputs": str, "targets": str}. A record is a *pair* when it has both
`inputs_key` and `targets_key`, otherwise its text is `text_key`.

For source="tfds", a dataset prepared under `data_dir` is opened from its files
(`tfds.builder_from_directory`, no builder code imported); otherwise `tfds.data_source`
(never downloading). Non-UTF-8 bytes in a text feature are replaced by U+FFFD and counted (the
record is kept: dropping it would change eval coverage); `strict_utf8=True` raises instead.
Local files are checked when prepared (see local_files.py).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import grain
import tensorflow_datasets as tfds
from etils import epath

from t5x_lite.data import builders
from t5x_lite.data import default_corpus
from t5x_lite.data.config import DataConfig, DataConfigError, rename_split
from t5x_lite.data.objectives import LoggedCounter


class RecordDecoder(grain.transforms.Map):
    """A tfds record (dict of bytes) -> {"text": str} or {"inputs": str, "targets": str}."""

    def __init__(self, kind: str, text_key: str = "text", inputs_key: str = "inputs",
                 targets_key: str = "targets", strict_utf8: bool = False):
        self.kind = kind
        self._keys = ({"text": text_key} if kind == "text"
                      else {"inputs": inputs_key, "targets": targets_key})
        self._strict = strict_utf8
        self.counter = LoggedCounter("non-UTF-8 bytes in tfds records were replaced by U+FFFD")

    def _text(self, value: Any, key: str) -> str:
        if isinstance(value, str):
            return value
        value = bytes(value)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            if self._strict:
                raise DataConfigError(f"record field {key!r} is not valid UTF-8 "
                                      "(data.strict_utf8=True)") from None
            self.counter.add()
            return value.decode("utf-8", errors="replace")

    def map(self, record):
        return {name: self._text(record[key], key) for name, key in self._keys.items()}


@dataclasses.dataclass(frozen=True)
class Source:
    data_source: Any  # grain RandomAccessDataSource: len(), [i] -> dict of features
    decoder: RecordDecoder
    description: str

    @property
    def kind(self) -> str:
        return self.decoder.kind

    def __len__(self) -> int:
        return len(self.data_source)


def _builder_split(builder, split: str):
    try:
        return builder.as_data_source(split)
    except ValueError as e:
        available = sorted(builder.info.splits.keys())
        hint = ""
        if split.startswith(builders.VALIDATION) and builders.VALIDATION not in available:
            hint = ("; set data.validation_paths, or data.validation_fraction > 0 with more "
                    "than one distinct document")
        raise DataConfigError(f"{builder.name}: no split {split!r} (available: {available})"
                              f"{hint}") from e


def _local_split_name(cfg: DataConfig, split: str) -> str:
    """Config split names (train_split / eval_split, their slices aside) -> the builders' train
    / validation. The builders' own names stay themselves (eval_split="train" evaluates on the
    train split), and a name that is both train_split and eval_split reads the train split."""
    if split.partition("[")[0] in (builders.TRAIN, builders.VALIDATION):
        return split
    return rename_split(split, cfg, builders.TRAIN, builders.VALIDATION)


def _prepared_dir(name: str, data_dir: str) -> epath.Path | None:
    """data_dir/name[/config]/version of a prepared dataset ("c4/en:3.1.0"); newest version
    if none is given; None if not there."""
    if not data_dir:
        return None
    base, _, version = name.partition(":")
    root = epath.Path(data_dir) / base
    if version:
        return root / version if (root / version / "dataset_info.json").exists() else None
    if not root.is_dir():
        return None
    versions = [p for p in root.iterdir() if re.fullmatch(r"\d+\.\d+\.\d+", p.name)
                and (p / "dataset_info.json").exists()]
    return max(versions, key=lambda p: tuple(map(int, p.name.split(".")))) if versions else None


def _open_tfds(cfg: DataConfig, split: str):
    # Reading the prepared files directly needs neither the dataset's builder code (which may
    # import TensorFlow or apache_beam) nor a network; tfds.data_source is the fallback.
    path = _prepared_dir(cfg.tfds_name, cfg.data_dir)
    if path is not None:
        return tfds.builder_from_directory(str(path)).as_data_source(split)
    return tfds.data_source(cfg.tfds_name, split=split, data_dir=cfg.data_dir or None,
                            download=False, try_gcs=False)


def _tfds_source(cfg: DataConfig, split: str) -> Source:
    try:
        src = _open_tfds(cfg, split)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataConfigError(
            f"tfds dataset {cfg.tfds_name!r} not found in data_dir={cfg.data_dir or '(default)'}; "
            "prepare it there first with file_format=array_record") from None
    except (ValueError, FileNotFoundError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataConfigError(f"tfds dataset {cfg.tfds_name!r} split {split!r}: {first}") from None
    features = sorted(src.dataset_info.features.keys())
    if cfg.inputs_key in features and cfg.targets_key in features:
        kind = "pairs"
    elif cfg.text_key in features:
        kind = "text"
    else:
        raise DataConfigError(
            f"tfds dataset {cfg.tfds_name!r} has no feature {cfg.text_key!r} (nor "
            f"{cfg.inputs_key!r}+{cfg.targets_key!r}); features: {features}; set data.text_key")
    decoder = RecordDecoder(kind, cfg.text_key, cfg.inputs_key, cfg.targets_key, cfg.strict_utf8)
    return Source(src, decoder, f"tfds {cfg.tfds_name} {split}")


def prepare_builder(cfg: DataConfig):
    """The prepared tfds builder behind a "default" / "text" / "jsonl" / "tsv" source."""
    if cfg.source == "default":
        return default_corpus.prepare_default_corpus(cfg.data_dir or None)
    try:
        config = builders.local_files_config(
            cfg.source, paths=cfg.paths, train_paths=cfg.train_paths,
            validation_paths=cfg.validation_paths, validation_fraction=cfg.validation_fraction,
            document_per=cfg.document_per, text_key=cfg.text_key, inputs_key=cfg.inputs_key,
            targets_key=cfg.targets_key, strict_utf8=cfg.strict_utf8,
            data_dir=cfg.data_dir or None)
    except FileNotFoundError as e:
        raise DataConfigError(f"data.source={cfg.source!r}: {e}") from None
    return builders.prepare_local_files(config, cfg.data_dir or None)


def make_source(cfg: DataConfig, split: str) -> Source:
    """The random-access source for `split` (a config split name, tfds slicing allowed)."""
    if cfg.source == "tfds":
        return _tfds_source(cfg, split)
    builder = prepare_builder(cfg)
    builders.report_skipped(builder)
    kind = builder.info.metadata["kind"]
    src = _builder_split(builder, _local_split_name(cfg, split))
    return Source(src, RecordDecoder(kind), f"{builder.name}/{builder.builder_config.name} {split}")
