"""T5 v1.1 base (248M params; gated-GELU, untied head), span corruption, Adafactor.

    python -m t5x_lite.train --config=configs/t5_1_1_base.py --workdir=gs://BUCKET/t5_base \
        --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 \
        --config.data.data_dir=gs://BUCKET/tfds --config.data.vocab_path=gs://BUCKET/spiece.model \
        --config.mesh.fsdp=-1 --config.mesh.data=1
"""
from t5x_lite import config as model_config
from t5x_lite.defaults import base_config


def get_config():
    model = model_config.t5_1_1(vocab_size=32128, d_model=768, num_heads=12, head_dim=64,
                                d_ff=2048, num_layers=12, dropout_rate=0.0, dtype="bfloat16")
    c = base_config(model, objective="span_corruption", seq_len=512, targets_length=114)
    c.train.num_steps = 524288
    c.train.batch_size = 128
    c.train.log_every = 100
    c.checkpoint.save_every = 5000
    return c
