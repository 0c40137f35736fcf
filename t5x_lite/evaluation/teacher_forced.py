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

import jax

from t5x_lite import partitioning, quantization
from t5x_lite.config import ModelConfig
from t5x_lite.data import DataConfig
from t5x_lite.models import LossConfig, abstract_variables, build_model
from t5x_lite.training import eval_sums, train_step
from t5x_lite.training.eval_sums import EvalDataError


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
        partitioning.check_process_rows(self.mesh)
        shards = partitioning.batch_shards(self.mesh)
        if batch_size % shards or batch_size % jax.process_count():
            raise EvalDataError(f"eval batch size {batch_size} must be divisible by data*fsdp="
                                f"{shards} and the process count {jax.process_count()}")
        split = split or data.eval_split
        # A mixture: each entry on its own split ("<name>/loss", ...), and all of them together.
        total, per_entry = eval_sums.mixture_sums(
            self._step, params, data, vocab, split, batch_size=batch_size // jax.process_count(),
            seed=seed, mesh=self.mesh)
        metrics = _metrics(total, split)
        for name, sums in per_entry.items():
            one = _metrics(sums, f"{name}: {sums.split}")
            metrics.update({f"{name}/{k}": v for k, v in one.items() if k != "batches"})
        return metrics


def _metrics(sums: eval_sums.Sums, split: str) -> dict[str, float]:
    tokens = sums.tokens
    if tokens <= 0:
        raise EvalDataError(f"split {split!r} has no target tokens to evaluate")
    loss = sums.totals["loss_sum"] / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "token_accuracy": 100.0 * sums.totals["correct_sum"] / tokens,
            "tokens": int(round(tokens)), "examples": sums.examples, "batches": sums.batches}
