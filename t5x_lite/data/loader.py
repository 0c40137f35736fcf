"""The grain input pipeline: source -> shard -> shuffle -> tokenize -> objective -> pack -> batch.

    it = make_dataset(config.data, vocab, split="train", batch_size=per_process_batch, seed=0)
    batch = next(it)                    # dict of int32 numpy [B, L], seqio/T5X feature names
    x = make_global_batch(batch, mesh)  # global jax.Array, batch dim over ('data', 'fsdp')

Order of operations (why): the global shuffle happens *before* the per-process split, so each
epoch is one global permutation (reseeded per epoch) dealt round-robin to processes; shards are
disjoint and together cover the data. Randomness of the objectives is keyed by (seed, process
index, example counter), so `it.get_state()` / `it.set_state()` (JSON-serializable; saved with
`grain.checkpoint.CheckpointSave(it)` inside an orbax CheckpointManager) resumes exactly.
Eval (`repeat=False`) is a single pass; the last batch is kept and padded with all-zero rows
(loss weights 0, segment ids 0) -- a real row always has a nonzero loss weight.

With pack=True the number of eval batches can differ between processes; a multi-host
evaluator should keep stepping with `zeros_like_batch` until every process is exhausted.
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5x_lite.data import default_corpus
from t5x_lite.data import objectives
from t5x_lite.data import packing
from t5x_lite.data import sources
from t5x_lite.data.builders import EmptyCorpusError
from t5x_lite.data.config import Component, DataConfig, DataConfigError
from t5x_lite.vocab import Vocabulary


def load_vocab(data_cfg: Mapping[str, Any] | DataConfig) -> Vocabulary:
    """`data.vocab_path` with `data.extra_ids`, or the default-corpus vocabulary (trained once)."""
    cfg = DataConfig.from_dict(data_cfg)
    if cfg.vocab_path:
        return Vocabulary(cfg.vocab_path, extra_ids=cfg.extra_ids)
    return default_corpus.default_vocab(cfg.data_dir or None, cfg.vocab_size, cfg.extra_ids)


def process_seed(seed: int, process_index: int) -> int:
    """A 32-bit seed for per-process randomness (different processes, different draws)."""
    return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


def mixing_proportions(weights) -> list[int]:
    """Integer row proportions for `grain.IterDataset.mix`, the smallest weight as 100 and the
    others rounded to the nearest 1/100 of it: grain takes floats to these integers by
    truncation, which turned weights 5 : 6, normalised to 5/11 and 6/11, into 100 : 119."""
    low = min(weights)
    return [max(1, round(100 * w / low)) for w in weights]


def make_pipeline(data_cfg: Mapping[str, Any] | DataConfig, vocab: Vocabulary | None, *,
                  split: str, batch_size: int, seed: int = 0, shuffle: bool = True,
                  repeat: bool = True, process_index: int | None = None,
                  process_count: int | None = None, num_workers: int | None = None
                  ) -> grain.IterDataset:
    """The batched grain IterDataset; `make_dataset` returns its iterator. Args as there."""
    cfg = DataConfig.from_dict(data_cfg)
    vocab = vocab if vocab is not None else load_vocab(cfg)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise DataConfigError(f"process_index={pi} not in [0, process_count={pc})")
    if batch_size < 1:
        raise DataConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise DataConfigError(f"seed must be in [0, 2**32), got {seed}")
    if not cfg.mixture:
        ds = _rows(cfg, vocab, split, seed, shuffle, repeat, pi, pc)
    else:
        rows, parts = {}, cfg.components()
        for part in parts:
            part_seed = int(np.random.SeedSequence(
                [seed, zlib.crc32(part.name.encode())]).generate_state(1)[0])
            with entry_errors(part):
                rows[part.name] = _rows(part.config, vocab, part.split(cfg, split),
                                        part_seed, shuffle, repeat, pi, pc)
        if repeat:  # training: rows of each component in proportion to the weights, interleaved
            ds = grain.IterDataset.mix(rows, dict(zip(rows, mixing_proportions(
                [p.weight for p in parts]))))
        else:  # one pass (evaluation): every component's split in full, one after another
            ds = grain.experimental.InterleaveIterDataset(list(rows.values()), cycle_length=1)
    ds = ds.batch(batch_size, drop_remainder=False,
                  batch_fn=packing.stack_and_pad_batch(batch_size))
    workers = cfg.num_workers if num_workers is None else num_workers
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside absl.app (pytest,
            flags.FLAGS.mark_as_parsed()  # notebooks) use their defaults instead of crashing
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=cfg.worker_buffer_size))
    return ds


def _rows(cfg: DataConfig, vocab: Vocabulary, split: str, seed: int, shuffle: bool,
          repeat: bool, pi: int, pc: int) -> grain.IterDataset:
    """One source's feature rows (per process, before batching)."""
    source = sources.make_source(cfg, split)
    if len(source) == 0:
        raise EmptyCorpusError(f"empty corpus: {source.description} has no records")
    if not repeat and len(source) < pc:
        raise EmptyCorpusError(f"{source.description}: {len(source)} records cannot be split over "
                               f"{pc} processes")
    ds = grain.MapDataset.source(source.data_source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()  # each epoch reshuffled with a seed folded with the epoch number
    ds = ds[pi::pc]
    ds = ds.map(source.decoder).map(objectives.Tokenize(vocab))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.prefetch_buffer_size))
    return objectives.apply_objective(
        ds, cfg.objective, vocab, kind=source.kind, seed=process_seed(seed, pi),
        inputs_length=cfg.inputs_length, targets_length=cfg.targets_length, seq_len=cfg.seq_len,
        noise_density=cfg.noise_density, mean_noise_span_length=cfg.mean_noise_span_length,
        mask_rate=cfg.mask_rate, pack=cfg.pack, pack_method=cfg.pack_method,
        num_packing_bins=cfg.packing_bins)


@contextlib.contextmanager
def entry_errors(part: Component) -> Iterator[None]:
    """A data error raised while reading a `data.mixture` entry's data, prefixed with the entry
    ("data.mixture[1] (qa): ..."); the run's own data's errors pass as they are."""
    try:
        yield
    except (DataConfigError, EmptyCorpusError, objectives.ObjectiveError) as e:
        if not part.where:
            raise
        raise type(e)(f"{part.where}: {e}") from None


def make_dataset(data_cfg: Mapping[str, Any] | DataConfig, vocab: Vocabulary | None, *,
                 split: str, batch_size: int, seed: int = 0, shuffle: bool = True,
                 repeat: bool = True, process_index: int | None = None,
                 process_count: int | None = None, num_workers: int | None = None
                 ) -> grain.DatasetIterator:
    """Iterator of per-process batches (dicts of int32 numpy [batch_size, length]).

    Args:
        data_cfg: the `data` ConfigDict / dict / DataConfig (keys: see DataConfig).
        vocab: tokenizer (its sentinels serve span corruption and MLM); None ->
            `load_vocab(data_cfg)`.
        split: split name, e.g. data.train_split / data.eval_split; tfds slicing
            ("validation[:500]") works for every source.
        batch_size: per-process batch size (global batch / process count).
        seed: shuffle and objective seed; same seed -> same batches.
        shuffle / repeat: training (True, True); evaluation (False, False).
        process_index / process_count: default jax.process_index() / process_count();
            override to simulate hosts in tests.
        num_workers: grain worker processes; default data.num_workers.

    Returns:
        A grain DatasetIterator with exact `get_state()` / `set_state()`.
    """
    return iter(make_pipeline(data_cfg, vocab, split=split, batch_size=batch_size, seed=seed,
                              shuffle=shuffle, repeat=repeat, process_index=process_index,
                              process_count=process_count, num_workers=num_workers))


def zeros_like_batch(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An all-padding batch (contributes nothing to losses), for ragged multi-host eval."""
    return {k: np.zeros_like(v) for k, v in batch.items()}


def make_global_batch(batch_np: Mapping[str, np.ndarray], mesh: Mesh,
                      data_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global jax.Arrays sharded over `data_axes` on dim 0.

    Each process passes its own rows; the global batch is their concatenation in process
    order (`jax.make_array_from_process_local_data`). Axes missing from the mesh are ignored.
    """
    axes = tuple(a for a in data_axes if a in mesh.axis_names)
    batch_spec = axes if axes else None

    def to_global(x):
        x = np.asarray(x)
        spec = PartitionSpec(batch_spec, *([None] * (x.ndim - 1)))
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

    return {k: to_global(v) for k, v in batch_np.items()}
