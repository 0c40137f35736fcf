r"""Distil a tiny T5 teacher (configs/tiny_t5.py, 2.89M params) into a smaller student.

    python -m t5x_lite.train --config=configs/tiny_t5.py --workdir=/tmp/tiny_t5      # teacher
    python -m t5x_lite.train --config=configs/distill_tiny_t5.py:teacher=/tmp/tiny_t5 \
        --workdir=/tmp/student

Student: d_model 64, d_ff 128, 1+1 layers (same vocabulary). Loss = label_weight * CE +
kl_weight * T^2 * KL(teacher || student) at temperature T. Config args (`:k=v,k=v`): teacher
(required), temperature (2), kl_weight (0.5), label_weight (0.5), steps (300), lr (3e-3),
sparsity (0 = no pruning; > 0 also prunes the student by magnitude, one-shot). Measured
numbers: README.md.
"""
from t5x_lite import config as model_config
from t5x_lite.defaults import base_config
from t5x_lite.finetune_config import parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, generic=False, teacher="", temperature=2.0, kl_weight=0.5,
                  label_weight=0.5, steps=300, lr=3e-3, sparsity=0.0, save_every=100)
    model = model_config.t5_1_1(vocab_size=8192, d_model=64, num_heads=2, head_dim=32, d_ff=128,
                                num_layers=1, num_decoder_layers=1, dtype="float32")
    c = base_config(model, objective="span_corruption", seq_len=128, targets_length=32)
    c.train.num_steps = a["steps"]
    c.train.batch_size = 16
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = a["lr"]
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 30
    c.checkpoint.save_every = a["save_every"]
    c.distill = dict(teacher=a["teacher"], teacher_step=-1, temperature=a["temperature"],
                     kl_weight=a["kl_weight"], label_weight=a["label_weight"])
    if a["sparsity"] > 0:
        c.prune = dict(sparsity=a["sparsity"])
    return c
