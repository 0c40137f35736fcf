"""Loss sums over an eval split, the same number of steps on every process: the one loop behind
the trainer's in-loop eval and `evaluation.TeacherForcedScorer`.

    total, per_entry = eval_sums.mixture_sums(step, params, data, vocab, split,
                                              batch_size=per_process, seed=0, mesh=mesh)

`step(params, global_batch) -> {SUM_KEYS}` is a jitted eval step (a collective under a mesh).
Sums are fetched once at the end and added in float64 on the host (no drift over long splits).
With `limit` > 0 every process runs exactly the split's first `limit` batches; with 0, the
whole split, each process stepping until every process is out of data. A process that runs
out first feeds all-padding batches, which carry zero loss weight.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Mapping

import jax
import numpy as np

from t5x_lite.data import DataConfig, make_dataset, make_global_batch, zeros_like_batch
from t5x_lite.data.loader import entry_errors
from t5x_lite.errors import UserError
from t5x_lite.training.train_step import SUM_KEYS


class EvalDataError(UserError):
    """An eval split that cannot be evaluated (empty, wrong objective for the model)."""


@dataclasses.dataclass(frozen=True)
class Sums:
    """Float64 sums of SUM_KEYS, real examples and steps run, over `split` (as its source
    names it; for a sum of several, the first one's)."""
    totals: dict[str, float]
    split: str
    examples: int = 0
    batches: int = 0

    def __add__(self, other: "Sums") -> "Sums":
        return Sums({k: self.totals[k] + other.totals[k] for k in self.totals}, self.split,
                    self.examples + other.examples, self.batches + other.batches)

    @property
    def tokens(self) -> float:
        return self.totals["weight_sum"]


def host_batches(it, limit: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process' batches, then all-padding ones: `limit` in all when > 0 (fewer only when a
    single process has no data at all), else until every process is out of data."""
    template = None
    multi = jax.process_count() > 1
    for i in itertools.count():
        if limit and i >= limit:
            return
        batch = next(it, None)
        if not limit and multi:
            from jax.experimental import multihost_utils

            alive = multihost_utils.process_allgather(np.int32(batch is not None))
            if not np.any(alive):
                return
        if batch is None:
            if not multi and (not limit or template is None):
                return
            if template is None:
                raise EvalDataError("this process got no eval data at all; use fewer processes "
                                    "or a larger eval split")
            batch = zeros_like_batch(template)
        template = batch
        yield batch


def count_examples(batch: Mapping[str, np.ndarray]) -> int:
    """Real examples in a batch: packed segments, or rows with any loss weight."""
    prefix = "decoder" if "decoder_loss_weights" in batch else "encoder"  # encoder-only: BERT
    seg = batch.get(f"{prefix}_segment_ids")
    if seg is not None:
        return int(sum(len(np.unique(row[row > 0])) for row in seg))
    return int(np.sum(np.any(batch[f"{prefix}_loss_weights"] > 0, axis=1)))


def _split_batches(data: DataConfig, vocab, split: str, batch_size: int, seed: int):
    """One source's split as evaluated: `batch_size` rows per process, in order, no repeat."""
    return make_dataset(data, vocab, split=split, batch_size=batch_size, seed=seed, shuffle=False,
                        repeat=False)


def split_sums(step, params, data: DataConfig, vocab, split: str, *, batch_size: int, seed: int,
               mesh, limit: int = 0) -> Sums:
    """Sums over one source's split (`batch_size` rows per process, in order, no repeat)."""
    it = _split_batches(data, vocab, split, batch_size, seed)
    pending, examples = [], 0
    for batch in host_batches(it, limit):
        examples += count_examples(batch)
        pending.append(step(params, make_global_batch(batch, mesh)))
    totals = {k: 0.0 for k in SUM_KEYS}
    for sums in jax.device_get(pending):
        for k in totals:
            totals[k] += float(sums[k])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        examples = int(np.sum(multihost_utils.process_allgather(np.int64(examples))))
    return Sums(totals, split, examples, len(pending))


def check_splits(data: DataConfig, vocab, split: str, *, batch_size: int, seed: int) -> None:
    """Opens each source's `split` and reads its first batch, so that a split that cannot be
    read (missing, wrong format) fails before training rather than at the first in-loop eval."""
    for part in data.components():
        with entry_errors(part):
            next(iter(_split_batches(part.config, vocab, part.split(data, split), batch_size,
                                     seed)), None)


def mixture_sums(step, params, data: DataConfig, vocab, split: str, **kwargs
                 ) -> tuple[Sums, dict[str, Sums]]:
    """(all of the data, {entry name: its sums}) -- the second empty without a `data.mixture`.
    Each entry reads its own source on its own name for `split`; kwargs go to `split_sums`."""
    per_entry, total = {}, None
    for part in data.components():  # the run's own data alone when it has no mixture
        with entry_errors(part):
            sums = split_sums(step, params, part.config, vocab, part.split(data, split),
                              **kwargs)
        if data.mixture:
            per_entry[part.name] = sums
        total = sums if total is None else total + sums
    return total, per_entry
