"""Hugging Face <-> t5x_lite weights and configs for T5 (v1.0, v1.1), GPT-2 and Llama /
Mistral / Qwen2 (as gpt_modern), without torch.

An HF model directory holds `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json` with its shards), optionally its tokenizer (`vocabulary_names`;
`HF_TOKENIZER_FILES`). Tensors are numpy
arrays throughout: `t5x_lite.load` uses the results in memory, `t5x_lite.convert` writes them
as a workdir (and holds the reverse config mapping and the HF directory writer).

Shape legend: V vocab, D d_model, H heads, K head dim, F MLP width, R relative-position buckets.
HF torch `Linear` weights are [out, in] (T5, Llama); GPT-2's `Conv1D` weights are [in, out].

The mapping is one table per family (`_spec`), read in both directions, on the unscanned
layout (`layers_i`); scanned models (`layers/block` with a leading layer axis) are stacked from /
unstacked to it, so both layouts share every name.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import struct
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from t5x_lite.checkpoints import VOCAB_FILE, CheckpointError
from t5x_lite.config import ConfigError, ModelConfig, gpt2, gpt_modern, t5_1_0
from t5x_lite.layers import yarn_mscale
from t5x_lite.models import abstract_variables, build_model
from t5x_lite.transformer import stack_layers, unstack_layers

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_CONFIG = "config.json"
HF_T5_VOCAB = "spiece.model"
HF_LLAMA_VOCAB = "tokenizer.model"  # Llama / Mistral's sentencepiece model (LlamaTokenizer's)
HF_TOKENIZER_JSON = "tokenizer.json"  # HF's tokenizers format (GPT-2, Llama 3, Qwen2, ...)
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_CHAT_TEMPLATE = "chat_template.jinja"  # an instruct model's chat template (`t5x_lite.chat`)
HF_CHAT_TEMPLATES_DIR = "additional_chat_templates"  # transformers 5's named templates (*.jinja)
# every file of an HF tokenizer (an export leaves none but its own model's)
HF_TOKENIZER_FILES = (HF_T5_VOCAB, HF_LLAMA_VOCAB, HF_TOKENIZER_JSON, HF_TOKENIZER_CONFIG,
                      "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                      HF_CHAT_TEMPLATE)
# a converted workdir's copy of the source tokenizer_config.json (`llama_vocabulary` reads it)
TOKENIZER_SOURCE_CONFIG = "hf_tokenizer_config.json"
CHAT_TEMPLATE_SOURCE = "hf_chat_template.jinja"  # a converted workdir's copy of chat_template.jinja
CHAT_TEMPLATES_SOURCE = "hf_additional_chat_templates"  # and of additional_chat_templates/
HF_SOURCE_CONFIG = "hf_config.json"  # a converted workdir's copy of the source config.json
# generate()'s defaults, among them its stop ids (`eos_token_id`: Llama 3 Instruct's list)
HF_GENERATION_CONFIG = "generation_config.json"
GENERATION_SOURCE_CONFIG = "hf_generation_config.json"  # a converted workdir's copy of it
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SUPPORTED = ("t5 (T5ForConditionalGeneration)", "gpt2 (GPT2LMHeadModel)",
             "llama (LlamaForCausalLM)", "mistral (MistralForCausalLM)",
             "qwen2 (Qwen2ForCausalLM)")


class InteropError(CheckpointError):
    """An HF directory, config or tensor set that cannot be converted (one-line message)."""


# ----------------------------------------------------------------------------------- safetensors
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_FLOATS = ("F64", "F32", "F16", "BF16")


def load_safetensors(data: bytes, name: str = "<bytes>") -> dict[str, np.ndarray]:
    """Tensors of one safetensors file; floating tensors come back as float32.

    Parsed here (the format is an 8-byte length, a JSON header, raw little-endian data) because
    `safetensors.numpy` cannot represent bfloat16, the dtype of most recent HF checkpoints.
    Every header entry is checked against the bytes there are: a truncated or corrupt file is
    an InteropError naming `name`.
    """
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError):
        raise InteropError(f"{name} is not a safetensors file") from None
    if not isinstance(header, dict):
        raise InteropError(f"{name} is not a safetensors file (its header is not a JSON object)")
    return {key: _st_tensor(data, 8 + n, info, f"{name}: tensor {key}")
            for key, info in header.items() if key != "__metadata__"}


def _st_tensor(data: bytes, start_of_data: int, info, where: str) -> np.ndarray:
    info = info if isinstance(info, dict) else {}
    kind, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(kind, str) or kind not in _ST_DTYPES:
        raise InteropError(f"{where} has unsupported dtype {json.dumps(kind)}")
    if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
        raise InteropError(f"{where} has no valid shape (got {json.dumps(shape)})")
    size = len(data) - start_of_data
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))
            and 0 <= offsets[0] <= offsets[1] <= size):
        raise InteropError(f"{where} has data_offsets {json.dumps(offsets)}, not a [start, end] "
                           f"range within the file's {size} data bytes (truncated or corrupt?)")
    dtype = np.dtype(_ST_DTYPES[kind])
    count = math.prod(shape)
    if offsets[1] - offsets[0] != count * dtype.itemsize:
        raise InteropError(f"{where} has {offsets[1] - offsets[0]} bytes, but shape {shape} of "
                           f"{kind} needs {count * dtype.itemsize}")
    arr = np.frombuffer(data, dtype, count, start_of_data + offsets[0]).reshape(shape)
    return arr.astype(np.float32) if kind in _ST_FLOATS else arr.copy()


def is_int(x) -> bool:
    """An int that is not a bool (JSON true / false)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """An int or float that is not a bool (JSON true / false)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_source_config(workdir, error: type[Exception], context: str, advice: str,
                       name: str = HF_SOURCE_CONFIG) -> dict | None:
    """The source HF config `convert --from_hf` kept in `workdir` (`name`: HF_SOURCE_CONFIG,
    or GENERATION_SOURCE_CONFIG), or None when there is none. One that is not a JSON object
    raises `error`, naming the file, `context` (what the file is to the caller) and `advice`."""
    what = "generation config" if name == GENERATION_SOURCE_CONFIG else "config"
    return read_json_object(epath.Path(workdir) / name, error,
                            f"the source HF {what} {context}", advice)


def read_generation_config(hf_dir) -> dict | None:
    """The generation_config.json of the HF directory `hf_dir` (None: it has none); one that is
    not a JSON object is an InteropError."""
    return read_json_object(epath.Path(hf_dir) / HF_GENERATION_CONFIG, InteropError,
                            "the model's generation config", "fix or remove it")


def read_json_object(path, error: type[Exception], what: str, advice: str) -> dict | None:
    """The JSON object in the file at `path`, or None when there is no such file; one that is
    not a JSON object (or not UTF-8) raises `error`, naming the file, `what` it is and
    `advice`."""
    path = epath.Path(path)
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        value = None
    except OSError as e:  # a directory, no permission
        raise error(f"{path} cannot be read ({what}): {e.strerror or e}") from None
    if not isinstance(value, dict):
        raise error(f"{path} is not a JSON object ({what}); {advice}")
    return value


def tokenizer_settings(path) -> dict:
    """The tokenizer_config.json at `path` ({} for None or no file; one InteropError line for
    one that is not a JSON object)."""
    value = None if path is None else read_json_object(
        path, InteropError, "the tokenizer's settings", "fix or remove it")
    return {} if value is None else value


def llama_vocabulary(path, settings_path=None):
    """The sentencepiece `tokenizer.model` at `path` as a LlamaVocabulary, with the settings of
    the tokenizer_config.json at `settings_path` (None or absent: the defaults): `add_bos_token`
    (absent or null: true, as Meta's and Mistral's reference tokenizers add BOS). One
    InteropError line for what would make our ids differ from HF's: `add_eos_token` true
    (every prompt would end with EOS), `add_prefix_space` false, a `bos_token` other than the
    model's BOS piece; also for a file that is not a JSON object or flags that are not
    booleans. Added tokens past the pieces are not read (`warn_unread_added_tokens`)."""
    from t5x_lite.vocab import LlamaVocabulary
    value = tokenizer_settings(settings_path)
    flags = {k: value.get(k) for k in ("add_bos_token", "add_eos_token", "add_prefix_space")}
    bad = next((k for k, v in flags.items() if v is not None and not isinstance(v, bool)), None)
    if bad:
        raise InteropError(f"{settings_path}: {bad}={json.dumps(flags[bad])} is not true or false")
    for key, unsupported, why in (("add_eos_token", True, "prompts would end with EOS"),
                                  ("add_prefix_space", False, "texts without sentencepiece's "
                                   "leading \u2581")):
        if flags[key] is unsupported:
            raise InteropError(f"{settings_path}: {key}={json.dumps(unsupported)} is not "
                               f"supported ({why})")
    vocab = LlamaVocabulary(path, add_bos=flags["add_bos_token"] is not False)
    bos = value.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if vocab.add_bos and bos is not None and bos != vocab.piece(vocab.bos_id):
        raise InteropError(f"{settings_path}: bos_token={json.dumps(bos)} is not the "
                           f"sentencepiece model's BOS piece {vocab.piece(vocab.bos_id)!r}")
    return vocab


def _token_names(value) -> list[str]:
    """The token texts in a tokenizer_config.json token list (strings or {"content": ...})."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    names = [t.get("content") if isinstance(t, dict) else t for t in items]
    return [t for t in names if isinstance(t, str)]


def warn_unread_added_tokens(vocab, settings_path, tokenizer_json=None) -> list[str]:
    """Warns (one line) about the tokens an HF tokenizer adds to the sentencepiece model that
    `vocab` reads (a Llama's or T5's): HF gives them ids past `vocab`'s, as tokenizer_config.json
    at `settings_path` names them (transformers 4's `added_tokens_decoder` and
    `additional_special_tokens`, 5's `extra_special_tokens`) and the `tokenizer.json` beside it
    lists them (`added_tokens`). Text that spells one is tokenized as text here, and decoding
    drops its id. Returns their texts."""
    value = tokenizer_settings(settings_path)
    ids: dict[str, int | None] = {}  # text -> its HF id (None: listed without one)
    decoder = value.get("added_tokens_decoder")
    for key, token in (decoder.items() if isinstance(decoder, dict) else ()):
        for name in _token_names([token]) if str(key).isdigit() else ():
            ids[name] = int(key)
    has_json = tokenizer_json is not None and epath.Path(tokenizer_json).exists()
    try:
        listed = json.loads(epath.Path(tokenizer_json).read_text()).get("added_tokens") \
            if has_json else None
    except (OSError, ValueError, AttributeError):  # unreadable: HF's problem, not ours here
        listed = None
    for token in listed if isinstance(listed, list) else ():
        for name in _token_names([token]) if isinstance(token, dict) and isinstance(
                token.get("id"), int) else ():
            ids[name] = token["id"]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        for name in _token_names(value.get(key)):
            ids.setdefault(name, None)
    pieces = {vocab.piece(i) for i in range(vocab.vocab_size)} if None in ids.values() else ()
    unread = [t for t, i in ids.items() if (i is None and t not in pieces)
              or (i is not None and i >= vocab.vocab_size)]
    if unread:
        past = sorted(ids[t] for t in unread if ids[t] is not None)
        many = len(unread) > 1
        logging.warning("%s: %d added token%s past the vocabulary's %d ids (%s%s) %s not read: "
                        "text that spells them is tokenized as text, and decoding drops them",
                        epath.Path(settings_path if settings_path is not None
                                   else tokenizer_json).parent,
                        len(unread), "s" if many else "", vocab.vocab_size,
                        ", ".join(map(repr, unread[:3])) + (", ..." if len(unread) > 3 else ""),
                        f"; ids {past[0]}..{past[-1]}" if past else "", "are" if many else "is")
    return unread


def is_hf_dir(path) -> bool:
    """True when `path` looks like an HF model directory rather than a t5x_lite workdir."""
    path = epath.Path(path)
    if not path.is_dir():
        return False
    if (path / SAFETENSORS).exists() or (path / SAFETENSORS_INDEX).exists():
        return True
    if any(p.name.endswith(PICKLE_SUFFIXES) for p in path.iterdir()):
        return True
    try:
        config = json.loads((path / HF_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def read_hf_dir(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, {tensor name: array}) of an HF directory. Raises InteropError."""
    path = epath.Path(path)
    if not path.exists():
        raise InteropError(f"HF model directory {path} does not exist")
    if not path.is_dir():
        if path.name.endswith(PICKLE_SUFFIXES):
            raise InteropError(_pickle_message(path, [path.name]))
        raise InteropError(f"{path} is a file; pass the HF model directory that holds it")
    cfg_path = path / HF_CONFIG
    if not cfg_path.exists():
        raise InteropError(f"No {HF_CONFIG} in {path}: not a Hugging Face model directory")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise InteropError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(hf_cfg, dict):
        raise InteropError(f"{cfg_path} is not a JSON object, so not an HF model config")
    return hf_cfg, _read_tensors(path)


def _pickle_message(path, names) -> str:
    return (f"{path} holds only pickle checkpoint(s) ({', '.join(sorted(names)[:3])}), which "
            "t5x_lite never loads (unpickling can run code); re-save it as safetensors: "
            "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")


def _read_tensors(path: epath.Path) -> dict[str, np.ndarray]:
    if (path / SAFETENSORS).exists():
        return load_safetensors((path / SAFETENSORS).read_bytes(), str(path / SAFETENSORS))
    if (path / SAFETENSORS_INDEX).exists():
        try:
            weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):  # TypeError: the JSON is not an object
            weight_map = None
        if not (isinstance(weight_map, dict)
                and all(isinstance(s, str) and s for s in weight_map.values())):
            raise InteropError(f"{path / SAFETENSORS_INDEX} has no valid weight_map (an object "
                               "of tensor name: shard file name)")
        tensors, origin = {}, {}
        for shard in sorted(set(weight_map.values())):
            if shard != epath.Path(shard).name or shard in (".", ".."):
                raise InteropError(f"{SAFETENSORS_INDEX} in {path} names shard {shard!r}, which "
                                   "is not a file name in that directory")
            if not (path / shard).is_file():
                raise InteropError(f"{SAFETENSORS_INDEX} in {path} names shard {shard}, which "
                                   "is missing")
            part = load_safetensors((path / shard).read_bytes(), str(path / shard))
            twice = sorted(set(part) & set(tensors))
            if twice:  # which copy would win is the order the shards happen to be read in
                raise InteropError(f"Shards {origin[twice[0]]} and {shard} in {path} both hold "
                                   f"tensor {twice[0]}")
            tensors.update(part)
            origin.update(dict.fromkeys(part, shard))
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise InteropError(f"Shards in {path} lack {len(absent)} tensor(s) the index lists, "
                               f"e.g. {absent[0]}")
        return tensors
    pickles = [p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES)
               or p.name.startswith("pytorch_model")]
    if pickles:
        raise InteropError(_pickle_message(path, pickles))
    raise InteropError(f"No {SAFETENSORS} or {SAFETENSORS_INDEX} in {path}")


# ----------------------------------------------------------------------------------- configs
# The T5 MLP transformers runs, (is_gated_act, dense_act_fn), -> our mlp. gelu_new and
# gelu_pytorch_tanh are the tanh GELU ours is; HF's "gelu" is the exact (erf) one.
T5_ACTIVATIONS = {(False, "relu"): "relu", (False, "gelu_new"): "gelu",
                  (False, "gelu_pytorch_tanh"): "gelu", (True, "gelu_new"): "gated-gelu",
                  (True, "gelu_pytorch_tanh"): "gated-gelu", (True, "silu"): "gated-silu",
                  (True, "swish"): "gated-silu"}
# feed_forward_proj -> our mlp, where config.json does not override what T5Config derives from
# it (`t5_activation`); "gated-gelu" derives gelu_new.
T5_MLPS = {("gated-" if gated else "") + act: mlp
           for (gated, act), mlp in T5_ACTIVATIONS.items()} | {"gated-gelu": "gated-gelu"}
GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
# transformers' attribute_map of each config class: alias -> the field it sets.
HF_ALIASES = {"t5": {"hidden_size": "d_model", "num_attention_heads": "num_heads",
                     "num_hidden_layers": "num_layers", "head_dim": "d_kv"},
              "gpt2": {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                       "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}}


def t5_activation(feed_forward_proj: str) -> tuple[bool, str] | None:
    """(is_gated_act, dense_act_fn) as T5Config derives them from `feed_forward_proj` ("ACT" or
    "gated-ACT"; "gated-gelu" means gelu_new), or None for a name it rejects."""
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        return None
    if feed_forward_proj == "gated-gelu":
        return True, "gelu_new"
    return len(parts) == 2, parts[-1]


def is_rate(x) -> bool:
    """A dropout rate: a number in [0, 1)."""
    return is_number(x) and 0 <= x < 1


# The kinds of config.json values read: (test, what a value of that kind is).
_KINDS = {"size": (lambda v: is_int(v) and v > 0, "a positive integer"),
          "eps": (lambda v: is_number(v) and v > 0, "a positive number"),
          "rate": (is_rate, "a number in [0, 1)"),
          "flag": (lambda v: isinstance(v, bool), "true or false"),
          "name": (lambda v: isinstance(v, str), "a string")}


def _field(hf: Mapping[str, Any], source: str, key: str, default, kind: str, *,
           null_is_default: bool = False, names: Mapping[str, str] | None = None):
    """hf[key], or `default` when absent (or null, where HF reads null as the default),
    checked to be of `kind`; a bad value is an InteropError naming `source` and the key as
    config.json spells it (`names`: key -> the alias it came from)."""
    value = hf.get(key, default)
    if value is None and null_is_default:
        return default
    ok, what = _KINDS[kind]
    if not ok(value):
        raise InteropError(f"{source}: {(names or {}).get(key, key)}={json.dumps(value)} is not "
                           f"{what}")
    return value


def _resolve_aliases(hf: Mapping[str, Any], source: str) -> tuple[dict, dict[str, str]]:
    """(hf with each HF_ALIASES alias read as the field it sets, {field: alias} of the fields
    only an alias gave). An alias and its field both present with different values is an
    InteropError (transformers would silently take the alias)."""
    out, from_alias = dict(hf), {}
    for alias, key in HF_ALIASES.get(hf.get("model_type"), {}).items():
        if alias not in out:
            continue
        value = out.pop(alias)
        if key not in out:
            out[key], from_alias[key] = value, alias
        elif out[key] != value or type(out[key]) is not type(value):
            raise InteropError(f"{source}: {alias}={json.dumps(value)} and {key}="
                               f"{json.dumps(out[key])} disagree ({alias} is HF's alias of {key}); "
                               "keep one of them")
    return out, from_alias


def _t5_mlp(get: Callable, source: str) -> str:
    """Our mlp for the T5 MLP transformers runs: what T5Config derives from feed_forward_proj,
    unless config.json stores dense_act_fn / is_gated_act, which then override it (as HF's)."""
    ff = get("feed_forward_proj", "relu", "name")
    derived = t5_activation(ff)
    if derived is None:
        raise InteropError(f"{source}: T5 feed_forward_proj={ff!r} is not \"ACT\" or "
                           "\"gated-ACT\" (transformers refuses it)")
    gated = get("is_gated_act", derived[0], "flag")
    act = get("dense_act_fn", derived[1], "name")
    if (gated, act) not in T5_ACTIVATIONS:
        supported = "; ".join(
            f"{'gated' if g else 'not gated'}: "
            + ", ".join(a for h, a in T5_ACTIVATIONS if h == g) for g in (False, True))
        raise InteropError(f"{source}: T5 feed_forward_proj={ff!r} with dense_act_fn={act!r}, "
                           f"is_gated_act={json.dumps(gated)} is not supported; supported "
                           f"dense_act_fn ({supported})")
    return T5_ACTIVATIONS[gated, act]


def model_config_from_hf(hf: Mapping[str, Any], tensors: Mapping[str, np.ndarray] | None = None,
                         *, scan_layers: bool = False, source: str = HF_CONFIG) -> ModelConfig:
    """The ModelConfig of an HF config.json (and its tensors, to tell tied from untied heads).

    T5: `scale_decoder_outputs` (transformers >= 5) or else `tie_word_embeddings` (4.x) decides
    the d_model**-0.5 logit scaling; the head is untied when the config says so or when the
    checkpoint's `lm_head.weight` differs from the embedding (5.x always writes
    tie_word_embeddings=true, even for v1.1). HF's aliases (`HF_ALIASES`, e.g. GPT-2's
    num_attention_heads for n_head) are read as the fields they set, and T5's MLP is the one
    transformers runs (`_t5_mlp`). Every field used is type-checked; errors name `source` (the
    config.json path).
    """
    try:
        return _model_config(hf, tensors, scan_layers, source)
    except ConfigError as e:  # a value HF takes that t5x_lite's model does not (HF's names)
        message = str(e).removeprefix("Invalid model config: ")
        for ours, theirs in _OUR_FIELDS.items():
            message = re.sub(rf"\b{ours}\b", theirs, message)
        raise InteropError(f"{source}: {message}") from None


# t5x_lite's ModelConfig fields whose HF names differ, for its checks' messages.
_OUR_FIELDS = {"relative_max_distance": "relative_attention_max_distance",
               "relative_buckets": "relative_attention_num_buckets",
               "norm_eps": "layer_norm_epsilon", "num_kv_heads": "num_key_value_heads"}


def _model_config(hf, tensors, scan_layers: bool, source: str) -> ModelConfig:
    if not isinstance(hf.get("model_type"), str):
        raise InteropError(f"{source}: model_type={json.dumps(hf.get('model_type'))} is not a "
                           f"name; t5x_lite converts {', '.join(SUPPORTED)}")
    hf, from_alias = _resolve_aliases(hf, source)
    get = functools.partial(_field, hf, source, names=from_alias)
    model_type = hf.get("model_type")
    if model_type == "t5":
        mlp = _t5_mlp(get, source)
        tied = get("tie_word_embeddings", True, "flag")
        n = get("num_layers", 6, "size")
        # T5Config fills in num_decoder_layers before it applies the num_hidden_layers alias
        decoder_default = 6 if "num_layers" in from_alias else n
        return t5_1_0(
            vocab_size=get("vocab_size", 32128, "size"), d_model=get("d_model", 512, "size"),
            num_heads=get("num_heads", 8, "size"), head_dim=get("d_kv", 64, "size"),
            d_ff=get("d_ff", 2048, "size"), num_layers=n,
            num_decoder_layers=get("num_decoder_layers", decoder_default, "size",
                                   null_is_default=True),
            mlp=mlp, norm_eps=get("layer_norm_epsilon", 1e-6, "eps"),
            relative_buckets=get("relative_attention_num_buckets", 32, "size"),
            relative_max_distance=get("relative_attention_max_distance", 128, "size"),
            tie_embeddings=not _untied(tied, tensors, _t5_embedding(tensors or {})),
            scale_logits=get("scale_decoder_outputs", tied, "flag"),
            dropout_rate=get("dropout_rate", 0.1, "rate"), scan_layers=scan_layers)
    if model_type == "gpt2":
        act = get("activation_function", "gelu_new", "name")
        problems = [(act not in GPT2_ACTIVATIONS, f"activation_function={act!r} (supported: "
                                                  f"{list(GPT2_ACTIVATIONS)})")]
        problems += [(get(k, False, "flag", null_is_default=True), k)
                     for k in ("scale_attn_by_inverse_layer_idx", "add_cross_attention")]
        for bad, what in problems:
            if bad:
                raise InteropError(f"{source}: GPT-2 config with {what} is not supported")
        d, h = get("n_embd", 768, "size"), get("n_head", 12, "size")
        if d % h:
            d_key, h_key = (from_alias.get(k, k) for k in ("n_embd", "n_head"))
            raise InteropError(f"{source}: GPT-2 {d_key}={d} is not a multiple of {h_key}={h}")
        gpt_tensors = _strip_gpt2_prefix(tensors or {})
        rate = get("resid_pdrop", 0.1, "rate")
        others = {k: get(k, 0.1, "rate") for k in ("embd_pdrop", "attn_pdrop")}
        if any(v != rate for v in others.values()):
            logging.warning("%s: t5x_lite has one dropout rate; it uses resid_pdrop=%g for all "
                            "three (%s); --to_hf writes them back while it is unchanged", source,
                            rate, ", ".join(f"{k}={v:g}" for k, v in others.items()))
        return gpt2(
            vocab_size=get("vocab_size", 50257, "size"), d_model=d, num_heads=h,
            head_dim=d // h, d_ff=get("n_inner", 4 * d, "size", null_is_default=True),
            num_layers=get("n_layer", 12, "size"), max_len=get("n_positions", 1024, "size"),
            norm_eps=get("layer_norm_epsilon", 1e-5, "eps"),
            attention_scale=get("scale_attn_weights", True, "flag"),
            tie_embeddings=not _untied(get("tie_word_embeddings", True, "flag"), gpt_tensors,
                                       gpt_tensors.get("wte.weight")),
            dropout_rate=rate, scan_layers=scan_layers)
    if model_type in LLAMA_DEFAULTS:
        return _llama_config(hf, tensors, get, scan_layers, source)
    raise InteropError(f"Unsupported HF model_type {model_type!r} in {source}; t5x_lite "
                       f"converts {', '.join(SUPPORTED)}")


# HF rope_type -> our rope_scaling (config.ROPE_SCALINGS)
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}
# The Llama-layout model types: (name, the config defaults that differ between them, as HF's
# LlamaConfig / MistralConfig / Qwen2Config have them; None: num_attention_heads). Mistral is
# Llama with sliding-window attention, Qwen2 Llama with query / key / value biases (and
# sliding-window layers, `_qwen2_window`).
LLAMA_DEFAULTS = {
    "llama": ("Llama", dict(num_key_value_heads=None, intermediate_size=11008,
                            max_position_embeddings=2048, vocab_size=32000)),
    "mistral": ("Mistral", dict(num_key_value_heads=8, intermediate_size=14336,
                                max_position_embeddings=131072, vocab_size=32000,
                                sliding_window=4096)),
    "qwen2": ("Qwen2", dict(num_key_value_heads=32, intermediate_size=22016,
                            max_position_embeddings=32768, vocab_size=151936)),
}
LLAMA_ARCHITECTURES = {kind: f"{name}ForCausalLM" for kind, (name, _) in LLAMA_DEFAULTS.items()}


def _llama_config(hf, tensors, get: Callable, scan_layers: bool, source: str) -> ModelConfig:
    """gpt_modern for a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM config:
    SiLU-gated MLP, RMSNorm, rotate-half RoPE, plain or scaled as `ROPE_TYPES` (transformers 5's
    rope_parameters or 4.x's rope_theta / rope_scaling), no biases but Qwen2's q / k / v ones;
    Mistral's sliding window (null: none), Qwen2's (`_qwen2_window`)."""
    name, defaults = LLAMA_DEFAULTS[hf["model_type"]]
    act = get("hidden_act", "silu", "name")
    # transformers 4.x: rope_scaling (without rope_theta, which is top-level); 5.x reads it
    # before rope_parameters, as here
    within = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(within) or {}
    if not isinstance(rope, dict):
        raise InteropError(f"{source}: {within}={json.dumps(rope)} is not an object")
    rope = {"rope_theta": hf.get("rope_theta", 10000.0), **rope}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    problems = [(act != "silu", f"hidden_act={act!r} (supported: 'silu')"),
                (not isinstance(rope_type, str) or rope_type not in ROPE_TYPES,
                 f"rope_type={json.dumps(rope_type)} (supported: "
                 f"{', '.join(map(repr, ROPE_TYPES))})"),
                (partial not in (None, 1, 1.0),
                 f"partial_rotary_factor={json.dumps(partial)} (RoPE on all of head_dim only)")]
    problems += [(get(k, False, "flag", null_is_default=True), f"{k}=true")
                 for k in ("attention_bias", "mlp_bias")
                 if hf["model_type"] == "llama"]  # Mistral has none, Qwen2 fixed ones: HF
    # reads neither key for them
    for bad, what in problems:
        if bad:
            raise InteropError(f"{source}: {name} config with {what} is not supported")
    theta = _field(rope, source, "rope_theta", 10000.0, "eps")
    max_len = get("max_position_embeddings", defaults["max_position_embeddings"], "size")
    window = None  # HF's Llama has none (and ignores the key)
    if "sliding_window" in defaults:
        window = _window_field(hf, get, defaults["sliding_window"])
    elif hf["model_type"] == "qwen2":
        window = _qwen2_window(hf, get, source)
    scale = lambda key, default=None, kind="eps": _field(rope, source, key, default, kind,
                                                         names={key: f"{within}.{key}"})
    # HF takes a top-level original_max_position_embeddings first, then the rope dict's, then
    # the model's own length
    original = lambda: (get("original_max_position_embeddings", None, "size")
                        if "original_max_position_embeddings" in hf else
                        scale("original_max_position_embeddings", max_len, "size"))
    scaling = {}
    if rope_type in ("linear", "llama3"):
        scaling = dict(rope_scaling=ROPE_TYPES[rope_type],
                       rope_scaling_factor=float(scale("factor")))
    if rope_type == "llama3":
        scaling.update(rope_low_freq_factor=float(scale("low_freq_factor")),
                       rope_high_freq_factor=float(scale("high_freq_factor")),
                       rope_original_max_len=original())
    if rope_type == "yarn":
        scaling = _yarn(rope, scale, original(), max_len, source, within)
    h = get("num_attention_heads", 32, "size")
    d = get("hidden_size", 4096, "size")
    kv = hf.get("num_key_value_heads", defaults["num_key_value_heads"] or h)
    kv = h if kv is None else get("num_key_value_heads", kv, "size")  # HF: null = num_heads
    if get("attention_dropout", 0.0, "rate"):
        logging.warning("%s: attention_dropout is not imported; t5x_lite's one dropout rate "
                        "would also drop the residual branches %s does not (it stays 0)",
                        source, name)
    return gpt_modern(
        vocab_size=get("vocab_size", defaults["vocab_size"], "size"), d_model=d, num_heads=h,
        num_kv_heads=kv,
        head_dim=get("head_dim", d // h, "size", null_is_default=True),
        d_ff=get("intermediate_size", defaults["intermediate_size"], "size"),
        num_layers=get("num_hidden_layers", 32, "size"),
        max_len=max_len, norm_eps=get("rms_norm_eps", 1e-6, "eps"), rope_theta=float(theta),
        sliding_window=window, qkv_bias=hf["model_type"] == "qwen2", **scaling,
        tie_embeddings=not _untied(get("tie_word_embeddings", False, "flag"), tensors,
                                   (tensors or {}).get("model.embed_tokens.weight")),
        scan_layers=scan_layers)


def _yarn(rope, scale: Callable, original: int, max_len: int, source: str, within: str) -> dict:
    """Our yarn settings for an HF rope dict (`within`: its config.json key), as transformers'
    _compute_yarn_parameters reads it: factor (null: max_position_embeddings / the original
    length), beta_fast / beta_slow (null or 0: 32 / 1), truncate (null: false), and the cos /
    sin factor given or derived from mscale / mscale_all_dim (stored explicitly)."""
    def number(key, value, what="a positive number", ok=lambda v: v > 0):
        if not (is_number(value) and ok(value)):
            raise InteropError(f"{source}: {within}.{key}={json.dumps(value)} is not {what}")
        return value

    factor = (max_len / original if rope.get("factor") is None else scale("factor"))
    betas = [number(k, rope.get(k) or d) for k, d in (("beta_fast", 32), ("beta_slow", 1))]
    truncate = rope.get("truncate", True)
    if truncate is not None and not isinstance(truncate, bool):
        raise InteropError(f"{source}: {within}.truncate={json.dumps(truncate)} is not true or "
                           "false")
    mscale = functools.partial(yarn_mscale, factor)
    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = (rope.get(k) for k in ("mscale", "mscale_all_dim"))
        if m and m_all:
            m, m_all = (number(k, v, "a number", lambda v: True)
                        for k, v in (("mscale", m), ("mscale_all_dim", m_all)))
            if mscale(m_all) == 0 or mscale(m) / mscale(m_all) <= 0:
                raise InteropError(f"{source}: {within}.mscale={m} and mscale_all_dim={m_all} "
                                   "give a cos / sin factor <= 0")
        attention = mscale(m) / mscale(m_all) if m and m_all else mscale()
    else:
        attention = scale("attention_factor")
    return dict(rope_scaling="yarn", rope_scaling_factor=float(factor),
                rope_original_max_len=original, rope_beta_fast=float(betas[0]),
                rope_beta_slow=float(betas[1]), rope_attention_factor=float(attention),
                rope_truncate=bool(truncate))


def _window_field(hf, get: Callable, default: int) -> int | None:
    """config.json's `sliding_window` (absent: `default`): a size, or None when null (none)."""
    window = hf.get("sliding_window", default)
    return None if window is None else get("sliding_window", window, "size")


def _qwen2_window(hf, get: Callable, source: str) -> int | None:
    """Qwen2's sliding window as HF builds it: `sliding_window` when `use_sliding_window`, in the
    layers `layer_types` marks "sliding_attention" (absent: from max_window_layers on). One
    window for every layer, or none in any; a mix is an InteropError."""
    window = None
    if get("use_sliding_window", False, "flag"):
        window = _window_field(hf, get, 4096)
    types = hf.get("layer_types")
    if types is None:
        first = hf.get("max_window_layers", 28)
        if not is_int(first) or first < 0:
            raise InteropError(f"{source}: max_window_layers={json.dumps(first)} is not an "
                               "integer >= 0")
        types = ["sliding_attention" if i >= first else "full_attention"
                 for i in range(get("num_hidden_layers", 32, "size"))]
    if not isinstance(types, list):
        raise InteropError(f"{source}: layer_types={json.dumps(types)} is not a list")
    windows = {window if t == "sliding_attention" else None for t in types}
    if len(windows) > 1:
        raise InteropError(f"{source}: Qwen2 config with a sliding window in some layers only "
                           "(layer_types / max_window_layers) is not supported: t5x_lite's "
                           "sliding_window is the same in every layer")
    return windows.pop() if windows else None


def hf_model_type(cfg: ModelConfig) -> str | None:
    """The HF model_type `convert --to_hf` would write `cfg` as (None for BERT; whether this
    config has that form is `convert.hf_config_from_model`'s check). Of the Llama layouts:
    Qwen2 with q / k / v biases, else Mistral with a sliding window, else Llama."""
    if cfg.family == "t5":
        return "t5"
    if is_llama(cfg):
        return "qwen2" if cfg.qkv_bias else "llama" if cfg.sliding_window is None else "mistral"
    return "gpt2" if cfg.family == "gpt" else None


def is_llama(cfg: ModelConfig) -> bool:
    """A GPT with Llama's layout (gpt_modern's): what `convert` maps to LlamaForCausalLM."""
    return (cfg.family == "gpt" and cfg.norm == "rms" and cfg.position == "rope"
            and cfg.mlp == "swiglu" and not cfg.use_bias and cfg.attention_scale
            and not cfg.scale_logits)


def _untied(tied_in_config: bool, tensors, embedding) -> bool:
    lm = (tensors or {}).get("lm_head.weight")
    if not tied_in_config:
        return True
    return lm is not None and embedding is not None and not np.array_equal(lm, embedding)


# ----------------------------------------------------------------------------------- params
Transform = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
_SAME: Transform = (lambda w: w, lambda p: p)
_LINEAR: Transform = (lambda w: w.T, lambda p: p.T)  # torch Linear [out, in] <-> ours [in, out]


def _reshape(hf_shape, ours_shape) -> Transform:
    return (lambda w: w.reshape(ours_shape), lambda p: p.reshape(hf_shape))


def _spec(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, Transform]]:
    """(our param path in the unscanned layout, HF tensor name, transform) for every param."""
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    # torch Linear q / k / v [n*K, D] <-> ours [D, n, K] (n heads); o [D, H*K] <-> [H, K, D]
    heads_in = lambda n: (lambda w: w.T.reshape(d, n, k), lambda p: p.reshape(d, n * k).T)
    heads_out = (lambda w: w.T.reshape(h, k, d), lambda p: p.reshape(h * k, d).T)
    if cfg.family == "t5":
        rel = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        spec = [(("token_embedder", "embedding"), "shared.weight", _SAME),
                (("encoder_relpos", "rel_embedding"), f"encoder.{rel}", _LINEAR),
                (("decoder_relpos", "rel_embedding"), f"decoder.{rel}", _LINEAR),
                (("encoder_norm", "scale"), "encoder.final_layer_norm.weight", _SAME),
                (("decoder_norm", "scale"), "decoder.final_layer_norm.weight", _SAME)]
        wi = ["wi"] if cfg.mlp in ("relu", "gelu") else ["wi_0", "wi_1"]
        for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
            for i in range(n):
                o, hf = (stack, f"layers_{i}"), f"{stack}.block.{i}.layer"
                subs = [("self_attention", "SelfAttention", "pre_attention_norm")]
                if stack == "decoder":
                    subs.append(("cross_attention", "EncDecAttention", "pre_cross_attention_norm"))
                for j, (ours, theirs, norm) in enumerate(subs):
                    spec.append(((*o, norm, "scale"), f"{hf}.{j}.layer_norm.weight", _SAME))
                    spec += [((*o, ours, name), f"{hf}.{j}.{theirs}.{t}.weight", heads_in(h))
                             for name, t in (("query", "q"), ("key", "k"), ("value", "v"))]
                    spec.append(((*o, ours, "out"), f"{hf}.{j}.{theirs}.o.weight", heads_out))
                m = len(subs)
                spec.append(((*o, "pre_mlp_norm", "scale"), f"{hf}.{m}.layer_norm.weight", _SAME))
                spec += [((*o, "mlp", w), f"{hf}.{m}.DenseReluDense.{w}.weight", _LINEAR)
                         for w in (*wi, "wo")]
    elif is_llama(cfg):
        g = cfg.kv_heads
        spec = [(("token_embedder", "embedding"), "model.embed_tokens.weight", _SAME),
                (("decoder_norm", "scale"), "model.norm.weight", _SAME)]
        for i in range(cfg.num_layers):
            o, hf = ("decoder", f"layers_{i}"), f"model.layers.{i}"
            spec += [((*o, "pre_attention_norm", "scale"), f"{hf}.input_layernorm.weight", _SAME),
                     ((*o, "pre_mlp_norm", "scale"), f"{hf}.post_attention_layernorm.weight",
                      _SAME)]
            spec += [((*o, "self_attention", name), f"{hf}.self_attn.{t}_proj.weight", heads_in(n))
                     for name, t, n in (("query", "q", h), ("key", "k", g), ("value", "v", g))]
            if cfg.qkv_bias:  # Qwen2
                spec += [((*o, "self_attention", f"{name}_bias"), f"{hf}.self_attn.{t}_proj.bias",
                          _reshape((n * k,), (n, k)))
                         for name, t, n in (("query", "q", h), ("key", "k", g), ("value", "v", g))]
            spec.append(((*o, "self_attention", "out"), f"{hf}.self_attn.o_proj.weight",
                         heads_out))
            spec += [((*o, "mlp", ours), f"{hf}.mlp.{theirs}_proj.weight", _LINEAR)
                     for ours, theirs in (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down"))]
    else:
        spec = [(("token_embedder", "embedding"), "wte.weight", _SAME),
                (("position_embedder", "embedding"), "wpe.weight", _SAME),
                (("decoder_norm", "scale"), "ln_f.weight", _SAME),
                (("decoder_norm", "bias"), "ln_f.bias", _SAME)]
        for i in range(cfg.num_layers):
            o, hf = ("decoder", f"layers_{i}"), f"h.{i}"
            for norm, ln in (("pre_attention_norm", "ln_1"), ("pre_mlp_norm", "ln_2")):
                spec += [((*o, norm, "scale"), f"{hf}.{ln}.weight", _SAME),
                         ((*o, norm, "bias"), f"{hf}.{ln}.bias", _SAME)]
            for name in ("query", "key", "value"):  # c_attn is split by _split_c_attn
                spec += [((*o, "self_attention", name), f"{hf}.attn.c_attn.{name}.weight",
                          _reshape((d, h * k), (d, h, k))),
                         ((*o, "self_attention", f"{name}_bias"), f"{hf}.attn.c_attn.{name}.bias",
                          _reshape((h * k,), (h, k)))]
            spec += [((*o, "self_attention", "out"), f"{hf}.attn.c_proj.weight",
                      _reshape((h * k, d), (h, k, d))),
                     ((*o, "self_attention", "out_bias"), f"{hf}.attn.c_proj.bias", _SAME)]
            spec += [((*o, "mlp", ours), f"{hf}.mlp.{theirs}", _SAME) for ours, theirs in (
                ("wi", "c_fc.weight"), ("wi_bias", "c_fc.bias"), ("wo", "c_proj.weight"),
                ("wo_bias", "c_proj.bias"))]
    if not cfg.tie_embeddings:
        spec.append((("lm_head",), "lm_head.weight", _LINEAR))
    return spec


def _t5_embedding(tensors):
    for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if name in tensors:
            return tensors[name]
    return None


def _strip_gpt2_prefix(tensors):
    return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def _canonical(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors under the names `_spec` uses, without the ones HF itself ignores or ties."""
    if cfg.family == "t5":
        out = dict(tensors)
        emb = _t5_embedding(out)
        if emb is not None:
            out["shared.weight"] = emb
        out.pop("encoder.embed_tokens.weight", None)
        out.pop("decoder.embed_tokens.weight", None)
        out.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)
    elif is_llama(cfg):  # older checkpoints kept RoPE's inverse frequencies as buffers
        out = {k: v for k, v in tensors.items() if not k.endswith(".rotary_emb.inv_freq")}
    else:
        out = {k: v for k, v in _strip_gpt2_prefix(tensors).items()
               if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers
        d = cfg.d_model
        for i in range(cfg.num_layers):
            for part in ("weight", "bias"):
                fused = out.pop(f"h.{i}.attn.c_attn.{part}", None)
                if fused is not None:
                    if fused.shape[-1] != 3 * d:
                        raise InteropError(f"h.{i}.attn.c_attn.{part} has shape {fused.shape}; "
                                           f"n_embd={d} needs a last dimension of {3 * d}")
                    for name, piece in zip(("query", "key", "value"),
                                           np.split(fused, 3, axis=-1)):
                        out[f"h.{i}.attn.c_attn.{name}.{part}"] = piece
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)  # equal to the embedding (checked by _untied)
    return out


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """HF tensors -> our float32 numpy params tree (scanned when cfg.scan_layers).

    Raises InteropError naming missing, unexpected or mis-shaped tensors.
    """
    tensors = _canonical(cfg, tensors)
    spec = _spec(cfg)
    missing = [name for _, name, _ in spec if name not in tensors]
    if missing:
        raise InteropError(f"The HF checkpoint lacks {len(missing)} tensor(s) its config.json "
                           f"needs, e.g. {', '.join(missing[:3])}")
    unexpected = sorted(set(tensors) - {name for _, name, _ in spec})
    if unexpected:
        raise InteropError(f"The HF checkpoint has {len(unexpected)} tensor(s) its config.json "
                           f"does not describe, e.g. {', '.join(unexpected[:3])}")
    wanted = expected_shapes(dataclasses.replace(cfg, scan_layers=False))
    flat = {}
    for path, name, (to_ours, _) in spec:
        w = tensors[name]
        try:
            p = to_ours(w)
        except ValueError:
            p = None
        if p is None or p.shape != wanted[path]:
            raise InteropError(f"HF tensor {name} has shape {tuple(w.shape)}, which does not fit "
                               f"{'/'.join(path)} {wanted[path]} of the config in config.json")
        flat[path] = np.ascontiguousarray(p, np.float32)
    params = traverse_util.unflatten_dict(flat)
    return stack_layers(params) if cfg.scan_layers else params


def params_to_hf(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """Our params (scanned or not) -> HF tensor names and layouts, float32 numpy."""
    flat = traverse_util.flatten_dict(unstack_layers(params) if cfg.scan_layers else params)
    out = {name: np.asarray(from_ours(np.asarray(flat[path], np.float32)))
           for path, name, (_, from_ours) in _spec(cfg)}
    if cfg.family == "gpt" and not is_llama(cfg):
        for i in range(cfg.num_layers):
            for part in ("weight", "bias"):
                pieces = [out.pop(f"h.{i}.attn.c_attn.{n}.{part}")
                          for n in ("query", "key", "value")]
                out[f"h.{i}.attn.c_attn.{part}"] = np.concatenate(pieces, axis=-1)
        out = {(k if k == "lm_head.weight" else f"transformer.{k}"): v for k, v in out.items()}
    return out


def expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{param path: shape} of the model `cfg` builds (abstractly; nothing is allocated)."""
    tree = nn.meta.unbox(abstract_variables(build_model(cfg)))["params"]
    return {tuple(k.key for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------------- one call
T5_EXTRA_IDS = 100  # T5Tokenizer's default number of sentinels


def run_config_for(cfg: ModelConfig, tokenizer_config=None):
    """The full run config of a converted model (span corruption for T5, causal LM for GPT);
    a T5's `data.extra_ids` are those of the HF tokenizer_config.json at `tokenizer_config`
    (`t5_extra_ids`)."""
    from t5x_lite.defaults import base_config
    if cfg.is_encoder_decoder:
        run = base_config(cfg, objective="span_corruption")
        run.data.extra_ids = t5_extra_ids(tokenizer_config)
        return run
    return base_config(cfg, objective="causal_lm", seq_len=min(cfg.max_len, 1024))


def t5_extra_ids(tokenizer_config=None) -> int:
    """T5Tokenizer's `extra_ids` (sentinels after the pieces) in the tokenizer_config.json at
    `tokenizer_config`; 100 without one, as T5Tokenizer's default (HF gives the other tokens it
    lists, an `<extra_id_N>` with N >= extra_ids included, ids after the sentinels:
    `warn_unread_added_tokens`)."""
    n = tokenizer_settings(tokenizer_config).get("extra_ids", T5_EXTRA_IDS)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InteropError(f"{tokenizer_config}: extra_ids={json.dumps(n)} is not an integer "
                           ">= 0")
    return n


def from_hf(path, *, scan_layers: bool = False):
    """Reads an HF directory.

    Returns:
      (ModelConfig, numpy params tree, config.json dict, path of the vocabulary or None:
      T5's spiece.model; a decoder-only model's tokenizer.model, else its tokenizer.json).
    """
    from t5x_lite.vocab import sentencepiece_ids
    hf_cfg, tensors = read_hf_dir(path)
    cfg = model_config_from_hf(hf_cfg, tensors, scan_layers=scan_layers,
                               source=str(epath.Path(path) / HF_CONFIG))
    found = [p for p in (epath.Path(path) / n for n in vocabulary_names(cfg)) if p.exists()]
    if len(found) > 1 and sentencepiece_ids(found[0].read_bytes()) is None:
        found = found[1:]  # e.g. Llama 3's tiktoken tokenizer.model beside its tokenizer.json
    return cfg, params_from_hf(cfg, tensors), hf_cfg, (found[0] if found else None)


def vocabulary_names(cfg: ModelConfig) -> list[str]:
    """The files an HF directory's vocabulary is read from for this model, first found wins."""
    return [HF_T5_VOCAB] if cfg.family == "t5" else [HF_LLAMA_VOCAB, HF_TOKENIZER_JSON]


def hf_vocabulary_name(cfg: ModelConfig, path) -> str | None:
    """The HF file the vocabulary at `path` (an HF directory's or a workdir's) is for model
    `cfg`: T5's `spiece.model`; a decoder-only model's `tokenizer.json`, or its sentencepiece
    model with its own special ids (Llama's) as `tokenizer.model`. None when there is no file,
    for other families, and for a decoder-only model's T5-convention vocabulary (a GPT trained
    here: its prompts begin with id 0, which has no HF tokenizer form)."""
    from t5x_lite.vocab import is_t5_convention
    path = epath.Path(path)
    if not path.exists() or cfg.family not in ("t5", "gpt"):
        return None
    if cfg.family == "t5":
        return HF_T5_VOCAB
    if path.name == HF_TOKENIZER_JSON:
        return HF_TOKENIZER_JSON
    return None if is_t5_convention(path.read_bytes()) else HF_LLAMA_VOCAB


def workdir_vocabulary(workdir) -> epath.Path:
    """The vocabulary file of a workdir: `vocab.model`, or a converted model's
    `tokenizer.json` when it has that instead (the `vocab.model` path when it has neither)."""
    spm = epath.Path(workdir) / VOCAB_FILE
    json_file = epath.Path(workdir) / HF_TOKENIZER_JSON
    return json_file if json_file.exists() and not spm.exists() else spm
