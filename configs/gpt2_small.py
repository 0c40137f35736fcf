"""GPT-2 small (124M params; 50257-token vocab padded to 50304), causal LM, AdamW.

    python -m t5x_lite.train --config=configs/gpt2_small.py --workdir=gs://BUCKET/gpt2_small \
        --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 \
        --config.data.data_dir=gs://BUCKET/tfds --config.data.vocab_path=gs://BUCKET/spiece.model
"""
from t5x_lite import config as model_config
from t5x_lite.defaults import base_config


def get_config():
    model = model_config.gpt2(vocab_size=50304, d_model=768, num_heads=12, head_dim=64, d_ff=3072,
                              num_layers=12, max_len=1024, dropout_rate=0.0, dtype="bfloat16")
    c = base_config(model, objective="causal_lm", seq_len=1024)
    c.train.num_steps = 100000
    c.train.batch_size = 256
    c.train.log_every = 100
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 6e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 2000
    c.optimizer.weight_decay = 0.1
    c.checkpoint.save_every = 2000
    return c
