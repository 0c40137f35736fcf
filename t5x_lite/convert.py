"""Convert Hugging Face T5 / GPT-2 / Llama / Mistral / Qwen2 checkpoints to t5x_lite workdirs and
back.

    # HF directory (config.json + model.safetensors or a sharded index) -> t5x_lite workdir
    python -m t5x_lite.convert --from_hf=/models/t5-v1_1-base --workdir=/tmp/t5_base
    python -m t5x_lite.convert --from_hf=/models/gpt2 --workdir=/tmp/gpt2 --scan_layers

    # t5x_lite workdir (or its checkpoints/ or a checkpoints/<step> dir) -> HF directory
    python -m t5x_lite.convert --to_hf --workdir=/tmp/t5_base --out=/tmp/t5_base_hf [--step=N]

The workdir gets `config.json` (a full run config, ready for `t5x_lite.train` fine-tuning),
a params-only checkpoint at step 0, the vocabulary when present (`vocab.model` from T5's
`spiece.model` or Llama / Mistral's `tokenizer.model`, else a decoder-only model's
`tokenizer.json`; its `tokenizer_config.json` as `hf_tokenizer_config.json`) and
`hf_config.json` (the source config, so `--to_hf` writes back its token ids and extras). The HF
directory gets `config.json`, `model.safetensors` and the vocabulary in HF form (T5's
`spiece.model`; `tokenizer.model` or `tokenizer.json`, with `tokenizer_config.json`);
re-exporting into an earlier export (or any HF directory whose weights are one
`model.safetensors`) replaces those files, removes another model's tokenizer files and leaves
the rest. Refused, before anything is written: `--out` being the workdir, inside its
`checkpoints/` or any t5x_lite workdir; an `--out` holding another model's weights in other
files (shards, pickles) or a `config.json` that is no HF config; `--from_hf` into an HF directory (its own included) or a workdir with checkpoints
or another model's `vocab.model`, and an HF model whose vocabulary has more ids than it has
embedding rows.
Errors (missing or malformed files, pickle checkpoints, unsupported models) print one line
and exit 1.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import safetensors.numpy
from absl import app, flags, logging
from etils import epath

from t5x_lite import checkpoints, cli, files, hf_interop, layers
from t5x_lite.config import ConfigError, ModelConfig
from t5x_lite import vocab as vocab_lib
from t5x_lite.vocab import EOS_ID

HF_SOURCE_CONFIG = hf_interop.HF_SOURCE_CONFIG
InteropError = hf_interop.InteropError

# our mlp -> HF feed_forward_proj ('gelu_new' is the tanh GELU ours is), unless the source
# config names an equivalent (`_activation`)
_T5_MLPS_OUT = {"relu": "relu", "gated-gelu": "gated-gelu", "gated-silu": "gated-silu",
                "swiglu": "gated-silu", "gelu": "gelu_new"}


# Weight files of an HF directory other than the one model.safetensors `--to_hf` writes: a
# directory holding any of them would hold two models after an export.
_OTHER_WEIGHTS = (hf_interop.SAFETENSORS_INDEX, "tf_model.h5", "flax_model.msgpack")


class ConvertError(InteropError):
    """A --workdir / --out that convert must not write into (one line)."""


def check_writable_dir(path, flag: str) -> epath.Path:
    """`path` as a directory to write into: neither it nor its nearest existing ancestor may be
    a file (mkdir would report a bare '[Errno 17] File exists' / '[Errno 20] Not a directory')."""
    path = epath.Path(path)
    if path.exists() and not path.is_dir():
        raise ConvertError(f"{flag} {path} is a file, not a directory")
    blocking = files.file_in_the_way(path)
    if blocking:
        raise ConvertError(f"{flag} {path}: its parent {blocking} is a file, not a directory")
    return path


def _config_json(directory: epath.Path) -> dict | None:
    """The config.json of `directory` as a dict, {} when it is not a JSON object, None when
    there is none."""
    path = directory / hf_interop.HF_CONFIG
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_workdir(directory: epath.Path) -> bool:
    """A t5x_lite workdir: checkpoints/, or a run config.json (one with a `model` section)."""
    config = _config_json(directory)
    return ((directory / checkpoints.CHECKPOINT_DIR).exists()
            or (config is not None and isinstance(config.get("model"), dict)))


def check_hf_out(out, workdir) -> None:
    """Refuses an --out that writing an HF directory into would break or mix up. An HF model
    whose weights are one model.safetensors (an earlier export: a re-run) is fine: the export
    replaces its config.json and model.safetensors."""
    out = check_writable_dir(out, "--out")
    target, work = files.real(out), files.real(workdir)
    if target == work:
        raise ConvertError(f"--out {out} is the workdir itself, which the HF config.json would "
                           "break; give the HF directory a path of its own")
    ckpts = work / checkpoints.CHECKPOINT_DIR
    if target == ckpts or ckpts in target.parents:
        raise ConvertError(f"--out {out} is inside the workdir's {checkpoints.CHECKPOINT_DIR}/; "
                           "give the HF directory a path of its own")
    if not out.exists():
        return
    if _is_workdir(out):
        raise ConvertError(f"--out {out} is a t5x_lite workdir, which the HF config.json would "
                           "break; give the HF directory a path of its own")
    others = sorted(p.name for p in out.iterdir() if p.is_file() and (
        p.name in _OTHER_WEIGHTS or p.name.endswith(hf_interop.PICKLE_SUFFIXES)
        or (p.name.startswith("model-") and p.name.endswith(".safetensors"))))
    if others:
        raise ConvertError(f"--out {out} holds another model's weights ({', '.join(others[:3])})"
                           "; export into a new or empty directory (or an earlier --to_hf "
                           "export, which is replaced)")
    config = _config_json(out)
    if config is not None and "model_type" not in config:
        raise ConvertError(f"--out {out} holds a {hf_interop.HF_CONFIG} that is not a Hugging "
                           "Face model config; export into a new or empty directory")


def write_hf_dir(path, hf_cfg: dict, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes config.json + model.safetensors (float32) that `from_pretrained` loads."""
    path = epath.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    # transformers rejects safetensors files without format metadata.
    blob = safetensors.numpy.save(data, metadata={"format": "pt"})
    files.write_atomic(path / hf_interop.SAFETENSORS, blob)  # a re-export replaces both
    files.write_atomic(path / hf_interop.HF_CONFIG, json.dumps(hf_cfg, indent=2, sort_keys=True))


def hf_config_from_model(cfg: ModelConfig, base: Mapping[str, Any] | None = None, *,
                         eos_id: int = EOS_ID) -> dict:
    """config.json content for `cfg`; `base` (the source model's HF config) keeps token ids etc.

    `eos_id` is the EOS of the weights (`api.checkpoint_eos`), so that HF `generate` stops
    where `t5x_lite.load` does: `eos_token_id` is the base's only when it names that id (an
    id, or a list of ids within the vocabulary that begins with it), else `eos_id`.
    """
    out = dict(base or {})
    if cfg.dropout_broadcast and cfg.dropout_rate > 0:
        logging.warning("HF has no dropout masks shared along the sequence "
                        "(model.dropout_broadcast): a model trained from this export draws "
                        "them per element at dropout_rate=%g", cfg.dropout_rate)
    # HF reads an alias (num_attention_heads, ...) over the field it sets: the base's would
    # override the fields written below.
    for alias in {a for aliases in hf_interop.HF_ALIASES.values() for a in aliases}:
        out.pop(alias, None)
    # The weights are float32 (`dtype` below); transformers 4.x reads a source's stale
    # `torch_dtype` (e.g. bfloat16) instead and would cast them on `torch_dtype="auto"`.
    out.pop("torch_dtype", None)
    if cfg.family == "t5" and _t5_exportable(cfg):
        ff = _activation(out.get("feed_forward_proj"), hf_interop.T5_MLPS, cfg.mlp,
                         _T5_MLPS_OUT[cfg.mlp])
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
        return _with_token_ids(out, cfg, eos_id, pad_token_id=0, decoder_start_token_id=0)
    if cfg.family == "gpt" and _gpt2_exportable(cfg):
        out.update(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
            n_embd=cfg.d_model, n_head=cfg.num_heads, n_layer=cfg.num_layers,
            n_positions=cfg.max_len, n_inner=cfg.d_ff, activation_function=_activation(
                out.get("activation_function"), hf_interop.GPT2_ACTIVATIONS, cfg.mlp, "gelu_new"),
            layer_norm_epsilon=cfg.norm_eps, scale_attn_weights=cfg.attention_scale,
            scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=cfg.tie_embeddings,
            dtype="float32", **_gpt2_dropouts(out, cfg.dropout_rate))
        # GPT-2's 50256 only exists in its own vocabulary
        return _with_token_ids(out, cfg, eos_id, bos_token_id=1)
    if hf_interop.is_llama(cfg):
        out.pop("rope_scaling", None)  # rope_parameters below says what RoPE this is
        rope = {"rope_type": {v: k for k, v in hf_interop.ROPE_TYPES.items()}[cfg.rope_scaling],
                "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling != "none":
            rope["factor"] = cfg.rope_scaling_factor
        if cfg.rope_scaling == "llama3":
            rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                        high_freq_factor=cfg.rope_high_freq_factor,
                        original_max_position_embeddings=cfg.rope_original_max_len)
        if cfg.rope_scaling == "yarn":
            rope.update(original_max_position_embeddings=cfg.rope_original_max_len,
                        beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
                        attention_factor=layers.rope_attention_scale(cfg),
                        truncate=cfg.rope_truncate)
        # Qwen2 is Llama with q / k / v biases, Mistral Llama with a sliding window (HF's Llama
        # has none); the keys of the source's model type that this one does not have go
        w, kind = cfg.sliding_window, hf_interop.hf_model_type(cfg)
        # (a top-level original_max_position_embeddings would override rope_parameters' in HF)
        for key in ("attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
                    "max_window_layers", "layer_types", "original_max_position_embeddings"):
            out.pop(key, None)
        out.update({
            "llama": dict(attention_bias=False, mlp_bias=False),
            "mistral": dict(sliding_window=w),
            "qwen2": dict(use_sliding_window=w is not None, sliding_window=w, max_window_layers=0,
                          layer_types=[("full_attention" if w is None else "sliding_attention")]
                          * cfg.num_layers)}[kind])
        out.update(
            architectures=[hf_interop.LLAMA_ARCHITECTURES[kind]], model_type=kind,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_len,
            rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            rope_theta=cfg.rope_theta,  # transformers 4.x; 5.x reads rope_parameters
            rope_parameters=rope,
            # transformers 4.x (>= 4.43 for llama3) reads scaling from here, theta top-level;
            # 5.x reads it first, the rope_parameters' theta with it
            rope_scaling=None if cfg.rope_scaling == "none" else {
                k: v for k, v in rope.items() if k != "rope_theta"},
            dtype="float32")
        return _with_token_ids(out, cfg, eos_id, bos_token_id=1)
    raise InteropError(f"No HF equivalent for this {cfg.family} config (mlp={cfg.mlp}, "
                       f"norm={cfg.norm}, position={cfg.position}, use_bias={cfg.use_bias}"
                       + (f", num_kv_heads={cfg.num_kv_heads}" if cfg.num_kv_heads else "")
                       + (f", sliding_window={cfg.sliding_window}" if cfg.sliding_window else "")
                       + "); to_hf exports T5 v1.0/v1.1-style, GPT-2-style and Llama-style "
                       "(gpt_modern; Mistral with a sliding window, Qwen2 with qkv_bias) models")


def _activation(source, names: Mapping[str, str], ours: str, default: str) -> str:
    """The source config's activation name when `names` maps it to our mlp `ours` (so a round
    trip writes back e.g. GPT-2's 'gelu_pytorch_tanh'), else `default`."""
    return source if isinstance(source, str) and names.get(source) == ours else default


def _gpt2_dropouts(source: Mapping[str, Any], rate: float) -> dict:
    """GPT-2's three dropout rates for our one: the source's own three while its resid_pdrop
    (the one an import reads) is still ours, so a round trip keeps e.g. attn_pdrop=0.0;
    otherwise `rate` for all three."""
    keys = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
    if source.get("resid_pdrop") == rate and all(hf_interop.is_rate(source.get(k)) for k in keys):
        return {k: source[k] for k in keys}
    return dict.fromkeys(keys, rate)


def _with_token_ids(out: dict, cfg: ModelConfig, eos_id: int, **defaults: int) -> dict:
    """`out` whose token id fields are valid for cfg's vocabulary: the source's value when it is
    null (no such token), an id below vocab_size or a non-empty list of them (HF allows a list
    eos_token_id); otherwise the default. `eos_token_id` is the source's only when it is valid
    and names `eos_id` (first, in a list), else `eos_id`."""
    def valid_ids(value):
        ids = value if isinstance(value, list) else [value]
        ok = ids and all(hf_interop.is_int(i) and 0 <= i < cfg.vocab_size for i in ids)
        return ids if ok else None

    for key, default in defaults.items():
        value = out.get(key, -1)
        if value is not None and valid_ids(value) is None:
            out[key] = default
    if (valid_ids(out.get("eos_token_id")) or [None])[0] != eos_id:
        out["eos_token_id"] = eos_id
    return out


def _t5_exportable(cfg: ModelConfig) -> bool:
    return (cfg.norm == "rms" and cfg.position == "relative" and not cfg.has_qkv_bias
            and not cfg.attention_scale and cfg.mlp in _T5_MLPS_OUT)


def _gpt2_exportable(cfg: ModelConfig) -> bool:
    return (cfg.norm == "layer" and cfg.position == "learned" and cfg.use_bias
            and cfg.mlp == "gelu" and cfg.num_heads * cfg.head_dim == cfg.d_model
            and not cfg.scale_logits and cfg.kv_heads == cfg.num_heads
            and cfg.sliding_window is None)


def hf_to_workdir(hf_dir, workdir, *, scan_layers: bool = False) -> ModelConfig:
    """Writes the HF model in `hf_dir` as a t5x_lite workdir; returns its ModelConfig."""
    from t5x_lite import api  # imported on use: the loader pulls in much more than this module

    workdir = check_writable_dir(workdir, "--workdir")
    if files.real(workdir) == files.real(hf_dir):
        raise ConvertError(f"--workdir {workdir} is the --from_hf directory; convert into a new "
                           "directory")
    if checkpoints.all_steps(workdir):
        raise InteropError(f"{workdir} already holds checkpoints; convert into a new directory")
    config = _config_json(workdir)
    if config is not None and not isinstance(config.get("model"), dict):
        raise ConvertError(f"--workdir {workdir} holds a {checkpoints.CONFIG_FILE} that is not a "
                           "t5x_lite run config (an HF model?), which the conversion would "
                           "replace; convert into a new directory")
    # refuses one that is not a JSON object, as load does
    source_generation = hf_interop.read_generation_config(hf_dir)
    cfg, params, hf_cfg, vocab = hf_interop.from_hf(hf_dir, scan_layers=scan_layers)
    tokenizer_config = epath.Path(hf_dir) / hf_interop.HF_TOKENIZER_CONFIG
    run = hf_interop.run_config_for(cfg, tokenizer_config)
    run.decode.update(api.hf_decode_defaults(hf_cfg, source_generation, str(hf_dir)))
    generation_config = epath.Path(hf_dir) / hf_interop.HF_GENERATION_CONFIG
    # refuses one larger than the embedding, or bad tokenizer settings, as load does
    api.load_vocabulary(vocab, cfg, run, tokenizer_config)
    json_vocab = vocab is not None and vocab.name == hf_interop.HF_TOKENIZER_JSON
    dest = workdir / (hf_interop.HF_TOKENIZER_JSON if json_vocab else checkpoints.VOCAB_FILE)
    for old in (workdir / checkpoints.VOCAB_FILE, workdir / hf_interop.HF_TOKENIZER_JSON):
        if old.exists() and (old != dest or vocab is None or
                             old.read_bytes() != vocab.read_bytes()):
            raise ConvertError(f"--workdir {workdir} holds a {old.name} that is not this "
                               f"model's {vocab.name if vocab else 'vocabulary (it has none)'}; "
                               "convert into a new directory")
    checkpoints.write_config(workdir, run)
    (workdir / HF_SOURCE_CONFIG).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    if vocab is not None:
        dest.write_bytes(vocab.read_bytes())
    # The source files load() and --to_hf read beside the weights; an earlier conversion's
    # copy (checkpoints deleted, an interrupted run) goes when this source has none.
    chat_template = epath.Path(hf_dir) / hf_interop.HF_CHAT_TEMPLATE
    tokenizer_side = cfg.family == "gpt" and vocab is not None
    for source, kept, applies in (
            (generation_config, hf_interop.GENERATION_SOURCE_CONFIG, True),  # the stop ids
            (tokenizer_config, hf_interop.TOKENIZER_SOURCE_CONFIG, tokenizer_side),
            (chat_template, hf_interop.CHAT_TEMPLATE_SOURCE, tokenizer_side)):
        if applies and source.exists():
            (workdir / kept).write_bytes(source.read_bytes())
        elif (workdir / kept).exists():
            (workdir / kept).unlink()
    kept = workdir / hf_interop.CHAT_TEMPLATES_SOURCE  # transformers 5's named templates
    _copy_named_templates(epath.Path(hf_dir) / hf_interop.HF_CHAT_TEMPLATES_DIR if tokenizer_side
                          else None, kept)
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
    """Writes the checkpoint at `path` (latest step unless `step`) as an HF directory.

    Refuses (ConvertError, before writing anything) an `out_dir` that is a t5x_lite workdir
    (`path`'s own included) or holds another model (see `check_hf_out`); an earlier export
    there is replaced."""
    from t5x_lite import api  # imported on use, as in hf_to_workdir
    if epath.Path(path).is_file():
        raise ConvertError(f"--workdir {path} is a file, not a t5x_lite workdir")
    workdir, latest = checkpoints.resolve(path)
    check_hf_out(out_dir, workdir)
    step = checkpoints.check_step(workdir, latest if step is None else step)
    run = checkpoints.read_config(workdir)
    cfg = ModelConfig.from_dict(run.model)
    base = hf_interop.read_source_config(
        workdir, ConvertError, "that --from_hf wrote",
        "restore it, or delete it to export without its extra fields")
    if base and base.get("model_type") != hf_interop.hf_model_type(cfg):
        base = None  # another architecture's fields (and its token ids) do not carry over
    # fails fast on unexportable models; stops where load() does at this step
    eos_id, stop_ids = api.checkpoint_eos(workdir, step, cfg)
    hf_cfg = hf_config_from_model(cfg, base, eos_id=eos_id)
    generation = None if base is None else _generation_config(workdir, stop_ids, cfg)
    params = restore_numpy_params(workdir, step, cfg)
    vocab = hf_interop.workdir_vocabulary(workdir)
    if hf_interop.hf_vocabulary_name(cfg, vocab) in (hf_interop.HF_T5_VOCAB,
                                                     hf_interop.HF_LLAMA_VOCAB):
        vocab_lib.LlamaVocabulary(vocab, add_bos=False)  # damaged: one error line, no write
    write_hf_dir(out_dir, hf_cfg, hf_interop.params_to_hf(cfg, params))
    _write_hf_extras(epath.Path(workdir), epath.Path(out_dir), cfg, generation,
                     int(run.get("data", {}).get("extra_ids", hf_interop.T5_EXTRA_IDS)))
    return cfg


def _generation_config(workdir, stop_ids: tuple[int, ...], cfg: ModelConfig) -> bytes | None:
    """generation_config.json for an export that stops at `stop_ids`: the source's as
    `convert --from_hf` kept it (None when there is none), byte for byte when it gives those
    stop ids (step 0), else with `eos_token_id` replaced (a step trained here stops at 1), as
    HF `generate` reads the stop ids from this file when there is one."""
    from t5x_lite import api
    path = epath.Path(workdir) / hf_interop.GENERATION_SOURCE_CONFIG
    source = hf_interop.read_source_config(
        workdir, ConvertError, "that --from_hf wrote", "restore it, or delete it to export "
        "without generation settings", hf_interop.GENERATION_SOURCE_CONFIG)
    if source is None:
        return None
    if api.hf_stop_ids({}, cfg.vocab_size, source) == stop_ids:
        return path.read_bytes()
    source["eos_token_id"] = (list(stop_ids) if len(stop_ids) > 1 else
                              stop_ids[0] if stop_ids else None)
    return json.dumps(source, indent=2, sort_keys=True).encode()


def _write_hf_extras(workdir: epath.Path, out: epath.Path, cfg: ModelConfig,
                     generation: bytes | None, extra_ids: int) -> None:
    """The files beside the weights: `generation` (None: none) as generation_config.json, and the
    workdir's vocabulary in HF form: T5's as `spiece.model` (with a tokenizer_config.json
    naming its `extra_ids` when they are not T5Tokenizer's default 100); a decoder-only
    model's Llama-style one (`vocab.LlamaVocabulary`) as `tokenizer.model` with
    `tokenizer_config.json` (the source's, else LlamaTokenizer's settings and special
    pieces), its `tokenizer.json` as it
    came (with the source's `tokenizer_config.json`), either with the source's
    `chat_template.jinja` and `additional_chat_templates/` when it had them. A GPT trained here
    has no HF tokenizer form (its prompts begin with id 0). Unless `out` already holds this very
    vocabulary file (an export into the model's own directory: its other tokenizer files are
    this model's and stay), every other tokenizer file there (`hf_interop.HF_TOKENIZER_FILES`:
    an earlier export's, another model's) is removed, and so is a generation_config.json the
    export does not write, and a chat template (`chat_template.jinja`,
    `additional_chat_templates/`) it does not write unless `out`'s tokenizer_config.json is the
    source's too: HF and `load` would read them as this model's."""
    path = hf_interop.workdir_vocabulary(workdir)
    name = hf_interop.hf_vocabulary_name(cfg, path)
    proto = path.read_bytes() if name is not None else None
    source = workdir / hf_interop.TOKENIZER_SOURCE_CONFIG
    settings = source.read_text() if source.exists() else None
    if name == hf_interop.HF_LLAMA_VOCAB and settings is None:
        vocab = vocab_lib.LlamaVocabulary.from_proto(proto)
        settings = json.dumps(dict(
            tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
            **{f"{k}_token": vocab.piece(i) for k, i in (("bos", vocab.bos_id),
                                                        ("eos", vocab.eos_id),
                                                        ("unk", vocab.unk_id)) if i >= 0}),
            indent=2)
    elif name == hf_interop.HF_LLAMA_VOCAB:
        settings = _explicit_bos_flags(settings)
    written = {} if generation is None else {hf_interop.HF_GENERATION_CONFIG: generation}
    chat_template = workdir / hf_interop.CHAT_TEMPLATE_SOURCE
    if name == hf_interop.HF_T5_VOCAB and vocab_lib.byte_pieces(proto):
        logging.warning(
            "%s has byte pieces (sentencepiece byte fallback), which HF's T5Tokenizer does not "
            "use: a character outside the pieces is <unk> there (here: its UTF-8 bytes), and a "
            "generated byte piece decodes as its name ('<0xE2>')", path)
    if name == hf_interop.HF_T5_VOCAB and extra_ids != hf_interop.T5_EXTRA_IDS:
        written[hf_interop.HF_TOKENIZER_CONFIG] = json.dumps(  # else T5Tokenizer's 100
            {"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids}, indent=2).encode()
    if name is not None:
        written[name] = proto
        if name != hf_interop.HF_T5_VOCAB and settings is not None:
            written[hf_interop.HF_TOKENIZER_CONFIG] = settings.encode()
        if name != hf_interop.HF_T5_VOCAB and chat_template.exists():
            written[hf_interop.HF_CHAT_TEMPLATE] = chat_template.read_bytes()
    own = name is not None and (out / name).exists() and (out / name).read_bytes() == proto
    # A generation config belongs to the weights: one this export does not write goes, also
    # from the model's own directory (its stop ids may not be this step's). So does a chat
    # template, unless the tokenizer settings there are the source's too (a base and an
    # instruct model share a tokenizer file, not a template).
    out_settings = out / hf_interop.HF_TOKENIZER_CONFIG
    own_template = own and source.exists() and out_settings.exists() and \
        out_settings.read_bytes() in (source.read_bytes(), (settings or "").encode())
    for other in (hf_interop.HF_GENERATION_CONFIG,
                  *(() if own_template else (hf_interop.HF_CHAT_TEMPLATE,)),
                  *(() if own else hf_interop.HF_TOKENIZER_FILES)):
        if other not in written and (out / other).exists():
            (out / other).unlink()
    named = out / hf_interop.HF_CHAT_TEMPLATES_DIR  # HF reads it as this model's templates
    if not own_template and named.is_dir():
        named.rmtree()
    for other, data in written.items():
        (out / other).write_bytes(data)
    if name not in (None, hf_interop.HF_T5_VOCAB):  # the source's named templates, as saved
        _copy_named_templates(workdir / hf_interop.CHAT_TEMPLATES_SOURCE, named, keep=True)


def _explicit_bos_flags(settings: str) -> str:
    """A Llama source's tokenizer_config.json text with `add_bos_token` / `add_eos_token` set
    to what `load` uses (true / false) where it has none. transformers 5 saves a Llama tokenizer
    as tokenizer.json (its post-processor adds the BOS) beside a config without the flags; the
    export writes tokenizer.model, for which HF reads a missing flag as no BOS."""
    value = json.loads(settings)  # read (and checked) by --from_hf / load already
    flags = {"add_bos_token": True, "add_eos_token": False}
    missing = {k: v for k, v in flags.items() if value.get(k) is None}
    return json.dumps({**value, **missing}, indent=2) if missing else settings


def _copy_named_templates(source, dest: epath.Path, keep: bool = False) -> None:
    """The `<name>.jinja` files of directory `source` (None: none) copied into `dest`, which
    holds only them afterwards (`keep`: also the files it held), or is gone when there are
    none (and not `keep`)."""
    from t5x_lite import api  # imported on use, as in hf_to_workdir
    templates = api.named_chat_template_files(source) if source is not None else []
    if dest.is_dir() and not keep:
        dest.rmtree()
    for f in templates:
        dest.mkdir(exist_ok=True)
        (dest / f.name).write_bytes(f.read_bytes())


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
    other = ("out", "step") if FLAGS.from_hf else ("scan_layers",)
    ignored = [f"--{name}" for name in other if FLAGS[name].present]
    if ignored:
        raise ConfigError(f"{', '.join(ignored)} only appl{'y' if len(ignored) > 1 else 'ies'} "
                          f"to {'--to_hf' if FLAGS.from_hf else '--from_hf'}; drop "
                          f"{'them' if len(ignored) > 1 else 'it'}")
    if FLAGS.from_hf:
        cfg = hf_to_workdir(FLAGS.from_hf, FLAGS.workdir, scan_layers=FLAGS.scan_layers)
        return f"wrote t5x_lite workdir {FLAGS.workdir} ({cfg.family}, vocab {cfg.vocab_size})"
    if not FLAGS.out:
        raise ConfigError("--to_hf needs --out=DIR")
    out = epath.Path(FLAGS.out)
    replaced = out.is_dir() and any(
        (out / name).exists() for name in (hf_interop.HF_CONFIG, hf_interop.SAFETENSORS))
    cfg = workdir_to_hf(FLAGS.workdir, FLAGS.out, step=FLAGS.step)
    return (f"wrote HF directory {FLAGS.out} ({cfg.family}, vocab {cfg.vocab_size})"
            + ("; replaced the model that was there" if replaced else ""))


def main(argv):
    if not FLAGS["verbosity"].present:
        cli.quiet_console(logging.WARNING)  # orbax logs a page per restore / save at INFO
    try:
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {argv[1:]}")
        print(_run())
    except cli.ERRORS as e:
        cli.exit_with("convert", e)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.flags_parser("convert"))
