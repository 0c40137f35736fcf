"""Tiny encoder-only masked LM (BERT-style, ~1.5M params) on the offline default corpus.

    python -m t5x_lite.train --config=configs/tiny_bert.py --workdir=/tmp/tiny_bert

Measured on a 2-core CPU: ~40 s (0.09 s/step: the MLM head runs on the masked positions
only); loss on the masked tokens 8.8 at step 25 -> ~6.8 at step 300, masked-token accuracy
~6%: the masked tokens' unigram entropy is 6.75, so
300 steps of 16 x 128 tokens learn word frequencies, not yet context.
`t5x_lite.load(workdir).logits([...])` reads the result (README, "Load and use a model").
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
