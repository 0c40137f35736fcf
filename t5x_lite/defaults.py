"""The full run configuration every `configs/*.py` starts from.

`configs/<preset>.py:get_config()` calls `base_config(model_config, ...)` and overrides what it
needs; command-line flags (`--config.train.num_steps=...`) override the rest.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from t5x_lite.config import ModelConfig
from t5x_lite.data.config import DataConfig


def _model_section(model: ModelConfig) -> ml_collections.ConfigDict:
    """The model's fields; one left None (e.g. T5's num_decoder_layers: = num_layers) is a typed
    placeholder, so `--config.model.<key>=...` can still set it on the locked config."""
    kinds = {"int | None": int, "str | None": str}
    return ml_collections.ConfigDict({
        f.name: ml_collections.config_dict.placeholder(kinds[f.type])
        if getattr(model, f.name) is None else getattr(model, f.name)
        for f in dataclasses.fields(model)})


def base_config(model: ModelConfig, *, objective: str, seq_len: int = 512,
                targets_length: int = 114) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = _model_section(model)

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 32  # global, across all processes
    c.train.microbatches = 1  # gradient accumulation steps per batch
    c.train.log_every = 10
    c.train.eval_every = 0  # 0 = no in-loop eval
    c.train.eval_batches = 8
    c.train.z_loss = 1e-4
    c.train.label_smoothing = 0.0
    c.train.loss_normalizer = "tokens"  # 'tokens' or a number (T5X loss_normalizing_factor)
    c.train.init_from = ""  # params-only init from a checkpoint (fine-tuning)
    c.train.peak_flops = 0.0  # per device; 0 = look up the device kind
    c.train.debug = False

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adafactor"  # 'adafactor' (T5 defaults) or 'adamw'
    c.optimizer.learning_rate = 0.01  # adafactor: used only with schedule='constant'
    c.optimizer.schedule = "rsqrt"  # adafactor: 1/sqrt(max(step, warmup)); adamw: cosine|linear|constant
    c.optimizer.warmup_steps = 10000
    c.optimizer.decay_steps = 0  # 0 = train.num_steps
    c.optimizer.end_lr_fraction = 0.1
    c.optimizer.weight_decay = 0.0  # never on norms / biases; embeddings: next key
    c.optimizer.weight_decay_embeddings = False
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    # Global-norm gradient clipping; 0 = off; None = the optimizer's default (`optimizers.
    # grad_clip`: off for adafactor, as T5X, 1.0 for adamw), pinned in the run's config.json.
    c.optimizer.grad_clip = ml_collections.config_dict.placeholder(float)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = ml_collections.config_dict.placeholder(tuple)  # None = partitioning defaults

    # Every data key with its default, so that any of them can be set on the command line
    # (`--config.data.source=jsonl --config.data.paths=/data/train.jsonl`; a locked config
    # rejects keys it lacks). Not type-safe: DataConfig types the section, and paths may be a
    # tuple, a list or a comma-separated string.
    c.data = ml_collections.ConfigDict(dataclasses.asdict(DataConfig(
        objective=objective, inputs_length=seq_len, targets_length=targets_length,
        seq_len=seq_len)), type_safe=False)

    c.decode = ml_collections.ConfigDict()
    c.decode.method = "greedy"
    c.decode.max_new_tokens = 64
    c.decode.temperature = 1.0
    c.decode.top_k = 0
    c.decode.top_p = 1.0
    c.decode.min_p = 0.0  # HF's min-p filter, after top-p (0.0 = off)
    c.decode.typical_p = 1.0  # HF's typical-p filter, after min-p (1.0 = off)
    c.decode.epsilon_cutoff = 0.0  # HF's epsilon cutoff, after typical-p (0.0 = off)
    c.decode.eta_cutoff = 0.0  # HF's eta cutoff, after epsilon (0.0 = off)
    c.decode.num_beams = 4
    c.decode.alpha = 0.6  # T5's length penalty ((5 + len) / 6) ** alpha (beam_rule "t5")
    # Beam search rule: "t5" (T5X's) or "hf" (HF generate's: sum log p / len ** length_penalty,
    # early_stopping "false" | "true" | "never", as HF's False / True / "never")
    c.decode.beam_rule = "t5"
    c.decode.length_penalty = 1.0
    c.decode.early_stopping = "false"
    c.decode.num_samples = 1
    c.decode.seed = 0
    c.decode.batch_size = 16
    c.decode.num_draft = 4  # speculative decoding (infer --draft): draft tokens per target pass
    # HF's prompt lookup decoding (GPT): proposals copied from the row itself (0 = off)
    c.decode.prompt_lookup_num_tokens = 0
    c.decode.max_matching_ngram_size = 2  # the longest n-gram it looks up
    c.decode.stop_ids = ""  # ids that end a row, e.g. "13,198" ("": the model's stop ids)
    # HF's stop strings: a row ends at the token completing one; a JSON list ("" = none)
    c.decode.stop_strings = ""  # e.g. the JSON text ["\n\n", "Q:"]
    c.decode.repetition_penalty = 1.0  # HF's penalty on ids already in a row (1.0 = off)
    c.decode.no_repeat_ngram_size = 0  # no n-gram of this size twice in a row (0 = off)
    c.decode.min_new_tokens = 0  # no stop id before this many new tokens (0 = off)
    # HF's sequence processors of these names ("" = off): JSON [[ids, bias], ...] and
    # [[ids], ...]; comma-separated ids.
    c.decode.sequence_bias = ""  # e.g. '[[[5, 6], -2.0], [[7], 1.5]]'
    c.decode.bad_words_ids = ""  # e.g. '[[5, 6], [7]]'
    c.decode.suppress_tokens = ""  # e.g. "5,6": never generated
    c.decode.begin_suppress_tokens = ""  # not generated first
    return c
