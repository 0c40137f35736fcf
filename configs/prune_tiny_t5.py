r"""Magnitude-prune a tiny T5 checkpoint (configs/tiny_t5.py) and fine-tune it with the masks.

    python -m t5x_lite.train --config=configs/tiny_t5.py --workdir=/tmp/tiny_t5
    python -m t5x_lite.train --workdir=/tmp/pruned \
        --config=configs/prune_tiny_t5.py:init_from=/tmp/tiny_t5,sparsity=0.5

Config args (`:k=v,k=v`): init_from (the checkpoint to prune; empty = prune while training from
scratch), sparsity (0.5), structure (unstructured | heads | mlp_units), scope (global | layer),
schedule (one_shot | polynomial: from initial_sparsity at begin_step to sparsity at end_step,
masks updated every `frequency` steps), steps (100), lr (1e-3). Masks live in the optimizer
state (checkpointed); pruned weights are exactly zero in every checkpoint. Measured sparsity vs
eval loss: README.md.
"""
import dataclasses

from t5x_lite import pruning
from t5x_lite import config as model_config
from t5x_lite.defaults import base_config
from t5x_lite.finetune_config import parse_arg, take_model_and_vocabulary


def get_config(arg: str = ""):
    a = parse_arg(arg, generic=False, init_from="", sparsity=0.5, structure="unstructured",
                  scope="global", schedule="one_shot", initial_sparsity=0.0, begin_step=0,
                  end_step=0, frequency=10, steps=100, lr=1e-3, save_every=100)
    model = model_config.t5_1_1(vocab_size=8192, d_model=128, num_heads=4, head_dim=32, d_ff=256,
                                num_layers=2, num_decoder_layers=2, dtype="float32")
    c = base_config(model, objective="span_corruption", seq_len=128, targets_length=32)
    c.train.init_from = a["init_from"]
    c.train.num_steps = a["steps"]
    c.train.batch_size = 16
    c.train.log_every = 25
    c.train.eval_every = a["steps"]
    c.train.eval_batches = 4
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = a["lr"]
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.checkpoint.save_every = a["save_every"]
    if a["init_from"]:  # the model and vocabulary of the checkpoint, so the shapes match
        take_model_and_vocabulary(c, a["init_from"])
    # Every prune key (power, targets too), so any can be set with --config.prune.<key>=...
    c.prune = dataclasses.asdict(pruning.PruneConfig(
        sparsity=a["sparsity"], structure=a["structure"], scope=a["scope"],
        schedule=a["schedule"], initial_sparsity=a["initial_sparsity"],
        begin_step=a["begin_step"], end_step=a["end_step"], frequency=a["frequency"]))
    return c
