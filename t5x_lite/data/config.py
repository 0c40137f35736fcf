"""The data configuration: one frozen dataclass, built from a config's `data` ConfigDict.

This is the only place the `data` section becomes typed; unknown keys are an error so that a
typo (`data.noise_densty`) cannot silently fall back to a default. See README.md.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from t5x_lite import files
from t5x_lite.data import local_files
from t5x_lite.data import objectives
from t5x_lite.data import span_corruption
from t5x_lite.errors import UserError

SOURCES = ("default", "text", "jsonl", "tsv", "tfds")
# What a `data.mixture` entry may set besides `name` and `weight`: where its records come from
# and its objective. Lengths, packing, vocabulary and loader settings are the run's.
MIXTURE_KEYS = ("source", "paths", "train_paths", "validation_paths", "validation_fraction",
                "document_per", "tfds_name", "data_dir", "train_split", "eval_split", "text_key",
                "inputs_key", "targets_key", "strict_utf8", "objective")
# Where an entry's records are: not taken from the run's config when the entry sets its own
# `source` or any of these.
LOCATION_KEYS = ("paths", "train_paths", "validation_paths", "tfds_name")


class DataConfigError(UserError):
    """A `data` config that cannot describe a valid input pipeline."""


def _paths(value) -> tuple[str, ...]:
    """Comma-separated str or a sequence -> the non-blank paths (an empty override: none)."""
    items = value.split(",") if isinstance(value, str) else [str(p) for p in value or ()]
    return tuple(p.strip() for p in items if p.strip())


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline settings (the `data` section of a config).

    Sources: "default" (stdlib docstrings), "text" / "jsonl" / "tsv" (local or gs:// files,
    via `paths` with a hash holdout of `validation_fraction`, or `train_paths` +
    `validation_paths`), "tfds" (a prepared array_record tfds dataset `tfds_name` in
    `data_dir`, e.g. "c4/en:3.1.0"). Lengths: `inputs_length` / `targets_length` for
    encoder-decoder and MLM (encoder length = inputs_length), `seq_len` for decoder-only.
    """

    source: str = "default"
    paths: tuple[str, ...] = ()
    train_paths: tuple[str, ...] = ()
    validation_paths: tuple[str, ...] = ()
    validation_fraction: float = 0.05
    document_per: str = "file"  # text files: "file" | "paragraph" | "line"
    tfds_name: str = ""
    data_dir: str = ""  # "" -> $T5X_LITE_DATA_DIR or ~/.cache/t5x_lite/data (tfds: its default)
    train_split: str = "train"
    eval_split: str = "validation"
    text_key: str = "text"
    inputs_key: str = "inputs"
    targets_key: str = "targets"
    strict_utf8: bool = False
    objective: str = "span_corruption"
    inputs_length: int = 512
    targets_length: int = 114
    seq_len: int = 512
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    mask_rate: float = 0.15
    pack: bool = True
    pack_method: str = "first_fit"  # or "concat" (causal_lm only, GPT-style)
    packing_bins: int = 64  # rows first-fit fills at once (more: less padding, more memory)
    vocab_path: str = ""  # "" -> default vocab trained on the default corpus
    vocab_size: int = 8000  # pieces of that default vocab
    extra_ids: int = 100
    num_workers: int = 0  # grain worker processes (mp_prefetch); 0 = in-process
    read_threads: int = 2  # grain ReadOptions.num_threads (tokenization runs in them)
    prefetch_buffer_size: int = 64
    worker_buffer_size: int = 2
    # Several sources in one run: entries {name, weight, <MIXTURE_KEYS>}; see `components`.
    mixture: tuple = ()

    def __post_init__(self):
        for name in ("paths", "train_paths", "validation_paths"):
            object.__setattr__(self, name, _paths(getattr(self, name)))
        object.__setattr__(self, "mixture", _normalise_mixture(self.mixture))
        checks = [
            (self.source in SOURCES, f"source must be one of {SOURCES}, got {self.source!r}"),
            (self.objective in objectives.OBJECTIVES,
             f"objective must be one of {objectives.OBJECTIVES}, got {self.objective!r}"),
            (self.document_per in local_files.DOCUMENT_PER,
             f"document_per must be one of {local_files.DOCUMENT_PER}"),
            (self.pack_method in ("first_fit", "concat"),
             f"pack_method must be 'first_fit' or 'concat', got {self.pack_method!r}"),
            (self.pack_method == "first_fit" or (self.objective == "causal_lm" and self.pack),
             "pack_method='concat' needs objective='causal_lm' and pack=True"),
            (self.source != "tfds" or bool(self.tfds_name), "source='tfds' needs data.tfds_name"),
            (self.source == "tfds" or not self.tfds_name,
             f"data.tfds_name is read with source='tfds' only (source={self.source!r}); set "
             "data.source=tfds"),
            (self.source not in ("default", "tfds")
             or not (self.paths or self.train_paths or self.validation_paths),
             f"data.paths / train_paths / validation_paths are read by source 'text', 'jsonl' "
             f"or 'tsv' only (source={self.source!r}"
             + (", the stdlib docstrings" if self.source == "default" else "")
             + "); set data.source"),
            (self.source not in ("text", "jsonl", "tsv") or bool(self.paths or self.train_paths),
             f"source={self.source!r} needs data.paths or data.train_paths"),
            (not (self.paths and (self.train_paths or self.validation_paths)),
             "give data.paths (hash holdout) or data.train_paths/validation_paths, not both"),
            (0.0 <= self.validation_fraction < 1.0, "validation_fraction must be in [0, 1)"),
            # float32: the mask is drawn in float32, where 0.99999999 is 1 (all noise)
            (0.0 < self.noise_density and float(np.float32(self.noise_density)) < 1.0,
             "noise_density must be in (0, 1) (below 1 in float32)"),
            (1.0 <= self.mean_noise_span_length < float("inf"),
             "mean_noise_span_length must be >= 1 and finite"),
            (0.0 < self.mask_rate < 1.0, "mask_rate must be in (0, 1)"),
            (min(self.inputs_length, self.targets_length, self.seq_len) >= 2,
             "inputs_length, targets_length and seq_len must be >= 2"),
            (self.num_workers >= 0 and self.read_threads >= 0, "worker/thread counts must be >= 0"),
            (self.prefetch_buffer_size >= 0 and self.worker_buffer_size >= 1,
             "prefetch_buffer_size must be >= 0 and worker_buffer_size >= 1"),
            (self.packing_bins >= 1, "packing_bins must be >= 1"),
            (self.extra_ids >= 0, "extra_ids must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataConfigError(f"Invalid data config: {message}")
        try:  # a gs:// path without gcsfs: one line now, not a traceback at the first read
            for path in (*self.paths, *self.train_paths, *self.validation_paths, self.data_dir,
                         self.vocab_path):
                files.check_remote(path)
        except UserError as e:
            raise DataConfigError(f"Invalid data config: {e}") from None
        if self.objective == "span_corruption":
            # Too-dense noise or short targets otherwise fail only at the first batch.
            try:
                span_corruption.check_settings(self.inputs_length, self.targets_length,
                                               self.noise_density, self.mean_noise_span_length,
                                               self.extra_ids)
            except span_corruption.SpanCorruptionError as e:
                raise DataConfigError(f"Invalid data config: {e}") from None
        self.components()  # a mixture entry that cannot be built fails here, named

    def components(self) -> list[Component]:
        """The sources a run reads: one per `mixture` entry (its keys over this config's; the
        entries' weights normalised to sum to 1), or this config alone (name "", weight 1)."""
        if not self.mixture:
            return [Component("", 1.0, self)]
        built, names = [], set()
        for i, entry in enumerate(self.mixture):
            entry = dict(entry)
            name = str(entry.pop("name", "") or i)
            where = f"data.mixture[{i}]" + (f" ({name})" if name != str(i) else "")
            weight = entry.pop("weight", 1.0)
            unknown = sorted(set(entry) - set(MIXTURE_KEYS))
            if unknown:
                raise DataConfigError(f"Invalid data config: {where} sets {unknown}; an entry "
                                      f"sets name, weight and {', '.join(MIXTURE_KEYS)} (the rest "
                                      "is the run's)")
            if name in names:
                raise DataConfigError(f"Invalid data config: {where}: name {name!r} is used twice")
            names.add(name)
            if (not isinstance(weight, (int, float)) or isinstance(weight, bool)
                    or not 0 < weight < float("inf")):
                raise DataConfigError(f"Invalid data config: {where}: weight must be a finite "
                                      f"number > 0, got {weight!r}")
            if any(k in entry for k in LOCATION_KEYS + ("source",)):
                # Its own records: no path or dataset name of the run's comes along.
                entry = {**{k: _DEFAULTS[k] for k in LOCATION_KEYS}, **entry}
            try:
                cfg = dataclasses.replace(self, mixture=(), **entry)
            except DataConfigError as e:
                raise DataConfigError(str(e).replace("Invalid data config: ",
                                                     f"Invalid data config: {where}: ")) from None
            if (self.train_split == self.eval_split
                    and cfg.train_split != cfg.eval_split):  # `Component.split` maps by name
                raise DataConfigError(
                    f"Invalid data config: {where} reads train_split={cfg.train_split!r} and "
                    f"eval_split={cfg.eval_split!r}, but the run names both {self.train_split!r}; "
                    "give the run distinct data.train_split / data.eval_split")
            if objectives.row_features(cfg.objective) != objectives.row_features(self.objective):
                raise DataConfigError(
                    f"Invalid data config: {where}: objective {cfg.objective!r} makes other "
                    f"batches than data.objective={self.objective!r}; mix objectives with the "
                    "same features (span_corruption + seq2seq; causal_lm + prompt_completion)")
            built.append(Component(name, float(weight), cfg, where))
        total = sum(c.weight for c in built)
        return [dataclasses.replace(c, weight=c.weight / total) for c in built]

    @property
    def family(self) -> str:
        """"encoder_decoder", "decoder_only" or "encoder_only"."""
        if self.objective in objectives.ENCODER_DECODER:
            return "encoder_decoder"
        return "decoder_only" if self.objective in objectives.DECODER_ONLY else "encoder_only"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "DataConfig") -> "DataConfig":
        """From a dict / ConfigDict (or passes a DataConfig through); unknown keys are an error."""
        if isinstance(d, DataConfig):
            return d
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataConfigError(f"Unknown data config keys {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mixture"] = tuple(dict(entry) for entry in self.mixture)
        return d


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DataConfig)}


@dataclasses.dataclass(frozen=True)
class Component:
    """One source of a run: `config` is the run's data config with the entry's keys."""

    name: str
    weight: float
    config: DataConfig
    where: str = ""  # how errors name it: "data.mixture[1] (qa)"; "" for the run's own data

    def split(self, run: DataConfig, split: str) -> str:
        """The run's train / eval split name (tfds slicing kept) as this entry names it."""
        return rename_split(split, run, self.config.train_split, self.config.eval_split)


def rename_split(split: str, run: DataConfig, train: str, eval_: str) -> str:
    """`split` renamed when it is the run's train_split (-> `train`) or eval_split (-> `eval_`),
    compared without tfds slices ("[...]"); a name both splits share is the train split. The
    slice of `split` stays unless the new name has its own; other names pass through."""
    names = {run.eval_split.partition("[")[0]: eval_, run.train_split.partition("[")[0]: train}
    base, bracket, rest = split.partition("[")
    if base not in names:
        return split
    new = names[base]
    return new if "[" in new else new + bracket + rest


def _normalise_mixture(value) -> tuple:
    """Entries (dicts, ConfigDicts, JSON lists) -> a hashable tuple of sorted (key, value)
    tuples; path lists become tuples."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise DataConfigError(f"Invalid data config: mixture must be a list of entries (dicts), "
                              f"got {type(value).__name__}")
    out = []
    for i, entry in enumerate(value):
        if hasattr(entry, "to_dict"):
            entry = entry.to_dict()
        elif isinstance(entry, tuple) and all(isinstance(kv, tuple) and len(kv) == 2
                                              for kv in entry):
            entry = dict(entry)  # already normalised
        if not isinstance(entry, Mapping):
            raise DataConfigError(f"Invalid data config: data.mixture[{i}] must be a dict "
                                  f"(name, weight, source, ...), got {type(entry).__name__}")
        out.append(tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v)
                                for k, v in entry.items())))
    return tuple(out)
