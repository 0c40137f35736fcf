"""Chat templates: `generate(messages=...)` renders a conversation as transformers'
`apply_chat_template(add_generation_prompt=True)` does and decodes what HF `generate` does on
those ids; `infer` takes "messages" lines; `convert` keeps chat_template.jinja both ways.

The tokenizer is a byte-level BPE with Llama 3-style special tokens; the templates are written
here in the forms instruct models ship (a Llama 3-style one as chat_template.jinja, a Qwen2-style
one with a default system message in tokenizer_config.json).
"""
from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import transformers
from tokenizers import processors

import hf_reference as ref
import t5x_lite
from t5x_lite import chat, convert, infer
from t5x_lite.decoding import generate
from t5x_lite.decoding.generate import DecodeError

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
BOS, EOT, IM_END = 300, 304, 306
N = 12
LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")
QWEN2 = """\
{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
<|im_start|>system
You are helpful.<|im_end|>
    {% endif %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""  # block tags on lines of their own: HF's trim_blocks / lstrip_blocks decide the text
CHATS = [
    [{"role": "user", "content": "abc def ghi"}],
    [{"role": "system", "content": "be brief "}, {"role": "user", "content": "tell me ab"},
     {"role": "assistant", "content": "fgh ijk"}, {"role": "user", "content": "and prs?"}],
    [{"role": "user", "content": "wx <|eot_id|> stu", "name": None}],  # a spelled special token
]


def _bpe():
    return ref.byte_level_bpe(BOS, SPECIALS, processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", BOS)]))


def _model_dir(path, *, jinja=None, config_template=None, seed=0):
    hf = ref.llama(kv_heads=2, seed=seed, vocab_size=320)
    hf.config.eos_token_id = hf.generation_config.eos_token_id = [EOT, IM_END]
    hf.config.bos_token_id = hf.generation_config.bos_token_id = BOS
    hf.save_pretrained(path)
    _bpe().save(str(path / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>"}
    if config_template is not None:
        settings["chat_template"] = config_template
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)
    return hf, path


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("chat") / "llama3", jinja=LLAMA3,
                      config_template="NOT READ")  # the .jinja file wins, as in HF


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("chat") / "qwen2", config_template=QWEN2, seed=1)


def _hf_chat_ids(path, chats):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return texts, ids


@pytest.mark.parametrize("which", ["llama3", "qwen2"])
def test_chat_prompts_and_greedy_replies_equal_hf(which, request):
    hf, path = request.getfixturevalue(which)
    texts, hf_ids = _hf_chat_ids(path, CHATS)
    assert texts[0].startswith("<|begin_of_text|><|start_header_id|>user" if which == "llama3"
                               else "<|im_start|>system\nYou are helpful.<|im_end|>")
    assert hf_ids[2].count(EOT) == (2 if which == "llama3" else 1)  # the spelled one too
    m = t5x_lite.load(path)
    assert [m.chat_template.render(c) for c in CHATS] == texts
    theirs = [r[:next((i for i, t in enumerate(r) if t in (EOT, IM_END)), len(r) - 1) + 1]
              for r in ref.greedy_left_padded(hf, hf_ids, N)]
    ours = m.generate(messages=CHATS, max_new_tokens=N)
    assert [o["ids"] for o in ours] == theirs
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert [o["text"] for o in ours] == [
        tok.decode(o["ids"][:-1] if o["finished"] else o["ids"], skip_special_tokens=True)
        for o in ours]
    one = m.generate(messages=CHATS[1], max_new_tokens=N)  # one conversation
    assert one[0]["ids"] == theirs[1]


def test_convert_keeps_the_chat_template_both_ways(llama3, tmp_path):
    hf, path = llama3
    convert.hf_to_workdir(path, tmp_path / "w")
    assert (tmp_path / "w" / "hf_chat_template.jinja").read_text() == LLAMA3
    m = t5x_lite.load(tmp_path / "w")
    _, hf_ids = _hf_chat_ids(path, CHATS[:1])
    assert m.generate(messages=CHATS[:1], max_new_tokens=N)[0]["ids"] == \
        t5x_lite.load(path).generate(input_ids=hf_ids, max_new_tokens=N)[0]["ids"]
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == LLAMA3
    assert _hf_chat_ids(tmp_path / "out", CHATS) == _hf_chat_ids(path, CHATS)


def test_infer_takes_messages(llama3, tmp_path):
    hf, path = llama3
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS[:2]))
    out = tmp_path / "out.jsonl"
    assert infer.run(path, src, out, {"max_new_tokens": N}, log=open(os.devnull, "w")) == 2
    records = [json.loads(x) for x in out.read_text().splitlines()]
    want = t5x_lite.load(path).generate(messages=CHATS[:2], max_new_tokens=N)
    assert [r["inputs"] for r in records] == CHATS[:2]
    assert [r["output_ids"] for r in records] == [w["ids"] for w in want]
    # The sidecar records the template: an edited one is not resumed into this output.
    (tmp_path / "edited").mkdir()
    copy = _qwen_copy(path, tmp_path / "edited")
    (copy / "chat_template.jinja").write_text(LLAMA3)
    convert.hf_to_workdir(copy, tmp_path / "w")
    src2, out2 = tmp_path / "chats2.jsonl", tmp_path / "out2.jsonl"
    src2.write_text(src.read_text())
    run = lambda: infer.run(tmp_path / "w", src2, out2, {"max_new_tokens": 2},
                            log=open(os.devnull, "w"))
    assert run() == 2
    out2.write_text(out2.read_text().splitlines(keepends=True)[0])  # interrupted
    (tmp_path / "w" / "hf_chat_template.jinja").write_text(LLAMA3 + "{{ '!' }}")
    with pytest.raises(infer.InferError, match=r"chat_template: '[0-9a-f]{16}' there, "
                                               r"'[0-9a-f]{16}' now"):
        run()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n")
    qwen = _qwen_copy(path, tmp_path)
    with pytest.raises(DecodeError, match=rf"^{bad}:1: the chat template .* unknown role tool$"):
        infer.run(qwen, bad, tmp_path / "o2", log=open(os.devnull, "w"))
    assert not (tmp_path / "o2").exists()


def _qwen_copy(path, tmp_path):
    """`path` with the Qwen2-style template only (it refuses unknown roles)."""
    copy = tmp_path / "qwen_copy"
    copy.mkdir()
    for f in path.iterdir():
        if f.name != "chat_template.jinja":
            (copy / f.name).write_bytes(f.read_bytes())
    settings = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": QWEN2}))
    return copy


def test_bad_conversations_and_templates_are_one_line(llama3, qwen2, tmp_path):
    m = t5x_lite.load(llama3[1])
    for bad, message in [
        ("hi", r"messages are a conversation \(a list of message dicts\) or a list of them, "
               "got str"),
        ([[]], r"messages\[0\]: a conversation is a non-empty list of messages"),
        ([{"content": "x"}], r"messages\[0\]: message 0 is not a dict with a string \"role\""),
        ([{"role": "user", "content": object()}], "messages hold JSON values only"),
    ]:
        with pytest.raises(DecodeError, match=message) as e:
            m.generate(messages=bad, max_new_tokens=2)
        assert "\n" not in str(e.value)
    with pytest.raises(DecodeError, match=r"unknown role tool"):
        t5x_lite.load(qwen2[1]).generate(messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(DecodeError, match="give exactly one of inputs"):
        m.generate(inputs=["a"], messages=CHATS[0])

    # No template; a broken one (loads, fails on use); a sentencepiece vocabulary.
    hf, plain = _model_dir(tmp_path / "plain")
    with pytest.raises(DecodeError, match=r"^messages\[0\]: messages need a chat template, and "
                       "this model has none .* give one as chat_template=<Jinja text>$"):
        t5x_lite.load(plain).generate(messages=CHATS[0])
    # given as text, a template renders as HF's for a model without one of its own
    tok = transformers.AutoTokenizer.from_pretrained(plain)
    text = tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True,
                                   chat_template=LLAMA3)
    assert text.startswith("<|begin_of_text|><|start_header_id|>")
    ours = t5x_lite.load(plain).generate(messages=CHATS[0], chat_template=LLAMA3,
                                         max_new_tokens=3)[0]
    hf_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ours["ids"] == ref.greedy_left_padded(hf, [hf_ids], 3)[0][:len(ours["ids"])]
    _, broken = _model_dir(tmp_path / "broken", jinja="{% for m in messages %}")
    lm = t5x_lite.load(broken)
    with pytest.raises(DecodeError, match=r"chat_template.jinja: not a Jinja template \("):
        lm.generate(messages=CHATS[0])
    assert lm.generate(input_ids=[[BOS, 5]], max_new_tokens=2)[0]["ids"]  # the model works
    ref.build("t5_v1_1", tmp_path / "t5")
    with pytest.raises(DecodeError, match=r"messages \(chat\) need a decoder-only model"):
        t5x_lite.load(tmp_path / "t5").generate(messages=CHATS[0])


def test_templates_render_in_a_process_that_has_not_imported_transformers():
    """transformers' import loads jinja2.ext, which the loop controls need; `infer` runs
    without it."""
    code = ("import sys; from t5x_lite import chat; "
            "t = chat.ChatTemplate('{% for m in messages %}{% if loop.index > 1 %}{% break %}"
            "{% endif %}{{ m.content }}{% endfor %}', {}, 's'); "
            "print(t.render([{'role': 'user', 'content': 'a'}, {'role': 'user', 'content': 'b'}]),"
            " 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split() == ["a", "False"]


def test_template_selection_and_variables():
    """The .jinja text wins over the config's; named templates pick "default"; special tokens
    are variables (a dict's "content" too)."""
    default = {"name": "default", "template": "{{ eos_token }}|{{ bos_token }}"}
    settings = {"chat_template": [{"name": "tool_use", "template": "T"}, default],
                "eos_token": {"content": "<e>"}, "bos_token": "<b>"}
    one = [{"role": "user", "content": "x"}]
    assert chat.ChatTemplate.from_settings(settings, None, "s").render(one) == "<e>|<b>"
    assert chat.ChatTemplate.from_settings(settings, "J{{ messages[0].content }}", "s"
                                           ).render(one) == "Jx"
    bare = chat.ChatTemplate.from_settings({"bos_token": "<b>"}, None, "s")  # no template
    with pytest.raises(chat.ChatError, match=r"^messages need a chat template, and this model "
                       r"has none \(.*\): give one as chat_template=<Jinja text>$"):
        bare.render(one)
    assert bare.render(one, chat_template="{{ bos_token }}{{ messages[0].content }}") == "<b>x"
    nameless = chat.ChatTemplate.from_settings(
        {"chat_template": [{"name": "a", "template": "x"}]}, None, "s")
    assert nameless.render(one, chat_template="a") == "x"
    with pytest.raises(chat.ChatError, match=r"^s: its chat templates \['a'\] have no 'default' "
                       "one: choose one with chat_template=<name>$"):
        nameless.render(one)
    with pytest.raises(chat.ChatError, match="^s: its named chat templates are not a list of"):
        chat.ChatTemplate.from_settings({"chat_template": [{"name": "a"}]}, None, "s")
    # as HF: a dict of named templates; a template that is not text fails only when chosen
    as_dict = chat.ChatTemplate.from_settings(
        {"chat_template": {"default": "D{{ messages[0].content }}", "x": "X{{ bos_token }}",
                           "n": None}, "bos_token": "<b>"}, None, "s")
    assert [as_dict.render(one), as_dict.render(one, chat_template="x")] == ["Dx", "X<b>"]
    with pytest.raises(chat.ChatError, match="^s: its chat template 'n' is not text$"):
        as_dict.render(one, chat_template="n")
    for empty in ([], [{"name": "default", "template": None}]):
        t = chat.ChatTemplate.from_settings({"chat_template": empty}, None, "s")
        assert t.render(one, chat_template="{{ messages[0].content }}!") == "x!"
        with pytest.raises(chat.ChatError):
            t.render(one)
    html = chat.ChatTemplate.from_settings({}, "{{ messages | tojson }}", "s")
    assert html.render([{"role": "user", "content": "<b>é"}]) == \
        '[{"role": "user", "content": "<b>é"}]'  # HF's tojson: no HTML escapes, no \\u


FEATURES = (  # what instruct templates use beyond the basics
    "{%- set ns = namespace(n=0) %}"
    "{%- for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
    "{%- set ns.n = ns.n + 1 %}"
    "{{ image_token }}{{ boi_token }}{{ m.role }}|{{ m.reasoning_content }}|{{ m.thinking }}|"
    "{{ m.content }}|{{ m.get('extra') }}|{{ m | tojson(indent=1, sort_keys=True) }};"
    "{%- if m.role == 'assistant' %}{% generation %}<{{ m.content }}>{% endgeneration %}"
    "{%- endif %}{%- endfor %}{{ ns.n }}{{ dict(a=1) }}{{ eos_token }}")


class _Role(str, enum.Enum):  # str(_Role.USER) is "_Role.USER"; its text is "user"
    USER = "user"


def test_template_features_render_as_hf(tmp_path):
    """Custom `*_token` keys and an `extra_special_tokens` dict are variables; reasoning fields
    are filled in under both names; tuples, numpy scalars, str enums, loop controls,
    namespaces, dict(), tojson's options and `{% generation %}` blocks (assistant masks): each
    as HF's apply_chat_template renders them."""
    _, path = _model_dir(tmp_path / "m", jinja=FEATURES)
    settings = json.loads((path / "tokenizer_config.json").read_text())
    settings.update(image_token="<|im_start|>", extra_special_tokens={"boi_token": "<|im_end|>"})
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    conversation = [
        {"role": _Role.USER, "content": ("a", "b"), "extra": np.int64(3)},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "y", "reasoning": "think", "extra": None}]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    want = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    got = t5x_lite.load(path).chat_template.render(conversation)
    assert got == want and "think|think" in got and "('a', 'b')" in got
    assert "user|" in got and "<y>" in got


THINKING = (  # Qwen3-style: the assistant's reasoning in <think> before its content
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.reasoning_content %}{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- endif %}{{- m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.mark.parametrize("field, message", [
    ("reasoning_content", {"reasoning_content": "let me see "}),
    ("thinking", {"thinking": "hmm"}),  # copied to reasoning_content, which the template reads
    ("content", {"reasoning": "done", "content": "The answer"}),
    ("reasoning", {"content": "x"}),  # no such field: one line, as HF refuses
])
def test_continue_final_message_names_a_field_as_hf(llama3, field, message):
    tok = transformers.AutoTokenizer.from_pretrained(llama3[1])
    conversation = [{"role": "user", "content": "why?"},
                    {"role": "assistant", "content": "", **message}]
    ours = chat.ChatTemplate.from_settings({}, THINKING, "t")
    try:
        want = tok.apply_chat_template(conversation, chat_template=THINKING, tokenize=False,
                                       continue_final_message=field)
    except ValueError:
        with pytest.raises(chat.ChatError, match=f'final message has no "{field}"'):
            ours.render(conversation, continue_final_message=field)
        return
    assert ours.render(conversation, continue_final_message=field) == want
    assert want.rstrip().endswith(("let me see", "hmm", "The answer"))


def test_continuing_reasoning_blocks_tags_every_copy_as_hf():
    """Reasoning given as content blocks is continued in its last text block, under both
    names the template may read (HF's copies share one list)."""
    from transformers.utils.chat_template_utils import render_jinja_template
    template = ("{%- for m in messages %}{{- m.role + ':' }}"
                "{%- if m.reasoning_content %}<think>{{ m.reasoning_content[-1].text }}</think>"
                "{%- endif %}{%- if m.thinking %}[{{ m.thinking[-1].text }}]{%- endif %}"
                "{{- m.content + '|' }}{%- endfor %}")
    conversation = [{"role": "user", "content": "q"},
                    {"role": "assistant", "content": "c",
                     "thinking": [{"type": "text", "text": "a"}, {"type": "text", "text": "blk"}]}]
    want = render_jinja_template([conversation], chat_template=template,
                                 continue_final_message="thinking")[0][0]
    got = chat.ChatTemplate.from_settings({}, template, "t").render(
        conversation, continue_final_message="thinking")
    assert got == want and want.endswith("[blk")  # cut at the last copy's tag, as HF


@pytest.mark.parametrize("template, message", [
    ("{% set d = {'a': 1} %}{{ dict.update(d, b=2) }}", "failed on this conversation"),
    ("{% set ns = namespace(_x=1) %}", "underscore names"),
])
def test_the_sandbox_refuses_what_hf_refuses(template, message):
    one = [{"role": "user", "content": "x"}]
    with pytest.raises(chat.ChatError, match=message):
        chat.ChatTemplate.from_settings({}, template, "s").render(one)


def test_what_cannot_chat_says_why(llama3, tmp_path):
    hf, path = llama3
    m = t5x_lite.load(path)
    with pytest.raises(DecodeError, match=r"messages are a conversation .* got list \[\]"):
        m.generate(messages=[])
    unreadable = _qwen_copy(path, tmp_path)
    (unreadable / "chat_template.jinja").mkdir()
    lm = t5x_lite.load(unreadable)  # loads (a warning); the template's use says why not
    with pytest.raises(DecodeError, match="chat template cannot be used: .*chat_template.jinja "
                                          "cannot be read"):
        lm.generate(messages=CHATS[0])
    lm.generate(input_ids=[[BOS, 5]], max_new_tokens=2)
    ids_only = types.SimpleNamespace(**{**vars(m), "vocab": None})
    with pytest.raises(DecodeError, match="messages need the model's tokenizer"):
        generate.generate(ids_only, messages=CHATS[0])
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"inputs": "a", "messages": CHATS[0]}) + "\n")
    with pytest.raises(infer.InferError, match=r':1: give one of "inputs", "input_ids" or '
                                               r'"messages", not "inputs" and "messages"'):
        infer.read_prompts(both)


def test_an_export_removes_a_template_that_is_not_its_models(llama3, qwen2, tmp_path):
    """Two models with the same tokenizer.json but other settings and templates (a base and an
    instruct model): exporting one over the other leaves none of the other's templates."""
    _, llama_dir = llama3
    _, qwen_dir = qwen2
    out = tmp_path / "out"
    convert.hf_to_workdir(llama_dir, tmp_path / "w1")
    convert.workdir_to_hf(tmp_path / "w1", out)
    (out / "additional_chat_templates").mkdir()
    (out / "additional_chat_templates" / "tool_use.jinja").write_text("OTHER")
    convert.hf_to_workdir(qwen_dir, tmp_path / "w2")
    convert.workdir_to_hf(tmp_path / "w2", out)
    assert not (out / "chat_template.jinja").exists()
    assert not (out / "additional_chat_templates").exists()
    assert _hf_chat_ids(out, CHATS) == _hf_chat_ids(qwen_dir, CHATS)
    assert [t5x_lite.load(out).chat_template.render(c) for c in CHATS] == \
        _hf_chat_ids(qwen_dir, CHATS)[0]
    own = tmp_path / "own"  # a copy of the model's directory, exported into
    own.mkdir()
    for f in llama_dir.iterdir():
        (own / f.name).write_bytes(f.read_bytes())
    convert.workdir_to_hf(tmp_path / "w1", own)  # its own tokenizer files and template stay
    assert (own / "chat_template.jinja").read_text() == LLAMA3
    assert (own / "generation_config.json").exists()
    (tmp_path / "w1" / "hf_generation_config.json").unlink()  # converted before it was kept
    convert.workdir_to_hf(tmp_path / "w1", own)
    assert not (own / "generation_config.json").exists()  # its stop ids need not be this step's
    assert (own / "chat_template.jinja").read_text() == LLAMA3


TOOL_USE = (
    "{{- bos_token }}\n"
    "{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\nTools: ' + "
    "tools | tojson + '<|eot_id|>' }}{%- endif %}\n"
    "{%- for d in documents or [] %}{{- '[doc ' + d.title + ': ' + d.text + ']' }}{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for b in message['content'] %}{{- b['text'] }}{%- endfor %}{%- endif %}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think></think>' }}"
    "{%- endif %}{%- endif %}\n")
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "number"}}}}}]
DOCS = [{"title": "ab", "text": "cd ef"}]
ASK = [{"role": "user", "content": "add ab and cd"}]
OPEN = ASK + [{"role": "assistant", "content": "the sum is "}]  # continued, trailing space
BLOCKS = ASK + [{"role": "assistant", "content": [{"type": "text", "text": "fgh"},
                                                   {"type": "image"}]}]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """Named templates, as tokenizer_config.json ships them: "default" (Llama 3-style) and a
    "tool_use" one that reads tools, documents, enable_thinking and content blocks."""
    return _model_dir(tmp_path_factory.mktemp("chat") / "tools", config_template=[
        {"name": "default", "template": LLAMA3}, {"name": "tool_use", "template": TOOL_USE}])


@pytest.mark.parametrize("conversation,kw", [
    (ASK, {"tools": TOOLS}),
    (ASK, {"tools": []}),  # HF: the tool_use template, with an empty list
    (ASK, {"tools": TOOLS, "documents": DOCS, "enable_thinking": False}),
    (ASK, {"documents": DOCS}),  # no tools: the default template, which ignores documents
    (OPEN, {"continue_final_message": True}),  # the default template trims: HF's second cut
    (OPEN, {"tools": TOOLS, "continue_final_message": True}),  # kept as written: the first
    (BLOCKS, {"tools": TOOLS, "continue_final_message": True}),  # the last text block
])
def test_tools_documents_kwargs_and_continuing_render_as_hf(tool_model, conversation, kw):
    hf, path = tool_model
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cont = kw.get("continue_final_message", False)
    text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=not cont,
                                   **kw)
    m = t5x_lite.load(path)
    options = {k: kw[k] for k in ("tools", "documents", "continue_final_message") if k in kw}
    variables = {k: v for k, v in kw.items() if k not in options}
    assert m.chat_template.render(conversation, variables=variables, **options) == text
    hf_ids = tok(text, add_special_tokens=False)["input_ids"]
    ours = m.generate(messages=conversation, max_new_tokens=4,
                      chat_template_kwargs=variables or None, **options)[0]
    assert ours["ids"] == ref.greedy_left_padded(hf, [hf_ids], 4)[0][:len(ours["ids"])]
    if cont:
        assert text.endswith(("the sum is", "the sum is ", "fgh"))


def add(a: float, b: float = 0.0) -> float:
    """Add two numbers.

    Args:
        a: the first
        b (float, optional): the second (choices: [0.0, 1.5])

    Returns:
        their sum
    """
    return a + b


def test_tools_given_as_functions_render_as_hf(tool_model):
    """A Python function among the tools is described as HF's get_json_schema describes it
    (`tool_schema`), so the prompt is HF's; a function HF cannot describe is one line."""
    hf, path = tool_model
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tools = [add, TOOLS[0]]
    text = tok.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True, tools=tools)
    assert '"name": "add"' in text and '"enum": [0.0, 1.5]' in text
    m = t5x_lite.load(path)
    assert m.chat_template.render(ASK, tools=tools) == text
    ours = m.generate(messages=ASK, tools=tools, max_new_tokens=3)[0]
    hf_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ours["ids"] == ref.greedy_left_padded(hf, [hf_ids], 3)[0][:len(ours["ids"])]
    with pytest.raises(DecodeError, match=r"^messages\[0\]: tool <lambda>: it has no docstring"):
        m.generate(messages=ASK, tools=[lambda x: x], max_new_tokens=1)


RAG = ("{{- bos_token }}{%- for d in documents or [] %}[doc {{ d.title }}: {{ d.text }}]"
       "{%- endfor %}{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
       "{{ m.content }}<|eot_id|>{%- endfor %}"
       "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}")


def test_a_template_chosen_by_name_or_given_as_text_renders_as_hf(tool_model, llama3, tmp_path):
    """HF's `chat_template=`: a named template by its name (over the tools' choice), or Jinja
    text instead of the model's, for named templates and a single one alike; a name the
    model lacks that holds no Jinja tag is one line (HF would render it as text)."""
    hf, path = _model_dir(tmp_path / "rag", config_template=[
        {"name": "default", "template": LLAMA3}, {"name": "tool_use", "template": TOOL_USE},
        {"name": "rag", "template": RAG}])
    tok = transformers.AutoTokenizer.from_pretrained(path)
    m = t5x_lite.load(path)
    cases = [{"chat_template": "rag", "documents": DOCS}, {"chat_template": "rag"},
             {"chat_template": "default", "tools": TOOLS},  # a name wins over the tools
             {"chat_template": "rag", "tools": TOOLS, "documents": DOCS},
             {"chat_template": "{{ bos_token }}{{ messages[0].content }}|{{ tools | length }}",
              "tools": TOOLS},
             {"tools": TOOLS}, {}]
    texts = []
    for kw in cases:
        want = tok.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True, **kw)
        assert m.chat_template.render(ASK, **kw) == want, kw
        texts.append(want)
    assert texts[0].startswith("<|begin_of_text|>[doc ab: cd ef]") and texts[4].endswith("|1")
    assert texts[2] == texts[6] != texts[5]  # "default" named: not tool_use, for all the tools
    assert texts[0] != texts[1] and texts[0] != texts[6]
    hf_ids = tok(texts[0], add_special_tokens=False)["input_ids"]
    ours = m.generate(messages=ASK, max_new_tokens=3, **cases[0])[0]
    assert ours["ids"] == ref.greedy_left_padded(hf, [hf_ids], 3)[0][:len(ours["ids"])]
    one = t5x_lite.load(llama3[1])  # a single template: text replaces it, as in HF
    single = transformers.AutoTokenizer.from_pretrained(llama3[1])
    assert one.chat_template.render(ASK, chat_template=RAG) == single.apply_chat_template(
        ASK, tokenize=False, add_generation_prompt=True, chat_template=RAG)
    for model, message in [(m, r"its named templates are \['default', 'rag', 'tool_use'\]"),
                           (one, "it has no named templates")]:
        with pytest.raises(DecodeError, match=r"^messages\[0\]: chat_template 'rg' is not a "
                           f"template of this model \\({message}\\) and holds no Jinja tag"):
            model.generate(messages=ASK, max_new_tokens=1, chat_template="rg")
    with pytest.raises(DecodeError, match="chat_template is a template's name or Jinja text"):
        m.generate(messages=ASK, max_new_tokens=1, chat_template=["rag"])
    with pytest.raises(DecodeError, match=r"^messages\[0\]: the given chat_template: not a Jinja"):
        m.generate(messages=ASK, max_new_tokens=1, chat_template="{% if %}")
    with pytest.raises(DecodeError, match="chat_template apply to chat messages only"):
        m.generate(inputs=["ab"], chat_template="rag", max_new_tokens=1)
    # the other named templates count in the fingerprint (a resumed infer run checks it) when
    # chosen by name: a model's fingerprint stays what it was before they could be chosen
    rag, tools = (t5x_lite.load(p).chat_template for p in (path, tool_model[1]))
    assert rag.fingerprint() == tools.fingerprint() == rag.fingerprint(["tool_use", "nope"])
    assert rag.fingerprint(["rag"]) != rag.fingerprint()
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"messages": ASK, "chat_template": "rag"}) + "\n")
    infer.run(path, src, out, {"max_new_tokens": 2}, log=open(os.devnull, "w"))
    assert json.loads(infer.sidecar_path(out).read_text())["chat_template"] == \
        rag.fingerprint(["rag"])


def test_fingerprint_without_named_templates_is_as_before(llama3):
    """Outputs written before named templates counted resume: the fingerprint of a template
    without a "tool_use" one hashes what it hashed then."""
    t = t5x_lite.load(llama3[1]).chat_template
    old = json.dumps([t.template, sorted(t.variables.items())]).encode("utf-8")
    assert t.tool_use is None and t.fingerprint() == hashlib.sha256(old).hexdigest()[:16]


def test_chat_options_in_infer_and_their_errors(tool_model, tmp_path):
    hf, path = tool_model
    lines = [{"messages": ASK, "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}},
             {"messages": OPEN, "continue_final_message": True}, {"messages": ASK},
             {"messages": ASK, "chat_template": "tool_use"}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert infer.run(path, src, out, {"max_new_tokens": 3}, log=open(os.devnull, "w")) == 4
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["inputs"] for r in records] == [lines[0], lines[1], ASK, lines[3]]
    m = t5x_lite.load(path)
    want = [m.generate(messages=x["messages"], max_new_tokens=3,
                       **{k: v for k, v in x.items() if k != "messages"})[0] for x in lines]
    assert [r["output_ids"] for r in records] == [w["ids"] for w in want]
    for line, message in [({"inputs": "ab", "tools": TOOLS}, '"tools" apply to "messages"'),
                          ({"messages": OPEN, "continue_final_message": 1},
                           '"continue_final_message" must be true, false or the name of'),
                          ({"messages": ASK, "chat_template": 1},
                           '"chat_template" must be the name of one of the model'),
                          # strings the template may not render, which the record holds
                          ({"messages": [{**ASK[0], "name": "caf\udce9"}]},
                           r"the conversation holds a lone surrogate \(U\+DCE9 at character 3\)"),
                          ({"messages": ASK, "documents": [{"\udce9": "x"}]},
                           r"the conversation holds a lone surrogate \(U\+DCE9 at character 0\)")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(line) + "\n")
        with pytest.raises(infer.InferError, match=f"^{bad}:1: {message}"):
            infer.run(path, bad, tmp_path / "o", log=open(os.devnull, "w"))
        assert not (tmp_path / "o").exists()
    for kw, message in [({"tools": "add"}, r"tools are a list of JSON schemas \(dicts\)"),
                        ({"documents": [1]}, "documents are a list of dicts"),
                        ({"chat_template_kwargs": [1]}, "chat_template_kwargs are a dict"),
                        ({"chat_template_kwargs": {"tools": []}},
                         "chat_template_kwargs cannot set tools"),
                        ({"continue_final_message": 2},
                         "continue_final_message is True, False or the name of the field"),
                        ({"continue_final_message": "reasoning_content"},
                         "final message has no \"reasoning_content\""),
                        ({"continue_final_message": True}, "final message has no \"content\"")]:
        convo = [{"role": "user"}] if "continue_final_message" in kw else ASK
        with pytest.raises(DecodeError, match=message):
            m.generate(messages=convo, max_new_tokens=1, **kw)
    with pytest.raises(DecodeError, match="tools apply to chat messages only"):
        m.generate(inputs=["ab"], tools=TOOLS, max_new_tokens=1)


def test_named_templates_as_transformers_5_saves_them(tool_model, tmp_path, caplog):
    """transformers 5 saves named templates as chat_template.jinja ("default") and
    additional_chat_templates/<name>.jinja: they render as HF's from such a directory, from its
    converted workdir and from that workdir's export. Without a default one, a template is
    chosen by name or by tools, as in HF; with neither, one line names them."""
    hf, path = tool_model
    copy = tmp_path / "m"
    shutil.copytree(path, copy)
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(copy)
    assert (copy / "chat_template.jinja").read_text() == LLAMA3
    assert (copy / "additional_chat_templates" / "tool_use.jinja").read_text() == TOOL_USE
    assert "chat_template" not in json.loads((copy / "tokenizer_config.json").read_text())

    def renders(directory):
        tok = transformers.AutoTokenizer.from_pretrained(directory)
        return [tok.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True, **kw)
                for kw in ({}, {"tools": TOOLS})]

    want = renders(copy)
    assert want[0] != want[1] and "Tools: " in want[1]
    convert.hf_to_workdir(copy, tmp_path / "w")
    convert.workdir_to_hf(tmp_path / "w", tmp_path / "out")
    assert renders(tmp_path / "out") == want
    for where in (copy, tmp_path / "w", tmp_path / "out"):
        m = t5x_lite.load(where)
        assert [m.chat_template.render(ASK), m.chat_template.render(ASK, tools=TOOLS)] == want
    (copy / "chat_template.jinja").unlink()
    with caplog.at_level(logging.WARNING):
        m = t5x_lite.load(copy)
    assert "chat template" not in caplog.text
    tok = transformers.AutoTokenizer.from_pretrained(copy)
    for kw in ({"tools": TOOLS}, {"chat_template": "tool_use"}):
        want = tok.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True, **kw)
        assert m.chat_template.render(ASK, **kw) == want
    with pytest.raises(ValueError, match="no default specified"):
        tok.apply_chat_template(ASK, tokenize=False)
    with pytest.raises(DecodeError, match=r"^messages\[0\]: .*additional_chat_templates: its chat "
                       r"templates \['tool_use'\] have no 'default' one: choose one with "
                       "chat_template=<name>$"):
        m.generate(messages=ASK, max_new_tokens=1)