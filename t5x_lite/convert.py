"""Convert Hugging Face T5 / GPT-2 checkpoints to t5x_lite workdirs and back.

    # HF directory (config.json + model.safetensors or a sharded index) -> t5x_lite workdir
    python -m t5x_lite.convert --from_hf=/models/t5-v1_1-base --workdir=/tmp/t5_base
    python -m t5x_lite.convert --from_hf=/models/gpt2 --workdir=/tmp/gpt2 --scan_layers

    # t5x_lite workdir (or its checkpoints/ or a checkpoints/<step> dir) -> HF directory
    python -m t5x_lite.convert --to_hf --workdir=/tmp/t5_base --out=/tmp/t5_base_hf [--step=N]

The workdir gets `config.json` (a full run config, ready for `t5x_lite.train` fine-tuning),
a params-only checkpoint at step 0, `vocab.model` (from `spiece.model`, when present) and
`hf_config.json` (the source config, so `--to_hf` writes back its token ids and extras).
Errors (missing files, pickle checkpoints, unsupported models) print one line and exit 1.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import safetensors.numpy
from absl import app, flags
from etils import epath

from t5x_lite import checkpoints, cli, hf_interop
from t5x_lite.config import ConfigError, ModelConfig

HF_SOURCE_CONFIG = "hf_config.json"
InteropError = hf_interop.InteropError

# our mlp -> HF feed_forward_proj ('gelu_new' is the tanh GELU ours is)
_T5_MLPS_OUT = {"relu": "relu", "gated-gelu": "gated-gelu", "gated-silu": "gated-silu",
                "swiglu": "gated-silu", "gelu": "gelu_new"}


def write_hf_dir(path, hf_cfg: dict, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes config.json + model.safetensors (float32) that `from_pretrained` loads."""
    path = epath.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    # transformers rejects safetensors files without format metadata.
    blob = safetensors.numpy.save(data, metadata={"format": "pt"})
    (path / hf_interop.SAFETENSORS).write_bytes(blob)
    (path / hf_interop.HF_CONFIG).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))


def hf_config_from_model(cfg: ModelConfig, base: Mapping[str, Any] | None = None) -> dict:
    """config.json content for `cfg`; `base` (the source model's HF config) keeps token ids etc."""
    out = dict(base or {})
    if cfg.family == "t5" and _t5_exportable(cfg):
        ff = _T5_MLPS_OUT[cfg.mlp]
        for k in ("dense_act_fn", "is_gated_act"):  # derived by T5Config from feed_forward_proj
            out.pop(k, None)
        out.update(
            architectures=["T5ForConditionalGeneration"], model_type="t5",
            vocab_size=cfg.vocab_size, d_model=cfg.d_model, num_heads=cfg.num_heads,
            d_kv=cfg.head_dim, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
            num_decoder_layers=cfg.decoder_layers, feed_forward_proj=ff,
            layer_norm_epsilon=cfg.norm_eps, relative_attention_num_buckets=cfg.relative_buckets,
            relative_attention_max_distance=cfg.relative_max_distance,
            # 4.x reads tie_word_embeddings for both tying and scaling; 5.x reads
            # scale_decoder_outputs and unties when lm_head.weight is present and differs.
            tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.scale_logits,
            dropout_rate=cfg.dropout_rate, is_encoder_decoder=True, dtype="float32")
        out.setdefault("pad_token_id", 0)
        out.setdefault("eos_token_id", 1)
        out.setdefault("decoder_start_token_id", 0)
        return out
    if cfg.family == "gpt" and _gpt2_exportable(cfg):
        out.update(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
            n_embd=cfg.d_model, n_head=cfg.num_heads, n_layer=cfg.num_layers,
            n_positions=cfg.max_len, n_inner=cfg.d_ff, activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps, scale_attn_weights=cfg.attention_scale,
            scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=cfg.tie_embeddings,
            resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate,
            attn_pdrop=cfg.dropout_rate, dtype="float32")
        for k in ("bos_token_id", "eos_token_id"):  # GPT-2's 50256 only exists in its own vocab
            if not 0 <= out.get(k, -1) < cfg.vocab_size:
                out[k] = 1
        return out
    raise InteropError(f"No HF equivalent for this {cfg.family} config (mlp={cfg.mlp}, "
                       f"norm={cfg.norm}, position={cfg.position}, use_bias={cfg.use_bias}); "
                       "to_hf exports T5 v1.0/v1.1-style and GPT-2-style models")


def _t5_exportable(cfg: ModelConfig) -> bool:
    return (cfg.norm == "rms" and cfg.position == "relative" and not cfg.use_bias
            and not cfg.attention_scale and cfg.mlp in _T5_MLPS_OUT)


def _gpt2_exportable(cfg: ModelConfig) -> bool:
    return (cfg.norm == "layer" and cfg.position == "learned" and cfg.use_bias
            and cfg.mlp == "gelu" and cfg.num_heads * cfg.head_dim == cfg.d_model
            and not cfg.scale_logits)


def hf_to_workdir(hf_dir, workdir, *, scan_layers: bool = False) -> ModelConfig:
    """Writes the HF model in `hf_dir` as a t5x_lite workdir; returns its ModelConfig."""
    cfg, params, hf_cfg, vocab = hf_interop.from_hf(hf_dir, scan_layers=scan_layers)
    workdir = epath.Path(workdir)
    if checkpoints.all_steps(workdir):
        raise InteropError(f"{workdir} already holds checkpoints; convert into a new directory")
    checkpoints.write_config(workdir, hf_interop.run_config_for(cfg))
    (workdir / HF_SOURCE_CONFIG).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    if vocab is not None:
        (workdir / checkpoints.VOCAB_FILE).write_bytes(vocab.read_bytes())
    checkpoints.save_params(workdir, params, step=0)
    return cfg


def restore_numpy_params(workdir, step: int, cfg: ModelConfig):
    """The float32 params of one checkpoint as host (CPU) arrays, shape-checked first."""
    import flax.linen as nn
    import jax

    from t5x_lite.models import abstract_variables, build_model
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    shapes = nn.meta.unbox(abstract_variables(build_model(cfg)))["params"]
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), shapes)
    return checkpoints.restore_params(workdir, step, abstract)


def workdir_to_hf(path, out_dir, *, step: int | None = None) -> ModelConfig:
    """Writes the checkpoint at `path` (latest step unless `step`) as an HF directory."""
    workdir, latest = checkpoints.resolve(path)
    step = latest if step is None else step
    if step not in checkpoints.all_steps(workdir):
        raise checkpoints.CheckpointError(f"No checkpoint for step {step} in {workdir}; "
                                          f"available: {checkpoints.all_steps(workdir)}")
    cfg = ModelConfig.from_dict(checkpoints.read_config(workdir).model)
    source = epath.Path(workdir) / HF_SOURCE_CONFIG
    base = json.loads(source.read_text()) if source.exists() else None
    if base and base.get("model_type") != {"t5": "t5", "gpt": "gpt2"}.get(cfg.family):
        base = None
    hf_cfg = hf_config_from_model(cfg, base)  # fails fast on unexportable models
    params = restore_numpy_params(workdir, step, cfg)
    write_hf_dir(out_dir, hf_cfg, hf_interop.params_to_hf(cfg, params))
    vocab = epath.Path(workdir) / checkpoints.VOCAB_FILE
    if vocab.exists() and cfg.family == "t5":
        (epath.Path(out_dir) / hf_interop.HF_VOCAB).write_bytes(vocab.read_bytes())
    return cfg


FLAGS = flags.FLAGS


def _define_flags():
    """The CLI's flags, defined only when run as a program, so that importing this module (for
    `hf_config_from_model` etc.) leaves the importer's absl flags alone."""
    flags.DEFINE_string("from_hf", None, "HF model directory to convert into --workdir.")
    flags.DEFINE_bool("to_hf", False, "Convert --workdir into an HF directory at --out.")
    flags.DEFINE_string("workdir", None, "t5x_lite workdir: output of --from_hf, input of "
                        "--to_hf (also a checkpoints/ or checkpoints/<step> directory).")
    flags.DEFINE_string("out", None, "Output HF directory for --to_hf.")
    flags.DEFINE_bool("scan_layers", False, "--from_hf: store layers scanned (layers/block/...).")
    flags.DEFINE_integer("step", None, "--to_hf: checkpoint step (default: latest).")


def _run() -> str:
    if bool(FLAGS.from_hf) == FLAGS.to_hf:
        raise ConfigError("give exactly one of --from_hf=DIR or --to_hf")
    if not FLAGS.workdir:
        raise ConfigError("--workdir is required")
    if FLAGS.from_hf:
        cfg = hf_to_workdir(FLAGS.from_hf, FLAGS.workdir, scan_layers=FLAGS.scan_layers)
        return f"wrote t5x_lite workdir {FLAGS.workdir} ({cfg.family}, vocab {cfg.vocab_size})"
    if not FLAGS.out:
        raise ConfigError("--to_hf needs --out=DIR")
    cfg = workdir_to_hf(FLAGS.workdir, FLAGS.out, step=FLAGS.step)
    return f"wrote HF directory {FLAGS.out} ({cfg.family}, vocab {cfg.vocab_size})"


def main(argv):
    try:
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {argv[1:]}")
        print(_run())
    except cli.ERRORS as e:
        cli.exit_with("convert", e)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.flags_parser("convert"))
