"""Run configs for fine-tuning recipes (used by configs/finetune_*.py).

    --config=configs/finetune_t5_seq2seq.py:init_from=/tmp/t5_base,train=/d/a.tsv,validation=/d/b.tsv

The argument string is `key=value` pairs joined by commas (big_vision style; use globs rather
than commas for several files). With `init_from` (a t5x_lite workdir, its checkpoints/ dir or
one checkpoints/<step> dir -- ours, or one written by `t5x_lite.convert --from_hf`), the model
section, vocabulary and `data.extra_ids` are taken from that run's config.json / vocab.model, so
the shapes match by construction, and `train.init_from` restores its params only (fresh
optimizer, step 0). Without it, the family's tiny preset trains from scratch (smoke tests).
"""
from __future__ import annotations

from typing import Any

import ml_collections
from etils import epath

from t5x_lite import checkpoints
from t5x_lite import config as model_config
from t5x_lite.defaults import base_config
from t5x_lite.errors import UserError

ARGS = {
    "init_from": "",  # checkpoint to start from (params only)
    "train": "",  # TSV / JSONL glob(s) of the train split
    "validation": "",  # same for the eval split; "" = a 5% content-hash holdout of `train`
    "format": "",  # tsv | jsonl; "" = from the file extension
    "steps": 2000,
    "batch": 32,
    "lr": 0.0,  # 0 = the recipe's default
    "inputs_length": 0,  # 0 = the recipe's default (T5 encoder / GPT row length)
    "targets_length": 0,  # T5 only
    "save_every": 500,
}


class FinetuneConfigError(UserError):
    """A bad config argument string (one line)."""


def parse_arg(arg: str, *, generic: bool = True, **recipe_defaults) -> dict[str, Any]:
    """`k=v,k=v` -> dict typed like ARGS (plus recipe defaults); unknown keys are an error.
    `generic=False` (recipes that are not `build`'s fine-tuning): only the recipe's own keys,
    so a generic key such as `train=` or `batch=` is refused rather than silently ignored."""
    defaults = {**(ARGS if generic else {}), **recipe_defaults}
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise FinetuneConfigError(f"bad config argument {item!r}; known keys: "
                                      f"{', '.join(sorted(defaults))}")
        kind = type(defaults[key])
        try:
            out[key] = kind(value)
        except ValueError:
            raise FinetuneConfigError(f"config argument {key} must be {kind.__name__}, got "
                                      f"{value!r}") from None
    return out


def take_model_and_vocabulary(c: ml_collections.ConfigDict, source: str) -> None:
    """`c`'s model section, vocabulary and `data.extra_ids` become those of the run at `source`
    (a workdir, or one of its checkpoints), so that its params' shapes and ids fit: what the
    LoRA and pruning recipes start from."""
    workdir, run = _source_run(source)
    c.model = ml_collections.ConfigDict(run.model.to_dict())
    c.data.extra_ids = int(run.get("data", {}).get("extra_ids", 100))
    vocab = epath.Path(workdir) / checkpoints.VOCAB_FILE
    if vocab.exists():
        c.data.vocab_path = str(vocab)


def _source_run(init_from: str) -> tuple[str, ml_collections.ConfigDict]:
    workdir, _ = checkpoints.resolve(init_from)
    return str(workdir), checkpoints.read_config(workdir)


def _format_of(path: str) -> str:
    return "jsonl" if path.lower().endswith(".jsonl") else "tsv"


def build(arg: str, *, family: str, objective: str, inputs_length: int, targets_length: int = 0,
          lr: float, optimizer: str) -> ml_collections.ConfigDict:
    """The full run config of one recipe. See the module docstring for `arg`."""
    a = parse_arg(arg)
    if not a["train"] and (a["validation"] or a["format"]):  # they only describe train's data
        raise FinetuneConfigError(
            f"{'validation' if a['validation'] else 'format'}= needs train= (the training "
            "pairs); without train= the recipe reads data.* from the command line")
    if family != "t5" and a["targets_length"]:
        raise FinetuneConfigError(
            f"targets_length={a['targets_length']} is for T5 recipes; a {family} row is "
            "inputs_length tokens (prompt + completion)")
    inputs_length = a["inputs_length"] or inputs_length
    targets_length = a["targets_length"] or targets_length or inputs_length
    if a["init_from"]:
        _, src = _source_run(a["init_from"])
        model = model_config.ModelConfig.from_dict(src.model)
        if model.family != family:
            raise FinetuneConfigError(f"init_from={a['init_from']} is a {model.family!r} model; "
                                      f"this recipe fine-tunes {family!r} models")
    else:
        src = None
        tiny = dict(vocab_size=8192, d_model=128, num_heads=4, head_dim=32, num_layers=2,
                    dtype="float32")
        model = (model_config.t5_1_1(d_ff=256, num_decoder_layers=2, **tiny) if family == "t5"
                 else model_config.gpt2(d_ff=512, max_len=max(256, inputs_length), **tiny))
    if family == "gpt" and model.position == "learned" and inputs_length > model.max_len:
        if a["inputs_length"]:
            raise FinetuneConfigError(
                f"inputs_length={a['inputs_length']} is longer than the model's learned "
                f"positions (max_len={model.max_len})")
        inputs_length = model.max_len  # the recipe's default shortened to the positions
    c = base_config(model, objective=objective, seq_len=inputs_length,
                    targets_length=targets_length)
    if src is not None:
        # The saved shapes, a setting older versions ignored read as what they built
        c.model = ml_collections.ConfigDict(model.to_dict())
        c.data.extra_ids = int(src.get("data", {}).get("extra_ids", 100))
        c.data.data_dir = src.get("data", {}).get("data_dir", "")
        vocab = checkpoints.resolve(a["init_from"])[0] / checkpoints.VOCAB_FILE
        c.data.vocab_path = str(vocab) if vocab.exists() else src.get("data", {}).get(
            "vocab_path", "")
        if not c.data.vocab_path:  # the default vocabulary would be another model's ids
            raise FinetuneConfigError(
                f"init_from={a['init_from']} has no {checkpoints.VOCAB_FILE}: the recipes "
                "tokenize with the model's T5-convention sentencepiece vocabulary (an HF "
                "tokenizer.json cannot be used; a converted T5 needs its spiece.model)")
        if src.get("mesh", {}).get("rules") is not None:
            c.mesh.rules = src.mesh.rules
    c.train.init_from = a["init_from"]
    c.train.num_steps = a["steps"]
    c.train.batch_size = a["batch"]
    c.train.log_every = 50
    c.train.eval_every = 0  # continuous eval: `python -m t5x_lite.evaluate --follow`
    c.checkpoint.save_every = a["save_every"]
    c.checkpoint.keep = 0  # keep all: `evaluate --checkpoint=all` picks the best afterwards
    c.optimizer.name = optimizer
    c.optimizer.learning_rate = a["lr"] or lr
    if optimizer == "adafactor":  # T5 fine-tuning: constant 1e-3, no warmup
        c.optimizer.schedule = "constant"
        c.optimizer.warmup_steps = 0
    else:
        c.optimizer.schedule = "cosine"
        c.optimizer.warmup_steps = min(100, max(a["steps"] // 10, 1))
        c.optimizer.weight_decay = 0.01
    # Every data key the recipes use exists, so `--config.data.x=...` works with locked configs.
    c.data.paths, c.data.train_paths, c.data.validation_paths = (), (), ()
    c.data.extra_ids = c.data.get("extra_ids", 100)
    if a["train"]:
        fmt = a["format"] or _format_of(a["train"])
        if a["validation"] and not a["format"] and _format_of(a["validation"]) != fmt:
            raise FinetuneConfigError(
                f"train={a['train']} reads as {fmt} but validation={a['validation']} as "
                f"{_format_of(a['validation'])}; both splits need one format (format=tsv|jsonl "
                "to name it)")
        c.data.source = fmt
        if a["validation"]:
            c.data.train_paths = (a["train"],)
            c.data.validation_paths = (a["validation"],)
        else:
            c.data.paths = (a["train"],)
    c.data.objective = objective
    c.decode.method = "greedy"
    # GPT: completions keep at least half the row; more new tokens than that would leave a
    # model with a short max_len (rows = max_len) no room for the prompt when evaluating.
    c.decode.max_new_tokens = targets_length if family == "t5" else min(
        64, max(inputs_length // 2, 1))
    return c
