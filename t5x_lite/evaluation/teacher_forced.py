"""Teacher-forced loss, perplexity and token accuracy over a whole eval split, exactly.

    scorer = TeacherForcedScorer(model_config, mesh, rules)
    metrics = scorer.evaluate(params, config.data, vocab, batch_size=32)

"Exactly" means: one pass over the split (`shuffle=False, repeat=False`), every example once,
the last short batch kept (the loader pads it with all-zero rows, which carry zero loss weight),
and sums accumulated in float64 on the host. With packing, processes can run out of batches at
different times; the ones that are done keep stepping with all-padding batches until every
process is (the jitted step is a collective).

Loss is the plain cross entropy of the targets (no z-loss, no label smoothing, whatever the
training run used), averaged over all loss-weighted target tokens of the split:

    loss = sum_tokens -log p(target) / tokens,  perplexity = exp(loss),
    token_accuracy = % of those tokens where argmax p == target.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator, Mapping

import jax
import numpy as np

from t5x_lite import partitioning, quantization
from t5x_lite.config import ModelConfig
from t5x_lite.data import DataConfig, make_dataset, make_global_batch, zeros_like_batch
from t5x_lite.errors import UserError
from t5x_lite.models import LossConfig, abstract_variables, build_model
from t5x_lite.training import train_step


class EvalDataError(UserError):
    """An eval split that cannot be evaluated (empty, wrong objective for the model)."""


def host_batches(it) -> Iterator[dict[str, np.ndarray]]:
    """This process' batches, then all-padding ones until every process is out of data."""
    template = None
    multi = jax.process_count() > 1
    while True:
        batch = next(it, None)
        if multi:
            from jax.experimental import multihost_utils

            alive = multihost_utils.process_allgather(np.int32(batch is not None))
            if not np.any(alive):
                return
        elif batch is None:
            return
        if batch is None:
            if template is None:
                raise EvalDataError("this process got no eval data at all; use fewer processes "
                                    "or a larger eval split")
            batch = zeros_like_batch(template)
        template = batch
        yield batch


def count_examples(batch: Mapping[str, np.ndarray], model_cfg: ModelConfig) -> int:
    """Real examples in a batch: packed segments, or rows with any loss weight."""
    prefix = "encoder" if model_cfg.family == "bert" else "decoder"
    seg = batch.get(f"{prefix}_segment_ids")
    if seg is not None:
        return int(sum(len(np.unique(row[row > 0])) for row in seg))
    return int(np.sum(np.any(batch[f"{prefix}_loss_weights"] > 0, axis=1)))


def _family_matches(model_cfg: ModelConfig, data: DataConfig) -> bool:
    return {"t5": "encoder_decoder", "gpt": "decoder_only", "bert": "encoder_only"}[
        model_cfg.family] == data.family


@functools.lru_cache(maxsize=8)
def _eval_step(model_cfg: ModelConfig, mesh, rules, quantize: str | None = None):
    """One jitted step per (model shape, mesh, rules): evaluating many checkpoints, or calling
    `run` several times in one process, compiles once."""
    # Plain cross entropy: evaluation reports the data's likelihood, not the training loss.
    model = build_model(model_cfg, LossConfig(z_loss=0.0, label_smoothing=0.0))
    boxed = abstract_variables(model)["params"]
    shardings = partitioning.shardings(boxed, mesh, rules)
    shardings = quantization.shardings_for(boxed, shardings, quantize)  # compression: int8
    return train_step.jit_eval_step(train_step.make_eval_step(model), shardings, mesh, rules)


class TeacherForcedScorer:
    """The jitted eval step for one model shape and mesh (reused across checkpoints)."""

    def __init__(self, model_cfg: ModelConfig, mesh, rules, quantize: str | None = None):
        self.model_cfg = model_cfg
        self.mesh = mesh
        self._step = _eval_step(model_cfg, mesh, rules, quantize)

    def evaluate(self, params, data_cfg, vocab, *, batch_size: int, split: str | None = None,
                 seed: int = 0) -> dict[str, float]:
        """Metrics over the whole split (default data.eval_split).

        Args:
          batch_size: global batch; divisible by the mesh's data * fsdp and the process count.

        Returns:
          {"loss", "perplexity", "token_accuracy", "tokens", "examples", "batches"}; for a
          `data.mixture`, over all its entries, and "<name>/<metric>" for each one alone.
        """
        data = DataConfig.from_dict(data_cfg)
        if not _family_matches(self.model_cfg, data):
            raise EvalDataError(f"data.objective={data.objective!r} makes {data.family} batches "
                                f"but the model is a {self.model_cfg.family!r} model")
        shards = partitioning.batch_shards(self.mesh)
        if batch_size % shards or batch_size % jax.process_count():
            raise EvalDataError(f"eval batch size {batch_size} must be divisible by data*fsdp="
                                f"{shards} and the process count {jax.process_count()}")
        split = split or data.eval_split
        # A mixture: each entry on its own split ("<name>/loss", ...), and all of them together;
        # otherwise the run's own data, its one component.
        metrics, everything = {}, None
        for part in data.components():
            sums = self._sums(params, part.config, vocab, part.split(data, split), batch_size,
                              seed)
            if data.mixture:
                one = _metrics(sums, f"{part.name}: {part.split(data, split)}")
                metrics.update({f"{part.name}/{k}": v for k, v in one.items() if k != "batches"})
            everything = sums if everything is None else _add(everything, sums)
        return {**_metrics(everything, split), **metrics}

    def _sums(self, params, data: DataConfig, vocab, split: str, batch_size: int, seed: int):
        """(loss/weight/correct sums, examples, batches) over one source's whole split."""
        it = make_dataset(data, vocab, split=split, batch_size=batch_size // jax.process_count(),
                          seed=seed, shuffle=False, repeat=False)
        pending, examples, batches = [], 0, 0
        for batch in host_batches(it):
            examples += count_examples(batch, self.model_cfg)
            pending.append(self._step(params, make_global_batch(batch, self.mesh)))
            batches += 1
        totals = {k: 0.0 for k in train_step.SUM_KEYS}
        for sums in jax.device_get(pending):
            for k in totals:
                totals[k] += float(sums[k])  # float64 on the host: no drift over long splits
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            examples = int(np.sum(multihost_utils.process_allgather(np.int64(examples))))
        return totals, examples, batches


def _add(a, b):
    return {k: a[0][k] + b[0][k] for k in a[0]}, a[1] + b[1], a[2] + b[2]


def _metrics(sums, split: str) -> dict[str, float]:
    totals, examples, batches = sums
    tokens = totals["weight_sum"]
    if tokens <= 0:
        raise EvalDataError(f"split {split!r} has no target tokens to evaluate")
    loss = totals["loss_sum"] / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "token_accuracy": 100.0 * totals["correct_sum"] / tokens,
            "tokens": int(round(tokens)), "examples": examples, "batches": batches}
