"""Tiny encoder-only masked LM (BERT-style, ~1.5M params) on the offline default corpus.

    python -m t5x_lite.train --config=configs/tiny_bert.py --workdir=/tmp/tiny_bert
"""
from t5x_lite import config as model_config
from t5x_lite.defaults import base_config


def get_config():
    model = model_config.bert(vocab_size=8192, d_model=128, num_heads=4, head_dim=32, d_ff=512,
                              num_layers=2, max_len=256, dtype="float32")
    c = base_config(model, objective="mlm", seq_len=128)
    c.train.num_steps = 300
    c.train.batch_size = 16
    c.train.log_every = 25
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 30
    return c
