"""Instruction template layout and the instruction-JSONL -> prompt/completion conversion."""
import gzip
import json
import subprocess
import sys

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
    ('{"instruction": "x", "output": "caf\\udce9"}', r"in.jsonl:2: field 'output' holds a lone "
                                                      r"surrogate \(U\+DCE9 at character 3\)"),
    ('{"instruction": "x", "output": ' + "1" * 5000 + "}", r"in.jsonl:2: invalid JSON \(Exceeds"),
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


def test_non_utf8_input_is_one_error_naming_file_and_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"instruction": "ok", "output": "fine"}\n{"instruction": "caf\xff", '
                    b'"output": "y"}\n')
    with pytest.raises(TemplateError, match=r"in.jsonl is not UTF-8 text \(line 2: byte 0xff\)"):
        convert_instruction_jsonl(src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085"])
def test_line_separators_inside_json_strings_are_text_not_line_breaks(tmp_path, char):
    # Raw U+2028 / U+2029 / U+0085 are valid inside JSON strings; only '\n' ends a JSONL line
    # (and a '\r' before it is dropped).
    src = tmp_path / "in.jsonl"
    src.write_bytes(('{"instruction": "a' + char + 'b", "output": "c"}\r\n'
                     '{"instruction": "d", "output": "e"}\r\n').encode())
    dst = tmp_path / "out.jsonl"
    assert convert_instruction_jsonl(src, dst) == 2
    first = json.loads(dst.read_bytes().split(b"\n")[0])
    assert first == {"inputs": InstructionTemplate().prompt("a" + char + "b"), "targets": "c"}


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n')
    assert convert_instruction_jsonl(src, tmp_path / "out.jsonl") == 1


def test_compressed_and_utf16_input_is_read_and_binary_refused_in_one_line(tmp_path):
    # A UTF-16 export (PowerShell's `>`) or a .jsonl.gz stopped at "not UTF-8 text (line 1:
    # byte 0xff)"; the data pipeline reads both, so conversion does too.
    record = '{"instruction": "a", "output": "b é"}\n'
    (tmp_path / "in16.jsonl").write_bytes(record.encode("utf-16"))
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(record.encode()))
    for name in ("in16.jsonl", "in.jsonl.gz"):
        assert convert_instruction_jsonl(tmp_path / name, tmp_path / "out.jsonl") == 1, name
        assert json.loads((tmp_path / "out.jsonl").read_text())["targets"] == "b é"
    # UTF-16 without a byte order mark: ASCII text in it is valid UTF-8, with NULs between
    ascii_record = '{"instruction": "a", "output": "b"}\n'
    (tmp_path / "bin.jsonl").write_bytes(ascii_record.encode("utf-16-le"))
    with pytest.raises(TemplateError, match=r"bin.jsonl: not UTF-8 text \(NUL byte") as e:
        convert_instruction_jsonl(tmp_path / "bin.jsonl", tmp_path / "o2.jsonl")
    assert "\n" not in str(e.value) and not (tmp_path / "o2.jsonl").exists()


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "t5x_lite.finetune_templates", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"instruction": "\xff", "output": "y"}\n')
    (tmp_path / "ok.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    for args, message in [
        (["--input=bad.jsonl", "--output=o.jsonl"],
         "bad.jsonl is not UTF-8 text (line 1: byte 0xff)"),
        (["--input=ok.jsonl", "--output=o.jsonl", "stray"], "unexpected arguments ['stray']"),
        (["--input=ok.jsonl", "--output=ok.jsonl/o.jsonl"],
         f"cannot write ok.jsonl/o.jsonl: {tmp_path / 'ok.jsonl'} is a file, not a directory"),
    ]:
        r = _cli(tmp_path, *args)
        assert r.returncode == 1 and r.stderr.strip() == f"finetune_templates: error: {message}", (
            r.stderr[-2000:])
        assert not (tmp_path / "o.jsonl").exists()
    r = _cli(tmp_path, "--input=ok.jsonl", "--output=o.jsonl")
    assert r.returncode == 0 and (tmp_path / "o.jsonl").exists(), r.stderr[-2000:]
