"""tfds builders (array_record, no TensorFlow) that turn local files into a prepared dataset.

`prepare_local_files(...)` builds a `LocalFiles` dataset into `data_dir` once and reuses it
afterwards. The builder config name is a hash of everything the records depend on (file paths,
sizes, mtimes, format and options, builder version), so changing any input gives a new config
directory instead of a stale cache:

    {data_dir}/t5x_lite_local_files/{format}-{hash}/1.0.0/*.array_record-*

Splits: explicit `train_paths` / `validation_paths`, or a deterministic holdout: a record goes
to "validation" when the first 64 bits of sha1(record's JSON) / 2**64 < validation_fraction
(content-based, so the split does not depend on file order; duplicate texts land in the same
split). If that leaves validation empty (tiny corpora) the record with the smallest hash is
moved there, and vice versa for train. Counts of skipped records are kept in the dataset's
`metadata.json`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from t5x_lite import files
from t5x_lite.data import local_files
from t5x_lite.errors import UserError
from t5x_lite.vocab import expand_globs, file_key

DEFAULT_DATA_DIR = "~/.cache/t5x_lite/data"
BUILDER_VERSION = "1.0.0"  # bump whenever the records produced from the same inputs change
TRAIN, VALIDATION = "train", "validation"


class EmptyCorpusError(UserError):
    """No documents were found where some were expected."""


class LocalFilesError(UserError):
    """Local-file data options that do not go together."""


def resolve_data_dir(data_dir: str | os.PathLike | None) -> epath.Path:
    """`data_dir`, else $T5X_LITE_DATA_DIR, else ~/.cache/t5x_lite/data (user dirs expanded)."""
    data_dir = str(data_dir or os.environ.get("T5X_LITE_DATA_DIR") or DEFAULT_DATA_DIR)
    return epath.Path(os.path.expanduser(data_dir) if data_dir.startswith("~") else data_dir)


def record_hash(record: dict[str, str]) -> float:
    """Deterministic uniform value in [0, 1) of a record's content."""
    digest = hashlib.sha1(json.dumps(record, sort_keys=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclasses.dataclass
class HoldoutTally:
    """What the holdout needs to know of the records' hashes, counted in one pass: a list of
    them took ~32 bytes a record (~10 GB for a 30 GB corpus read a line a document)."""

    fraction: float
    total: int = 0
    below: int = 0  # hashes < fraction
    low: float = math.inf
    num_low: int = 0
    high: float = -math.inf
    num_high: int = 0

    def add(self, h: float) -> None:
        self.total += 1
        self.below += h < self.fraction
        if h <= self.low:
            self.num_low = self.num_low + 1 if h == self.low else 1
            self.low = h
        if h >= self.high:
            self.num_high = self.num_high + 1 if h == self.high else 1
            self.high = h

    def overrides(self) -> tuple[float | None, float | None]:
        """Hashes to force into validation / train so neither split is empty.

        Train always gets a record; validation gets one unless that would take every record
        (one document, or only copies of one): a forced hash moves all the records that share it.
        """
        if self.fraction <= 0 or not self.total:
            return None, None
        if self.below == self.total:
            return None, self.high
        if self.below == 0 and self.num_low < self.total:
            return self.low, None
        return None, None

    def num_validation(self) -> int:
        """How many records `in_validation` puts in validation, with `overrides()`."""
        force_val, force_train = self.overrides()
        if force_val is not None:
            return self.num_low  # nothing was below the fraction
        if force_train is not None:
            return self.below - self.num_high  # everything was
        return self.below


def holdout_overrides(hashes: Iterable[float], fraction: float
                      ) -> tuple[float | None, float | None]:
    """`HoldoutTally.overrides` of `hashes` (see the module doc)."""
    tally = HoldoutTally(fraction)
    for h in hashes:
        tally.add(h)
    return tally.overrides()


def in_validation(h: float, fraction: float, overrides: tuple[float | None, float | None]) -> bool:
    force_val, force_train = overrides
    if h == force_val:
        return True
    if h == force_train:
        return False
    return h < fraction


class _LocalInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a corpus built from local files. tfds' builder, when it finds no prepared
    dataset yet, asks for GCS metadata by name, and even with GCS disabled that call leaves an
    empty `tmp*tfds` directory in the system temp dir on every first preparation; a local
    corpus has no GCS metadata to ask for."""

    def initialize_from_bucket(self) -> None:
        pass


class DocumentsBuilder(tfds.core.GeneratorBasedBuilder):
    """Base: records {"text"} or {"inputs", "targets"} in train (+ validation) splits.

    Subclasses implement `_plan()` -> (kind, {split: callable returning (key, record) pairs},
    metadata dict). The plan is made before any file is written, so an empty corpus fails
    without leaving partial output.
    """

    VERSION = tfds.core.Version(BUILDER_VERSION)
    # tfds derives code_path via importlib_resources, which may not be installed; the path is
    # only used to look for a checksums file next to the code, and we download nothing.
    code_path = epath.Path(__file__)

    def _kind(self) -> str:
        return self.builder_config.kind

    def _info(self) -> tfds.core.DatasetInfo:
        names = ("text",) if self._kind() == "text" else ("inputs", "targets")
        return _LocalInfo(
            builder=self, description=self.builder_config.description,
            features=tfds.features.FeaturesDict({n: tfds.features.Text() for n in names}),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True)  # record i = i-th document, in input order (int keys)

    def _plan(self) -> tuple[dict[str, Callable[[], Iterable]], dict]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager
        generators, metadata = self._plan()
        self.info.metadata.update(metadata)
        return {split: self._generate_examples(fn) for split, fn in generators.items()}

    def _generate_examples(self, records_fn):
        yield from records_fn()

    # tfds prints "Downloading and preparing dataset ..." / "... downloaded and prepared" to
    # stdout for every dataset; ours are local files, and a train log wants one info line.
    def _log_download_bytes(self) -> None:
        logging.info("preparing %s", self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("prepared %s", self.data_dir)


@dataclasses.dataclass
class LocalFilesConfig(tfds.core.BuilderConfig):
    """What a `LocalFiles` dataset is made of. `split_files` maps split -> file list;
    a single "all" entry means the holdout split by `validation_fraction`."""

    fmt: str = "text"
    kind: str = "text"
    split_files: dict = dataclasses.field(default_factory=dict)
    validation_fraction: float = 0.05
    document_per: str = "file"
    text_key: str = "text"
    inputs_key: str = "inputs"
    targets_key: str = "targets"
    strict_utf8: bool = False

    def __repr__(self):  # tfds logs the config; keep the file list out of the logs
        return f"LocalFilesConfig({self.name}: {self.description})"


class LocalFiles(DocumentsBuilder):
    """Text / JSONL / TSV files as a tfds dataset (see `prepare_local_files`)."""

    name = "t5x_lite_local_files"

    def _read(self, paths, counts=None) -> Iterator[tuple[str, dict]]:
        c = self.builder_config
        return local_files.read_files(
            [epath.Path(p) for p in paths], c.fmt, kind=c.kind, document_per=c.document_per,
            text_key=c.text_key, inputs_key=c.inputs_key, targets_key=c.targets_key,
            strict_utf8=c.strict_utf8, counts=counts)

    def _warn_skipped(self, counts, what) -> None:
        # Only the counting pass warns: the files are read again for each split written, and
        # each pass warning made one event three warnings.
        c = self.builder_config
        message = local_files.skipped_message(counts, c.fmt, c.document_per, what)
        if message:
            logging.warning(message)

    def _plan(self):
        c = self.builder_config
        counts = local_files.ReadCounts()
        if "all" in c.split_files:
            paths = c.split_files["all"]
            tally = HoldoutTally(c.validation_fraction)
            for _, r in self._read(paths, counts):
                tally.add(record_hash(r))
            self._warn_skipped(counts, "the input files")
            if not tally.total:
                raise EmptyCorpusError(_empty_message(paths, counts))
            overrides = tally.overrides()

            def split_fn(want_val):
                return lambda: ((k, r) for k, r in self._read(paths)
                                if in_validation(record_hash(r), c.validation_fraction,
                                                 overrides) == want_val)

            generators = {TRAIN: split_fn(False)}
            sizes = {TRAIN: tally.total - tally.num_validation()}
            if tally.num_validation():
                generators[VALIDATION] = split_fn(True)
                sizes[VALIDATION] = tally.num_validation()
        else:
            generators, sizes = {}, {}
            for split, paths in c.split_files.items():
                split_counts = local_files.ReadCounts()
                sizes[split] = sum(1 for _ in self._read(paths, split_counts))
                self._warn_skipped(split_counts, f"the {split} files")
                counts.merge(split_counts)
                if not sizes[split]:
                    raise EmptyCorpusError(_empty_message(paths, split_counts, split))
                generators[split] = (lambda p=paths: self._read(p))
        _reported.add(_report_key(self))  # make_source need not repeat it from the metadata
        metadata = {"kind": c.kind, "split_sizes": sizes,
                    "skipped_non_utf8": counts.skipped_non_utf8,
                    "skipped_blank": counts.skipped_blank}
        return generators, metadata


def _empty_message(paths, counts: local_files.ReadCounts, split: str = "") -> str:
    where = f"{len(paths)} {split + ' ' if split else ''}file(s) (first: {paths[0]})"
    skipped = [f"{n} {what}" for n, what in ((counts.skipped_non_utf8, "non-UTF-8"),
                                             (counts.skipped_blank, "blank")) if n]
    why = ("skipped " + " and ".join(skipped) if skipped
           else "the files are empty or hold only blank lines")
    return f"empty corpus: no documents in {where}; {why}"


# What preparing writes under data_dir (tfds makes downloads/ even for local files).
_PREPARED_DIRS = ("t5x_lite_local_files", "t5x_lite_default_corpus", "t5x_lite_vocab",
                  "downloads")


def _without_prepared_data(files, patterns, data_dir) -> list:
    """`files` but those under data_dir's prepared datasets: with data_dir inside an input
    directory, each run read the previous run's array_record files as text (and, the inputs
    having changed, prepared yet another copy)."""
    root = resolve_data_dir(data_dir)
    ours = tuple(file_key(root / d).rstrip("/") + "/" for d in _PREPARED_DIRS)
    kept = [f for f in files if not file_key(f).startswith(ours)]
    if files and not kept:
        raise FileNotFoundError(f"{patterns}: only prepared datasets under data_dir {root}")
    return kept


def _fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_signature(paths: Sequence[epath.Path]) -> list:
    """(path, size, modification time) of each input: nanoseconds and the inode for local
    files (epath's stat has whole seconds: a same-size edit within the second reused the
    stale build), epath's stat for remote ones."""
    out = []
    for p in paths:
        text = os.fspath(p)
        if files.is_remote(text):
            st = p.stat()
            out.append([text, st.length, st.mtime])
        else:
            st = os.stat(text)
            out.append([text, st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def local_files_config(fmt: str, *, paths: Sequence[str] = (), train_paths: Sequence[str] = (),
                       validation_paths: Sequence[str] = (), validation_fraction: float = 0.05,
                       document_per: str = "file", text_key: str = "text",
                       inputs_key: str = "inputs", targets_key: str = "targets",
                       strict_utf8: bool = False, data_dir=None) -> LocalFilesConfig:
    """Resolves globs and fingerprints the inputs into a `LocalFilesConfig`.

    Either `paths` (train/validation by hash holdout) or `train_paths` (+ optional
    `validation_paths`). Files our builders wrote under `data_dir` (see `resolve_data_dir`)
    are not input, even where a directory or glob takes them in. Raises FileNotFoundError
    for missing paths / unmatched globs.
    """
    if fmt not in local_files.FORMATS:
        raise LocalFilesError(f"unknown local file format {fmt!r}; known: {local_files.FORMATS}")
    if document_per not in local_files.DOCUMENT_PER:
        raise LocalFilesError(f"document_per must be one of {local_files.DOCUMENT_PER}")
    if bool(paths) == bool(train_paths):
        raise LocalFilesError("give either data.paths (hash holdout) or data.train_paths "
                         "(+ data.validation_paths), not both / neither")

    def expand(patterns):
        return _without_prepared_data(expand_globs(patterns), patterns, data_dir)

    if paths:
        split_files = {"all": expand(paths)}
    else:
        split_files = {TRAIN: expand(train_paths)}
        if validation_paths:
            split_files[VALIDATION] = expand(validation_paths)
            shared = (set(map(file_key, split_files[TRAIN]))
                      & set(map(file_key, split_files[VALIDATION])))
            if shared:  # once: every split a run opens (train, eval) resolves the paths again
                _warn_once(f"{len(shared)} file(s) are both train and validation data (e.g. "
                           f"{min(shared)}): the validation metrics measure memorisation")
    if fmt == "jsonl":
        kind = local_files.detect_jsonl_kind(next(iter(split_files.values())), text_key,
                                             inputs_key, targets_key)
    else:
        kind = "pairs" if fmt == "tsv" else "text"
    options = dict(fmt=fmt, kind=kind, validation_fraction=validation_fraction if paths else 0.0,
                   document_per=document_per if fmt == "text" else "line", text_key=text_key,
                   inputs_key=inputs_key, targets_key=targets_key, strict_utf8=strict_utf8)
    signature = {s: _file_signature(f) for s, f in split_files.items()}
    key = [signature, options, BUILDER_VERSION, local_files.READER_VERSION]
    name = f"{fmt}-{_fingerprint(key)}"
    description = "; ".join(f"{s}: {len(f)} file(s) from {f[0]}" for s, f in split_files.items())
    return LocalFilesConfig(name=name, description=description,
                            split_files={s: tuple(map(str, f)) for s, f in split_files.items()},
                            **options)


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """download_and_prepare once; with several JAX processes, process 0 first, others reuse
    (or, when process 0 failed, all stop: `distributed.on_process_0`)."""
    from t5x_lite import distributed  # local: keep `builders` importable without initialising JAX

    distributed.on_process_0(lambda: _prepare_quietly(builder), f"prepare {builder.data_dir}")
    if not distributed.is_coordinator():
        _prepare_quietly(builder)
    return builder


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """`builder.is_prepared()` without its warning about the (empty) folder tfds makes first."""
    return (epath.Path(builder.data_dir) / "dataset_info.json").exists()


def _prepare_quietly(builder):
    if not is_prepared(builder):
        # Processes of one host preparing the same dataset (runs started together, parallel
        # test workers) take turns: the second reuses what the first built.
        with files.host_lock(builder.data_dir):
            if not is_prepared(builder):
                _download_and_prepare(builder)
    if not builder.info.splits:
        # Prepared by another process after this builder was made: it read no dataset info.
        builder.info.read_from_directory(builder.data_dir)


def _download_and_prepare(builder):
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)  # tqdm bars for a few MB of text are noise in train logs
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except FileExistsError:
        # Another host wrote the same (deterministic) dataset to a shared data_dir first.
        if not is_prepared(builder):
            raise
    except BaseException:
        _remove_empty_dirs(builder)
        raise
    finally:
        tfds.display_progress_bar(was_active)


def _remove_empty_dirs(builder) -> None:
    """A failed preparation leaves nothing behind: not even the empty folders tfds made."""
    path = epath.Path(builder.data_dir)
    for d in (path, path.parent):
        try:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        except OSError:
            return


def prepare_local_files(config: LocalFilesConfig, data_dir=None) -> LocalFiles:
    """Builds (or reuses) the prepared `LocalFiles` dataset for `config` under `data_dir`."""
    builder = LocalFiles(config=config, data_dir=str(resolve_data_dir(data_dir)),
                         file_format="array_record")
    return prepare(builder)


_reported: set[str] = set()  # datasets / warnings this process has reported


def _warn_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        logging.warning(message)


def _report_key(builder) -> str:
    return f"{builder.name}/{builder.builder_config.name}"


def report_skipped(builder: tfds.core.DatasetBuilder) -> None:
    """Logs `skipped_summary` once per dataset and process: each split a run opens (train,
    eval, a second evaluation) reads the same metadata, and preparing it warned already."""
    key = _report_key(builder)
    if key in _reported:
        return
    _reported.add(key)
    summary = skipped_summary(builder)
    if summary:
        logging.warning(summary)


def skipped_summary(builder: tfds.core.DatasetBuilder) -> str:
    """One line about what preparation skipped ("" if nothing)."""
    md = builder.info.metadata or {}
    unit = {"file": "file(s)", "paragraph": "paragraph(s)", "line": "line(s)"}[
        getattr(builder.builder_config, "document_per", "file")]
    parts = [f"{md[k]} {what} {unit}" for k, what in
             (("skipped_non_utf8", "non-UTF-8"), ("skipped_blank", "blank")) if md.get(k)]
    return f"{builder.data_dir}: preparation skipped " + ", ".join(parts) if parts else ""
