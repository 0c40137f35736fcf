"""Instruction template layout and the instruction-JSONL -> prompt/completion conversion."""
import json

import pytest

from t5x_lite.finetune_templates import (InstructionTemplate, TemplateError,
                                         convert_instruction_jsonl)


def test_prompt_layout_with_and_without_input():
    t = InstructionTemplate()
    assert t.prompt("Add the numbers.", "2 and 3") == (
        f"{t.header_with_input}\n\n### Instruction:\nAdd the numbers.\n\n"
        "### Input:\n2 and 3\n\n### Response:")
    assert t.prompt("  Say hi. ") == f"{t.header}\n\n### Instruction:\nSay hi.\n\n### Response:"
    assert t.pair("Say hi.", "", " hello ") == {"inputs": t.prompt("Say hi."), "targets": "hello"}


def test_convert_writes_pairs(tmp_path):
    src = tmp_path / "alpaca.jsonl"
    recs = [{"instruction": "Say hi.", "output": "hello"},
            {"instruction": "Add.", "input": "2 and 3", "output": "5", "extra": 1}]
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    dst = tmp_path / "out" / "sft.jsonl"
    assert convert_instruction_jsonl(src, dst) == 2
    assert convert_instruction_jsonl(src, dst) == 2  # re-running replaces the output
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    t = InstructionTemplate()
    assert got == [{"inputs": t.prompt("Say hi."), "targets": "hello"},
                   {"inputs": t.prompt("Add.", "2 and 3"), "targets": "5"}]


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x"}', r"in.jsonl:2: field 'output' must be a string"),
    ('{"instruction": "x", "input": 3, "output": "y"}', r"in.jsonl:2: field 'input'"),
    ('{"instruction": " ", "output": "y"}', r"in.jsonl:2: empty instruction"),
    ('{"instruction": "x", "output": ""}', r"in.jsonl:2: empty response"),
    ("[1, 2]", r"in.jsonl:2: expected a JSON object"),
    ("{oops", r"in.jsonl:2: invalid JSON"),
])
def test_bad_records_name_file_and_line_and_write_nothing(tmp_path, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "ok", "output": "fine"}\n' + line + "\n")
    dst = tmp_path / "out.jsonl"
    with pytest.raises(TemplateError, match=message):
        convert_instruction_jsonl(src, dst)
    assert not dst.exists() and not list(tmp_path.glob("*.tmp"))


def test_missing_or_empty_input(tmp_path):
    with pytest.raises(TemplateError, match="does not exist"):
        convert_instruction_jsonl(tmp_path / "nope.jsonl", tmp_path / "o.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(TemplateError, match="has no records"):
        convert_instruction_jsonl(tmp_path / "e.jsonl", tmp_path / "o.jsonl")
