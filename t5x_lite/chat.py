"""An HF chat template: conversations (lists of {"role", "content"} messages) as prompt text.

An instruct model's tokenizer files carry a Jinja template that writes a conversation in the
model's format (Llama 3's `<|start_header_id|>user<|end_header_id|>...<|eot_id|>`, Qwen2's
`<|im_start|>user...`). `ChatTemplate` renders it as transformers' `apply_chat_template` does
(`add_generation_prompt=True`: the text ends where the assistant's reply begins):

- the template is `chat_template.jinja` when the directory has one, else tokenizer_config.json's
  `chat_template` (a string, or named templates: the one named "default");
- Jinja2's sandbox with HF's settings (`trim_blocks`, `lstrip_blocks`, loop controls) and HF's
  additions: `raise_exception(message)`, `strftime_now(format)`, a `tojson` that does not escape
  HTML, HF's restricted `dict` and `namespace` (no `_` names), and the special tokens of
  tokenizer_config.json (`bos_token`, `eos_token`, any other `*_token` key, the entries of an
  `extra_special_tokens` dict) as variables. Tokens the config does not name are not filled
  from a tokenizer class's defaults (GPT2Tokenizer's `<|endoftext|>`) nor from a legacy
  special_tokens_map.json;
- messages as given (JSON values; tuples and numpy scalars as HF passes them), keys whose value
  is None dropped, a message's reasoning (`reasoning_content`, `thinking` or `reasoning`) under
  both `reasoning_content` and `thinking`, as HF fills them.

The rendered text holds the template's special tokens spelled out (`<|begin_of_text|>`): a
tokenizer.json vocabulary reads them as those tokens (`TokenizerJsonVocabulary.encode`, HF's
`add_special_tokens=False`), and the text gets no start id of its own. Needs the `jinja2`
package (`pip install jinja2`; transformers installs it too). Tools, documents,
`continue_final_message` and named templates other than "default" (HF's
`additional_chat_templates/`) are not supported.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from t5x_lite.errors import UserError

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # HF's names, first read first


class ChatError(UserError):
    """A chat template or conversation that cannot be rendered (one-line message)."""


class UnusableTemplate:
    """A model's chat template that could not be read: rendering raises `problem`."""

    def __init__(self, problem: str):
        self.problem = problem

    def render(self, conversation, *, add_generation_prompt: bool = True) -> str:
        raise ChatError(self.problem)


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

    def fingerprint(self) -> str:
        """A short hash of what decides the rendered text: the template and its variables."""
        blob = json.dumps([self.template, sorted(self.variables.items())]).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

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
        extra = settings.get("extra_special_tokens")
        tokens = {**{k: v for k, v in settings.items() if k.endswith("_token")},
                  **(extra if isinstance(extra, dict) else {})}
        variables = {}
        for name, value in tokens.items():
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
    if not nonempty_list(conversation):
        raise ChatError(f"a conversation is a non-empty list of messages (dicts with \"role\" and "
                        f"\"content\"), got {_short(conversation)}")
    out = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatError(f"message {i} is not a dict with a string \"role\": "
                            f"{_short(message)}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def nonempty_list(value) -> bool:
    """A non-empty sequence that is not a string (a conversation, a list of them)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and bool(value)


def _plain(value):
    """`value` rebuilt from plain types (what a sandboxed template may see), as HF does:
    JSON values, tuples, numpy scalars (as Python ones)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):  # subclasses (numpy strings, enums) as the base type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "item", None)) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # a numpy scalar
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

    class RestrictedDict:  # `dict(...)` and `dict.fromkeys(...)` only: no `dict.update(d)`
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):  # no `_` attributes (CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore names on a namespace: {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, dict=RestrictedDict(),
                       namespace=Namespace,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _short(value) -> str:
    return f"{type(value).__name__} {value!r:.60}"
