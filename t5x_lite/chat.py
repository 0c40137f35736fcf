"""An HF chat template: conversations (lists of {"role", "content"} messages) as prompt text.

An instruct model's tokenizer files carry a Jinja template that writes a conversation in the
model's format (Llama 3's `<|start_header_id|>user<|end_header_id|>...<|eot_id|>`, Qwen2's
`<|im_start|>user...`). `ChatTemplate` renders it as transformers' `apply_chat_template` does
(`add_generation_prompt=True`: the text ends where the assistant's reply begins):

- the template is `chat_template.jinja` when the directory has one, else tokenizer_config.json's
  `chat_template` (a string, or named templates: the one named "default");
- Jinja2's sandbox with HF's settings (`trim_blocks`, `lstrip_blocks`, loop controls) and HF's
  additions: `raise_exception(message)`, `strftime_now(format)`, a `tojson` that does not escape
  HTML, and the special tokens of tokenizer_config.json (`bos_token`, `eos_token`, ...) as
  variables;
- messages as given, keys whose value is None dropped.

The rendered text holds the template's special tokens spelled out (`<|begin_of_text|>`): a
tokenizer.json vocabulary reads them as those tokens (`TokenizerJsonVocabulary.encode`, HF's
`add_special_tokens=False`), and the text gets no start id of its own. Needs the `jinja2`
package (`pip install jinja2`; transformers installs it too). Tools, documents and
`continue_final_message` are not supported.
"""
from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

from t5x_lite.errors import UserError

# tokenizer_config.json's named special tokens, the variables HF passes to the template
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


class ChatError(UserError):
    """A chat template or conversation that cannot be rendered (one-line message)."""


class ChatTemplate:
    """A compiled chat template with its special-token variables.

    Args:
      template: the Jinja source.
      variables: template variables (the special tokens' text).
      source: where the template came from, for error messages.
    """

    def __init__(self, template: str, variables: Mapping[str, str], source: str):
        self.template, self.source, self.variables = template, source, dict(variables)
        self._compiled = None  # on first use: a model loads whatever its template holds

    def _compile(self):
        if self._compiled is None:
            try:
                env = _environment()
            except ImportError as e:
                raise ChatError(f"chat templates need the jinja2 package, version 3.1.6 or "
                                f"later (pip install 'jinja2>=3.1.6'): {e}") from None
            try:
                self._compiled = env.from_string(self.template)
            except Exception as e:  # jinja2.TemplateSyntaxError and kin
                raise ChatError(f"{self.source}: not a Jinja template ({_first_line(e)})"
                                ) from None
        return self._compiled

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None, jinja: str | None,
                      source: str) -> ChatTemplate | None:
        """The template of a tokenizer: `jinja` (chat_template.jinja's text) when given, else
        `settings`' (tokenizer_config.json) `chat_template`; None when neither has one."""
        settings = settings or {}
        template = jinja if jinja is not None else settings.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise ChatError(f"{source}: its chat templates {sorted(map(str, named))} have no "
                                "'default' one")
            template = named["default"]
        if template is None:
            return None
        if not isinstance(template, str):
            raise ChatError(f"{source}: chat_template is not a string")
        variables = {}
        for name in SPECIAL_TOKENS:
            value = settings.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                variables[name] = value
        return cls(template, variables, source)

    def render(self, conversation, *, add_generation_prompt: bool = True) -> str:
        """The prompt text of `conversation`, a list of message dicts."""
        messages = normalize_conversation(conversation)
        compiled = self._compile()
        try:
            return compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.variables)
        except Exception as e:  # raise_exception's TemplateError, a template's own bugs
            raise ChatError(f"the chat template ({self.source}) failed on this conversation: "
                            f"{_first_line(e)}") from None


def normalize_conversation(conversation) -> list[dict]:
    """`conversation` as a list of message dicts (keys whose value is None dropped); a
    ChatError when it is not a non-empty list of dicts with a string "role"."""
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence) \
            or not conversation:
        raise ChatError(f"a conversation is a non-empty list of messages (dicts with \"role\" and "
                        f"\"content\"), got {_short(conversation)}")
    out = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatError(f"message {i} is not a dict with a string \"role\": "
                            f"{_short(message)}")
        out.append(_plain({k: v for k, v in message.items() if v is not None}))
    return out


def _plain(value):
    """`value` rebuilt from JSON types (what a sandboxed template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise ChatError(f"messages hold JSON values only, got {type(value).__name__}")


def _environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(f"jinja2 {jinja2.__version__} is installed (older versions have "
                          "known sandbox escapes, and templates come with downloaded models)")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _short(value) -> str:
    return f"{type(value).__name__} {value!r:.60}"
