"""An HF chat template: conversations (lists of {"role", "content"} messages) as prompt text.

An instruct model's tokenizer files carry a Jinja template that writes a conversation in the
model's format (Llama 3's `<|start_header_id|>user<|end_header_id|>...<|eot_id|>`, Qwen2's
`<|im_start|>user...`). `ChatTemplate` renders it as transformers' `apply_chat_template` does
(`add_generation_prompt=True`: the text ends where the assistant's reply begins):

- the template is `chat_template.jinja` when the directory has one, else tokenizer_config.json's
  `chat_template` (a string, or named templates). Named templates may also come as
  transformers 5 saves them, as `additional_chat_templates/<name>.jinja` beside a
  `chat_template.jinja` ("default"); as in HF, tokenizer_config.json's template is then not
  read. HF's choice (`get_chat_template`): `chat_template` given to `render` is one of the
  named templates' names, or else the Jinja text to use; without it, named templates use
  "tool_use" when tools are given (even []) and there is one, else "default" (none: an
  error that lists the names);
- Jinja2's sandbox with HF's settings (`trim_blocks`, `lstrip_blocks`, loop controls) and HF's
  additions: `raise_exception(message)`, `strftime_now(format)`, a `tojson` that does not escape
  HTML, HF's restricted `dict` and `namespace` (no `_` names), and the special tokens of
  tokenizer_config.json (`bos_token`, `eos_token`, any other `*_token` key, the entries of an
  `extra_special_tokens` dict) as variables. Tokens the config does not name are not filled
  from a tokenizer class's defaults (GPT2Tokenizer's `<|endoftext|>`) nor from a legacy
  special_tokens_map.json;
- messages as given (JSON values; tuples and numpy scalars as HF passes them), keys whose value
  is None dropped, a message's reasoning (`reasoning_content`, `thinking` or `reasoning`) under
  both `reasoning_content` and `thinking`, as HF fills them;
- `tools` (JSON schemas: dicts, or Python functions, described as HF's `get_json_schema` does:
  `tool_schema`) and `documents` (dicts) as the template's variables of those
  names, and `variables` (HF's `**kwargs`, e.g. `enable_thinking`) as more variables, over the
  special tokens of the same name;
- `continue_final_message`: no generation prompt; the text ends where the last message's
  content ends (its last text block's, for a list of blocks), or the field it names (e.g.
  "reasoning_content", every copy of the reasoning), so the model continues it. HF's method: a
  tag is appended to that text, and the rendered text is cut at the tag.

The rendered text holds the template's special tokens spelled out (`<|begin_of_text|>`): a
tokenizer.json vocabulary reads them as those tokens (`TokenizerJsonVocabulary.encode`, HF's
`add_special_tokens=False`), and the text gets no start id of its own. Needs the `jinja2`
package (`pip install jinja2`; transformers installs it too). One departure from HF: a
`chat_template` that is neither a name nor holds a Jinja tag (`{{`, `{%`, `{#`), e.g. a
misspelled name, is an error where HF would render it as text.
"""
from __future__ import annotations

import datetime
import hashlib
import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

from t5x_lite.errors import UserError
from t5x_lite.tool_schema import function_schema

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # HF's names, first read first
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # HF's marker for continue_final_message
NO_TEMPLATE = ("messages need a chat template, and this model has none (an HF model's "
               "chat_template.jinja or tokenizer_config.json chat_template; a workdir converted "
               "before templates were kept: convert it again)")


class ChatError(UserError):
    """A chat template or conversation that cannot be rendered (one-line message)."""


class UnusableTemplate:
    """A model's chat template that could not be read: rendering raises `problem`."""

    def __init__(self, problem: str):
        self.problem = problem

    def render(self, conversation, **options) -> str:
        raise ChatError(self.problem)


class ChatTemplate:
    """A compiled chat template with its special-token variables.

    Args:
      template: the Jinja source (of named templates, the "default" one); None: none, so a
        template is chosen by name or tools, or given as text (`choose`).
      variables: template variables (the special tokens' text).
      source: where the template came from, for error messages.
      tool_use: the "tool_use" one of named templates, for calls with tools.
      named: every named template by name, "default" and "tool_use" included ({} for one
        template).
    """

    def __init__(self, template: str | None, variables: Mapping[str, str], source: str,
                 tool_use: str | None = None, named: Mapping[str, str] | None = None):
        self.template, self.source, self.variables = template, source, dict(variables)
        self.tool_use, self.named = tool_use, dict(named or {})
        self._compiled = {}  # on first use: a model loads whatever its template holds

    def fingerprint(self, chosen: Sequence[str] = ()) -> str:
        """A short hash of what decides the rendered text: the templates and their variables;
        of the other named templates, those `chosen` by name (infer: its prompts' choices),
        so that a model's fingerprint is the same as before they could be chosen."""
        parts = [self.template, sorted(self.variables.items())]
        if self.tool_use is not None:  # without one: the fingerprint of earlier versions
            parts.append(self.tool_use)
        others = sorted((k, self.named[k]) for k in set(chosen) & set(self.named)
                        if k not in ("default", "tool_use"))
        if others:  # likewise
            parts.append(others)
        return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:16]

    def choose(self, chat_template: str | None = None, tools=None) -> tuple[str, str]:
        """(the template text `render` uses, where it is from, for errors): HF's
        `get_chat_template` (module docstring)."""
        if chat_template is not None:
            if not isinstance(chat_template, str):
                raise ChatError(f"chat_template is a template's name or Jinja text, got "
                                f"{_short(chat_template)}")
            if chat_template in self.named:
                return self._named_text(chat_template)
            if not any(tag in chat_template for tag in ("{{", "{%", "{#")):
                names = (f"its named templates are {sorted(map(str, self.named))}"
                         if self.named else "it has no named templates")
                shown = chat_template if len(chat_template) <= 60 else chat_template[:57] + "..."
                raise ChatError(f"chat_template {shown!r} is not a template of this "
                                f"model ({names}) and holds no Jinja tag, so it is not a "
                                "template's text either")
            return chat_template, "the given chat_template"
        if tools is not None and self.tool_use is not None:
            return self._named_text("tool_use")
        if self.named:
            if "default" not in self.named:
                raise ChatError(f"{self.source}: its chat templates {sorted(map(str, self.named))}"
                                " have no 'default' one: choose one with chat_template=<name>")
            return self._named_text("default")
        if self.template is None:
            raise ChatError(f"{NO_TEMPLATE}: give one as chat_template=<Jinja text>")
        return self.template, self.source

    def _named_text(self, name: str) -> tuple[str, str]:
        text = self.named[name]
        if not isinstance(text, str):
            raise ChatError(f"{self.source}: its chat template {name!r} is not text")
        return text, f"{self.source}, {name!r}"

    def _compile(self, template: str, source: str):
        if template not in self._compiled:
            try:
                env = _environment()
            except ImportError as e:
                raise ChatError(f"chat templates need the jinja2 package, version 3.1.6 or "
                                f"later (pip install 'jinja2>=3.1.6'): {e}") from None
            try:
                self._compiled[template] = env.from_string(template)
            except Exception as e:  # jinja2.TemplateSyntaxError and kin
                raise ChatError(f"{source}: not a Jinja template ({_first_line(e)})"
                                ) from None
        return self._compiled[template]

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None, jinja: str | None,
                      source: str, named: Mapping[str, str] | None = None
                      ) -> ChatTemplate:
        """The template of a tokenizer: `jinja` (chat_template.jinja's text) when given, else
        `settings`' (tokenizer_config.json) `chat_template`; when neither has one, a
        ChatTemplate without one (`template` None), which renders only a `chat_template` text
        given to `render` (with `settings`' special tokens, as HF's). With
        `named` templates (additional_chat_templates/: {name: text}) HF's choice: they and
        `jinja` as "default" (a named "default" wins), `settings`' not read."""
        settings = settings or {}
        template = jinja if jinja is not None else settings.get("chat_template")
        if named:
            both = {**({"default": jinja} if jinja is not None else {}), **named}
            template = both["default"] if list(both) == ["default"] else both
        tool_use, named = None, None
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            if not all(isinstance(t, dict) and "name" in t and "template" in t
                       for t in template):  # HF's tokenizer does not load either
                raise ChatError(f"{source}: its named chat templates are not a list of "
                                "{\"name\": ..., \"template\": ...} objects")
            template = {t["name"]: t["template"] for t in template}
        if isinstance(template, dict):  # named templates by name, as HF holds them
            named = dict(template)  # each one's text is checked when it is chosen
            template, tool_use = named.get("default"), named.get("tool_use")
        elif template is not None and not isinstance(template, str):
            raise ChatError(f"{source}: chat_template is not a string")
        extra = settings.get("extra_special_tokens")
        tokens = {**{k: v for k, v in settings.items() if k.endswith("_token")},
                  **(extra if isinstance(extra, dict) else {})}
        variables = {}
        for name, value in tokens.items():
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                variables[name] = value
        return cls(template, variables, source, tool_use, named)

    @staticmethod
    def _tag_final_message(messages: list[dict], field: str, template: str, source: str
                           ) -> tuple[list[dict], str]:
        """The messages with HF's continue tag after the last message's `field` (its last text
        block's, for a list of blocks; every copy of a reasoning field), and that text."""
        last = dict(messages[-1])
        value = last.get(field)
        if value is None:
            raise ChatError(f"continue_final_message: the final message has no \"{field}\" to "
                            "continue")
        fields = [field] if field not in REASONING_FIELDS else [
            f for f in REASONING_FIELDS if last.get(f) == value]
        if not any(f in template for f in fields):
            raise ChatError(f"continue_final_message: the chat template ({source}) does "
                            f"not read a message's \"{field}\"")
        if isinstance(value, str):
            for f in fields:
                last[f] = value + CONTINUE_TAG
            return messages[:-1] + [last], value
        blocks = [dict(b) if isinstance(b, Mapping) else b for b in value] \
            if isinstance(value, (list, tuple)) else []
        at = next((i for i in range(len(blocks) - 1, -1, -1)
                   if isinstance(blocks[i], dict) and "text" in blocks[i]), None)
        if at is None or not isinstance(blocks[at]["text"], str):
            raise ChatError("continue_final_message: the final message has no text to continue")
        final = blocks[at]["text"]
        blocks[at]["text"] = final + CONTINUE_TAG
        for f in fields:  # every copy of a reasoning field, as HF's shared list has it
            last[f] = blocks
        return messages[:-1] + [last], final

    def render(self, conversation, *, add_generation_prompt: bool | None = None, tools=None,
               documents=None, continue_final_message: bool | str = False,
               variables=None, chat_template: str | None = None) -> str:
        """The prompt text of `conversation`, a list of message dicts (see module docstring):
        the assistant's header at the end (`add_generation_prompt`, default: unless
        `continue_final_message`), or with `continue_final_message` the last message left
        open: its "content" (True) or the field it names ("reasoning_content").
        `chat_template`: a named template's name, or Jinja text (`choose`)."""
        messages = normalize_conversation(conversation)
        if not isinstance(continue_final_message, (bool, str)):
            raise ChatError(f"continue_final_message is True, False or the name of the field "
                            f"to continue, got {_short(continue_final_message)}")
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if add_generation_prompt and continue_final_message:
            raise ChatError("continue_final_message and add_generation_prompt exclude each other")
        tools, documents = _dicts(tools, "tools"), _dicts(documents, "documents")
        variables = {} if variables is None else variables
        if not isinstance(variables, Mapping) or not all(isinstance(k, str) for k in variables):
            raise ChatError(f"chat_template_kwargs are a dict with string keys, got "
                            f"{_short(variables)}")
        reserved = sorted(set(variables) & {"messages", "tools", "documents",
                                            "add_generation_prompt"})
        if reserved:
            raise ChatError(f"chat_template_kwargs cannot set {', '.join(reserved)} (give them "
                            "as their own arguments)")
        extra = _plain(dict(variables))
        template, source = self.choose(chat_template, tools)
        compiled = self._compile(template, source)
        final = None
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) else \
                "content"
            messages, final = self._tag_final_message(messages, field, template, source)
        try:
            text = compiled.render(messages=messages, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt,
                                   **{**self.variables, **extra})
        except Exception as e:  # raise_exception's TemplateError, a template's own bugs
            raise ChatError(f"the chat template ({source}) failed on this conversation: "
                            f"{_first_line(e)}") from None
        if final is None:
            return text
        if final.strip() not in text or CONTINUE_TAG.strip() not in text:
            raise ChatError(f"continue_final_message: the chat template ({source}) does "
                            "not write the final message as given, so it cannot be continued")
        at = text.rindex(CONTINUE_TAG.strip())
        # HF's cut: at the tag, or before the whitespace the template trimmed after it
        return text[:at] if text[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else \
            text[:at].rstrip()


def _dicts(value, name: str):
    """`tools` / `documents` as a list of plain dicts (None stays None; [] is HF's too); a
    tool given as a Python function becomes its JSON schema (`tool_schema`), as in HF."""
    if value is None:
        return None
    tools = name == "tools"
    what = "JSON schemas (dicts) or functions" if tools else "dicts"
    if not (isinstance(value, Sequence) and not isinstance(value, (str, bytes))) or not all(
            isinstance(x, Mapping) or (tools and (inspect.isfunction(x) or inspect.ismethod(x)))
            for x in value):
        raise ChatError(f"{name} are a list of {what}, got {_short(value)}")
    return [_plain(dict(x)) if isinstance(x, Mapping) else function_schema(x) for x in value]


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
        if isinstance(value, kind):  # str.__str__: a (str, Enum)'s value, not "Role.USER"
            return str.__str__(value) if kind is str else kind(value)
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
    import jinja2.ext  # `import jinja2` alone does not load it (transformers' import does)
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

    class Generation(jinja2.ext.Extension):
        """HF's `{% generation %}...{% endgeneration %}` (it marks the assistant's tokens
        for training masks): the body, rendered as it is."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
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
