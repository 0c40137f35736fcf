"""T5 v1.0 small (60M params; ReLU MLP, tied embeddings), span corruption on C4-style data.

    python -m t5x_lite.train --config=configs/t5_small.py --workdir=gs://BUCKET/t5_small \
        --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 \
        --config.data.data_dir=gs://BUCKET/tfds --config.data.vocab_path=gs://BUCKET/spiece.model
"""
from t5x_lite import config as model_config
from t5x_lite.defaults import base_config


def get_config():
    model = model_config.t5_1_0(vocab_size=32128, d_model=512, num_heads=8, head_dim=64,
                                d_ff=2048, num_layers=6, dropout_rate=0.1, dtype="bfloat16")
    c = base_config(model, objective="span_corruption", seq_len=512, targets_length=114)
    c.train.num_steps = 524288
    c.train.batch_size = 128
    c.train.log_every = 100
    c.checkpoint.save_every = 5000
    return c
