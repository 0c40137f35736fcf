"""A Python function as the JSON schema a chat template's `tools` holds, as HF derives it.

transformers' `apply_chat_template(tools=[fn, ...])` accepts plain functions and describes each
by `get_json_schema(fn)`; `function_schema` gives the same dict, key for key and in the same
key order (templates write it with `tojson`, so the order shows in the prompt):

    {"type": "function", "function": {"name": fn.__name__, "description": ...,
     "parameters": {"type": "object", "properties": {arg: {..., "description": ...}},
                    "required": [args without a default]},
     "return": {...}}}                                  (when the return hint converts)

- The docstring is Google style: the description is the text before the first "Args:",
  "Returns:" or "Raises:"; the "Args:" section (a line of its own) describes every argument
  as `name: text` or `name (type): text`, continued on lines indented deeper; "(choices:
  [JSON values])" at the end of an argument's text becomes its "enum"; the "Returns:" section
  becomes the return's description.
- Type hints: int, float, str, bool, None, Any, list / tuple / dict (with their arguments:
  "items", "prefixItems", "additionalProperties"), Union / Optional / `X | Y` (a list of types,
  or "anyOf"; "nullable" with None), Literal and Enum classes ("enum"); PIL images and torch
  tensors as HF's "image" and "audio". `self` / `cls` without a hint is skipped.

Anything HF refuses (no docstring, an argument without a hint or a description, a custom
class, `tuple[int]`, `tuple[int, ...]`, bad choices) is a `ToolSchemaError`, one line.
"""
from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from typing import Any, Callable

from t5x_lite.errors import UserError

_JSON_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean",
                 type(None): "null"}
_PLAIN_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean",
                type(None): "null", list: "array", tuple: "array", dict: "object"}
_SECTIONS = ("Args:", "Returns:", "Raises:")
# "name:" or "name (type):" opening an argument's text in the Args section
_ARGUMENT = re.compile(r"([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:")
_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)


class ToolSchemaError(UserError):
    """A function whose JSON schema cannot be derived (one-line message)."""


def function_schema(fn: Callable) -> dict:
    """The tool schema of `fn` (module docstring)."""
    name = getattr(fn, "__name__", "operation")
    doc = (inspect.getdoc(fn) or "").strip()
    if not doc:
        raise ToolSchemaError(f"tool {name}: it has no docstring, which describes the tool and "
                              "its arguments")
    description, argument_texts, returns = _docstring_parts(doc)
    parameters = _parameters(fn, name)
    return_schema = parameters["properties"].pop("return", None)
    if return_schema is not None and returns is not None:
        return_schema["description"] = returns
    for arg, schema in parameters["properties"].items():
        if arg not in argument_texts:
            raise ToolSchemaError(f"tool {name}: its docstring's Args section does not describe "
                                  f"argument {arg!r}")
        text = argument_texts[arg]
        choices = _CHOICES.search(text)
        if choices:
            try:
                values = json.loads(choices.group(1))
            except json.JSONDecodeError as e:
                raise ToolSchemaError(f"tool {name}: argument {arg!r}: (choices: ...) is not a "
                                      f"JSON list ({e.msg})") from None
            if not isinstance(values, (list, str, dict)):  # HF takes a text's characters
                raise ToolSchemaError(f"tool {name}: argument {arg!r}: (choices: ...) is not a "
                                      "JSON list")  # and an object's keys, as it iterates
            schema["enum"] = [v.strip() if isinstance(v, str) else v for v in values]
            text = text[:choices.start()].strip()
        schema["description"] = text
    function = {"name": name, "description": description, "parameters": parameters}
    if return_schema is not None:
        function["return"] = return_schema
    return {"type": "function", "function": function}


def _first(text: str, markers) -> int:
    """The position of the earliest of `markers` in `text` (len(text) when none occurs)."""
    return min([i for i in (text.find(m) for m in markers) if i >= 0], default=len(text))


def _section(doc: str, heading: str, ends) -> str | None:
    """The text after `heading` on a line of its own (a newline, optional space, the heading
    and a newline) up to the earliest of `ends`; None without one."""
    found = re.search(r"\n\s*" + re.escape(heading) + r"\n", doc)
    if found is None:
        return None
    rest = doc[found.end():]
    return rest[:_first(rest, ends)]


def _docstring_parts(doc: str) -> tuple[str, dict[str, str], str | None]:
    """(description, {argument: text}, returns text or None) of a Google-style docstring."""
    description = doc[:_first(doc, _SECTIONS)].strip()
    returns = _section(doc, "Returns:", ("Raises:",))
    returns = returns.strip() if returns is not None else None
    block = _section(doc, "Args:", ("Returns:", "Raises:"))
    texts: dict[str, str] = {}
    current, indent, lines = None, "", []

    def finish():
        if current is not None:
            texts[current] = re.sub(r"\s*\n+\s*", " ", "\n".join(lines).strip())

    for line in (block or "").split("\n"):
        if not line.strip():
            continue
        opening = _ARGUMENT.match(line)
        deeper = current is not None and line.startswith(indent) and \
            line[len(indent):len(indent) + 1] in (" ", "\t")
        # an argument with no text on its own line takes the next line as its text's start,
        # whatever that line looks like (HF's parse reads past the line end for it)
        if opening and not deeper and not (current is not None and not "".join(lines).strip()):
            finish()
            current, indent, lines = opening.group(2), opening.group(1), [line[opening.end():]]
        elif current is not None:
            lines.append(line)
    finish()
    return description, texts, returns


def _parameters(fn: Callable, name: str) -> dict:
    """{"type": "object", "properties": {...} (with "return" when its hint converts),
    "required": [...] when any}."""
    try:
        hints = typing.get_type_hints(fn)
        signature = inspect.signature(fn)
    except (NameError, TypeError, ValueError, SyntaxError) as e:  # SyntaxError: 'list['
        raise ToolSchemaError(f"tool {name}: its signature cannot be read ({e})") from None
    params = signature.parameters
    first = next(iter(params), None)
    receiver = first if first in ("self", "cls") and \
        params[first].annotation is inspect.Parameter.empty else None
    required = []
    for arg, param in params.items():
        if arg == receiver:
            continue
        if param.annotation is inspect.Parameter.empty:
            raise ToolSchemaError(f"tool {name}: argument {arg!r} has no type hint")
        if param.default is inspect.Parameter.empty:
            required.append(arg)
    properties = {}
    for arg, hint in hints.items():
        if arg == receiver:
            continue
        if arg == "return":  # never generated: left out when it does not convert
            try:
                properties[arg] = _type_schema(hint)
            except ToolSchemaError:
                pass
        elif arg in params:
            try:
                properties[arg] = _type_schema(hint)
            except ToolSchemaError as e:
                raise ToolSchemaError(f"tool {name}: argument {arg!r}: {e}") from None
    out = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    return out


def _enum(values: list) -> dict:
    """{"type": the JSON types of `values`, each once in order of appearance, "enum": values}."""
    kinds = list(dict.fromkeys(_JSON_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _plain(hint) -> dict | None:
    """The schema of a bare type (no type arguments), None for one without a JSON form."""
    if hint is Any:
        return {}
    if hint in _PLAIN_TYPES:
        return {"type": _PLAIN_TYPES[hint]}
    if isinstance(hint, type):
        where = (hint.__module__, hint.__qualname__)
        if where == ("torch", "Tensor"):
            return {"type": "audio"}
        if where == ("PIL.Image", "Image"):
            return {"type": "image"}
    return None


def _type_schema(hint) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [member.value for member in hint]
        if not values:
            raise ToolSchemaError(f"the Enum {hint.__name__} has no members")
        if any(type(v) not in _JSON_SCALARS for v in values):
            raise ToolSchemaError(f"the Enum {hint.__name__} has values that are not JSON "
                                  "scalars (int, float, str, bool, None)")
        return _enum(values)
    if origin is None:
        schema = _plain(hint)
        if schema is None:
            raise ToolSchemaError(f"type hint {hint!r} has no JSON schema (a custom class?); "
                                  "give the tool's JSON schema instead of the function")
        return schema
    if origin is typing.Union or origin is types.UnionType:
        parts = [_type_schema(a) for a in args if a is not type(None)]
        if len(parts) == 1:
            schema = parts[0]
        elif all(set(p) == {"type"} and isinstance(p["type"], str) for p in parts):
            names = sorted({p["type"] for p in parts})
            schema = {"type": names[0] if len(names) == 1 else names}
        else:
            schema = {"anyOf": parts}
        if type(None) in args:
            schema["nullable"] = True
        return schema
    if origin is typing.Literal and args:
        if any(type(a) not in _JSON_SCALARS for a in args):
            raise ToolSchemaError(f"{hint!r}: Literal values must be JSON scalars")
        return _enum(list(args))
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or Ellipsis in args:
            raise ToolSchemaError(f"{hint!r}: a tuple hint needs two or more fixed types (use "
                                  "list[...] for a sequence)")
        return {"type": "array", "prefixItems": [_type_schema(a) for a in args]}
    if origin is dict:
        schema = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = _type_schema(args[1])
        return schema
    raise ToolSchemaError(f"type hint {hint!r} has no JSON schema; give the tool's JSON schema "
                          "instead of the function")
