"""High-level decoding: prompts in, one result per input out.

    from t5x_lite.decoding.generate import generate
    results = generate(loaded, inputs=["translate: hello"], method="beam", num_beams=4)

`loaded` is anything with `.model` (a `models.BaseModel`), `.params` and optionally `.vocab`,
`.run_config`, `.eos_id` and `.stop_ids` (what `t5x_lite.load(path)` returns; without them the
stop id is 1). Options left as None come from `loaded.run_config.decode` (the checkpoint's
config.json), then from `defaults.base_config`.

A GPT trained with objective prefix_lm (`api.is_prefix_lm`: `run_config.data.objective`) decodes
as T5X PrefixLM: the prompt (start id included) is the prefix, prefilled with bidirectional
attention among its tokens; each generated token then attends causally. Likewise the draft of
speculative decoding when it is such a model.

Batches of `batch_size` prompts are padded to a bucketed length (a power of two, >= 8) and a
bucketed row count, and each (method, shapes, options) combination compiles once.

Shape legend: B rows, P prompt length, N max new tokens, W beams, V vocab.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import weakref
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from t5x_lite import files, partitioning, quantization, token_rows
from t5x_lite.api import is_prefix_lm
from t5x_lite.config import ModelConfig
from t5x_lite.decoding import cache as cache_lib
from t5x_lite.decoding import steps, stop_strings
from t5x_lite.decoding.beam_search import EARLY_STOPPING, NEG, BeamRule, beam_search
from t5x_lite.decoding.compiler import decode_jit
from t5x_lite.decoding.filtering import SamplingConfig
from t5x_lite.decoding.processors import Processing, initial_history, take_rows
from t5x_lite.decoding.sampling import EOS_ID, sample_decode
from t5x_lite.decoding.speculative import Lookup, speculative_decode
from t5x_lite.errors import UserError

METHODS = ("greedy", "sample", "beam")
BEAM_RULES = ("t5", "hf")
# Decode options that are tuples of ids, or of (ids, bias) pairs; () = off.
SEQUENCE_OPTIONS = ("sequence_bias", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens")
INT32_MAX = 2**31 - 1  # sizes and positions are int32 inside the jitted loops
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # a Python float: compares with any int
MIN_BUCKET = 8
_SMALLER = "lower batch_size, num_beams / num_samples or max_new_tokens"  # a decode too large


class DecodeError(UserError):
    """Decode options or prompts that cannot be decoded (one-line, user-facing message)."""


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """What to decode and how; field names are those of the config's `decode` section."""

    method: str = "greedy"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0  # HF's min-p filter (after top-p): 0 = off
    typical_p: float = 1.0  # HF's typical-p filter (after min-p): 1 = off
    epsilon_cutoff: float = 0.0  # HF's epsilon cutoff (after typical-p): 0 = off
    eta_cutoff: float = 0.0  # HF's eta cutoff (after epsilon): 0 = off
    num_beams: int = 4
    alpha: float = 0.6  # T5's length penalty ((5 + length) / 6) ** alpha (beam_rule "t5")
    # "t5" (T5X's beam search) or "hf" (HF generate's: length ** length_penalty, its
    # early_stopping "false" | "true" | "never"); see `beam_search`.
    beam_rule: str = "t5"
    length_penalty: float = 1.0
    early_stopping: str = "false"
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 16
    num_draft: int = 4  # speculative decoding: draft tokens proposed per target pass
    # HF's prompt lookup decoding: speculative decoding whose proposals are the ids that
    # followed the row's last max_matching_ngram_size (or fewer) ids earlier in it. 0 = off.
    prompt_lookup_num_tokens: int = 0
    max_matching_ngram_size: int = 2
    stop_ids: tuple = ()  # ids that end a row, instead of the model's (`stop_ids`); () = those
    repetition_penalty: float = 1.0  # HF's (CTRL's) penalty on ids already in the row; 1 = off
    no_repeat_ngram_size: int = 0  # no n-gram twice in a row (HF's); 0 = off
    min_new_tokens: int = 0  # stop ids held back until a row has this many new tokens
    # HF's: ((ids, bias), ...) added to the last id after the others; sequences never
    # generated; ids always / at the first new token scored -inf (`processors`). () = off.
    sequence_bias: tuple = ()
    bad_words_ids: tuple = ()
    suppress_tokens: tuple = ()
    begin_suppress_tokens: tuple = ()
    # HF's stop_strings: a row ends at the token that completes one ("\n\n", "Q:"). () = off.
    stop_strings: tuple = ()

    def __post_init__(self):
        # lists and text, as hashable tuples
        for name in ("stop_ids", "stop_strings", "early_stopping", *SEQUENCE_OPTIONS):
            object.__setattr__(self, name, _coerce(name, getattr(self, name)))
        if self.method == "beam" and self.beam_rule == "hf" and self.num_beams == 1:
            object.__setattr__(self, "method", "greedy")  # HF's choice for one beam
        checks = [
            (self.method in METHODS,
             f"unknown decode method {self.method!r}; choose one of {', '.join(METHODS)}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (0 <= self.temperature < math.inf,
             f"temperature must be finite and >= 0, got {self.temperature}"),
            (math.isfinite(self.alpha), f"alpha must be finite, got {self.alpha}"),
            (self.beam_rule in BEAM_RULES, f"unknown beam_rule {self.beam_rule!r}; choose one "
             f"of {', '.join(BEAM_RULES)}"),
            (math.isfinite(self.length_penalty),
             f"length_penalty must be finite, got {self.length_penalty}"),
            (self.early_stopping in EARLY_STOPPING, f"early_stopping must be one of "
             f"{', '.join(EARLY_STOPPING)} (or a bool), got {self.early_stopping!r}"),
            (0 < self.repetition_penalty < math.inf, f"repetition_penalty must be finite and "
             f"> 0 (1 = off), got {self.repetition_penalty}"),
            (self.min_new_tokens >= 0, f"min_new_tokens must be >= 0 (0 = off), got "
             f"{self.min_new_tokens}"),
            (self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0 (0 = off), "
             f"got {self.no_repeat_ngram_size}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1] (0 = off), got {self.min_p}"),
            (0.0 < self.typical_p <= 1.0,
             f"typical_p must be in (0, 1] (1 = off), got {self.typical_p}"),
            *[(0.0 <= getattr(self, f) < 1.0, f"{f} must be in [0, 1) (0 = off), got "
               f"{getattr(self, f)}") for f in ("epsilon_cutoff", "eta_cutoff")],
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.num_draft >= 1, f"num_draft must be >= 1, got {self.num_draft}"),
            (self.prompt_lookup_num_tokens >= 0, f"prompt_lookup_num_tokens must be >= 0 (0 = "
             f"off), got {self.prompt_lookup_num_tokens}"),
            (1 <= self.max_matching_ngram_size <= 64, f"max_matching_ngram_size must be in "
             f"[1, 64], got {self.max_matching_ngram_size}"),
            # keys are made from 32 bits: a wider seed wrapped onto another's samples
            (0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}"),
            *[(getattr(self, f) <= INT32_MAX, f"{f} must be <= {INT32_MAX}, got "
               f"{getattr(self, f)}") for f in ("max_new_tokens", "top_k", "num_beams",
                                                "num_samples", "batch_size", "num_draft",
                                                "prompt_lookup_num_tokens",
                                                "min_new_tokens", "no_repeat_ngram_size")],
            (self.num_samples == 1 or self.method == "sample",
             f"num_samples={self.num_samples} needs method='sample' (got {self.method!r})"),
        ]
        for ok, message in checks:
            if not ok:
                raise DecodeError(message)

    @property
    def sampling(self) -> SamplingConfig:
        if self.method == "sample" and self.temperature > 0:
            return SamplingConfig(**{f.name: getattr(self, f.name)
                                     for f in dataclasses.fields(SamplingConfig)})
        return SamplingConfig(temperature=0.0)

    def processing(self, eos) -> Processing | None:
        """The sequence processors (`processors.Processing`: sequence bias, repetition
        penalty, no-repeat n-grams, bad words, min_new_tokens, suppressed tokens) for stop ids
        `eos` (None: all off)."""
        return Processing.of(self.repetition_penalty, self.no_repeat_ngram_size,
                             self.min_new_tokens, eos, self.sequence_bias, self.bad_words_ids,
                             self.suppress_tokens, self.begin_suppress_tokens)

    @property
    def beam(self) -> BeamRule:
        """The beam search's scoring and stopping rule."""
        if self.beam_rule == "hf":
            return BeamRule(True, self.length_penalty, self.early_stopping)
        return BeamRule(False, self.alpha)

    @property
    def processed_ids(self) -> list[int]:
        """Every token id the sequence processors name."""
        return [*(i for ids, _ in self.sequence_bias for i in ids),
                *(i for ids in self.bad_words_ids for i in ids), *self.suppress_tokens,
                *self.begin_suppress_tokens]

    @property
    def rows_per_prompt(self) -> int:
        return self.num_beams if self.method == "beam" else self.num_samples


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(DecodeOptions)}


def _coerce(name: str, value):
    if name in ("stop_ids", "suppress_tokens", "begin_suppress_tokens"):
        return _ids_option(name, value)
    if name == "bad_words_ids":
        return _sequences_option(value)
    if name == "sequence_bias":
        return _sequence_bias_option(value)
    if name == "stop_strings":
        return _stop_strings_option(value)
    if name == "early_stopping":  # HF's True / False / "never", or their flag text
        return str(value).lower() if isinstance(value, (bool, str)) else value
    kind = {"str": str, "int": int, "float": float}[_FIELD_TYPES[name]]
    try:
        if isinstance(value, (bool, np.bool_)) and kind is not str:
            raise TypeError  # True is no count (int(True) == 1)
        out = kind(value)
    except (TypeError, ValueError):
        raise DecodeError(f"decode.{name} must be {'an' if kind is int else 'a'} "
                          f"{kind.__name__}, got {value!r}") from None
    if kind is int and out != value:
        raise DecodeError(f"decode.{name} must be an integer, got {value!r}")
    return out


def _ids_option(name: str, value) -> tuple[int, ...]:
    """decode.<name> (stop_ids, suppress_tokens, ...) as a tuple of ids: from ids (an int, a
    list or tuple of them) or a comma-separated string of them (the flag's and the config's
    form, "" = none) or a JSON list ("[13, 198]")."""
    if isinstance(value, str) and value.strip().startswith("["):
        value = _json_option(name, value, "[13, 198]")
    items = value.split(",") if isinstance(value, str) else (
        [value] if isinstance(value, int) else value)
    try:
        parts = [p.strip() if isinstance(p, str) else p for p in items]
        ids = tuple(int(p) for p in parts if p != "")
        exact = all(isinstance(p, str) or int(p) == p for p in parts)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        ids, exact = None, False
    if ids is None or not exact or any(isinstance(p, bool) for p in parts):
        raise DecodeError(f"decode.{name} must be token ids (a list, or a comma-separated "
                          f"string such as '13,198'), got {value!r}")
    if any(i < 0 or i > INT32_MAX for i in ids):
        raise DecodeError(f"decode.{name} must be token ids in [0, {INT32_MAX}], got "
                          f"{list(ids)}")
    return tuple(dict.fromkeys(ids))


def sequence_option_text(name: str, value) -> str:
    """The config / flag text of a `SEQUENCE_OPTIONS` or stop_strings value (what `_coerce`
    reads back)."""
    if name in ("suppress_tokens", "begin_suppress_tokens"):
        return ",".join(map(str, value))
    if name == "stop_strings":
        return json.dumps(list(value)) if value else ""
    if name == "bad_words_ids":
        return json.dumps([list(ids) for ids in value]) if value else ""
    return json.dumps([[list(ids), bias] for ids, bias in value]) if value else ""


def _json_option(name: str, value, form: str):
    """A decode option given as JSON text (the flag's and the config's form; "" = none)."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return []
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DecodeError(f"decode.{name} must be JSON such as {form}, got {value!r} "
                          f"({e.msg})") from None


def _token_sequence(name: str, ids, form: str) -> tuple[int, ...]:
    if (not isinstance(ids, (list, tuple)) or not ids or any(
            isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not
            0 <= i <= INT32_MAX for i in ids)):
        raise DecodeError(f"decode.{name} must hold non-empty lists of token ids, as in "
                          f"{form}; got {ids!r}")
    return tuple(int(i) for i in ids)


def _sequences_option(value) -> tuple[tuple[int, ...], ...]:
    """decode.bad_words_ids: id sequences, from a list of lists or its JSON text."""
    form = "[[5, 6], [7]]"
    items = _json_option("bad_words_ids", value, form)
    if not isinstance(items, (list, tuple)):
        raise DecodeError(f"decode.bad_words_ids must be a list of id lists such as {form}, "
                          f"got {value!r}")
    return tuple(dict.fromkeys(_token_sequence("bad_words_ids", w, form) for w in items))


def _sequence_bias_option(value) -> tuple[tuple[tuple[int, ...], float], ...]:
    """decode.sequence_bias: ((ids, bias), ...), from HF's forms (a dict of id tuples to
    biases, or a list of [ids, bias] pairs) or the list form's JSON text. A bias is a float,
    finite or -inf (a ban); a sequence given twice keeps its last bias (as a dict would)."""
    form = "[[[5, 6], -2.0], [[7], 1.5]]"
    items = _json_option("sequence_bias", value, form)
    items = list(items.items()) if isinstance(items, dict) else items
    out: dict = {}
    for pair in items if isinstance(items, (list, tuple)) else [None]:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DecodeError(f"decode.sequence_bias must be [ids, bias] pairs such as {form}, "
                              f"got {value!r}")
        ids, bias = pair
        ok = (not isinstance(bias, bool) and isinstance(bias, (int, float, np.number))
              and (bias == -math.inf or abs(bias) <= _FLOAT32_MAX))  # as float32
        if not ok:
            raise DecodeError(f"decode.sequence_bias: a bias must be a finite float32 or -inf, "
                              f"got {bias!r}")
        out[_token_sequence("sequence_bias", ids, form)] = float(bias)
    return tuple(out.items())


def _stop_strings_option(value) -> tuple[str, ...]:
    """decode.stop_strings: from a list of strings, one string, or a JSON list's text (the
    flag's and the config's form: '["\\n\\n", "Q:"]'; "" = none). A string is read as a JSON
    list when it is one; give a list to stop at such a text itself."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.lstrip().startswith("[") else None
        except json.JSONDecodeError:
            parsed = None
        value = parsed if isinstance(parsed, list) else [value] if value else []
    if not isinstance(value, (list, tuple)):
        raise DecodeError(f"decode.stop_strings must be strings (a list, or a JSON list such as "
                          f'["\\n\\n", "Q:"]), got {value!r}')
    for item in value:
        why = ("not a str" if not isinstance(item, str) else files.not_unicode(item) or (
            f"must be 1 to {stop_strings.MAX_BYTES} bytes of UTF-8"
            if not stop_strings.fits(item) else None))
        if why:
            raise DecodeError(f"decode.stop_strings: {item!r:.60} {why}")
    return tuple(dict.fromkeys(value))


def default_decode_config():
    """The `decode` ConfigDict of `defaults.base_config` (the library's defaults)."""
    from t5x_lite.defaults import base_config  # light, but keeps import cycles impossible
    return base_config(ModelConfig(), objective="causal_lm").decode


def decode_options(loaded=None, **overrides) -> DecodeOptions:
    """Defaults <- `loaded.run_config.decode` (known keys) <- overrides that are not None."""
    values = dict(default_decode_config().to_dict())
    run_config = getattr(loaded, "run_config", None)
    if run_config is not None and "decode" in run_config:
        section = run_config["decode"]
        values.update(section.to_dict() if hasattr(section, "to_dict") else dict(section))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(overrides) - set(_FIELD_TYPES))
    if unknown:
        raise DecodeError(f"unknown decode option(s) {unknown}; known: {sorted(_FIELD_TYPES)}")
    return DecodeOptions(**{k: _coerce(k, v) for k, v in values.items() if k in _FIELD_TYPES})


# ----------------------------------------------------------------------------------- prompts
def model_config(loaded) -> ModelConfig:
    cfg = loaded.model.config
    if cfg.family not in ("t5", "gpt"):
        raise DecodeError(f"decoding needs a 't5' or 'gpt' model, this one is {cfg.family!r}")
    return cfg


def eos_id(loaded) -> int:
    """`loaded`'s EOS id (`LoadedModel.eos_id`; 1 when it has none): T5 inputs end with it."""
    return int(getattr(loaded, "eos_id", EOS_ID))


def stop_ids(loaded) -> tuple[int, ...]:
    """The ids that end `loaded`'s generated sequences (`LoadedModel.stop_ids`, () for none;
    without the attribute, `(eos_id(loaded),)`)."""
    ids = getattr(loaded, "stop_ids", None)
    return (eos_id(loaded),) if ids is None else tuple(int(i) for i in ids)


def encode_prompts(loaded, *, inputs=None, input_ids=None, messages=None,
                   labels: Sequence[str] | None = None, tools=None, documents=None,
                   continue_final_message: bool | str = False,
                   chat_template_kwargs=None, chat_template: str | None = None
                   ) -> list[list[int]]:
    """Token ids per prompt. Text is encoded with `loaded.vocab`; T5 inputs get EOS appended
    (T5's convention for encoder inputs), GPT prompts do not; a GPT trained by t5x_lite gets its
    decoder start id 0 first, a Llama-style tokenizer's its BOS (`start_ids`). Given ids are
    used as they are. `messages` (a conversation, or a list of them) are rendered with the
    model's chat template (`chat_prompts`, with the `chat` options: tools, documents,
    continue_final_message, chat_template_kwargs, chat_template)."""
    if sum(x is not None for x in (inputs, input_ids, messages)) != 1:
        raise DecodeError("give exactly one of inputs (text), input_ids or messages (chat)")
    chat = dict(tools=tools, documents=documents, continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs, chat_template=chat_template)
    if messages is not None:
        return chat_prompts(loaded, messages, labels, **chat)
    given = sorted(k for k, v in chat.items() if v is not None and v is not False)
    if given:
        raise DecodeError(f"{', '.join(given)} apply to chat messages only (give messages=)")
    if input_ids is not None:
        return token_rows.rows(input_ids, "input_ids", DecodeError, "texts go in inputs")
    try:
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
    except TypeError:  # not iterable: one non-text input
        texts = [inputs]
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise DecodeError(f"inputs are texts (str), got {type(bad).__name__} {bad!r:.40}; give "
                          "token ids as input_ids")
    vocab = getattr(loaded, "vocab", None)
    if vocab is None:
        raise DecodeError("text inputs need a vocabulary; this model has none (give input_ids)")
    eos = [eos_id(loaded)] if model_config(loaded).family == "t5" else []
    start = start_ids(loaded)
    encoded = []
    for i, text in enumerate(texts):
        try:
            encoded.append(start + list(vocab.encode(text)) + eos)
        except UserError as e:  # a lone surrogate, an <extra_id_N> past the vocabulary's
            raise DecodeError(f"{labels[i] if labels else f'inputs[{i}]'}: {e}") from None
    return encoded


def chat_prompts(loaded, messages, labels: Sequence[str] | None = None, *, tools=None,
                 documents=None, continue_final_message: bool | str = False,
                 chat_template_kwargs=None, chat_template: str | None = None
                 ) -> list[list[int]]:
    """Token ids of each conversation in `messages` (one conversation: a list of message
    dicts; or a list of conversations), rendered by `loaded.chat_template` with the assistant's
    header at the end (`add_generation_prompt`; or, with `continue_final_message`, the last
    message left open), `tools`, `documents`, `chat_template_kwargs` and `chat_template` (a
    named template's name, or Jinja text) for every conversation
    (`chat.ChatTemplate.render`), and encoded as HF's `apply_chat_template`
    does: special tokens spelled in the text are those tokens, no start id is added (the
    template writes its own). Needs a decoder-only model whose vocabulary reads special tokens
    in text (an HF tokenizer.json)."""
    from t5x_lite.chat import NO_TEMPLATE, ChatError, nonempty_list  # jinja2: for chat only
    if model_config(loaded).family != "gpt":
        raise DecodeError("messages (chat) need a decoder-only model; give T5 inputs as text")
    template, vocab = getattr(loaded, "chat_template", None), getattr(loaded, "vocab", None)
    if vocab is None:
        raise DecodeError("messages need the model's tokenizer, and this model has none that "
                          "t5x_lite reads (it takes token ids only)")
    if not getattr(vocab, "reads_special_tokens", False):
        raise DecodeError("messages need a vocabulary that reads the chat template's special "
                          "tokens in text (an HF tokenizer.json); this model's is "
                          f"{type(vocab).__name__} (sentencepiece would split them): load a "
                          "copy of the directory without its tokenizer.model")
    if template is None:
        raise DecodeError(NO_TEMPLATE)
    one = nonempty_list(messages) and isinstance(messages[0], dict)
    conversations = [messages] if one else messages
    if not nonempty_list(conversations):
        raise DecodeError(f"messages are a conversation (a list of message dicts) or a list of "
                          f"them, got {type(messages).__name__} {messages!r:.40}")
    out = []
    for i, conversation in enumerate(conversations):
        where = labels[i] if labels else f"messages[{i}]"
        try:
            out.append(list(vocab.encode(template.render(
                conversation, tools=tools, documents=documents,
                continue_final_message=continue_final_message,
                variables=chat_template_kwargs, chat_template=chat_template))))
        except (ChatError, UserError) as e:
            raise DecodeError(f"{where}: {e}") from None
    return out


def start_ids(loaded) -> list[int]:
    """[the id `loaded`'s text prompts begin with] (`LoadedModel.start_id`), or []."""
    if not getattr(loaded, "uses_start_token", False):
        return []
    return [getattr(loaded, "start_id", 0)]


def check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], options: DecodeOptions,
                  draft_cfg: ModelConfig | None = None, first_index: int = 0,
                  labels: Sequence[str] | None = None, mesh=None) -> None:
    """Raises DecodeError naming (by `labels`, default "input <index>") the first prompt that
    cannot be decoded, or the batch that cannot (`check_decode_size` on `mesh`)."""
    for n, ids in enumerate(prompts):
        i = labels[n] if labels is not None else f"input {first_index + n}"
        if not ids:
            raise DecodeError(f"{i}: empty prompt")
        if cfg.family == "t5" and not any(ids):  # the encoder would attend to nothing
            raise DecodeError(f"{i}: empty prompt (only id 0, padding for a T5 encoder)")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise DecodeError(f"{i}: token id {bad[0]} outside [0, {cfg.vocab_size})")
        if len(ids) > cfg.max_len:
            raise DecodeError(f"{i}: prompt of {len(ids)} tokens is longer than the "
                              f"model's max length {cfg.max_len}")
        for c, which in ((cfg, "the model"), (draft_cfg, "the draft model")):
            # The last new token is never fed back: the model sees prompt + n - 1 positions
            # (as `LoadedModel.score` allows prompt + continuation = max_len + 1).
            if (c is not None and c.family == "gpt"
                    and len(ids) + options.max_new_tokens - 1 > c.max_len):
                raise DecodeError(
                    f"{i}: prompt of {len(ids)} tokens + max_new_tokens "
                    f"{options.max_new_tokens} - 1 exceeds {which}'s max length {c.max_len}")
    for ids, what in ((options.stop_ids, "stop id {}"),
                      (options.processed_ids, "token id {} of sequence_bias / bad_words_ids / "
                                              "suppress_tokens / begin_suppress_tokens")):
        bad = [t for t in ids if t >= cfg.vocab_size]
        if bad:
            raise DecodeError(f"{what.format(bad[0])} is outside the model's vocabulary [0, "
                              f"{cfg.vocab_size})")
    if prompts:
        check_decode_size(cfg, prompts, options, draft_cfg, mesh)


def check_decode_size(cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                      options: DecodeOptions, draft_cfg: ModelConfig | None = None,
                      mesh=None) -> None:
    """DecodeError when one batch's largest array (a layer's KV cache, the logits) would have
    more than INT32_MAX elements: such a decode cannot run (int32 indexing), and only fails deep
    inside XLA (OverflowError, a RESOURCE_EXHAUSTED traceback, an abort); or when its KV caches
    would not fit the memory free on each of `mesh`'s devices (None: one device holds them)."""
    per = options.rows_per_prompt
    rows = batch_rows(min(options.batch_size, len(prompts)), options.batch_size)
    shards = partitioning.batch_shards(mesh) if mesh is not None else 1
    rows = -(-rows // shards) * shards * per  # `shard_rows` pads them to fill the batch axes
    k = options.num_draft if draft_cfg is not None else options.prompt_lookup_num_tokens
    prompt_len = bucket(max(len(p) for p in prompts))  # the encoder's length for T5
    slots = cache_len(cfg, prompt_len, options.max_new_tokens, k)
    largest = rows * max([cfg.vocab_size] + [slots * c.kv_heads * c.head_dim for c in
                                             (cfg, draft_cfg) if c is not None])
    what = {"beam": f" x {per} beams", "sample": f" x {per} samples"}.get(
        options.method, "") if per > 1 else ""
    request = (f"batch_size {options.batch_size}{what} x {slots} cache slots (max_new_tokens "
               f"{options.max_new_tokens})")
    if largest > INT32_MAX:
        raise DecodeError(f"{request} is too large to decode: {largest} elements in one "
                          f"array, over {INT32_MAX}; {_SMALLER}")
    devices = mesh.size if mesh is not None else 1
    need = sum(cache_bytes(c, rows, slots, prompt_len, devices) for c in (cfg, draft_cfg)
               if c is not None)
    have = free_memory()
    if have is not None and need > have:
        raise DecodeError(f"{request} needs {need / 2**30:.1f} GiB of KV cache per device "
                          f"(at least), more than the {have / 2**30:.1f} GiB free; {_SMALLER}")


def cache_bytes(cfg: ModelConfig, rows: int, slots: int, encoder_len: int,
                devices: int | None = None) -> int:
    """Bytes of one decode's KV caches on each device (self-attention over `slots`, plus T5's
    cross-attention over the encoder), with the rows split evenly over `devices` (default: all
    of them). A lower bound on what the decode holds: no logits, no temporaries."""
    devices = jax.device_count() if devices is None else devices
    per_slot = cfg.decoder_layers * 2 * cfg.kv_heads * cfg.head_dim * \
        jnp.dtype(cfg.compute_dtype).itemsize
    length = slots + (encoder_len if cfg.is_encoder_decoder else 0)
    return rows * length * per_slot // devices


def free_memory() -> int | None:
    """Bytes free on each device: an accelerator's own memory, or for CPU devices (which share
    the host's) the host's available memory over the process's CPU devices; None if unknown."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError, IndexError):
            return None
        return kib * 1024 // jax.local_device_count()
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def lookup_options(loaded, draft, options: DecodeOptions) -> DecodeOptions:
    """`options` with prompt lookup off, and a warning, where it does not apply: beam search
    (as HF ignores it there), a draft model given (the draft proposes), a model that is not
    decoder-only. A model's own decode options may turn it on for decodes it does not fit."""
    if not options.prompt_lookup_num_tokens:
        return options
    why = ("beam search" if options.method == "beam" else
           "a draft model proposes" if draft is not None else
           "not a decoder-only (gpt) model" if model_config(loaded).family != "gpt" else None)
    if why is None:
        return options
    logging.warning("prompt_lookup_num_tokens=%d is not used: %s", options.prompt_lookup_num_tokens,
                    why)
    return dataclasses.replace(options, prompt_lookup_num_tokens=0)


def check_draft(loaded, draft, options: DecodeOptions):
    cfg, draft_cfg = model_config(loaded), model_config(draft)
    if cfg.family != "gpt" or draft_cfg.family != "gpt":
        raise DecodeError("speculative decoding (draft=...) needs decoder-only (gpt) models")
    if options.method == "beam":
        raise DecodeError("speculative decoding works with method 'greedy' or 'sample', not beam")
    if draft_cfg.vocab_size != cfg.vocab_size:
        raise DecodeError(f"draft vocab_size {draft_cfg.vocab_size} != target vocab_size "
                          f"{cfg.vocab_size}")
    if not options.stop_ids and set(stop_ids(draft)) != set(stop_ids(loaded)):
        raise DecodeError(f"the draft model stops at {_ids_text(stop_ids(draft))}, the target "
                          f"at {_ids_text(stop_ids(loaded))}; give a draft with the target's "
                          "stop ids")


def _ids_text(ids: Sequence[int]) -> str:
    return f"EOS id {ids[0]}" if len(ids) == 1 else f"stop ids {list(ids)}" if ids else \
        "no stop id"


def bucket(n: int) -> int:
    """Smallest power of two >= max(n, MIN_BUCKET): bounds the number of compiled shapes."""
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def batch_rows(n: int, batch_size: int) -> int:
    """Rows a batch of n <= batch_size prompts is padded to: batch_size, or for a short last
    batch the next power of two (bounds the compiled shapes)."""
    return min(batch_size, 1 << (n - 1).bit_length())


def pack_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], rows: int):
    """int32 [rows, P] (GPT: left-padded, T5: right-padded) and lengths [rows]; missing rows
    repeat the last prompt (their results are dropped)."""
    prompts = list(prompts) + [prompts[-1]] * (rows - len(prompts))
    p = bucket(max(len(x) for x in prompts))
    tokens = np.zeros((rows, p), np.int32)
    for r, ids in enumerate(prompts):
        if cfg.family == "gpt":
            tokens[r, p - len(ids):] = ids
        else:
            tokens[r, :len(ids)] = ids
    return tokens, np.array([len(x) for x in prompts], np.int32)


# ----------------------------------------------------------------------------------- jitted
def _row_keys(seed, example_B, samples: int):
    base = jax.random.key(seed)
    example_R = jnp.repeat(example_B, samples)
    sample_R = jnp.tile(jnp.arange(samples), example_B.shape[0])
    return jax.vmap(lambda e, s: jax.random.fold_in(jax.random.fold_in(base, e), s))(
        example_R, sample_R)


def _expand_rows(b: int, per: int):
    return None if per == 1 else jnp.repeat(jnp.arange(b), per)


def cache_len(cfg: ModelConfig, p: int, n: int, k: int = 0) -> int:
    """Cache slots for prompts of length p (a GPT keeps them in its cache), n new tokens and k
    speculative lookahead slots."""
    return (p if cfg.family == "gpt" else 0) + n + k


CACHE_PHASES = 4  # greedy / sampled decoding grows its cache in up to this many phases
MIN_PHASE = 64  # slots; a shorter decode keeps one cache


def cache_phases(cfg: ModelConfig, p: int, n: int, k: int = 0) -> list[int]:
    """The cache lengths of a greedy / sampled decode's phases (see `sample_decode`), or of a
    speculative decode's with k draft tokens (each phase has room for an iteration's k + 1).

    Each step's attention reads the whole cache, so one cache of the final length reads ~2x the
    slots that hold tokens, on average. Phases of equal length ending at the final length cut
    that to ~(phases + 1) / (2 phases), at the cost of one loop body per phase to compile
    (GPT-36M, batch 16, 256 new tokens: 4 phases of 64 slots).
    """
    total = cache_len(cfg, p, n, k)
    start = p if cfg.family == "gpt" else 1  # slots the prefill fills: prompt or start token
    size = max(MIN_PHASE, k + 1, -(-(total - start) // CACHE_PHASES))
    return [*range(start + size, total, size), total]


def _prompt_stops(stops, cfg: ModelConfig, tokens_BxP, lengths_B, rows_R):
    """`stops` from each (expanded) row's state after its prompt, as HF reads it (a GPT's;
    a T5's generated text has none before it: its encoder input is not in the sequence)."""
    if stops is None or cfg.family == "t5":
        return stops
    if rows_R is not None:
        tokens_BxP, lengths_B = tokens_BxP[rows_R], lengths_B[rows_R]
    valid = steps.left_pad_valid(lengths_B, tokens_BxP.shape[1])
    return stop_strings.after_prompt(stops, tokens_BxP, valid)


def _history(processing, cfg: ModelConfig, tokens_BxP, lengths_B, rows_R, room: int):
    """Each (expanded) row's history for the processors, with `room` free slots; or None."""
    history = initial_history(processing, cfg.family, tokens_BxP, lengths_B, cfg.vocab_size,
                              room)
    return history if rows_R is None else take_rows(history, rows_R)


@decode_jit(static_argnames=("cfg", "n", "sampling", "samples", "eos", "prefix_lm",
                             "processing"))
def _sample_jit(params, tokens_BxP, lengths_B, seed, example_B, *, cfg, n, sampling, samples,
                eos=(EOS_ID,), prefix_lm=False, processing=None, stops=None):
    b, p = tokens_BxP.shape
    lengths, rows = cache_phases(cfg, p, n), _expand_rows(b, samples)
    logits, cache, step = steps.prefill(cfg, params, tokens_BxP, lengths_B, lengths[0], rows,
                                        prefix_lm=prefix_lm)
    return sample_decode(step, cache, logits, _row_keys(seed, example_B, samples),
                         max_new_tokens=n, sampling=sampling, eos_id=eos,
                         grow_to=tuple(lengths[1:]), processing=processing,
                         history=_history(processing, cfg, tokens_BxP, lengths_B, rows, n),
                         stops=_prompt_stops(stops, cfg, tokens_BxP, lengths_B, rows))


@decode_jit(static_argnames=("cfg", "n", "beams", "rule", "eos", "prefix_lm", "processing"))
def _beam_jit(params, tokens_BxP, lengths_B, *, cfg, n, beams, rule, eos=(EOS_ID,),
              prefix_lm=False, processing=None, stops=None):
    b, p = tokens_BxP.shape
    rows = jnp.repeat(jnp.arange(b), beams)
    logits, cache, step = steps.prefill(cfg, params, tokens_BxP, lengths_B, cache_len(cfg, p, n),
                                        rows, prefix_lm=prefix_lm)
    return beam_search(step, cache, logits, num_beams=beams, max_new_tokens=n, rule=rule,
                       reorder_cache=cache_lib.take_rows, eos_id=eos, processing=processing,
                       history=_history(processing, cfg, tokens_BxP, lengths_B, rows, n),
                       stops=_prompt_stops(stops, cfg, tokens_BxP, lengths_B, rows))


@decode_jit(static_argnames=("cfg", "draft_cfg", "n", "k", "sampling", "samples", "eos",
                             "prefix_lm", "draft_prefix_lm", "processing", "lookup_ngram"))
def _speculative_jit(params, draft_params, tokens_BxP, lengths_B, seed, example_B, *, cfg,
                     draft_cfg, n, k, sampling, samples, eos=(EOS_ID,), prefix_lm=False,
                     draft_prefix_lm=False, processing=None, stops=None, lookup_ngram=0):
    """Speculative decoding with a draft model, or with `lookup_ngram` > 0 prompt lookup
    (`draft_params` and `draft_cfg` None)."""
    b, p = tokens_BxP.shape
    rows = _expand_rows(b, samples)
    lengths = cache_phases(cfg, p, n, k)
    logits, tcache, tstep = steps.prefill(cfg, params, tokens_BxP, lengths_B, lengths[0], rows,
                                          prefix_lm=prefix_lm)
    tokens_RxP = tokens_BxP if rows is None else tokens_BxP[rows]  # left-padded
    if lookup_ngram:
        dcache = dstep = None
        lookup = Lookup(tokens_RxP, lengths_B if rows is None else lengths_B[rows],
                        lookup_ngram)
    else:
        _, dcache, dstep = steps.prefill(draft_cfg, draft_params, tokens_BxP, lengths_B,
                                         lengths[0], rows, prefix_lm=draft_prefix_lm)
        lookup = None
    return speculative_decode(tstep, dstep, tcache, dcache, logits, tokens_RxP[:, -1],
                              _row_keys(seed, example_B, samples), max_new_tokens=n,
                              num_draft=k, sampling=sampling, eos_id=eos,
                              grow_to=tuple(lengths[1:]), processing=processing,
                              history=_history(processing, cfg, tokens_BxP, lengths_B, rows,
                                               n + k + 1),
                              stops=_prompt_stops(stops, cfg, tokens_BxP, lengths_B, rows),
                              lookup=lookup)


def shard_rows(loaded, *arrays_B):
    """The row arrays (tokens, lengths, example ids) placed for a decode on `loaded.mesh`.

    `t5x_lite.load` puts every model on a mesh (default: all devices, data-parallel). Its
    params' shardings alone would make each device decode every row; here the rows are padded
    to a multiple of the data-parallel devices (data x fsdp; the last row is repeated) and split
    over them, so each device decodes its own rows, with its params sharded as loaded (FSDP,
    tensor parallelism). Without a mesh (a plain namespace), the arrays are returned as they are.

    Returns:
      (the placed arrays, the context to trace the decode in).
    """
    mesh = getattr(loaded, "mesh", None)
    if mesh is None:
        return arrays_B, contextlib.nullcontext()
    return partitioning.place_rows(mesh, arrays_B), partitioning.activate(
        mesh, getattr(loaded, "rules", None) or partitioning.DEFAULT_RULES)


@contextlib.contextmanager
def _out_of_memory_is_a_decode_error(rows: int, options: DecodeOptions):
    """A decode the devices cannot hold (XLA's RESOURCE_EXHAUSTED) as one DecodeError line."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        lines = str(e).strip().splitlines()
        raise DecodeError(
            f"out of memory decoding {rows} rows x {options.rows_per_prompt} (batch_size "
            f"{options.batch_size}, max_new_tokens {options.max_new_tokens}): "
            f"{lines[0] if lines else 'RESOURCE_EXHAUSTED'}; {_SMALLER}") from None


def _check_same_devices(loaded, draft):
    meshes = [getattr(x, "mesh", None) for x in (loaded, draft)]
    if None not in meshes and list(meshes[0].devices.flat) != list(meshes[1].devices.flat):
        raise DecodeError("the draft model is on other devices than the target; load it on the "
                          "target's mesh: t5x_lite.load(path, mesh=target.mesh)")


def stop_tables(loaded, options: DecodeOptions) -> stop_strings.StopStrings | None:
    """The device tables of `options.stop_strings` over `loaded`'s vocabulary (None: none)."""
    if not options.stop_strings:
        return None
    vocab = getattr(loaded, "vocab", None)
    if vocab is None or not hasattr(vocab, "token_bytes"):
        raise DecodeError("stop_strings need the model's vocabulary (its tokens' text) and "
                          "this model has none; give stop_ids instead")
    return stop_strings.tables(vocab.token_bytes(), options.stop_strings,
                               model_config(loaded).vocab_size)


@functools.partial(jax.jit, static_argnames="cfg")
def _layout_jit(params, *, cfg):
    return steps.decode_layout(cfg, params)[1]


def decode_weights(loaded, cfg: ModelConfig):
    """(cfg, params) of `loaded` for the decode programs: on CPU in the decode layout
    (`steps.decode_layout`: a tied head's transposed copy, fused q/k/v and gated MLP kernels, a
    scanned stack unrolled), made once and kept on `loaded` while its params stay the same
    arrays (jax arrays, which nothing changes in place; numpy params are laid out anew).
    Made inside each decode program instead, those copies cost every call ~30-40 ms on 2
    cores (in-process A/B, 4 alternating rounds, ms per token min / median, in-program ->
    kept: GPT-36M batch 1, 32 new tokens 6.70 / 6.82 -> 5.36 / 5.87, 256 tokens 5.64 / 5.89 ->
    5.49 / 5.91; T5 ~70M batch 1, 32 tokens 7.74 / 7.98 -> 6.76 / 7.00, 256 tokens 6.27 / 6.58
    -> 6.04 / 6.37; GPT-36M batch 16, 32 tokens 23.47 / 24.68 -> 22.25 / 23.18), and the
    program held them for its whole run anyway. On other backends the params are passed as they
    are (a kept copy would hold accelerator memory) and, for a scanned stack, unrolled inside
    each program."""
    params = quantization.unbox_float(loaded.params)  # keeps int8 weights int8 (compression)
    if jax.default_backend() != "cpu":
        return cfg, params
    leaves = jax.tree_util.tree_leaves(params)
    if not all(isinstance(x, jax.Array) for x in leaves):  # numpy arrays change in place
        return steps.unrolled_config(cfg), _layout_jit(params, cfg=cfg)
    kept = getattr(loaded, "_decode_weights", None)
    if (kept is not None and kept[0] == cfg and len(kept[1]) == len(leaves)
            and all(ref() is x for ref, x in zip(kept[1], leaves))):
        return kept[2], kept[3]
    out_cfg, out = steps.unrolled_config(cfg), _layout_jit(params, cfg=cfg)
    try:
        loaded._decode_weights = (cfg, [weakref.ref(x) for x in leaves], out_cfg, out)
    except (AttributeError, TypeError):  # no attributes to keep it on, or leaves without refs
        pass
    return out_cfg, out


def decode_batch(loaded, tokens_BxP, lengths_B, options: DecodeOptions, example_B=None,
                 draft=None, stops: stop_strings.StopStrings | None = None):
    """Runs one packed batch; returns device arrays (DecodeOutput | BeamOutput, or for
    speculative decoding (DecodeOutput, stats)) with rows for (at least) the B prompts, prompt-
    major: b * per + j. On a multi-device mesh, rows may be padded (`shard_rows`). `stops`:
    `stop_tables(loaded, options)` (made here when None and the options have stop strings)."""
    cfg, params = decode_weights(loaded, model_config(loaded))
    example_B = np.arange(len(tokens_BxP)) if example_B is None else example_B
    (tokens_BxP, lengths_B, example_B), context = shard_rows(
        loaded, tokens_BxP, lengths_B, np.asarray(example_B, np.int32))
    n, eos = options.max_new_tokens, options.stop_ids or stop_ids(loaded)
    processing = options.processing(eos)
    if stops is None:
        stops = stop_tables(loaded, options)
    seed = np.uint32(options.seed % 2**32)
    plm = is_prefix_lm(loaded)
    with context:
        if options.method == "beam":
            out = _beam_jit(params, tokens_BxP, lengths_B, cfg=cfg, n=n,
                            beams=options.num_beams, rule=options.beam, eos=eos,
                            prefix_lm=plm, processing=processing, stops=stops)
        elif draft is not None:
            _check_same_devices(loaded, draft)
            draft_cfg, draft_params = decode_weights(draft, model_config(draft))
            out = _speculative_jit(params, draft_params, tokens_BxP,
                                   lengths_B, seed, example_B, cfg=cfg,
                                   draft_cfg=draft_cfg, n=n, k=options.num_draft,
                                   sampling=options.sampling, samples=options.num_samples,
                                   eos=eos, prefix_lm=plm, draft_prefix_lm=is_prefix_lm(draft),
                                   processing=processing, stops=stops)
        elif options.prompt_lookup_num_tokens:
            out = _speculative_jit(params, None, tokens_BxP, lengths_B, seed, example_B,
                                   cfg=cfg, draft_cfg=None, n=n,
                                   k=options.prompt_lookup_num_tokens,
                                   sampling=options.sampling, samples=options.num_samples,
                                   eos=eos, prefix_lm=plm, processing=processing, stops=stops,
                                   lookup_ngram=options.max_matching_ngram_size)
        else:
            out = _sample_jit(params, tokens_BxP, lengths_B, seed, example_B, cfg=cfg, n=n,
                              sampling=options.sampling, samples=options.num_samples, eos=eos,
                              prefix_lm=plm, processing=processing, stops=stops)
    if jax.process_count() > 1:  # rows decoded on other hosts' devices: every process gets all
        from jax.experimental import multihost_utils
        out = multihost_utils.process_allgather(out, tiled=True)
    return out


# ----------------------------------------------------------------------------------- results
def _result(vocab, stops: tuple[int, ...], ids_N, length, logprob, finished, penalised=None,
            token_logprob_N=None) -> dict[str, Any]:
    ids = [int(t) for t in ids_N[:int(length)]]
    out = {"ids": ids, "score": float(logprob), "finished": bool(finished)}
    if penalised is not None:
        out["penalised_score"] = float(penalised)
    if token_logprob_N is not None:
        out["token_scores"] = [float(x) for x in token_logprob_N[:int(length)]]
    if vocab is not None:  # without the stop id, which need not be the vocabulary's EOS
        out["text"] = vocab.decode(ids[:-1] if finished and ids[-1] in stops else ids)
    return out


def _unpack(out, options: DecodeOptions, count: int, vocab, stops: tuple[int, ...],
            token_scores: bool = False) -> list:
    per = options.rows_per_prompt
    if options.method == "beam":
        arrays = [np.asarray(x) for x in (out.tokens_BxWxN, out.lengths_BxW,
                                          out.model_logprob_BxW, out.finished_BxW,
                                          out.scores_BxW)]
        ranked = np.asarray(out.logprob_BxW)
        tokens = np.asarray(out.token_logprob_BxWxN) if token_scores else None
    else:
        by_prompt = lambda x: np.asarray(x).reshape((-1, per) + np.shape(x)[1:])
        arrays = [by_prompt(x) for x in
                  (out.tokens_BxN, out.lengths_B, out.logprob_B, out.finished_B)]
        tokens = by_prompt(out.token_logprob_BxN) if token_scores else None
    results = []
    for b in range(count):
        # Beam slots that hold no sequence (fewer than W exist, as with num_beams > vocabulary:
        # an empty finished slot, or a placeholder beam of log-prob ~NEG or -inf) are left out,
        # not returned as beams (the empty ones had score 0.0, better than every real beam).
        items = [_result(vocab, stops, *(a[b, j] for a in arrays),
                         token_logprob_N=None if tokens is None else tokens[b, j])
                 for j in range(per)
                 if options.method != "beam" or (arrays[1][b, j] > 0 and ranked[b, j] > NEG / 2)]
        if not items and per == 1:  # one beam, and no sequence (processors banned them all)
            items = [_result(vocab, stops, [], 0, -math.inf, False, -math.inf,
                             None if tokens is None else [])]
        results.append(items if per > 1 else items[0])
    return results


def iter_generate(loaded, prompts: Sequence[Sequence[int]], options: DecodeOptions, *,
                  draft=None, first_index: int = 0, token_scores: bool = False
                  ) -> Iterator[list]:
    """Yields the results of each batch of `options.batch_size` prompts, in order.

    `first_index` is the global index of prompts[0]: samples are keyed by (seed, global index,
    sample number), so resuming a run halfway reproduces the uninterrupted run's samples.
    `token_scores`: each result also holds its tokens' log-probs (see `generate`).
    """
    cfg = model_config(loaded)
    options = lookup_options(loaded, draft, options)
    if draft is not None:
        check_draft(loaded, draft, options)
    check_prompts(cfg, prompts, options, None if draft is None else model_config(draft),
                  first_index, mesh=getattr(loaded, "mesh", None))
    vocab = getattr(loaded, "vocab", None)
    stops, tables = options.stop_ids or stop_ids(loaded), stop_tables(loaded, options)
    bs = options.batch_size
    for start in range(0, len(prompts), bs):
        chunk = prompts[start:start + bs]
        rows = batch_rows(len(chunk), bs)
        tokens, lengths = pack_prompts(cfg, chunk, rows)
        example = np.arange(rows, dtype=np.int32) + first_index + start
        with _out_of_memory_is_a_decode_error(rows, options):  # raised when run, or read
            out = decode_batch(loaded, tokens, lengths, options, example, draft, tables)
            if draft is not None or options.prompt_lookup_num_tokens:
                out = out[0]
            results = _unpack(out, options, len(chunk), vocab, stops, token_scores)
        yield results


def generate(loaded, *, input_ids=None, inputs=None, messages=None, method=None,
             max_new_tokens=None, temperature=None, top_k=None, top_p=None, min_p=None,
             typical_p=None, epsilon_cutoff=None, eta_cutoff=None, num_beams=None, alpha=None,
             beam_rule=None, length_penalty=None, early_stopping=None, num_samples=None,
             seed=None, batch_size=None, draft=None, num_draft=None,
             prompt_lookup_num_tokens=None, max_matching_ngram_size=None, stop_ids=None,
             repetition_penalty=None, no_repeat_ngram_size=None, min_new_tokens=None,
             sequence_bias=None, bad_words_ids=None, suppress_tokens=None,
             begin_suppress_tokens=None, stop_strings=None, token_scores: bool = False,
             tools=None, documents=None, continue_final_message: bool | str = False,
             chat_template_kwargs=None, chat_template: str | None = None) -> list:
    """Decodes every input; returns one entry per input, in order.

    Args:
      loaded: a loaded model (see module docstring); `draft`: a smaller loaded GPT for
        speculative decoding (greedy or sample), proposing `num_draft` tokens per target pass.
      prompt_lookup_num_tokens: > 0 for HF's prompt lookup decoding instead (GPT; greedy or
        sample): speculative decoding with no draft model, proposing this many ids that
        followed the row's last `max_matching_ngram_size` (or fewer) ids earlier in the row
        (`speculative`). Greedy output is the same as without it, sampled output follows the
        same law; it is faster where the text repeats its input (extraction, summaries, code
        edits). Not used, with a warning, for beam search, with a draft, or for a T5.
      input_ids / inputs: token id lists, or texts (needs loaded.vocab; T5 appends EOS).
      messages: chat conversations (`chat_prompts`: a list of {"role", "content"} dicts, or a
        list of such lists), rendered with the model's chat template, as HF's
        `apply_chat_template` with `tools` (JSON schemas or Python functions), `documents`,
        `continue_final_message` (continue the last message's content, or the field it names,
        instead of starting a reply),
        `chat_template_kwargs` (more template variables, e.g. {"enable_thinking": False}) and
        `chat_template` (the name of one of the model's named templates, e.g. "tool_use", or
        Jinja text to use instead of the model's; `chat.ChatTemplate.choose`).
      method: 'greedy' | 'sample' (temperature -> top_k -> top_p; temperature 0 = greedy) |
        'beam' (num_beams; `beam_search`): beam_rule 't5' (T5X's: finished beams ranked by
        sum log p / ((5 + len) / 6) ** alpha) or 'hf' (HF `generate`'s beam search, the same
        beams and scores: sum log p / len ** length_penalty, and HF's early_stopping True /
        False / "never").
      stop_ids: ids that end a row instead of the model's (`stop_ids(loaded)`), as HF
        `generate(eos_token_id=[...])` (e.g. a newline's id for one-line answers).
      repetition_penalty: HF's penalty on every id already in the row (prompt and generated;
        > 1 discourages repeats, 1 = off); no_repeat_ngram_size: no n-gram of this size twice
        in a row (0 = off); min_new_tokens: no stop id before a row has this many new tokens.
        sequence_bias ({(ids...): bias} or [[ids, bias], ...]: the bias is added to the last
        id's logit where a row ends with the others), bad_words_ids ([[ids...], ...]: never
        generated), suppress_tokens (ids never generated), begin_suppress_tokens (not as the
        first new token). All as HF `generate` applies them, for every method
        (`processors`). min_p, typical_p, epsilon_cutoff, eta_cutoff: HF's filters of those
        names, in that order after top_p (sampling; `filtering`).
      stop_strings: a string or a list of them; a row ends at the token that completes one
        (HF's `stop_strings`, `stop_strings` module): the output keeps that token, so `text`
        holds the string. Needs the model's vocabulary.
      token_scores: also return each generated token's log-prob under the model.
      Other options: see `DecodeOptions`; None = the checkpoint's / library default.

    Returns:
      Per input a dict -- or, for num_samples > 1 or beam search with num_beams > 1, a list of
      dicts (beams best first; fewer than num_beams where fewer sequences exist) -- with `ids`
      (generated ids without prompt and padding, ending with a stop id when `finished`:
      `stop_ids`, else `stop_ids(loaded)`: the generation config's `eos_token_id` for HF
      weights, else 1; or with the token that completed a stop string), `score` (sum of
      log-probs of `ids` under the unfiltered model),
      `finished`, `text` (when there is a vocabulary) and, for beam search, `penalised_score`
      (score / length penalty, what beams are ranked by); with `token_scores`, also
      `token_scores`: log p of each id of `ids` under the unfiltered model (their sum is
      `score`; HF's `compute_transition_scores` without processors or filters).
    """
    options = decode_options(
        loaded, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
        epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, num_beams=num_beams, alpha=alpha,
        beam_rule=beam_rule, length_penalty=length_penalty, early_stopping=early_stopping,
        num_samples=num_samples, seed=seed, batch_size=batch_size, num_draft=num_draft,
        prompt_lookup_num_tokens=prompt_lookup_num_tokens,
        max_matching_ngram_size=max_matching_ngram_size,
        stop_ids=stop_ids, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens,
        sequence_bias=sequence_bias, bad_words_ids=bad_words_ids,
        suppress_tokens=suppress_tokens, begin_suppress_tokens=begin_suppress_tokens,
        stop_strings=stop_strings)
    prompts = encode_prompts(loaded, inputs=inputs, input_ids=input_ids, messages=messages,
                             tools=tools, documents=documents,
                             continue_final_message=continue_final_message,
                             chat_template_kwargs=chat_template_kwargs,
                             chat_template=chat_template)
    results: list = []
    for batch in iter_generate(loaded, prompts, options, draft=draft,
                               token_scores=token_scores):
        results.extend(batch)
    return results
