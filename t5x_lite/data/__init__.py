"""Input pipeline: sources (tfds / local files / default corpus) -> objectives -> packed batches.

See README.md. Main entry points:
    make_dataset(config.data, vocab, split=..., batch_size=..., seed=...)  # grain iterator
    make_global_batch(batch, mesh)                                          # global jax.Array
    load_vocab(config.data)                                                 # Vocabulary
"""
from t5x_lite.data.config import DataConfig, DataConfigError
from t5x_lite.data.loader import (load_vocab, make_dataset, make_global_batch, make_pipeline,
                                  zeros_like_batch)
from t5x_lite.data.span_corruption import (SpanCorruptionError, random_spans_helper,
                                           random_spans_noise_mask, span_corrupt)

__all__ = [
    "DataConfig", "DataConfigError", "SpanCorruptionError", "load_vocab", "make_dataset",
    "make_global_batch", "make_pipeline", "random_spans_helper", "random_spans_noise_mask",
    "span_corrupt", "zeros_like_batch",
]
