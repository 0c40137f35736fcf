r"""Fine-tuning formats: prompt + completion examples (loss on the completion only) and the
instruction template (instruction / input / response) for supervised instruction tuning.

`PromptCompletion` is the grain transform behind `data.objective="prompt_completion"`
(wired in `t5x_lite/data/objectives.py`): an inputs/targets pair becomes one decoder-only row

    decoder_target_tokens  = prompt + completion + EOS
    decoder_loss_weights   = 0 ... 0  1 ...      1       (loss on the completion and its EOS)
    decoder_input_tokens   = 0 (decoder start) + targets[:-1]   (added by the pipeline)

so a fine-tuned GPT is prompted at decode time with `[0] + prompt` (see
`evaluation.predictions.prompt_ids`) and generates the completion up to EOS.

Instruction data (JSONL records with `instruction`, optional `input`, `output`) is turned into
inputs/targets pairs once, with the template below, by

    python -m t5x_lite.finetune_templates --input=alpaca.jsonl --output=/data/sft/train.jsonl

and then trained with `configs/finetune_gpt_instruction.py` (source=jsonl,
objective=prompt_completion). Evaluation and generation format prompts with the same
`InstructionTemplate.prompt`, so training and inference see identical text.

Shape legend: L row length.
"""
from __future__ import annotations

import dataclasses
import json

import grain
import numpy as np
from etils import epath

from t5x_lite import cli, errors, files
from t5x_lite.vocab import EOS_ID


class TemplateError(errors.UserError):
    """Instruction data that cannot be formatted (one line naming file:line and the field)."""


@dataclasses.dataclass(frozen=True)
class InstructionTemplate:
    """Alpaca-style prompt: a header, the instruction, the optional input, the response cue.

    The sentencepiece vocabularies of t5x_lite normalise newlines to spaces, so the section
    markers ("### Instruction:") carry the structure, not the line breaks.
    """

    header: str = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.")
    header_with_input: str = ("Below is an instruction that describes a task, paired with an "
                              "input that provides further context. Write a response that "
                              "appropriately completes the request.")
    instruction_marker: str = "### Instruction:"
    input_marker: str = "### Input:"
    response_marker: str = "### Response:"

    def prompt(self, instruction: str, input: str = "") -> str:  # noqa: A002 (the field name)
        """The text the model sees before its response (ends with the response marker)."""
        if not instruction.strip():
            raise TemplateError("empty instruction")
        parts = [self.header_with_input if input.strip() else self.header, "",
                 self.instruction_marker, instruction.strip(), ""]
        if input.strip():
            parts += [self.input_marker, input.strip(), ""]
        parts.append(self.response_marker)
        return "\n".join(parts)

    def pair(self, instruction: str, input: str, response: str) -> dict[str, str]:  # noqa: A002
        """{"inputs": prompt, "targets": response} for the prompt_completion objective."""
        if not response.strip():
            raise TemplateError("empty response")
        return {"inputs": self.prompt(instruction, input), "targets": response.strip()}


def jsonl_lines(path, error: type[errors.UserError]) -> list[str]:
    """The lines of a UTF-8 JSONL file (a leading BOM dropped), split at '\\n' only (a trailing
    '\\r' dropped): str.splitlines() would also split inside JSON strings, at a raw U+2028,
    U+2029 or U+0085. Read as the input pipeline reads files: gzip / bzip2 / xz and UTF-16
    with a byte order mark are decoded. Raises `error` naming the file and line of the first
    non-UTF-8 byte, or saying why the file is not text."""
    from t5x_lite.data import local_files

    path = epath.Path(path)
    if path.is_dir():
        raise error(f"{path} is a directory, not a JSONL file")
    try:
        raw = local_files.read_utf8_bytes(path, refuse_binary=False)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = e.object.count(b"\n", 0, e.start) + 1  # e.object: the bytes after a BOM
            raise error(f"{path} is not UTF-8 text (line {line}: byte {e.object[e.start]:#04x})"
                        ) from None
        local_files.check_not_binary(path, raw)  # UTF-16 without a BOM is valid UTF-8
    except local_files.DataFormatError as e:
        raise error(str(e)) from None
    return files.split_lines(text)


def convert_instruction_jsonl(src, dst, template: InstructionTemplate = InstructionTemplate(),
                              *, instruction_key: str = "instruction", input_key: str = "input",
                              response_key: str = "output") -> int:
    """Writes `dst` (JSONL of {"inputs", "targets"}) from instruction records in `src`.

    Written to a temp file and renamed, so `dst` is complete or absent. Returns the number of
    records. Raises TemplateError naming file:line for bad JSON, missing / non-string fields,
    empty instructions or responses, non-UTF-8 bytes, or an input without records.
    """
    src, dst = epath.Path(src), epath.Path(dst)
    if not src.exists():
        raise TemplateError(f"{src} does not exist")
    blocking = files.file_in_the_way(dst)
    if blocking:
        raise TemplateError(f"cannot write {dst}: {blocking} is a file, not a directory")
    out = []
    for n, line in enumerate(jsonl_lines(src, TemplateError), 1):
        if not line.strip():
            continue
        where = f"{src}:{n}"
        try:
            rec = files.json_line(line)
        except ValueError as e:
            raise TemplateError(f"{where}: invalid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise TemplateError(f"{where}: expected a JSON object")
        for key, required in ((instruction_key, True), (input_key, False), (response_key, True)):
            if (required and key not in rec) or not isinstance(rec.get(key, ""), str):
                raise TemplateError(f"{where}: field {key!r} must be a string "
                                    f"(keys: {sorted(rec)[:8]})")
            problem = files.not_unicode(rec.get(key, ""))
            if problem:
                raise TemplateError(f"{where}: field {key!r} holds {problem}")
        try:
            pair = template.pair(rec[instruction_key], rec.get(input_key, ""), rec[response_key])
        except TemplateError as e:
            raise TemplateError(f"{where}: {e}") from None
        out.append(json.dumps(pair, ensure_ascii=False))
    if not out:
        raise TemplateError(f"{src} has no records")
    dst.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(dst, "\n".join(out) + "\n")  # replaces an earlier conversion
    return len(out)


class PromptCompletion(grain.transforms.Map):
    """Tokenized pair -> decoder-only example with the loss on completion + EOS only.

    Too long: the completion (+ EOS, kept) gets at least `length - min(len(prompt),
    length // 2)` tokens and the prompt keeps its *end* (the part next to the completion,
    e.g. the response marker or the query of a few-shot prompt); truncations are counted.
    """

    def __init__(self, length: int):
        from t5x_lite.data.objectives import LoggedCounter  # here: the CLI needs no data stack

        self._length = length
        self.counter = LoggedCounter(
            f"prompt_completion pairs longer than {length} tokens were truncated")

    @property
    def truncated(self) -> int:
        return self.counter.count

    def map(self, example):
        prompt, completion = example["inputs"], example["targets"]
        n = self._length
        room = n - min(prompt.size, n // 2)
        cut = completion.size + 1 > room
        completion = completion[:room - 1] if cut else completion
        completion_L = np.concatenate([completion, [EOS_ID]]).astype(np.int32)
        keep = n - completion_L.size
        if prompt.size > keep:
            cut = True
            prompt = prompt[prompt.size - keep:]
        if cut:  # one pair, counted once however many of its sides were cut
            self.counter.add()
        tokens_L = np.concatenate([prompt, completion_L]).astype(np.int32)
        weights_L = np.concatenate([np.zeros(prompt.size, np.int32),
                                    np.ones(completion_L.size, np.int32)])
        return {"decoder_target_tokens": tokens_L, "decoder_loss_weights": weights_L}


def main(argv):
    from absl import flags

    if len(argv) > 1:
        cli.exit_with("finetune_templates", f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    try:
        n = convert_instruction_jsonl(f.input, f.output, instruction_key=f.instruction_key,
                                      input_key=f.input_key, response_key=f.response_key)
    except cli.ERRORS as e:
        cli.exit_with("finetune_templates", e)
    print(f"wrote {n} prompt/completion pairs to {f.output}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("input", None, "JSONL of instruction records.", required=True)
    flags.DEFINE_string("output", None, "JSONL of {inputs, targets} pairs to write.",
                        required=True)
    flags.DEFINE_string("instruction_key", "instruction", "Field holding the instruction.")
    flags.DEFINE_string("input_key", "input", "Field holding the optional input (context).")
    flags.DEFINE_string("response_key", "output", "Field holding the response.")
    app.run(main, flags_parser=cli.flags_parser("finetune_templates"))
