r"""LoRA fine-tuning of a tiny T5 checkpoint (configs/tiny_t5.py) on the offline default corpus.

    python -m t5x_lite.train --config=configs/tiny_t5.py --workdir=/tmp/tiny_t5      # the base
    python -m t5x_lite.train --config=configs/lora_tiny_t5.py:base=/tmp/tiny_t5 \
        --workdir=/tmp/lora_tiny_t5
    python -m t5x_lite.lora --workdir=/tmp/lora_tiny_t5 --output=/tmp/lora_merged   # optional

Config args (`:k=v,k=v`): base (required), rank (8), alpha (16), targets ('query|value'),
dropout (0), steps (200), lr (1e-3). The model section must match the base (checked). Only the
adapters are trained and checkpointed; `t5x_lite.load` / evaluate / infer merge them into the
base on load, at the base step the run started from (`lora.base_step`, recorded in the run's
config.json at the first start). Measured numbers: README.md.
"""
from t5x_lite import config as model_config
from t5x_lite.defaults import base_config
from t5x_lite.finetune_config import parse_arg, take_model_and_vocabulary


def get_config(arg: str = ""):
    a = parse_arg(arg, generic=False, base="", rank=8, alpha=16.0, targets="query|value",
                  dropout=0.0, steps=200, lr=1e-3, save_every=100)
    model = model_config.t5_1_1(vocab_size=8192, d_model=128, num_heads=4, head_dim=32, d_ff=256,
                                num_layers=2, num_decoder_layers=2, dtype="float32")
    c = base_config(model, objective="span_corruption", seq_len=128, targets_length=32)
    c.train.num_steps = a["steps"]
    c.train.batch_size = 16
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = a["lr"]
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.checkpoint.save_every = a["save_every"]
    if a["base"]:  # the model and vocabulary of the checkpoint, so the shapes match
        take_model_and_vocabulary(c, a["base"])
    c.lora = dict(base=a["base"], base_step=-1, rank=a["rank"], alpha=a["alpha"],
                  targets=a["targets"], dropout=a["dropout"])
    return c
