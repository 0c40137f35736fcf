"""Model wrappers: what the trainer, evaluator and decoder need from a network (T5X's BaseModel).

`build_model(config)` returns an `EncoderDecoderModel` (T5), `DecoderOnlyModel` (GPT) or
`EncoderOnlyModel` (BERT-style MLM). Batches use seqio/T5X feature names (see README).
The optimizer never lives here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from t5x_lite.bert import Bert
from t5x_lite.config import ModelConfig
from t5x_lite.gpt import GPT
from t5x_lite.losses import cross_entropy_sums, target_log_probs
from t5x_lite.t5 import T5

Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    # MLM: most scored positions per row (the data's bound); the head then projects only those
    # to the vocabulary. 0 = every position.
    mlm_predictions: int = 0

    @classmethod
    def for_run(cls, config) -> "LossConfig":
        """What a run config's training step uses (train.z_loss / label_smoothing; for an
        `mlm` objective the data's bound on predicted tokens per row)."""
        from t5x_lite.data import DataConfig, objectives  # models stays free of grain at import

        data = DataConfig.from_dict(config.data)
        k = objectives.mlm_predictions(data.inputs_length, data.mask_rate) if (
            data.objective == "mlm" and config.model.family == "bert") else 0
        return cls(z_loss=float(config.train.z_loss),
                   label_smoothing=float(config.train.label_smoothing), mlm_predictions=k)


class BaseModel:
    """Owns a network definition and its loss / scoring; subclasses fix the feature names."""

    module_cls: type = None
    input_features: tuple[str, ...] = ()
    init_features: tuple[str, ...] = ()
    target_feature: str = "decoder_target_tokens"
    weight_feature: str = "decoder_loss_weights"

    def __init__(self, config: ModelConfig, loss: LossConfig = LossConfig()):
        self.config = config
        self.loss = loss

    def module(self, *, decode: bool = False, deterministic: bool = True):
        return self.module_cls(self.config, decode=decode, deterministic=deterministic)

    def dummy_batch(self, batch_size: int = 1, length: int = 8, targets_length: int | None = None):
        """All-ones int32 token features the network needs (for init / eval_shape)."""
        t = targets_length or length
        return {f: jnp.ones((batch_size, length if f.startswith("encoder") else t), jnp.int32)
                for f in self.init_features}

    def init(self, rng, batch: Batch | None = None):
        """Variables {'params': ...} with nn.Partitioned leaves (unbox with nn.meta.unbox)."""
        batch = self.dummy_batch() if batch is None else batch
        return self.module().init(rng, **self._inputs(batch))

    def _inputs(self, batch: Batch) -> dict[str, Any]:
        return {k: batch[k] for k in self.input_features if k in batch}

    def logits(self, params, batch: Batch, *, rng=None, deterministic: bool = True,
               **module_kwargs):
        """The module's logits for `batch`; `module_kwargs` go to its call (BERT's
        `predict_positions`)."""
        rngs = None if rng is None else {"dropout": rng}
        return self.module(deterministic=deterministic).apply(
            {"params": params}, **self._inputs(batch), **module_kwargs, rngs=rngs)

    def _weights(self, batch: Batch):
        if self.weight_feature in batch:
            return batch[self.weight_feature]
        return (batch[self.target_feature] > 0).astype(jnp.float32)

    def loss_fn(self, params, batch: Batch, rng=None, *, normalizer=None):
        """(loss, aux) where loss = sum over tokens / normalizer (default: weighted tokens).

        Passing the normalizer of a whole batch lets gradient accumulation over microbatches
        reproduce the big-batch gradient exactly.
        """
        logits, targets, weights = self._scored(params, batch, rng)
        sums = cross_entropy_sums(logits, targets, weights, z_loss=self.loss.z_loss,
                                  label_smoothing=self.loss.label_smoothing)
        if normalizer is None:
            normalizer = jnp.maximum(sums["weight_sum"], 1.0)
        return sums["loss_sum"] / normalizer, sums

    def _scored(self, params, batch: Batch, rng):
        """(logits, targets, weights) the loss sums over."""
        logits = self.logits(params, batch, rng=rng, deterministic=rng is None)
        return logits, batch[self.target_feature], self._weights(batch)

    def score_batch(self, params, batch: Batch):
        """Per-example sum of weighted target log-probs, float32 [B]."""
        logits = self.logits(params, batch)
        logp = target_log_probs(logits, batch[self.target_feature])
        return jnp.sum(logp * self._weights(batch), axis=-1)


class EncoderDecoderModel(BaseModel):
    module_cls = T5
    input_features = ("encoder_input_tokens", "decoder_input_tokens", "encoder_segment_ids",
                      "decoder_segment_ids", "encoder_positions", "decoder_positions")
    init_features = ("encoder_input_tokens", "decoder_input_tokens")


class DecoderOnlyModel(BaseModel):
    module_cls = GPT
    input_features = ("decoder_input_tokens", "decoder_positions", "decoder_segment_ids",
                      "decoder_causal_attention")
    init_features = ("decoder_input_tokens",)


class EncoderOnlyModel(BaseModel):
    module_cls = Bert
    input_features = ("encoder_input_tokens", "encoder_positions", "encoder_segment_ids")
    target_feature = "encoder_target_tokens"
    weight_feature = "encoder_loss_weights"
    init_features = ("encoder_input_tokens",)

    def _scored(self, params, batch: Batch, rng):
        """With `loss.mlm_predictions` = k < T: the head runs on each row's k scored positions
        only (first the weighted ones in order, then unweighted filler of weight 0), not on all
        T: the same loss for rows of at most k weighted tokens, which BertMask guarantees."""
        k = self.loss.mlm_predictions
        targets, weights = batch[self.target_feature], self._weights(batch)
        t = targets.shape[1]
        if not 0 < k < t:
            return super()._scored(params, batch, rng)
        order = jnp.where(weights > 0, 2 * t, 0) - jnp.arange(t)  # weighted first, in order
        _, positions = jax.lax.top_k(order, k)
        logits = self.logits(params, batch, rng=rng, deterministic=rng is None,
                             predict_positions=positions)
        take = lambda x: jnp.take_along_axis(x, positions, axis=1)
        return logits, take(targets), take(weights)


MODEL_CLASSES = {"t5": EncoderDecoderModel, "gpt": DecoderOnlyModel, "bert": EncoderOnlyModel}


def build_model(config: ModelConfig, loss: LossConfig = LossConfig()) -> BaseModel:
    return MODEL_CLASSES[config.family](config, loss)


def abstract_variables(model: BaseModel):
    """Shapes/dtypes of the variables (with logical boxes), without allocating anything."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0)))
