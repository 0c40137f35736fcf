r"""In-context learning evaluation: zero-, one- and few-shot prompts, scored by generation or by
the log-likelihood of candidate answers (multiple choice).

    template = FewShotTemplate("Q: {inputs} A: {targets}", separator="\n")
    prompts, shots = build_prompts(queries, pool, k=3, template=template, seed=0)
    metrics, records = evaluate_choice(loaded, queries, pool, FewShotOptions(k=3))

A prompt is `prefix`, then k solved examples ("shots"), then the query, joined by `separator`:

    [prefix SEP] shot_1 SEP ... shot_k SEP query       shot  = template with inputs and targets
                                                       query = template cut before {targets},
                                                               trailing whitespace removed
The k shots of query i are drawn without replacement from the pool (a train split) by
`numpy.random.default_rng([seed, i])`: reproducible, independent of batch order and of the
other queries. A query is never its own shot: when the pool is the query split itself, query
i never draws pool example i, and no query draws a pool example with the same inputs (a
duplicate, or an example in both splits), whose target would give its answer away.

Scoring:
- "generate": greedy decoding of the answer, cut at the first stop string (the separator when it
  is not blank, and the template's text before {inputs}, e.g. "Q:" -- where the model would
  start a next example), then the text metrics (exact match, ...). The decoder stops a row at
  those stop strings (`decoding.stop_strings`), so a batch ends when every answer has.
- "choice": every candidate answer is scored by log p(candidate | prompt) (GPT: the candidate's
  tokens; T5: candidate + EOS); the prediction is the highest sum ("accuracy") and the highest
  mean per token ("accuracy_norm"). Candidates: the example's own `choices`, else the distinct
  targets of the pool (classification labels).
t5x_lite GPTs get the decoder start id 0 before the prompt, a converted model with an HF
tokenizer its BOS (`generate.start_ids`; see predictions.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
from etils import epath

from t5x_lite import files
from t5x_lite.decoding import generate as gen
from t5x_lite.decoding import stop_strings
from t5x_lite.errors import UserError
from t5x_lite.evaluation import likelihood, predictions, text_metrics
from t5x_lite.evaluation.predictions import Example

SCORING = ("generate", "choice")


class FewShotError(UserError):
    """Bad few-shot settings or data (one line)."""


@dataclasses.dataclass(frozen=True)
class FewShotTemplate:
    template: str = "Q: {inputs} A: {targets}"
    separator: str = "\n"
    prefix: str = ""

    def __post_init__(self):
        t = self.template
        if t.count("{inputs}") != 1 or t.count("{targets}") != 1 or (
                t.index("{inputs}") > t.index("{targets}")):
            raise FewShotError(f"template must hold {{inputs}} then {{targets}}, once each; got "
                               f"{t!r}")

    def _parts(self):
        pre, rest = self.template.split("{inputs}")
        mid, post = rest.split("{targets}")
        return pre, mid, post

    def shot(self, inputs: str, targets: str) -> str:
        pre, mid, post = self._parts()
        return pre + inputs + mid + targets + post

    def query(self, inputs: str) -> str:
        pre, mid, _ = self._parts()
        return (pre + inputs + mid).rstrip()

    def build(self, shots: Sequence[Example], inputs: str) -> str:
        parts = ([self.prefix] if self.prefix else []) + [
            self.shot(s.inputs, s.targets) for s in shots] + [self.query(inputs)]
        return self.separator.join(parts)

    def stop_strings(self) -> list[str]:
        stops = [self.separator.strip(), self._parts()[0].strip()]
        return [s for s in dict.fromkeys(stops) if s]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest stop string, stripped."""
    end = min([i for i in (text.find(s) for s in stops) if i >= 0], default=len(text))
    return text[:end].strip()


def begins_in_prompt(vocab, prompt_ids, ids, stops: Sequence[str]) -> bool:
    """Whether a stop string that the prompt begins ends in the generated `ids`, on the text
    the decoder's stop strings read (`vocab.token_bytes`; `decode` may drop a first piece's
    space): the decoder stops there (HF's rule), so a prompt ending in "=" and a generated
    "=" end at "==", and the answer is empty. An id without a token (None, or past the
    tokens) ends every match there, as in `stop_strings`."""
    tokens = vocab.token_bytes()

    def pieces(row) -> list[bytes]:  # the text of `row` split where an id has no token
        out = [b""]
        for i in row:
            b = tokens[i] if 0 <= i < len(tokens) else None
            if b is None:
                out.append(b"")
            else:
                out[-1] += b
        return out

    strings = [s.encode("utf-8") for s in stops]
    keep = max(map(len, strings), default=1) - 1
    tail = pieces(prompt_ids)[-1][-keep:] if keep else b""
    joined = tail + pieces(ids)[0]
    # a match at i ends in the generated bytes when i + len(s) > len(tail)
    return any(0 <= joined.find(s, max(0, len(tail) - len(s) + 1)) < len(tail)
               for s in strings)


@dataclasses.dataclass(frozen=True)
class FewShotOptions:
    """How to evaluate; `k = 0` is zero-shot."""

    k: int = 0
    scoring: str = "generate"
    template: FewShotTemplate = FewShotTemplate()
    seed: int = 0
    max_new_tokens: int = 32
    batch_size: int = 32  # rows per scoring batch ("choice")
    metrics: str = "auto"  # text metrics of "generate"

    def __post_init__(self):
        if self.k < 0:
            raise FewShotError(f"k must be >= 0, got {self.k}")
        if self.seed < 0:  # numpy seeds are non-negative
            raise FewShotError(f"the shot seed must be >= 0, got {self.seed}")
        if self.max_new_tokens < 0 or self.batch_size < 1:
            raise FewShotError(f"max_new_tokens must be >= 0 and batch_size >= 1, got "
                               f"{self.max_new_tokens} and {self.batch_size}")
        if self.scoring not in SCORING:
            raise FewShotError(f"scoring must be one of {SCORING}, got {self.scoring!r}")


def draw_shots(pool_size: int, k: int, seed: int, query_index: int,
               exclude: int | Iterable[int] | None = None) -> list[int]:
    """k distinct pool indices for one query (none of `exclude`), seeded by (seed, query).

    The same draw as `rng.choice(<the allowed indices>, k, replace=False)`, without building
    that array: O(k + |exclude|) per query, not O(pool)."""
    if seed < 0 or query_index < 0:
        raise FewShotError(f"the shot seed and query index must be >= 0, got {seed} and "
                           f"{query_index}")
    excluded = sorted({exclude} if isinstance(exclude, (int, np.integer)) else set(
        exclude or ()))
    excluded = np.array([e for e in excluded if 0 <= e < pool_size], np.int64)
    allowed = pool_size - excluded.size
    if k > allowed:
        raise FewShotError(f"{k} shots requested but the pool has only {allowed} "
                           "examples to draw from")
    if not k:
        return []
    picks = np.random.default_rng([seed, query_index]).choice(allowed, size=k, replace=False)
    # The t-th allowed index is t + the number of excluded e with e - (allowed ones below e),
    # i.e. e - (its rank among the excluded), <= t.
    gaps = excluded - np.arange(excluded.size)
    return [int(t + np.searchsorted(gaps, t, side="right")) for t in picks]


def build_prompts(queries: Sequence[Example], pool: Sequence[Example], *, k: int,
                  template: FewShotTemplate, seed: int, same_split: bool = False
                  ) -> tuple[list[str], list[list[int]]]:
    """(prompt text per query, pool indices of its shots). A query is never its own shot: with
    `same_split` (pool = queries) not pool[i] for query i, and in any case no pool example
    whose inputs equal the query's (after `text_metrics.normalize`), such as a duplicate
    record or one found in both splits, whose target would give the answer away. Over a
    `data.mixture` (examples that name their `entry`), a query's shots come from its own
    entry's part of the pool."""
    by_inputs: dict[str, list[int]] = {}
    if k:
        for j, ex in enumerate(pool):
            by_inputs.setdefault(text_metrics.normalize(ex.inputs), []).append(j)
    parts = _entry_parts(pool)
    rank = {j: t for part in parts.values() for t, j in enumerate(part)}  # index in its entry
    prompts, shots = [], []
    for i, q in enumerate(queries):
        exclude = set(by_inputs.get(text_metrics.normalize(q.inputs), ()))
        if same_split:
            exclude.add(i)
        part = parts.get(q.entry, []) if parts and q.entry else None
        if part is None:
            idx = draw_shots(len(pool), k, seed, i, exclude=exclude)
        else:  # the same draw over the entry's examples, numbered within the entry
            try:
                picks = draw_shots(len(part), k, seed, i, exclude=[
                    rank[j] for j in exclude if pool[j].entry == q.entry])
            except FewShotError as e:
                raise FewShotError(f"data.mixture entry {q.entry!r}: {e}") from None
            idx = [part[t] for t in picks]
        prompts.append(template.build([pool[j] for j in idx], q.inputs))
        shots.append(idx)
    return prompts, shots


def _entry_parts(examples: Sequence[Example]) -> dict[str, list[int]]:
    """{mixture entry: indices of its examples}; empty when the examples name no entry."""
    parts: dict[str, list[int]] = {}
    if any(ex.entry for ex in examples):
        for j, ex in enumerate(examples):
            parts.setdefault(ex.entry, []).append(j)
    return parts


def read_jsonl(path) -> list[dict[str, Any]]:
    """Few-shot records: {"inputs": str, "targets": str, optional "choices": [str, ...]}."""
    from t5x_lite.finetune_templates import jsonl_lines

    path = epath.Path(path)
    if not path.exists():
        raise FewShotError(f"{path} does not exist")
    out = []
    for n, line in enumerate(jsonl_lines(path, FewShotError), 1):
        if not line.strip():
            continue
        try:
            rec = files.json_line(line)
        except ValueError as e:
            raise FewShotError(f"{path}:{n}: invalid JSON ({e})") from None
        ok = (isinstance(rec, dict) and isinstance(rec.get("inputs"), str)
              and isinstance(rec.get("targets"), str))
        choices = rec.get("choices") if isinstance(rec, dict) else None
        if not ok or (choices is not None and not (
                isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)
                and rec["targets"] in choices)):
            raise FewShotError(f"{path}:{n}: expected {{\"inputs\": str, \"targets\": str}} and "
                               "optionally \"choices\": a list of strings holding the target")
        out.append({"inputs": rec["inputs"], "targets": rec["targets"], "choices": choices})
    if not out:
        raise FewShotError(f"{path} has no records")
    return out


def _prompt_ids(loaded, text: str, max_new_tokens: int) -> list[int]:
    cfg = loaded.model.config
    ids = list(loaded.vocab.encode(text))
    if cfg.family == "gpt":  # over-long: keep the end (the query)
        return predictions.gpt_prompt(cfg, ids, max_new_tokens, gen.start_ids(loaded),
                                      FewShotError)
    return ids


def _check(loaded, queries):
    if not queries:
        raise FewShotError("no queries to evaluate")
    if getattr(loaded, "vocab", None) is None:
        raise FewShotError("few-shot prompts are text: the model needs a vocabulary")


def evaluate_generation(loaded, queries: Sequence[Example], pool: Sequence[Example],
                        options: FewShotOptions, *, same_split: bool = False,
                        **decode_overrides) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers cut at the stop strings, scored with the text metrics."""
    _check(loaded, queries)
    prompts, shots = build_prompts(queries, pool, k=options.k, template=options.template,
                                   seed=options.seed, same_split=same_split)
    n = options.max_new_tokens
    # T5 encoder inputs end in EOS
    eos = [] if loaded.model.config.family == "gpt" else [gen.eos_id(loaded)]
    ids = [_prompt_ids(loaded, p, n) + eos for p in prompts]
    decode_overrides.setdefault("method", "greedy")
    stops = options.template.stop_strings()
    # Rows end at a stop string (those the decoder matches), so the batch ends when all have.
    decode_overrides.setdefault("stop_strings", [s for s in stops if stop_strings.fits(s)])
    try:
        results = gen.generate(loaded, input_ids=ids, max_new_tokens=n, **decode_overrides)
    except gen.DecodeError as e:
        raise FewShotError(str(e)) from None
    records, gpt = [], loaded.model.config.family == "gpt"  # T5 decodes apart from the prompt
    for q, p, s, row, res in zip(queries, prompts, shots, ids, results):
        best = predictions.first(res)
        empty = gpt and begins_in_prompt(loaded.vocab, row, best["ids"], stops)
        records.append({"index": q.index, **q.entry_field(), "inputs": q.inputs,
                        "targets": q.targets, "prompt": p, "shots": s,
                        "raw_prediction": best["text"],
                        "prediction": "" if empty else cut_at_stop(best["text"], stops)})
    return text_metrics.of_records(records, options.metrics), records


def evaluate_choice(loaded, queries: Sequence[Example], pool: Sequence[Example],
                    options: FewShotOptions, *, choices: Sequence[Sequence[str]] | None = None,
                    same_split: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Multiple choice by log-likelihood; `choices[i]` are query i's candidates (None, or a
    None entry: the distinct targets of the pool and the queries). Returns accuracy /
    accuracy_norm (%) and per-query records."""
    _check(loaded, queries)
    norm = text_metrics.normalize
    # Targets that normalise alike ("yes", "yes ") are one label (the first spelling in sorted
    # order): as two they tie exactly, and the one argmax never picks could never be right.
    labels: dict[str, dict[str, str]] = {"": {}}
    for ex in sorted((*pool, *queries), key=lambda ex: ex.targets):
        for key in ("", ex.entry) if ex.entry else ("",):  # a mixture entry's own labels too
            labels.setdefault(key, {}).setdefault(norm(ex.targets), ex.targets)
    choices = [None] * len(queries) if choices is None else choices
    if len(choices) != len(queries):
        raise FewShotError(f"{len(choices)} choice lists for {len(queries)} queries")
    choices = [sorted(labels[q.entry].values()) if c is None else c
               for q, c in zip(queries, choices)]
    for q, c in zip(queries, choices):
        if norm(q.targets) not in {norm(x) for x in c}:
            raise FewShotError(f"query {q.index}: target {q.targets!r} is not among its choices")
        first = {}
        for x in c:  # as two, they tie exactly, and either counts as right
            if first.setdefault(norm(x), x) != x:
                raise FewShotError(f"query {q.index}: choices {first[norm(x)]!r} and {x!r} are "
                                   "one answer once normalised (as exact_match compares them); "
                                   "keep one")
        if len(first) < 2:
            raise FewShotError(f"query {q.index}: one candidate ({q.targets!r}) makes multiple "
                               "choice trivial; give \"choices\" or a pool with other targets")
    prompts, shots = build_prompts(queries, pool, k=options.k, template=options.template,
                                   seed=options.seed, same_split=same_split)
    rows_p, rows_c = [], []
    gpt = loaded.model.config.family == "gpt"
    for q, p, cands in zip(queries, prompts, choices):
        encoded = [list(loaded.vocab.encode(c)) for c in cands]
        empty = [c for c, ids in zip(cands, encoded) if not ids]
        if gpt and empty:  # T5 scores a candidate's EOS, so an empty one is still a sequence
            raise FewShotError(f"query {q.index}: choice {empty[0]!r} encodes to no tokens, "
                               "which a decoder-only model cannot score")
        longest = max(range(len(cands)), key=lambda j: len(encoded[j]))
        if gpt and len(encoded[longest]) + predictions.uses_start_token(loaded) > \
                loaded.model.config.max_len:
            raise FewShotError(f"query {q.index}: choice {cands[longest][:40]!r} is "
                               f"{len(encoded[longest])} tokens, which leave no room for a "
                               f"prompt in the model's max length {loaded.model.config.max_len}")
        pid = _prompt_ids(loaded, p, len(encoded[longest]))
        rows_p += [pid] * len(cands)
        rows_c += encoded
    try:
        ll = likelihood.log_likelihoods(loaded, rows_p, rows_c, batch_size=options.batch_size)
    except likelihood.LikelihoodError as e:
        raise FewShotError(str(e)) from None
    extra = 0 if gpt else 1  # T5 scores the EOS too
    records, pos = [], 0
    for q, p, s, cands in zip(queries, prompts, shots, choices):
        scores = ll[pos:pos + len(cands)]
        lengths = np.array([len(rows_c[pos + j]) + extra for j in range(len(cands))])
        pos += len(cands)
        best, best_norm = int(np.argmax(scores)), int(np.argmax(scores / lengths))
        records.append({"index": q.index, **q.entry_field(), "inputs": q.inputs,
                        "targets": q.targets, "prompt": p, "shots": s, "choices": list(cands),
                        "log_likelihoods": [float(x) for x in scores],
                        "prediction": cands[best], "prediction_norm": cands[best_norm]})
    return choice_metrics(records), records


def choice_metrics(records: Sequence[dict]) -> dict[str, float]:
    """accuracy / accuracy_norm (%) of multiple-choice records: the prediction and the target
    compared as `text_metrics.normalize`d text, as exact_match compares them."""
    n, norm = len(records), text_metrics.normalize
    right = lambda key: sum(norm(r[key]) == norm(r["targets"]) for r in records)
    return {"accuracy": 100.0 * right("prediction") / n,
            "accuracy_norm": 100.0 * right("prediction_norm") / n}
