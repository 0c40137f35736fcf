r"""Decode a file of prompts with a checkpoint, writing one JSON line per input.

    python -m t5x_lite.infer --checkpoint=/tmp/tiny_t5 --input=prompts.txt --output=out.jsonl \
        --decode.method=beam --decode.num_beams=4 --decode.alpha=0.6

--checkpoint: a t5x_lite workdir / checkpoint step dir, or an HF model directory (t5x_lite.load).
--input: `.txt` -- one prompt per line (no empty lines); `.jsonl` -- per line a JSON string, or an
  object with "inputs" (text), "input_ids" (a list of ints; needed when there is no vocab) or
  "messages" (a chat: a list of {"role", "content"}, rendered with the model's chat template;
  optionally with "tools", "documents", "continue_final_message", "chat_template_kwargs",
  "chat_template" (a named template's name, or Jinja text), as generate's; the record's
  "inputs" then holds them with "messages").
  UTF-8; lines end at '\n' only (a '\r' before it is dropped: CRLF files work; U+2028, form
  feeds etc. stay inside the prompt); a UTF-8 byte order mark at the start is dropped.
--output: JSONL; per input {"inputs", "output" (text, or null without a vocab), "output_ids",
  "score", "finished"} (+ "penalised_score" for beam search, + "token_scores" with
  --token_scores: each output id's log-prob); for num_samples > 1 or beam search
  with num_beams > 1, output / output_ids / score / ... are lists (beams best first).
--decode.<field>=value: overrides the `decode` section of the checkpoint's config.json
  (method, max_new_tokens, temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff,
  eta_cutoff, num_beams, alpha, beam_rule ('t5' | 'hf': HF generate's beam search, with
  length_penalty and early_stopping 'false' | 'true' | 'never'), num_samples, seed, batch_size,
  num_draft,
  prompt_lookup_num_tokens, max_matching_ngram_size,
  repetition_penalty, no_repeat_ngram_size, min_new_tokens, sequence_bias ('[[[5, 6], -2.0]]'),
  bad_words_ids ('[[5, 6], [7]]'), suppress_tokens, begin_suppress_tokens ('5,6'),
  stop_ids: comma-separated ids that end a row instead of the model's, e.g.
  --decode.stop_ids=13,198; stop_strings: a JSON list of texts a row ends at, e.g.
  --decode.stop_strings='["\n\n", "Q:"]'); fields not given keep the checkpoint's values,
  else the defaults of `t5x_lite.defaults.base_config`.
--draft: a smaller GPT checkpoint for speculative decoding (greedy / sample).
--quantize=int8: per-channel int8 weights, dequantized inside jit (README.md).
--mesh=data,fsdp,tensor: the device mesh (default -1,1,1: every device, data-parallel). Each
  batch's prompts are split over data x fsdp; params are sharded as in training (FSDP on fsdp,
  tensor parallelism on tensor), for models too large for one device.
Multi-process (TPU VM pods, launch/cpu_local.sh --module=t5x_lite.infer): the same command on
every process; rows are decoded on all processes' devices; process 0 writes --output.

The output is flushed after every batch. Re-running the same command resumes: the complete lines
already in --output are kept (a trailing partial line is dropped) and decoding continues with the
next input; sampled outputs are keyed by (seed, input index), so a resumed run writes what an
uninterrupted one would (not with --draft or prompt lookup: speculative samples depend on the
batch).
`<output>.meta.json` (the sidecar, written atomically before the first record) records what
produced the output -- checkpoint (resolved workdir and step), --quantize, --draft and the decode
options that change the results (not batch_size); a resume or re-run with other settings is
refused, naming the fields. An output without a sidecar (older versions) is
resumed unchecked. infer never cuts or appends to a file it did not write: an --output that is
--input, whose complete lines are not infer records, or that is one unterminated line that does
not start a record for the first input, is refused. Bad input (empty file, bad JSON line, prompt
too long, bad decode options, an --output infer cannot use) stops with one error line and exit
code 1 before --output is touched; --output and its sidecar are created only when the first
batch's records are ready, so a decode that fails in its first batch leaves neither behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from t5x_lite import cli, distributed, errors, files, mesh_flag
from t5x_lite.decoding import generate as gen
from t5x_lite.mesh_flag import MESH

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint or HF model directory.")
_INPUT = flags.DEFINE_string("input", None, "Prompts: .txt (one per line) or .jsonl.")
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL (resumed when it exists).")
_DRAFT = flags.DEFINE_string("draft", None, "Draft GPT checkpoint for speculative decoding.")
_TOKEN_SCORES = flags.DEFINE_bool("token_scores", False, "Also write each output token's "
                                  "log-prob under the model (\"token_scores\").")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8"],
                              "int8: per-channel int8 weights (README.md).")
flags.adopt_module_key_flags(mesh_flag)  # --mesh, listed in --help


def _define_decode_flag():
    defaults = gen.default_decode_config()
    try:
        return config_flags.DEFINE_config_dict("decode", defaults,
                                              "Decode options (override with --decode.x=...).")
    except (AttributeError, KeyError):  # config_flags reads --decode.<field> at definition time
        bad = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--decode.")
               and a[len("--decode."):].split("=")[0] not in defaults]
        cli.exit_with("infer", f"unknown decode option(s) {bad}; known: {sorted(defaults)}")


cli.check_flagfiles("infer")  # config_flags reads them when a flag is defined
_DECODE = _define_decode_flag()


class InferError(errors.UserError):
    """Bad input for infer (one-line message)."""


SIDECAR_SUFFIX = ".meta.json"  # <output>.meta.json: what produced the output
_WRITER = "t5x_lite.infer"  # the sidecar's "written_by"
_RECORD_KEYS = frozenset({"inputs", "output", "output_ids", "score", "finished"})
_PROMPT_KEYS = ("inputs", "input_ids", "messages")  # what a .jsonl line's object gives
# beside "messages": generate()'s chat options, for that conversation
CHAT_OPTIONS = ("tools", "documents", "continue_final_message", "chat_template_kwargs",
                "chat_template")


@dataclasses.dataclass
class Prompt:
    inputs: Any  # the text, the id list or the chat messages as given (with chat options: the
    # object of "messages" and those options)
    ids: list[int] | None  # given ids (None: encode the text or messages)
    chat: bool = False  # `inputs` are chat messages (rendered with the chat template)
    chat_options: dict | None = None  # tools, documents, ... (`CHAT_OPTIONS`)

    @property
    def messages(self):
        return self.inputs["messages"] if self.chat_options else self.inputs


def read_prompts(path) -> list[Prompt]:
    """Parses a .txt or .jsonl prompt file; errors name the line."""
    path = epath.Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise InferError(f"--input must be a .txt or .jsonl file, got {path}")
    if not path.exists():
        raise InferError(f"--input {path} does not exist")
    if path.is_dir():
        raise InferError(f"--input {path} is a directory")
    try:
        text = path.read_bytes().decode("utf-8")  # read_text would turn a lone '\r' into '\n'
    except UnicodeDecodeError:
        raise InferError(f"--input {path} is not UTF-8 text") from None
    lines = files.split_lines(text.removeprefix("\ufeff"))  # a BOM is no part of a prompt
    if not lines:
        raise InferError(f"--input {path} is empty")
    prompts = []
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        if not line.strip():
            raise InferError(f"{where}: empty line (every line must hold one prompt)")
        if path.suffix == ".txt":
            prompts.append(Prompt(line, None))
            continue
        try:
            item = files.json_line(line)
        except ValueError as e:
            raise InferError(f"{where}: bad JSON ({e})") from None
        given = [json.dumps(k) for k in _PROMPT_KEYS if isinstance(item, dict) and k in item]
        if len(given) > 1:
            raise InferError(f"{where}: give one of \"inputs\", \"input_ids\" or \"messages\", "
                             f"not {' and '.join(given)}")
        stray = [json.dumps(k) for k in CHAT_OPTIONS if isinstance(item, dict) and k in item
                 and "messages" not in item]
        if stray:
            raise InferError(f"{where}: {', '.join(stray)} apply to \"messages\" (chat) lines only")
        text = item if isinstance(item, str) else (
            item.get("inputs") if isinstance(item, dict) else None)
        problem = files.not_unicode(text) if isinstance(text, str) else ""
        if problem:
            raise InferError(f"{where}: the prompt holds {problem}")
        if isinstance(item, str):
            prompts.append(Prompt(item, None))
        elif isinstance(item, dict) and isinstance(item.get("inputs"), str):
            prompts.append(Prompt(item["inputs"], None))
        elif (isinstance(item, dict) and isinstance(item.get("input_ids"), list)
              and all(isinstance(t, int) and not isinstance(t, bool) for t in item["input_ids"])):
            prompts.append(Prompt(item["input_ids"], list(item["input_ids"])))
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            options = {k: item[k] for k in CHAT_OPTIONS if k in item}
            for key in ("continue_final_message", "chat_template"):
                if key in options and options[key] is None:
                    options.pop(key)  # null: off, as the other options
            if not isinstance(options.get("chat_template", ""), str):
                raise InferError(f"{where}: \"chat_template\" must be the name of one of the "
                                 "model's chat templates or a template's text")
            if not isinstance(options.get("continue_final_message", False), (bool, str)):
                raise InferError(f"{where}: \"continue_final_message\" must be true, false or "
                                 "the name of the field to continue")
            inputs = {"messages": item["messages"], **options} if options else item["messages"]
            problem = next(filter(None, map(files.not_unicode, _strings(inputs))), "")
            if problem:  # also where the template renders none of it: the record holds it
                raise InferError(f"{where}: the conversation holds {problem}")
            prompts.append(Prompt(inputs, None, chat=True, chat_options=options or None))
        else:
            raise InferError(f"{where}: expected a JSON string or an object with \"inputs\" "
                             "(text), \"input_ids\" (list of ints) or \"messages\" (chat)")
    return prompts


def _strings(value):
    """Every string in a JSON value, keys included (a stack, not recursion: JSON nests deep)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            stack.extend(x for kv in v.items() for x in kv)
        elif isinstance(v, list):
            stack.extend(v)


# ------------------------------------------------------------------------- the output file
def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)  # links too
    except (OSError, TypeError, ValueError):  # one is missing, or not a local path
        return files.real(a) == files.real(b)


def check_output_path(input_path, output_path) -> None:
    """Refuses an --output infer could not write without losing something (reads only)."""
    if str(output_path).endswith(("/", os.sep)):  # a Path would drop the slash, then write there
        raise InferError(f"--output {output_path} names a directory; give a file path")
    out = epath.Path(output_path)
    if _same_file(input_path, out) or _same_file(input_path, sidecar_path(out)):
        raise InferError(f"--output {out} is the --input file; choose another --output")
    for path in (out, sidecar_path(out)):
        if path.is_dir():
            raise InferError(f"--output {out}: {path} is a directory; give a file path")
    blocking = files.file_in_the_way(out)
    if blocking:
        raise InferError(f"--output {out}: {blocking} is not a directory")


def _record_start(prompt: Prompt) -> bytes:
    """How `_record(prompt, ...)`'s JSON line begins."""
    return ('{"inputs": ' + json.dumps(prompt.inputs, ensure_ascii=False)
            + ', "output": ').encode("utf-8")


def _scan_output(path, prompts: Sequence[Prompt]) -> tuple[int, int | None]:
    """(records already in the output, bytes of it to keep) -- (0, None) when there is none.

    Reads only. A trailing unterminated line is left out of the bytes to keep when it is the
    start of the record of the next input (an interrupted write); anything else is refused:
    infer cuts and appends only to files it wrote.
    """
    path = epath.Path(path)
    if not path.exists():
        return 0, None
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # a crash can only cut the last line
    lines = data[:keep].split(b"\n")[:-1]
    foreign = f"--output {path} exists and was not written by infer"
    for n, raw in enumerate(lines, 1):
        try:
            item = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            item = None
        if not isinstance(item, dict) or not _RECORD_KEYS <= item.keys():
            raise InferError(f"{foreign} (line {n} is not an infer output record); choose "
                             "another path or remove it")
        if n > len(prompts) or item["inputs"] != prompts[n - 1].inputs:
            raise InferError(f"--output {path}:{n} was written for other inputs than --input "
                             "holds; use a new --output (or delete it)")
    partial = data[keep:]
    if partial:
        head = _record_start(prompts[len(lines)]) if len(lines) < len(prompts) else None
        if head is None or not (head.startswith(partial) or partial.startswith(head)):
            if not lines:
                raise InferError(f"{foreign}; choose another path or remove it")
            raise InferError(
                f"--output {path}:{len(lines) + 1} is an unterminated line that does not begin "
                f"the record of --input's line {len(lines) + 1}; not cutting it: remove it, or "
                "choose another path")
    return len(lines), keep


def resume_point(path, prompts: Sequence[Prompt]) -> int:
    """How many inputs the existing output already holds; drops a trailing partial line.

    Raises InferError when the file was not written by infer (a complete line that is not an
    output record, or a lone unterminated line that does not start one), or for other inputs.
    """
    done, keep = _scan_output(path, prompts)
    _cut(path, keep)
    return done


def _cut(path, keep: int | None) -> None:
    """Drops the bytes after `keep`, never the records before them: a local file is truncated
    in place (one system call; rewriting it emptied the file first, so a kill during the
    rewrite lost every record), a remote one replaced through a temp file."""
    path = epath.Path(path)
    if keep is None or not path.exists():
        return
    text = os.fspath(path)
    if files.is_remote(text):
        data = path.read_bytes()
        if len(data) > keep:
            files.write_atomic(path, data[:keep])
    elif os.path.getsize(text) > keep:
        os.truncate(text, keep)


def sidecar_path(output_path) -> epath.Path:
    """`<output>.meta.json`: what produced the output (checkpoint, quantize, draft, decode)."""
    out = epath.Path(output_path)
    return out.parent / (out.name + SIDECAR_SUFFIX)


def output_meta(checkpoint: dict, options: gen.DecodeOptions, quantize: str | None,
                draft: dict | None, stop_ids: Sequence[int], chat: str | None = None,
                token_scores: bool = False) -> dict:
    """The sidecar's content: everything that changes the records. `checkpoint` / `draft`:
    {"path", "step"} (`_checkpoint_id`); `stop_ids`: the ids rows end at (the option's, else
    the model's: its files may change between runs); `chat`: the chat templates' fingerprint
    when prompts are chats (`ChatTemplate.fingerprint` of the templates they may use;
    recorded only then); `token_scores`: whether records hold them (recorded only when they
    do). Decode options that the method ignores are left out, and so is batch_size (samples
    are keyed by seed and input index, not by batch)."""
    names = ["method", "max_new_tokens"]
    if options.method == "sample":
        names += ["temperature", "top_k", "top_p", "num_samples", "seed"]
    elif options.method == "beam":  # T5X's rule records as before these options existed
        names += ["num_beams", *(["alpha"] if options.beam_rule == "t5" else
                                 ["beam_rule", "length_penalty", "early_stopping"])]
    if draft is not None:
        names.append("num_draft")
    if options.prompt_lookup_num_tokens and options.method == "sample":  # greedy: the same
        names += ["prompt_lookup_num_tokens", "max_matching_ngram_size"]
    # Recorded when on, so that outputs written before these options resume as they were.
    names += [n for n in ("repetition_penalty", "min_new_tokens", "no_repeat_ngram_size",
                          *gen.SEQUENCE_OPTIONS, "stop_strings",
                          *(["min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"]
                            if options.method == "sample" else []))
              if getattr(options, n) != getattr(gen.DecodeOptions, n)]
    meta = {"written_by": _WRITER, "checkpoint": checkpoint, "quantize": quantize or "none",
            "draft": draft, "decode": {**{n: getattr(options, n) for n in names},
                                       "stop_ids": list(stop_ids)}}
    if chat is not None:
        meta["chat_template"] = chat
    if token_scores:
        meta["token_scores"] = True
    return json.loads(json.dumps(meta))  # as it reads back


def _read_sidecar(output_path) -> dict | None:
    path = sidecar_path(output_path)
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("written_by") != _WRITER:
        raise InferError(f"--output's sidecar {path} exists and was not written by infer; "
                         "choose another --output or remove it")
    return meta


def _flat(meta: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in meta.items():
        if k == "written_by":
            continue
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _check_same_meta(output_path, old: dict, new: dict) -> None:
    before, now = _flat(old), _flat(new)
    if "decode.stop_ids" not in before:  # a sidecar from before stop ids were recorded
        now.pop("decode.stop_ids", None)

    def shown(values, key):
        return repr(values[key]) if key in values else "unset"

    diffs = [f"{k}: {shown(before, k)} there, {shown(now, k)} now"
             for k in [*now, *(k for k in before if k not in now)]
             if (k in before, before.get(k)) != (k in now, now.get(k))]
    if diffs:
        raise InferError(f"--output {output_path} was written with other settings "
                         f"({'; '.join(diffs)}); re-run with those, or choose another --output")


def _write_sidecar(output_path, meta: dict) -> None:
    """Atomically (a temp file renamed over it)."""
    files.write_atomic(sidecar_path(output_path), json.dumps(meta, indent=1) + "\n")


@dataclasses.dataclass
class _Resume:
    done: int  # records already in --output
    keep: int | None = None  # bytes of --output to keep (None: none there)
    write_sidecar: bool = False  # (re)write <output>.meta.json before the first record


def _plan_resume(output_path, prompts: Sequence[Prompt], meta: dict) -> _Resume:
    done, keep = _scan_output(output_path, prompts)
    old = _read_sidecar(output_path)
    if done and old is not None:
        _check_same_meta(output_path, old, meta)
    # Records already there without a sidecar: from an older infer; resumed unchecked, as then.
    return _Resume(done, keep, write_sidecar=not done)


def _start_output(output_path, plan: _Resume, meta: dict):
    """Sidecar (if due), cut partial line, then --output opened for appending (bytes)."""
    out = epath.Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if plan.write_sidecar:
        _write_sidecar(out, meta)
    _cut(out, plan.keep)
    return out.open("ab")


def _record(prompt: Prompt, result) -> dict:
    items = result if isinstance(result, list) else [result]
    fields = {"output": [r.get("text") for r in items], "output_ids": [r["ids"] for r in items],
              "score": [r["score"] for r in items], "finished": [r["finished"] for r in items]}
    for name in ("penalised_score", "token_scores"):
        if name in items[0]:
            fields[name] = [r[name] for r in items]
    if not isinstance(result, list):
        fields = {k: v[0] for k, v in fields.items()}
    return {"inputs": prompt.inputs, **fields}


def _checkpoint_id(path) -> dict:
    """{"path": absolute workdir (or HF directory), "step": the step load reads (HF: None)}."""
    from t5x_lite import checkpoints, hf_interop

    if hf_interop.is_hf_dir(path):
        return {"path": str(files.real(path)), "step": None}
    workdir, step = checkpoints.resolve(path)
    return {"path": str(files.real(workdir)), "step": step}


def run(checkpoint, input_path, output_path, decode_overrides: dict | None = None,
        draft_path=None, log=sys.stderr, quantize: str | None = None,
        mesh: str | None = None, token_scores: bool = False) -> int:
    """Decodes every input not yet in `output_path`; returns how many lines it wrote.

    `mesh`: 'data,fsdp,tensor' (the --mesh flag); None: -1,1,1 (every device, data-parallel).
    `token_scores`: records also hold each output token's log-prob (--token_scores).
    Every check (inputs, options, prompts, --output and its sidecar) comes before anything is
    written; --output and its sidecar are created once the first batch's records are ready.
    """
    from t5x_lite import api, partitioning  # the loader pulls in orbax; keep `--help` fast

    device_mesh = partitioning.make_mesh(*partitioning.parse_mesh(mesh or "-1,1,1"))
    prompts = read_prompts(input_path)
    check_output_path(input_path, output_path)
    # Two runs appending to one --output would each resume from the same line and both write.
    with distributed.exclusive(output_path, lambda holder: InferError(
            f"--output {output_path} is being written by another infer run on this host "
            f"({holder}); wait for it to finish or stop it")):
        target_id = _checkpoint_id(checkpoint)
        draft_id = _checkpoint_id(draft_path) if draft_path else None
        loaded = api.load(checkpoint, quantize=quantize, mesh=device_mesh,
                          step=target_id["step"])
        draft = (api.load(draft_path, mesh=device_mesh, step=draft_id["step"]) if draft_path
                 else None)
        options = gen.lookup_options(loaded, draft,
                                     gen.decode_options(loaded, **(decode_overrides or {})))
        ids = [p.ids if p.ids is not None else gen.encode_prompts(
            loaded, **({"messages": [p.messages]} if p.chat else {"inputs": [p.inputs]}),
            labels=[f"{input_path}:{n}"], **(p.chat_options or {}))[0]
            for n, p in enumerate(prompts, 1)]
        draft_cfg = None
        if draft is not None:
            draft_cfg = gen.model_config(draft)
            gen.check_draft(loaded, draft, options)
        gen.check_prompts(gen.model_config(loaded), ids, options, draft_cfg,
                          labels=[f"{input_path}:{n}" for n in range(1, len(ids) + 1)],
                          mesh=loaded.mesh)
        # chat prompts were rendered above, so the model has a usable template
        chosen = [p.chat_options.get("chat_template") for p in prompts if p.chat_options]
        chat = loaded.chat_template.fingerprint([c for c in chosen if c]) if any(
            p.chat for p in prompts) else None
        meta = output_meta(target_id, options, quantize, draft_id,
                           options.stop_ids or gen.stop_ids(loaded), chat, token_scores)
        return _decode_into(loaded, draft, prompts, ids, options, output_path, meta, log,
                            token_scores)


def _decode_into(loaded, draft, prompts, ids, options, output_path, meta, log,
                 token_scores: bool = False) -> int:
    main_process = distributed.is_coordinator()  # the one that writes --output and progress
    say = (lambda message: print(message, file=log)) if main_process else (lambda message: None)
    plan = _agreed_resume_plan(output_path, prompts, meta)
    done, total = plan.done, len(prompts)
    if done == total:
        say(f"infer: all {total} inputs already in {output_path}; nothing to do")
        return 0
    if done:
        say(f"infer: resuming after {done} of {total} inputs")
    start, written = time.time(), 0
    with contextlib.ExitStack() as stack:
        f = None
        for batch in gen.iter_generate(loaded, ids[done:], options, draft=draft, first_index=done,
                                       token_scores=token_scores):
            if main_process:
                if f is None:  # only now: a decode that fails leaves no --output behind
                    f = stack.enter_context(_start_output(output_path, plan, meta))
                lines = [json.dumps(_record(prompts[done + written + i], r), ensure_ascii=False)
                         for i, r in enumerate(batch)]
                f.write("".join(line + "\n" for line in lines).encode("utf-8"))
                f.flush()
            written += len(batch)
            rate = written / max(time.time() - start, 1e-9)
            say(f"infer: {done + written}/{total} inputs ({rate:.1f} inputs/s)")
    return written


def _agreed_resume_plan(path, prompts: Sequence[Prompt], meta: dict) -> _Resume:
    """`_plan_resume` as process 0 (the writer of --output) finds it; its `done` on every
    process."""
    error, plan = None, _Resume(0)
    if distributed.is_coordinator():
        try:
            plan = _plan_resume(path, prompts, meta)
        except InferError as e:
            error, plan = e, _Resume(-1)
    done = distributed.agree(plan.done)
    if error is not None:
        raise error
    if done < 0:
        raise InferError(f"process 0 cannot resume into --output {path} (see its error)")
    return plan if distributed.is_coordinator() else _Resume(done)


def main(argv):
    if len(argv) > 1:
        cli.exit_with("infer", f"unexpected arguments {argv[1:]}")
    missing = [n for n, f in (("checkpoint", _CHECKPOINT), ("input", _INPUT), ("output", _OUTPUT))
               if not f.value]
    if missing:
        cli.exit_with("infer", f"missing --{', --'.join(missing)}")
    if not flags.FLAGS["verbosity"].present:
        cli.quiet_console(logging.WARNING)  # orbax logs a page per restore at INFO
    # Multi-process (launch/cpu_local.sh --module=t5x_lite.infer, TPU VM pods): T5X_LITE_*
    # environment / cluster auto-detection, as for training; process 0 writes --output.
    try:
        distributed.maybe_initialize()
    except distributed.DistributedError as e:
        cli.exit_with("infer", e)
    overrides = config_flags.get_override_values(flags.FLAGS["decode"])
    try:
        run(_CHECKPOINT.value, _INPUT.value, _OUTPUT.value, overrides, _DRAFT.value,
            quantize=_QUANTIZE.value, mesh=MESH.value, token_scores=_TOKEN_SCORES.value)
    except cli.ERRORS as e:
        cli.exit_with("infer", e)


if __name__ == "__main__":
    from t5x_lite import host_memory
    host_memory.reexec_with_huge_pages()
    app.run(main, flags_parser=cli.flags_parser("infer"))
