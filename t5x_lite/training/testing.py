"""Small run configs for tests and quick experiments (seconds to compile on a laptop CPU)."""
from __future__ import annotations

import ml_collections

from t5x_lite import config as model_config
from t5x_lite.defaults import base_config

# The default corpus vocabulary has 8000 pieces + 100 sentinels -> 8192 embedding rows.
DEFAULT_VOCAB_ROWS = 8192


def tiny_config(family: str = "t5", **model_overrides) -> ml_collections.ConfigDict:
    """A ~0.3M-param (mostly embedding) T5 v1.1 or GPT-2 on the default corpus, 20 steps."""
    sizes = dict(vocab_size=DEFAULT_VOCAB_ROWS, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                 num_layers=1, dtype="float32")
    if family == "t5":
        model = model_config.t5_1_1(**{**sizes, "num_decoder_layers": 1, **model_overrides})
        c = base_config(model, objective="span_corruption", seq_len=32, targets_length=8)
    elif family == "gpt":
        model = model_config.gpt2(**{**sizes, "max_len": 32, **model_overrides})
        c = base_config(model, objective="causal_lm", seq_len=32)
    else:
        raise ValueError(f"family must be 't5' or 'gpt', got {family!r}")
    c.train.num_steps = 20
    c.train.batch_size = 8
    c.train.log_every = 2
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-2
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.checkpoint.save_every = 10
    c.checkpoint.async_save = True
    return c
