"""`t5x_lite.load`: a t5x_lite checkpoint or a Hugging Face directory as a ready model.

    import t5x_lite
    m = t5x_lite.load("/tmp/t5_base")   # workdir, its checkpoints/ or checkpoints/<step>, or an
                                        # HF T5 / GPT-2 / Llama / Mistral / Qwen2 dir (in memory)
    m.logits([[37, 5, 1]], decoder_input_ids=[[0, 12, 9]])   # np.float32 [B, T, V]
    m.score(["question: ..."], ["answer"])                    # np.float32 [B]: sum of log p
    m.generate(...)                                           # see t5x_lite.decoding

A BERT-style MLM workdir offers `logits` only (`score` and `generate` raise one line each).

Token inputs are int arrays (every entry counts; for T5 and BERT id 0 is padding as always),
a list of ints, lists of lists (ragged rows are right-padded with 0), or, when the model has a
vocabulary (sentencepiece, or an HF tokenizer.json), strings; anything else, ids outside the
vocabulary and rows with no token are one ValueError line. Text conventions follow T5/seqio:
T5 encoder inputs and targets end with EOS, and BERT inputs (as its training documents);
decoder-only prompts and continuations get none, and a GPT trained by t5x_lite gets its
decoder start id 0 before a text prompt, a converted model with an HF tokenizer that adds a
BOS that BOS (`start_id`). Given ids are used as they are.

A GPT trained with `data.objective="prefix_lm"` (`is_prefix_lm`) is run as trained: its prompt
(start id included) is the prefix, attended bidirectionally, in `score`, `generate` and
`evaluation.likelihood`; `logits` takes `prefix_lengths` (default: the whole input).

Shape legend: B batch, S encoder length, T decoder length, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from t5x_lite import (checkpoints, distributed, hf_interop, lora, partitioning,
                      quantization, token_rows)
from t5x_lite.config import ConfigError, ModelConfig
from t5x_lite.models import BaseModel, LossConfig, abstract_variables, build_model
from t5x_lite.vocab import EOS_ID  # the stop id of every model trained here


class LoadedModel:
    """A model, its params placed on a mesh, and jit-compiled logits / scoring.

    Attributes:
      config: the ModelConfig. run_config: the full run ConfigDict. model: the BaseModel
      wrapper. params: the params tree (jax arrays on `mesh`). vocab: a Vocabulary, a
      LlamaVocabulary (a converted Llama / Mistral's tokenizer.model) or None.
      mesh, rules: where the params live and the logical axis rules used for them.
      eos_id: the model's EOS (`hf_eos_id`, `checkpoint_eos`): the HF config's
        `eos_token_id` for weights from HF, else 1. T5 inputs end with it.
      stop_ids: the ids that end a generated sequence (None: `eos_id` alone): for weights from
        HF, the ids HF `generate` stops at (`hf_stop_ids`; () when it stops at none).
      chat_template: a decoder-only HF model's `chat.ChatTemplate` (`load_chat_template`), for
        `generate(messages=...)`; for a model without a template of its own, one that renders
        only a `chat_template` text given to it; a `chat.UnusableTemplate` (rendering raises
        why) for one that cannot be read; None for other models.
    """

    def __init__(self, config: ModelConfig, run_config: ml_collections.ConfigDict,
                 model: BaseModel, params, vocab, mesh, rules, eos_id: int = EOS_ID,
                 stop_ids: Sequence[int] | None = None, chat_template=None):
        self.config, self.run_config, self.model = config, run_config, model
        self.params, self.vocab, self.mesh, self.rules = params, vocab, mesh, rules
        self.chat_template = chat_template
        self.eos_id = eos_id
        self.stop_ids = tuple(dict.fromkeys(
            int(i) for i in ((eos_id,) if stop_ids is None else stop_ids)))
        self._jitted: dict[str, Any] = {}

    def __repr__(self):
        c = self.config
        stops = f", stop_ids={list(self.stop_ids)}" if self.stop_ids != (self.eos_id,) else ""
        return (f"LoadedModel({c.family}, d_model={c.d_model}, layers={c.num_layers}, "
                f"vocab={c.vocab_size}, eos_id={self.eos_id}{stops}, dtype={c.dtype}, "
                f"devices={self.mesh.size})")

    # ------------------------------------------------------------------ text
    @property
    def start_id(self) -> int | None:
        """The id text prompts of this decoder-only model begin with, or None.

        The vocabulary's `prompt_start_id`: t5x_lite's LM objectives feed `[0] + targets[:-1]`,
        so a GPT trained here (one with a T5-convention vocabulary) saw id 0 first; a converted
        model's HF tokenizer gives its BOS when it adds one; a model without a vocabulary
        (converted GPT-2 weights, given ids) gets none.
        """
        if self.config.family != "gpt" or self.vocab is None:
            return None
        return self.vocab.prompt_start_id

    @property
    def uses_start_token(self) -> bool:
        """Whether text prompts of this decoder-only model begin with `start_id`."""
        return self.start_id is not None

    @property
    def prefix_lm(self) -> bool:
        """Whether this is a GPT trained with objective prefix_lm (`is_prefix_lm`)."""
        return is_prefix_lm(self)

    def tokenize(self, texts: str | Sequence[str], *, add_eos: bool) -> list[list[int]]:
        if self.vocab is None:
            raise ValueError("This model has no vocabulary (vocab.model / spiece.model / "
                             "tokenizer.model / tokenizer.json); pass token ids instead of text")
        texts = [texts] if isinstance(texts, str) else token_rows.as_list(texts, "texts")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("tokenize() takes a string or a list of strings, got "
                             f"{token_rows.kind(next(t for t in texts if not isinstance(t, str)))}")
        return [ids + [self.eos_id] if add_eos else ids
                for ids in self.vocab.encode_batch(texts)]

    def detokenize(self, ids) -> list[str]:
        """Text of each row of ids: cut before the first of the model's `stop_ids` (as a
        generated text is), padding dropped (the vocabulary's `decode`, which also ends at its
        own end id)."""
        if self.vocab is None:
            raise ValueError("This model has no vocabulary to detokenize with")
        rows = token_rows.rows(ids, "ids")
        self._check_range(rows)
        stops = set(self.stop_ids)
        return [self.vocab.decode(r[:next((i for i, t in enumerate(r) if t in stops), len(r))])
                for r in rows]

    def _ids(self, x, name: str, *, add_eos: bool = False, start: int | None = None,
             nonempty: bool = True, zero_is_padding: bool = False):
        """(right-padded int32 ids [B, T], lengths [B]) from ids or text (argument `name`);
        text rows begin with `start` when it is an id.

        `nonempty`: every row needs a token (a nonzero one when `zero_is_padding`: T5 encoder,
        BERT); an empty row's outputs would be padding's meaningless values.
        """
        if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and
                                  all(isinstance(t, str) for t in x)):
            rows = self.tokenize(x, add_eos=add_eos)
            rows = rows if start is None else [[start] + r for r in rows]
        else:
            rows = token_rows.rows(x, name)
        if not rows or (nonempty and max(len(r) for r in rows) == 0):
            raise ValueError(f"Empty input: {name} needs at least one token")
        self._check_range(rows, name)
        lengths = np.array([len(r) for r in rows])
        ids = np.zeros((len(rows), lengths.max()), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        if nonempty:
            real = (ids > 0) if zero_is_padding else (np.arange(ids.shape[1]) < lengths[:, None])
            if not real.any(axis=1).all():
                i = int(np.flatnonzero(~real.any(axis=1))[0])
                raise ValueError(f"{name} row {i} has no tokens"
                                 f"{' (id 0 is padding)' * zero_is_padding}; every row needs one")
        return ids, lengths

    def _check_range(self, rows, name: str = "ids"):
        v = self.config.vocab_size
        for i, r in enumerate(rows):
            if r and (min(r) < 0 or max(r) >= v):  # before int32: 2**40 would not fit
                bad = next(t for t in r if not 0 <= t < v)
                raise ValueError(f"Token ids must be in [0, {v}); {name} row {i} holds {bad}")

    # ------------------------------------------------------------------ compute
    def logits(self, input_ids, decoder_input_ids=None, *, prefix_lengths=None) -> np.ndarray:
        """float32 logits [B, T, V] (T: decoder length for T5, input length otherwise).

        Args:
          input_ids: encoder inputs (T5), tokens (GPT) or masked tokens (BERT).
          decoder_input_ids: T5 only, required: targets shifted right, starting with id 0
            (text is tokenized and prefixed with 0).
          prefix_lengths: GPT only: an int, or one per row [B], from 0 to the row's length:
            the first that many tokens of each row (as fed: the start id of text counts)
            attend to each other bidirectionally, the rest causally (T5X PrefixLM,
            `decoder_causal_attention`). None: for a prefix-LM model (`is_prefix_lm`) the whole
            row is the prefix -- the model's view of a prompt, whose last position's logits
            are those `generate` samples the first new token from; for any other model fully
            causal (0 and 1 are causal too).
        Positions past a row's length (padding) hold meaningless values.
        """
        if prefix_lengths is not None and self.config.family != "gpt":
            raise ValueError(f"prefix_lengths is for decoder-only (gpt) models, not "
                             f"{self.config.family}")
        if self.config.is_encoder_decoder:
            if decoder_input_ids is None:
                raise ValueError("This is an encoder-decoder (T5) model: pass decoder_input_ids "
                                 "(targets shifted right, starting with 0)")
            enc, _ = self._ids(input_ids, "input_ids", add_eos=True, zero_is_padding=True)
            dec, _ = self._ids(decoder_input_ids, "decoder_input_ids", start=0)  # T5's start
            _same_batch(enc, dec)
            batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec}
        else:
            if decoder_input_ids is not None:
                raise ValueError(f"A {self.config.family} model takes only input_ids")
            bert = self.config.family == "bert"  # text: + EOS, as each training document
            ids, lengths = self._ids(input_ids, "input_ids", start=self.start_id,
                                     add_eos=bert, zero_is_padding=bert)
            self._check_length(ids)
            key = "encoder_input_tokens" if bert else "decoder_input_tokens"
            batch = {key: ids}
            if prefix_lengths is not None or self.prefix_lm:
                n = lengths if prefix_lengths is None else _prefix_lengths(prefix_lengths,
                                                                           lengths)
                batch["decoder_causal_attention"] = prefix_flags(n, ids.shape[1])
        return self._run("logits", batch)

    def score(self, input_ids, target_ids, *, target_lengths=None) -> np.ndarray:
        """Per-example sum of target log-probs, float32 [B].

        T5: log p(targets | inputs), the decoder fed the targets shifted right (start id 0).
        GPT: log p(target continuation | prompt), prompt = input_ids (at least one token);
        for a prefix-LM model (`is_prefix_lm`) the prompt, start id included, is the prefix
        (bidirectional attention), as in training (a model trained on inputs/targets pairs saw
        inputs + EOS as the prefix: end given prompt ids with EOS to match).

        Args:
          target_lengths: optional, the number of target tokens of each row [B]: the first
            that many count, id 0 included (e.g. `len(out["ids"])` of `generate` outputs,
            which may hold a generated 0). Without it a row's tokens count, except that a
            T5 target id 0 is padding (as in HF).
        """
        cfg = self.config
        if cfg.family == "bert":
            raise ValueError("score() needs a T5 or GPT model; this one is encoder-only (MLM): "
                             "use logits()")
        if cfg.is_encoder_decoder:
            enc, _ = self._ids(input_ids, "input_ids", add_eos=True, zero_is_padding=True)
            tgt, tlen = self._ids(target_ids, "target_ids", add_eos=True, nonempty=False)
            _same_batch(enc, tgt)
            if tgt.shape[1] == 0:  # every row empty: log p(nothing) = 0
                _target_lengths(target_lengths, tlen)
                return np.zeros(len(tgt), np.float32)
            inputs = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
            valid = np.arange(tgt.shape[1]) < _target_lengths(target_lengths, tlen)[:, None]
            if target_lengths is None:
                valid &= tgt > 0  # padding, as in HF
            batch = {"encoder_input_tokens": enc, "decoder_input_tokens": inputs}
        elif cfg.family == "gpt":
            prompt, plen = self._ids(input_ids, "input_ids", start=self.start_id,
                                     nonempty=False)
            cont, clen = self._ids(target_ids, "target_ids", nonempty=False)
            _same_batch(prompt, cont)
            clen = _target_lengths(target_lengths, clen)
            if plen.min() == 0:
                raise ValueError("Decoder-only scoring needs at least one prompt token per row")
            seq, slen = self._ids([list(p[:m]) + list(c[:n]) for p, m, c, n in
                                   zip(prompt, plen, cont, clen)], "input_ids + target_ids")
            if seq.shape[1] == 1:  # one-token prompts, nothing to score: log p(nothing) = 0
                return np.zeros(len(seq), np.float32)
            inputs, tgt = seq[:, :-1], seq[:, 1:]
            self._check_length(inputs)
            pos = np.arange(tgt.shape[1])
            valid = (pos >= plen[:, None] - 1) & (pos < slen[:, None] - 1)
            batch = {"decoder_input_tokens": inputs}
            if self.prefix_lm:  # the prompt is the prefix, as `_prefix_lm_example` trains it
                batch["decoder_causal_attention"] = prefix_flags(plen, inputs.shape[1])
        batch.update(decoder_target_tokens=tgt, decoder_loss_weights=valid.astype(np.float32))
        return self._run("score", batch)

    def generate(self, **kwargs):
        """Decoding (greedy, sampling, beam search); see `t5x_lite.decoding.generate`."""
        # Imported on use: decoding is a separate part that plain scoring does not need.
        return importlib.import_module("t5x_lite.decoding.generate").generate(self, **kwargs)

    def _check_length(self, ids):
        cfg = self.config
        if cfg.position == "learned" and ids.shape[1] > cfg.max_len:
            raise ValueError(f"{ids.shape[1]} tokens exceed this model's {cfg.max_len} learned "
                             "positions")

    def _run(self, name: str, batch: dict[str, np.ndarray]) -> np.ndarray:
        if name not in self._jitted:
            self._jitted[name] = _compiled(self.config, self.model.loss, name)
        b = next(iter(batch.values())).shape[0]
        placed = partitioning.place_rows(self.mesh, batch)
        with partitioning.activate(self.mesh, self.rules):
            out = self._jitted[name](self.params, placed)
        return distributed.host_array(out).astype(np.float32)[:b]


def is_prefix_lm(loaded) -> bool:
    """Whether `loaded` (a LoadedModel, or anything with `.model` and optionally
    `.run_config`) is a decoder-only model trained with `data.objective="prefix_lm"`: T5X
    PrefixLM, bidirectional attention over BOS + prefix (`data.objectives._prefix_lm_example`).
    Scoring and decoding then treat the prompt as the prefix. Other models (HF conversions
    included) are causal."""
    run = getattr(loaded, "run_config", None)
    if run is None or loaded.model.config.family != "gpt":
        return False
    data = run.get("data", None) if hasattr(run, "get") else None
    return data is not None and data.get("objective", None) == "prefix_lm"


def prefix_flags(prefix_lengths, width: int) -> np.ndarray:
    """int32 `decoder_causal_attention` [B, width]: 1 on the first `prefix_lengths[b]` decoder
    input positions of row b (the prompt, start id included: BOS + prefix in
    `_prefix_lm_example`'s input alignment)."""
    return (np.arange(width)[None, :] < np.asarray(prefix_lengths)[:, None]).astype(np.int32)


def _prefix_lengths(given, lengths: np.ndarray) -> np.ndarray:
    """`prefix_lengths` of `logits`: an int or one per row, each from 0 to the row's length."""
    return _row_counts(given, lengths, "prefix_lengths must be an integer or one per row, from "
                       "0 to the row's length", scalar=True)


def _row_counts(given, limits: np.ndarray, must: str, *, scalar: bool = False) -> np.ndarray:
    """`given` as an int array of one count per row, each in [0, limits[row]] (`scalar`: an
    int stands for every row); else a ValueError line: `must`, the limits and what was given."""
    try:
        n = np.asarray(given)
    except (TypeError, ValueError):  # ragged nesting: numpy's own message names no argument
        n = np.asarray(given, dtype=object)
    if scalar and n.ndim == 0 and np.issubdtype(n.dtype, np.integer):
        n = np.full(limits.shape, int(n))
    if (n.shape != limits.shape or not np.issubdtype(n.dtype, np.integer)
            or np.any(n < 0) or np.any(n > limits)):
        raise ValueError(f"{must} {limits.tolist()}; got {n.tolist()}")
    return n


@functools.lru_cache(maxsize=16)
def _compiled(config: ModelConfig, loss: LossConfig, name: str):
    """One jitted function per (config, loss, kind), shared by instances loading the same
    architecture, so re-loading a model (another step, a converted copy) does not recompile."""
    model = build_model(config, loss)
    return jax.jit(model.logits if name == "logits" else model.score_batch)


def _target_lengths(given, widths: np.ndarray) -> np.ndarray:
    """`given` target lengths checked against the rows' `widths`; `widths` when None."""
    if given is None:
        return widths
    return _row_counts(given, widths, "target_lengths must be one integer per row, from 0 to "
                       "the row's number of target tokens")


def _same_batch(a, b):
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"Batch sizes differ: {a.shape[0]} inputs vs {b.shape[0]} targets")


def load(path, *, dtype=None, mesh=None, step: int | None = None,
         quantize: str | None = None) -> LoadedModel:
    """Loads a model for inference.

    Args:
      path: a t5x_lite workdir (latest step), its `checkpoints` dir, one `checkpoints/<step>`
        dir, or an HF T5 / GPT-2 / Llama / Mistral / Qwen2 directory (config.json +
        safetensors; converted in memory).
      dtype: compute dtype override ('float32', 'bfloat16', ...); params stay float32.
      mesh: a `partitioning.make_mesh(...)` mesh; default: all devices, data-parallel (params
        replicated).
      step: checkpoint step of a workdir (default: the one `path` names, else the latest);
        an error for an HF directory, which has none.
      quantize: 'int8' = per-channel int8 weights, dequantized inside jit (README.md).

    Raises:
      CheckpointError (InteropError for HF directories): missing or unusable files, a path
      that is a file, a step that is not an int >= 0 or has no checkpoint, a vocabulary
      larger than the checkpoint's embedding. ConfigError: a dtype other than float32,
      bfloat16, float16. MeshError: a mesh that is not a jax Mesh with axes data / fsdp /
      tensor, or whose axes do not divide the params.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise checkpoints.CheckpointError(f"load() takes a path (str or os.PathLike), got "
                                          f"{token_rows.kind(path)}")
    path = epath.Path(path)
    if path.exists() and not path.is_dir():
        raise checkpoints.CheckpointError(
            f"{path} is a file; pass a workdir, its checkpoints/ or checkpoints/<step> "
            "directory, or a Hugging Face model directory")
    if step is not None and (not token_rows.is_id(step) or step < 0):
        raise checkpoints.CheckpointError(f"step must be a checkpoint step (an int >= 0), got "
                                          f"{step!r}")
    step = None if step is None else int(step)
    dtype = _compute_dtype(dtype)
    mesh = partitioning.make_mesh() if mesh is None else _check_mesh(mesh)
    if hf_interop.is_hf_dir(path):
        if step is not None:
            raise hf_interop.InteropError(f"{path} is a Hugging Face directory, which has no "
                                          f"checkpoint steps; step={step} is for workdirs")
        generation_config = hf_interop.read_generation_config(path)  # before the weights
        cfg, numpy_params, hf_cfg, vocab_path = hf_interop.from_hf(path)
        tokenizer_config = path / hf_interop.HF_TOKENIZER_CONFIG
        run = hf_interop.run_config_for(cfg, tokenizer_config)
        run.decode.update(hf_decode_defaults(hf_cfg, generation_config, str(path)))
        eos = hf_eos(hf_cfg, cfg.vocab_size, generation_config)
        chat_file = path / hf_interop.HF_CHAT_TEMPLATE
        named_chat = path / hf_interop.HF_CHAT_TEMPLATES_DIR
    else:
        workdir, found = checkpoints.resolve(path)
        step = checkpoints.check_step(workdir, found if step is None else step)
        run = checkpoints.read_config(workdir)
        cfg = ModelConfig.from_dict(run.model)
        vocab_path = hf_interop.workdir_vocabulary(workdir)
        tokenizer_config = workdir / hf_interop.TOKENIZER_SOURCE_CONFIG
        chat_file = workdir / hf_interop.CHAT_TEMPLATE_SOURCE
        named_chat = workdir / hf_interop.CHAT_TEMPLATES_SOURCE
        numpy_params = None
        eos = checkpoint_eos(workdir, step, cfg, run)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
        run.model.dtype = cfg.dtype
    if not eos[1]:
        logging.warning("%s names no stop id within the vocabulary (eos_token_id of its "
                        "generation_config.json, else config.json): generation runs to "
                        "max_new_tokens, as in HF; give generate(stop_ids=...) to stop", path)
    vocab = load_vocabulary(vocab_path, cfg, run, tokenizer_config)
    if vocab is None and run.get("decode", {}).get("stop_strings"):
        logging.warning("%s: its decode options' stop_strings %s need a vocabulary, and the model "
                        "has none; decoding without them", path, run.decode.stop_strings)
        run.decode.stop_strings = ""
    # only a vocabulary that reads special tokens in text can encode a rendered chat
    chat = (load_chat_template(tokenizer_config, chat_file, named_chat)
            if cfg.family == "gpt" and getattr(vocab, "reads_special_tokens", False) else None)
    rules = partitioning.rules_from_config(run.get("mesh", {}).get("rules"))
    model = build_model(cfg, LossConfig(run.train.z_loss, run.train.label_smoothing))
    boxed = abstract_variables(model)["params"]
    shardings = partitioning.shardings(boxed, mesh, rules)
    if numpy_params is None:
        abstract = checkpoints.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
        # LoRA workdirs hold adapters: merged into their base here (README.md).
        params = lora.restore_params(workdir, step, run, abstract)
    else:
        params = jax.device_put(numpy_params, shardings)
    params = quantization.quantize_loaded(params, boxed, shardings, quantize)
    return LoadedModel(cfg, run, model, params, vocab, mesh, rules, *eos, chat_template=chat)


_DTYPES = ("float32", "bfloat16", "float16")


def _compute_dtype(dtype) -> str | None:
    if dtype is None:
        return None
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ConfigError(f"dtype must be one of {_DTYPES} (the compute dtype; params stay "
                          f"float32), got {dtype!r}")
    return name


def _check_mesh(mesh):
    if not isinstance(mesh, jax.sharding.Mesh):
        raise partitioning.MeshError(
            f"mesh must be a jax Mesh, e.g. partitioning.make_mesh(data=..., fsdp=..., "
            f"tensor=...); got {token_rows.kind(mesh)}")
    if set(mesh.axis_names) != set(partitioning.MESH_AXES):
        raise partitioning.MeshError(
            f"mesh axes must be {partitioning.MESH_AXES} (partitioning.make_mesh makes such a "
            f"mesh); got {tuple(mesh.axis_names)}")
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) != auto:  # jax.make_mesh's default Explicit axes: the same
        # devices as the Auto mesh the logical-axis sharding here is written for
        mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
    return mesh


def hf_eos_id(hf_config, vocab_size: int) -> int:
    """The EOS id of a model with HF config `hf_config`: its `eos_token_id` when that is an id
    within the vocabulary (of a list, the first such id), else 1 (as `convert --to_hf` writes
    it then: GPT-2's 50256 in a smaller vocabulary, a null field). A missing field is the
    config class's default: 2 for Llama and Mistral."""
    default = 2 if hf_config.get("model_type") in ("llama", "mistral") else None
    return next(iter(_vocab_ids(hf_config.get("eos_token_id", default), vocab_size)), EOS_ID)


def hf_stop_ids(hf_config, vocab_size: int, generation_config=None) -> tuple[int, ...]:
    """The ids HF `generate` stops at for a model with HF config `hf_config` and generation
    config `generation_config` (generation_config.json; None: there is none): the ids within
    the vocabulary that the generation config's `eos_token_id` names (an id or a list: Llama 3
    Instruct lists <|end_of_text|>, <|eom_id|> and <|eot_id|>, which ends a turn); without
    that file, config.json's, as HF derives its generation config from it then. () when none
    is named (a missing or null field, ids outside the vocabulary): HF then stops only at
    max_new_tokens."""
    source = hf_config if generation_config is None else generation_config
    return tuple(dict.fromkeys(_vocab_ids(source.get("eos_token_id"), vocab_size)))


# HF `generate`'s values for the settings a generation config leaves unset (5.x:
# GenerationConfig._get_default_generation_params; None there = off): note top_k 50.
HF_DECODE_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0,
                      "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                      "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0}
# Generation settings that change HF's output and are not taken, with the values that leave
# them off (None: unset). Beam search's length penalty is not T5's; max_length and min_length
# count the prompt; the rest are HF processors and options t5x_lite does not have.
HF_SETTINGS_NOT_TAKEN = {
    "num_beams": 1, "max_length": 20, "min_length": 0, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None, "guidance_scale": 1.0, "top_h": None,
    "watermarking_config": None, "token_healing": False,
    "num_return_sequences": 1, "num_beam_groups": 1, "diversity_penalty": 0.0,
    "constraints": None, "force_words_ids": None}
# beam search variants HF 5 no longer runs itself (group and constrained beam search)
_BEAM_VARIANTS = ("num_beam_groups", "diversity_penalty", "constraints", "force_words_ids")


def hf_decode_defaults(hf_config, generation_config=None, where: str = "") -> dict:
    """The `decode` options HF `generate()` would use for a model with HF config `hf_config`
    and generation config `generation_config` (None: no generation_config.json; config.json's
    generation fields then, as HF derives its generation config from them): method "sample"
    when `do_sample` is truthy (HF's test), else "greedy"; temperature, top_k, top_p, min_p,
    typical_p, epsilon_cutoff, eta_cutoff, repetition_penalty, no_repeat_ngram_size and
    min_new_tokens as set there, else HF's defaults (`HF_DECODE_DEFAULTS`: top_k 50);
    sequence_bias, bad_words_ids, suppress_tokens, begin_suppress_tokens and stop_strings when
    set (as the text the `decode` config holds: `generate.sequence_option_text`);
    max_new_tokens, prompt_lookup_num_tokens and max_matching_ngram_size when set; with
    sampling, num_return_sequences as num_samples (HF's own default of 20 new tokens is not
    taken). num_beams > 1 without sampling is HF's beam search: method "beam" with beam_rule
    "hf", length_penalty and early_stopping (HF's defaults 1.0, False). An encoder-decoder's
    max_length / min_length count its decoder start token, as HF's do: max_new_tokens =
    max_length - 1 and min_new_tokens = min_length - 1 where max_new_tokens / min_new_tokens
    are unset (those take precedence, as in HF). top_p 0, which keeps only the most likely
    token in HF, is taken as top_k 1. A value that is not a valid decode option is left at the
    default, with a warning naming `where`; settings that are not taken
    (`HF_SETTINGS_NOT_TAKEN`: beam sampling, a decoder-only model's max_length / min_length,
    which count the prompt, forced tokens, ...) get a warning when they are on."""
    from t5x_lite.decoding import generate as gen  # decoding imports api
    from t5x_lite.decoding import stop_strings
    DecodeError, DecodeOptions = gen.DecodeError, gen.DecodeOptions
    source = dict(hf_config if generation_config is None else generation_config)
    place = where or "HF model"
    sample = source.get("do_sample")
    if sample is not None and not isinstance(sample, bool):
        logging.warning("%s: generation setting do_sample=%r is not a bool; taken as HF reads "
                        "it, %s", place, sample, bool(sample))
    top_p = source.get("top_p")
    if hf_interop.is_number(top_p) and top_p == 0:
        logging.warning("%s: generation setting top_p=0 keeps only the most likely token in HF; "
                        "taken as top_k=1", place)
        source.update(top_p=None, top_k=1)
    out = {"method": "sample" if sample else "greedy", **HF_DECODE_DEFAULTS}
    for name in [*HF_DECODE_DEFAULTS, "max_new_tokens", "prompt_lookup_num_tokens",
                 "max_matching_ngram_size"]:
        value = source.get(name)
        if value is None:
            continue
        kind = type(getattr(DecodeOptions, name))
        try:
            if not hf_interop.is_number(value) or (kind is int and int(value) != value):
                raise DecodeError(f"{name} must be a number{'' if kind is float else ' (int)'}")
            DecodeOptions(**{name: kind(value)})
        except (DecodeError, OverflowError, ValueError) as e:
            _unusable(place, name, value, e, out.get(name, "t5x_lite's default"))
            continue
        out[name] = kind(value)
    vocab_size = hf_config.get("vocab_size")
    for name in (*gen.SEQUENCE_OPTIONS, "stop_strings"):
        if source.get(name) is None:
            continue
        given = source[name]
        if name == "stop_strings":  # HF reads a str as one stop string; t5x_lite's limit
            given = [given] if isinstance(given, str) else given
            long = [t for t in given if isinstance(t, str) and t and not stop_strings.fits(t)
                    ] if isinstance(given, list) else []
            if long:
                logging.warning("%s: generation setting stop_strings: %s longer than %d bytes "
                                "left out", place, long, stop_strings.MAX_BYTES)
                given = [t for t in given if t not in long]
        try:
            value = getattr(DecodeOptions(**{name: given}), name)
        except (DecodeError, OverflowError, ValueError) as e:
            logging.warning("%s: generation setting %s=%r is not a usable decode option (%s); "
                            "not taken", place, name, source[name], e)
            continue
        if name.endswith("suppress_tokens") and hf_interop.is_int(vocab_size):
            outside = [i for i in value if i >= vocab_size]
            if outside:  # HF's suppression ignores them; t5x_lite refuses such ids
                logging.warning("%s: generation setting %s: ids %s are outside the vocabulary "
                                "(HF ignores them); left out", place, name, outside)
                value = tuple(i for i in value if i < vocab_size)
        out[name] = gen.sequence_option_text(name, value)
    beams = source.get("num_beams")
    variant = any(source.get(k) is not None and source[k] != HF_SETTINGS_NOT_TAKEN[k]
                  for k in _BEAM_VARIANTS)
    if not sample and not variant and hf_interop.is_int(beams) and 1 < beams <= gen.INT32_MAX:
        _take_hf_beam_search(out, source, place)
    returned = source.get("num_return_sequences")
    if out["method"] in ("sample", "beam") and hf_interop.is_int(returned) \
            and 1 < returned <= gen.INT32_MAX:
        if out["method"] == "sample":
            out["num_samples"] = int(returned)  # HF's samples per prompt
        if out["method"] == "sample" or returned <= out["num_beams"]:
            source.pop("num_return_sequences")  # beam: HF's are the first of the beams
    if hf_config.get("is_encoder_decoder") is True:  # lengths count the decoder start token
        _take_encoder_decoder_lengths(out, source, place)
    ignored = [f"{k}={source[k]!r}" for k, off in HF_SETTINGS_NOT_TAKEN.items()
               if source.get(k) is not None and source[k] != off]
    if ignored:
        logging.warning("%s: generation settings %s are not taken (beam sampling, group and "
                        "constrained beam search are not supported; a decoder-only model's "
                        "max_length / min_length count the prompt: give max_new_tokens / "
                        "min_new_tokens; the others are HF options t5x_lite does not have)",
                        place, ", ".join(ignored))
    return out


def _unusable(place: str, name: str, value, why, using) -> None:
    logging.warning("%s: generation setting %s=%r is not a usable decode option (%s); using %s",
                    place, name, value, why, using)


def _take_hf_beam_search(out: dict, source: dict, place: str) -> None:
    """num_beams > 1 without sampling: HF's beam search, with its length_penalty and
    early_stopping (HF's defaults where unset or unusable, with a warning)."""
    out.update(method="beam", num_beams=int(source.pop("num_beams")), beam_rule="hf",
               length_penalty=1.0, early_stopping="false")
    penalty, early = source.get("length_penalty"), source.get("early_stopping")
    if penalty is not None:
        if hf_interop.is_number(penalty) and math.isfinite(penalty):
            out["length_penalty"] = float(penalty)
        else:
            _unusable(place, "length_penalty", penalty, "not a finite number", 1.0)
    if early is not None:
        if isinstance(early, bool) or early == "never":
            out["early_stopping"] = str(early).lower()
        else:
            _unusable(place, "early_stopping", early, "not True, False or 'never'", False)


def _take_encoder_decoder_lengths(out: dict, source: dict, place: str) -> None:
    """An encoder-decoder's max_length / min_length, which count the decoder start token:
    max_new_tokens = max_length - 1, min_new_tokens = min_length - 1, where max_new_tokens /
    min_new_tokens are unset (as HF gives those precedence)."""
    from t5x_lite.decoding.generate import INT32_MAX  # decoding imports api
    for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        value = source.pop(total, None)
        if value is None or source.get(new) is not None:
            continue
        least = 2 if total == "max_length" else 0
        if hf_interop.is_int(value) and least <= value <= INT32_MAX + 1:
            if total == "max_length" or value > 1:
                out[new] = int(value) - 1
        else:
            _unusable(place, total, value, f"not an int >= {least}",
                      out.get(new, "t5x_lite's default"))


def hf_eos(hf_config, vocab_size: int, generation_config=None) -> tuple[int, tuple[int, ...]]:
    """(`hf_eos_id`, `hf_stop_ids`) of an HF model: what `LoadedModel` takes."""
    return (hf_eos_id(hf_config, vocab_size),
            hf_stop_ids(hf_config, vocab_size, generation_config))


def _vocab_ids(value, vocab_size: int) -> list[int]:
    """The ids within [0, vocab_size) of an HF token id field (an id, a list of them, null)."""
    return [i for i in (value if isinstance(value, list) else [value])
            if hf_interop.is_int(i) and 0 <= i < vocab_size]


def checkpoint_eos(workdir, step: int, cfg: ModelConfig, run=None) -> tuple[int, tuple[int, ...]]:
    """(EOS id, stop ids) of step `step` of `workdir` (run config `run`, default: its
    config.json if it has one); `load`, evaluation and `convert --to_hf` all take them from
    here. They are `hf_eos` of the workdir's `hf_config.json` and `hf_generation_config.json`
    for the HF weights as `convert --from_hf` wrote them (step 0), else (1, (1,)). Any later
    step was trained here, on data that ends in id 1, and so is a LoRA merge (it copies its
    base's HF configs, and is saved at the LoRA run's step). Step 0 of a LoRA run (adapters
    not trained yet) is its base's weights (`lora.base_checkpoint`): the base's ids, as for
    its merge (saved at step 0 beside a converted base's configs)."""
    ours = (EOS_ID, (EOS_ID,))
    if step != 0:
        return ours
    if run is None:
        run = checkpoints.saved_config(workdir) or {}
    if lora.is_lora_run(run):
        return checkpoint_eos(*lora.base_checkpoint(lora.LoraConfig.from_dict(run.lora)), cfg)
    hf_config, generation_config = (hf_interop.read_source_config(
        workdir, checkpoints.CheckpointError, "that convert --from_hf wrote, which holds the "
        "model's eos_token_id", "restore it", name) for name in (
            hf_interop.HF_SOURCE_CONFIG, hf_interop.GENERATION_SOURCE_CONFIG))
    if hf_config is None:
        return ours
    return hf_eos(hf_config, cfg.vocab_size, generation_config)


def load_chat_template(settings_path, jinja_path, named_path):
    """The chat template of an HF tokenizer (`chat.ChatTemplate.from_settings`): the file at
    `jinja_path` (chat_template.jinja) with the named templates at `named_path` (an HF
    directory's additional_chat_templates/, or a converted workdir's copy of it:
    `read_named_chat_templates`), else the `chat_template` of the tokenizer_config.json at
    `settings_path`; without any, a ChatTemplate that renders only a given `chat_template`
    text. One that cannot be read is a
    `chat.UnusableTemplate` (using it raises why) and a warning: the model works without it."""
    from t5x_lite import chat
    jinja = epath.Path(jinja_path)
    try:
        settings = hf_interop.read_json_object(settings_path, hf_interop.InteropError,
                                               "the tokenizer's settings", "fix or remove it")
        text = _template_text(jinja) if jinja.exists() else None
        named = read_named_chat_templates(named_path)
        source = jinja if text is not None else named_path if named else settings_path
        return chat.ChatTemplate.from_settings(settings, text, str(source), named)
    except (chat.ChatError, hf_interop.InteropError) as e:
        logging.warning("%s; going on without a chat template", e)
        return chat.UnusableTemplate(f"the model's chat template cannot be used: {e}")


def _template_text(path) -> str:
    """A template file's text (ChatError when it is not UTF-8 or cannot be read)."""
    from t5x_lite import chat
    try:
        return epath.Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise chat.ChatError(f"{path} is not UTF-8 text") from None
    except OSError as e:  # a directory, no permission
        raise chat.ChatError(f"{path} cannot be read: {e.strerror or e}") from None


def named_chat_template_files(path) -> list:
    """The `<name>.jinja` files of a directory of named chat templates (an HF directory's
    additional_chat_templates/, as transformers 5 saves and reads them, or a converted
    workdir's copy of it), by name; [] when there is no such directory."""
    path = epath.Path(path)
    return sorted(path.glob("*.jinja"), key=lambda f: f.name) if path.is_dir() else []


def read_named_chat_templates(path) -> dict[str, str] | None:
    """The named chat templates {name: text} in directory `path`
    (`named_chat_template_files`); None when there are none."""
    return {f.name[:-len(".jinja")]: _template_text(f)
            for f in named_chat_template_files(path)} or None


def load_vocabulary(path, cfg: ModelConfig, run, tokenizer_config=None):
    """The vocabulary at `path` (None when there is none) for model `cfg` of run config `run`:
    a T5-convention one (`Vocabulary`, with the run's extra ids), or for a decoder-only model
    any other sentencepiece model (`LlamaVocabulary`, BOS as `tokenizer_config` says:
    `hf_interop.llama_vocabulary`) or an HF tokenizer.json (`TokenizerJsonVocabulary`).
    CheckpointError when it has more ids than the embedding has rows (`convert --from_hf`
    checks an HF vocabulary with this too)."""
    if path is None or not epath.Path(path).exists():
        return None
    try:
        from t5x_lite import vocab as vocab_lib
    except ImportError:  # the vocabulary module is optional for id-only use
        return None
    extra_ids = run.get("data", {}).get("extra_ids", 100)
    kind = hf_interop.hf_vocabulary_name(cfg, path)
    if kind == hf_interop.HF_TOKENIZER_JSON:
        from t5x_lite.hf_tokenizer import TokenizerJsonVocabulary, UnsupportedTokenizer
        try:
            vocab = TokenizerJsonVocabulary(path)
        except UnsupportedTokenizer as e:
            logging.warning("%s; going on without a vocabulary (token ids only)", e)
            return None
        extra_ids = 0
    elif kind == hf_interop.HF_LLAMA_VOCAB:
        vocab = hf_interop.llama_vocabulary(path, tokenizer_config)
        extra_ids = 0
    else:
        vocab = vocab_lib.Vocabulary(path, extra_ids=extra_ids)
    if kind != hf_interop.HF_TOKENIZER_JSON:  # a sentencepiece model: HF may add tokens to it
        hf_interop.warn_unread_added_tokens(
            vocab, tokenizer_config, epath.Path(path).parent / hf_interop.HF_TOKENIZER_JSON)
    if vocab.vocab_size > cfg.vocab_size:
        raise checkpoints.CheckpointError(
            f"Vocabulary {path} has {vocab.vocab_size} ids"
            f"{f' ({vocab.sp_size} pieces + {extra_ids} extra ids)' if extra_ids else ''} but "
            f"the model's embedding has only {cfg.vocab_size} rows")
    return vocab
