"""~1.06B-parameter modern decoder-only model (RoPE, RMSNorm, SwiGLU), bf16, FSDP.

    python -m t5x_lite.train --config=configs/gpt_1b.py --workdir=gs://BUCKET/gpt_1b \
        --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 \
        --config.data.data_dir=gs://BUCKET/tfds --config.data.vocab_path=gs://BUCKET/spiece.model \
        --config.mesh.data=1 --config.mesh.fsdp=-1
"""
from t5x_lite import config as model_config
from t5x_lite.defaults import base_config


def get_config():
    model = model_config.gpt_modern(vocab_size=32128, d_model=2048, num_heads=16, head_dim=128,
                                    d_ff=5632, num_layers=18, max_len=2048, dtype="bfloat16",
                                    scan_layers=True, remat="dots_no_batch")
    c = base_config(model, objective="causal_lm", seq_len=2048)
    c.train.num_steps = 50000
    c.train.batch_size = 512
    c.train.log_every = 50
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 2000
    c.optimizer.weight_decay = 0.1
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.checkpoint.save_every = 1000
    return c
