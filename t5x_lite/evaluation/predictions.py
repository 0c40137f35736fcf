"""Decode an eval split of inputs/targets pairs and collect predictions.

    examples = read_examples(config.data, split="validation")
    records = predict(loaded, examples, data_cfg=config.data, max_new_tokens=32)
    # [{"index", "inputs", "targets", "prediction", "score", "finished"}, ...]

Prompts are built the way the training objective saw the inputs:
- T5 (seq2seq): inputs + EOS (the model's, `LoadedModel.eos_id`), truncated to
  `data.inputs_length` (EOS kept).
- GPT (prompt_completion / causal_lm pairs): `[0] + inputs`; prefix_lm pairs: `[0] + inputs +
  EOS`, the prefix `PrefixLMFromPairs` trains on (its first target follows the EOS). Our data
  pipeline feeds every decoder-only row the decoder start id 0 before its first token, so a
  t5x_lite GPT expects it; a converted Llama / Mistral with its tokenizer gets its BOS instead
  (`generate.start_ids`), a GPT without a vocabulary (an HF GPT-2, where 0 is a real token) the
  prompt as is. Over-long prompts keep their end (next to the answer, EOS
  included): at most max_len - (max_new_tokens - 1) tokens, as generation allows (the last new
  token is never fed back).
A prediction's text ends before the stop id that ended it (`generate`'s `text`).
Every process decodes the whole split (identical inputs give identical outputs); only process
0 writes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging

from t5x_lite.data import DataConfig
from t5x_lite.decoding import generate as gen
from t5x_lite.errors import UserError

DECODER_START_ID = 0


class PredictionError(UserError):
    """A split or options that cannot be decoded (one line)."""


@dataclasses.dataclass(frozen=True)
class Example:
    index: int
    inputs: str
    targets: str
    entry: str = ""  # the data.mixture entry it comes from ("" without a mixture)

    def entry_field(self) -> dict[str, str]:
        """What a record of this example says of its entry: {"entry": name}, or nothing."""
        return {"entry": self.entry} if self.entry else {}


def read_examples(data_cfg, split: str, instead: str = "use --predict=false") -> list[Example]:
    """The split's inputs/targets pairs in order (the order `shuffle=False` batches use); for a
    `data.mixture`, those of each entry holding pairs, one entry after another (entries of text
    documents have nothing to compare and are left out). `instead`: what the error for text
    documents only suggests."""
    from t5x_lite.data import sources  # tfds import: only when a split is actually read
    from t5x_lite.data.loader import entry_errors

    data = DataConfig.from_dict(data_cfg)
    found, texts = [], []
    for part in data.components():
        with entry_errors(part):
            source = sources.make_source(part.config, part.split(data, split))
        (found if source.kind == "pairs" else texts).append((part.name, source))
    if not found:
        raise PredictionError(f"{texts[0][1].description} holds text documents, not "
                              f"inputs/targets pairs: there is nothing to decode and compare "
                              f"({instead})")
    for _, source in texts:
        logging.info("%s holds text documents: not decoded", source.description)
    records = [(name, source.decoder.map(source.data_source[i]))
               for name, source in found for i in range(len(source))]
    return [Example(i, rec["inputs"], rec["targets"], name)
            for i, (name, rec) in enumerate(records)]


def uses_start_token(loaded) -> bool:
    """Whether GPT prompts start with a start id (`generate.start_ids`; module docstring)."""
    return bool(getattr(loaded, "uses_start_token", False))


def prompt_ids(loaded, text: str, *, data_cfg, max_new_tokens: int,
               start_token: bool | None = None) -> list[int]:
    """Token ids of one prompt, truncated as described in the module docstring."""
    cfg = loaded.model.config
    data = DataConfig.from_dict(data_cfg)
    ids = list(loaded.vocab.encode(text))
    if cfg.family == "t5":
        return ids[:max(data.inputs_length - 1, 1)] + [gen.eos_id(loaded)]
    if cfg.family != "gpt":
        raise PredictionError(f"decoding needs a t5 or gpt model, not {cfg.family!r}")
    head = gen.start_ids(loaded)
    if start_token is not None:
        head = (head or [DECODER_START_ID]) if start_token else []
    if data.objective == "prefix_lm":  # trained on [0] + inputs + EOS as the prefix
        ids.append(gen.eos_id(loaded))
    return gpt_prompt(cfg, ids, max_new_tokens, head, PredictionError)


def gpt_prompt(cfg, ids: Sequence[int], max_new_tokens: int, head: Sequence[int],
               error=PredictionError) -> list[int]:
    """A decoder-only prompt: `head` (the start id, `generate.start_ids`, or nothing), then the
    end of `ids` that leaves room for `max_new_tokens` (prompt + max_new_tokens - 1 <= max_len,
    `generate`'s limit: the last new token is never fed back). `error`: the exception when
    nothing fits."""
    head = list(head)
    room = cfg.max_len - (max_new_tokens - 1) - len(head)
    if room < 1:
        raise error(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                    f"model's max length {cfg.max_len}")
    return head + list(ids[max(len(ids) - room, 0):])


def default_max_new_tokens(loaded, data_cfg, run_config=None) -> int:
    """T5: data.targets_length (what the decoder was trained on); GPT: config.decode's value."""
    if loaded.model.config.family == "t5":
        return DataConfig.from_dict(data_cfg).targets_length
    return int(gen.decode_options(loaded).max_new_tokens)


def first(result) -> dict[str, Any]:
    """The best beam / first sample of a generate() result."""
    return result[0] if isinstance(result, list) else result


def predict(loaded, examples: Sequence[Example], *, data_cfg, max_new_tokens: int | None = None,
            start_token: bool | None = None, **decode_overrides) -> list[dict[str, Any]]:
    """Decodes every example; one record per example, in order.

    Args:
      loaded: a `t5x_lite.api.LoadedModel` (needs a vocabulary).
      decode_overrides: method, num_beams, temperature, ... (None = the run config's `decode`).
    """
    if not examples:
        raise PredictionError("no examples to decode (empty split)")
    if getattr(loaded, "vocab", None) is None:
        raise PredictionError("decoding text needs the model's vocabulary (vocab.model)")
    n = max_new_tokens or default_max_new_tokens(loaded, data_cfg)
    prompts = [prompt_ids(loaded, ex.inputs, data_cfg=data_cfg, max_new_tokens=n,
                          start_token=start_token) for ex in examples]
    try:
        results = gen.generate(loaded, input_ids=prompts, max_new_tokens=n, **decode_overrides)
    except gen.DecodeError as e:
        raise PredictionError(str(e)) from None
    out = []
    for ex, res in zip(examples, results):
        best = first(res)
        out.append({"index": ex.index, **ex.entry_field(),
                    "inputs": ex.inputs, "targets": ex.targets,
                    "prediction": best["text"], "score": best["score"],
                    "finished": best["finished"]})
    return out
