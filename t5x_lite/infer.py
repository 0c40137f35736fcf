r"""Decode a file of prompts with a checkpoint, writing one JSON line per input.

    python -m t5x_lite.infer --checkpoint=/tmp/tiny_t5 --input=prompts.txt --output=out.jsonl \
        --decode.method=beam --decode.num_beams=4 --decode.alpha=0.6

--checkpoint: a t5x_lite workdir / checkpoint step dir, or an HF model directory (t5x_lite.load).
--input: `.txt` -- one prompt per line (no empty lines); `.jsonl` -- per line a JSON string, or an
  object with "inputs" (text) or "input_ids" (a list of ints; needed when there is no vocab).
--output: JSONL; per input {"inputs", "output" (text, or null without a vocab), "output_ids",
  "score", "finished"} (+ "penalised_score" for beam search); for num_samples > 1 or beam search
  with num_beams > 1, output / output_ids / score / ... are lists (beams best first).
--decode.<field>=value: overrides the `decode` section of the checkpoint's config.json
  (method, max_new_tokens, temperature, top_k, top_p, num_beams, alpha, num_samples, seed,
  batch_size, num_draft); fields not given keep the checkpoint's values, else the defaults of
  `t5x_lite.defaults.base_config`.
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
uninterrupted one would. Bad input (empty file, bad JSON line, prompt too long, bad decode
options) stops with one error line and exit code 1 before --output is touched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from typing import Any, Sequence

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from t5x_lite import cli, distributed, errors, mesh_flag
from t5x_lite.decoding import generate as gen
from t5x_lite.mesh_flag import MESH

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint or HF model directory.")
_INPUT = flags.DEFINE_string("input", None, "Prompts: .txt (one per line) or .jsonl.")
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL (resumed when it exists).")
_DRAFT = flags.DEFINE_string("draft", None, "Draft GPT checkpoint for speculative decoding.")
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


_DECODE = _define_decode_flag()


class InferError(errors.UserError):
    """Bad input for infer (one-line message)."""


@dataclasses.dataclass
class Prompt:
    inputs: Any  # the text, or the id list as given
    ids: list[int] | None  # given ids (None: encode the text)


def read_prompts(path) -> list[Prompt]:
    """Parses a .txt or .jsonl prompt file; errors name the line."""
    path = epath.Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise InferError(f"--input must be a .txt or .jsonl file, got {path}")
    if not path.exists():
        raise InferError(f"--input {path} does not exist")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise InferError(f"--input {path} is not UTF-8 text") from None
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
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
        if isinstance(item, str):
            prompts.append(Prompt(item, None))
        elif isinstance(item, dict) and isinstance(item.get("inputs"), str):
            prompts.append(Prompt(item["inputs"], None))
        elif (isinstance(item, dict) and isinstance(item.get("input_ids"), list)
              and all(isinstance(t, int) and not isinstance(t, bool) for t in item["input_ids"])):
            prompts.append(Prompt(item["input_ids"], list(item["input_ids"])))
        else:
            raise InferError(f"{where}: expected a JSON string or an object with \"inputs\" "
                             "(text) or \"input_ids\" (list of ints)")
    return prompts


def resume_point(path, prompts: Sequence[Prompt]) -> int:
    """How many inputs the existing output already holds; drops a trailing partial line.

    Raises InferError when a complete line is not valid JSON or was written for another input.
    """
    path = epath.Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]  # a crash can only cut the last line
    lines = complete.decode("utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise InferError(f"--output {path}:{n} is not valid JSON; not resuming into it"
                             ) from None
        ours = n <= len(prompts) and isinstance(item, dict)
        if not ours or item.get("inputs") != prompts[n - 1].inputs:
            raise InferError(f"--output {path}:{n} was written for other inputs than --input "
                             "holds; use a new --output (or delete it)")
    if len(complete) != len(data):
        path.write_bytes(complete)
    return len(lines)


def _record(prompt: Prompt, result) -> dict:
    items = result if isinstance(result, list) else [result]
    fields = {"output": [r.get("text") for r in items], "output_ids": [r["ids"] for r in items],
              "score": [r["score"] for r in items], "finished": [r["finished"] for r in items]}
    if "penalised_score" in items[0]:
        fields["penalised_score"] = [r["penalised_score"] for r in items]
    if not isinstance(result, list):
        fields = {k: v[0] for k, v in fields.items()}
    return {"inputs": prompt.inputs, **fields}


def run(checkpoint, input_path, output_path, decode_overrides: dict | None = None,
        draft_path=None, log=sys.stderr, quantize: str | None = None,
        mesh: str | None = None) -> int:
    """Decodes every input not yet in `output_path`; returns how many lines it wrote.

    `mesh`: 'data,fsdp,tensor' (the --mesh flag); None: -1,1,1 (every device, data-parallel).
    """
    from t5x_lite import api, partitioning  # the loader pulls in orbax; keep `--help` fast

    device_mesh = partitioning.make_mesh(*partitioning.parse_mesh(mesh or "-1,1,1"))
    prompts = read_prompts(input_path)
    loaded = api.load(checkpoint, quantize=quantize, mesh=device_mesh)
    draft = api.load(draft_path, mesh=device_mesh) if draft_path else None
    options = gen.decode_options(loaded, **(decode_overrides or {}))
    ids = [p.ids if p.ids is not None else gen.encode_prompts(loaded, inputs=[p.inputs])[0]
           for p in prompts]
    cfg = gen.model_config(loaded)
    draft_cfg = None
    if draft is not None:
        draft_cfg = gen.model_config(draft)
        gen.check_draft(cfg, draft_cfg, options)
    gen.check_prompts(cfg, ids, options, draft_cfg,
                      labels=[f"{input_path}:{n}" for n in range(1, len(ids) + 1)])
    main_process = distributed.is_coordinator()  # the one that writes --output and progress
    say = (lambda message: print(message, file=log)) if main_process else (lambda message: None)
    done = _agreed_resume_point(output_path, prompts)
    total = len(prompts)
    if done == total:
        say(f"infer: all {total} inputs already in {output_path}; nothing to do")
        return 0
    if done:
        say(f"infer: resuming after {done} of {total} inputs")
    out_path = epath.Path(output_path)
    if main_process:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    start, written = time.time(), 0
    with out_path.open("a") if main_process else contextlib.nullcontext() as f:
        for batch in gen.iter_generate(loaded, ids[done:], options, draft=draft, first_index=done):
            if f is not None:
                lines = [json.dumps(_record(prompts[done + written + i], r), ensure_ascii=False)
                         for i, r in enumerate(batch)]
                f.write("".join(line + "\n" for line in lines))
                f.flush()
            written += len(batch)
            rate = written / max(time.time() - start, 1e-9)
            say(f"infer: {done + written}/{total} inputs ({rate:.1f} inputs/s)")
    return written


def _agreed_resume_point(path, prompts: Sequence[Prompt]) -> int:
    """`resume_point` as process 0 (the writer of --output) finds it, on every process."""
    error, done = None, 0
    if distributed.is_coordinator():
        try:
            done = resume_point(path, prompts)
        except InferError as e:
            error, done = e, -1
    done = distributed.agree(done)
    if error is not None:
        raise error
    if done < 0:
        raise InferError(f"process 0 cannot resume into --output {path} (see its error)")
    return done


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
            quantize=_QUANTIZE.value, mesh=MESH.value)
    except cli.ERRORS as e:
        cli.exit_with("infer", e)


if __name__ == "__main__":
    from t5x_lite import host_memory
    host_memory.reexec_with_huge_pages()
    app.run(main, flags_parser=cli.flags_parser("infer"))
