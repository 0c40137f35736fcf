"""Tools given as Python functions: `tool_schema.function_schema` equals transformers'
`get_json_schema` key for key and in key order (a chat template writes it with `tojson`), on
hand-written functions and on generated docstrings; what HF refuses is one error line here."""
import enum
import json
import random
import textwrap
import typing
from typing import Any, Literal, Optional, Union

import pytest
from transformers.utils import chat_template_utils as hf

from t5x_lite.tool_schema import ToolSchemaError, function_schema


class Color(enum.Enum):
    RED = "red"
    ONE = 1


def plain(x: int, y: float, name: str, flag: bool = False) -> str:
    """Describe a point.

    Args:
        x: The x coordinate.
        y (float): The y coordinate,
            continued on a second line.
        name: Its name. (choices: ["a", " b ", 3])
        flag (bool, optional): A switch.

    Returns:
        The description, as text.

    Raises:
        ValueError: never.
    """


def containers(a: list[int], b: dict[str, list[float]], c: tuple[int, str], d: list,
               e: typing.Dict, f: tuple) -> dict:
    """Containers.
    Args:
        a: ints
        b: float lists by name
        c: a pair
        d: anything listed
        e: a mapping
        f: a tuple
    """


def unions(a: Optional[int], b: Union[int, str], c: int | None = None, d: list[int] | str = "",
           e: Optional[Any] = None, f: Union[int, float, int] = 0,
           g: Literal["x", 2, None] = "x", h: Color = Color.RED, i: Union[str, int] = "") -> None:
    """Unions, literals and enums.

    Args:
      a: maybe an int
      b: an int or a str
      c: an int or nothing
      d: ids or a text
      e: anything or nothing
      f: a number
      g: a literal
      h: a color
      i: a str or an int
    Returns:
      nothing
    """


class Tools:
    def method(self, q: str) -> list[str]:
        """Search.

        Args:
            q: the query
        """

    @classmethod
    def klass(cls, n: int):
        """Count to n.

        Args:
            n: how far
        """


def text_choices(x: str, y: str):
    """Choices given as a JSON text or object: HF takes its characters or keys.

    Args:
        x: a letter (choices: "ab")
        y: a key (choices: {"k": 1, "m": 2})
    """


def described_oddly(x: int, y: int):
    """Odd layouts: Args: mid-line is a section start for the description.
Args:
    x (a type, with comma): first
        note: a deeper line that looks like an argument
    y: second
    Returns: inline, not a section
    """


def no_return_hint(x: int) -> "Tools":
    """The return hint does not convert: left out.

    Args:
        x: a number
    """


@pytest.mark.parametrize("fn", [plain, containers, unions, Tools().method, Tools.klass,
                                described_oddly, no_return_hint, text_choices])
def test_schemas_equal_hf_get_json_schema(fn):
    ours = function_schema(fn)
    assert json.dumps(ours) == json.dumps(hf.get_json_schema(fn))  # in the same key order


def test_the_hand_written_cases_cover_what_they_name():
    p = function_schema(plain)["function"]
    assert p["parameters"]["properties"]["name"]["enum"] == ["a", "b", 3]
    assert p["parameters"]["required"] == ["x", "y", "name"]
    assert p["return"] == {"type": "string", "description": "The description, as text."}
    u = function_schema(unions)["function"]["parameters"]["properties"]
    assert u["d"] == {"anyOf": [{"type": "array", "items": {"type": "integer"}},
                                {"type": "string"}], "description": "ids or a text"}
    assert u["h"]["enum"] == ["red", 1] and u["h"]["type"] == ["string", "integer"]
    assert "self" not in json.dumps(function_schema(Tools().method))


def _fuzzed(rng: random.Random) -> str:
    """The source of a function with a generated Google-style docstring."""
    names = rng.sample(["alpha", "b2", "c_d", "e", "ff"], rng.randint(1, 4))
    indent = rng.choice(["  ", "    ", "\t"])
    lines = [rng.choice(["Do a thing.", "Several words here", ""])]
    if rng.random() < 0.7:
        lines += [""] * rng.randint(0, 2) + ["Args:"]
        for name in names:
            kind = rng.choice(["", " (int)", "(int, optional)", " (list[str])"])
            text = rng.choice(["the value", "", "a (choices: [1, 2])", "x: y", "Returns: z"])
            lines.append(f"{indent}{name}{kind}: {text}")
            for _ in range(rng.randint(0, 2)):
                deeper = rng.choice(["more text", "inner: looks like an arg", ""])
                lines.append(indent + rng.choice([indent, " ", ""]) + deeper)
    if rng.random() < 0.5:
        lines += ["", "Returns:", f"{indent}a result" + rng.choice(["", "\n\nmore"])]
    if rng.random() < 0.3:
        lines += ["Raises:", f"{indent}KeyError: sometimes"]
    doc = "\n".join(lines)
    args = ", ".join(f"{n}: int" for n in names)
    return f"def fn({args}) -> int:\n    {json.dumps(doc)}\n"


def test_generated_docstrings_parse_as_hf():
    """Either both derive the same schema or both refuse (a missing description)."""
    rng, same, refused = random.Random(0), 0, 0
    for _ in range(400):
        scope = {}
        exec(_fuzzed(rng), scope)  # noqa: S102 - test-generated source
        fn = scope["fn"]
        try:
            want = json.dumps(hf.get_json_schema(fn))
        except (hf.DocstringParsingException, hf.TypeHintParsingException, TypeError,
                ValueError):
            with pytest.raises(ToolSchemaError):
                function_schema(fn)
            refused += 1
            continue
        assert json.dumps(function_schema(fn)) == want, textwrap.indent(fn.__doc__, "| ")
        same += 1
    assert same > 100 and refused > 50


def undocumented(x: int):
    pass


def no_description(x: int, y: int):
    """Only x.

    Args:
        x: described
    """


def no_hint(x):
    """A.

    Args:
        x: untyped
    """


class Custom:
    pass


def custom(x: Custom):
    """A.

    Args:
        x: custom
    """


def one_tuple(x: tuple[int]):
    """A.

    Args:
        x: a one-tuple
    """


def open_tuple(x: tuple[int, ...]):
    """A.

    Args:
        x: any length
    """


def empty_enum(x: enum.Enum("Empty", {})):  # noqa: F821 - a memberless Enum
    """A.

    Args:
        x: nothing
    """


@pytest.mark.parametrize("fn, message", [
    (undocumented, "tool undocumented: it has no docstring"),
    (no_description, "tool no_description: its docstring's Args section does not describe "
                     "argument 'y'"),
    (no_hint, "tool no_hint: argument 'x' has no type hint"),
    (custom, "tool custom: argument 'x': type hint .*Custom.* has no JSON schema"),
    (one_tuple, "argument 'x': tuple.int.: a tuple hint needs two or more fixed types"),
    (open_tuple, "a tuple hint needs two or more fixed types"),
    (empty_enum, "the Enum Empty has no members"),
])
def test_what_hf_refuses_is_one_line(fn, message):
    with pytest.raises((hf.DocstringParsingException, hf.TypeHintParsingException)):
        hf.get_json_schema(fn)
    with pytest.raises(ToolSchemaError, match=message) as e:
        function_schema(fn)
    assert "\n" not in str(e.value)


def unparsable_hint(x: "list["):  # noqa: F722 - a forward reference that is no expression
    """A.

    Args:
        x: broken
    """


def test_a_hint_that_does_not_parse_is_one_line():
    """typing.get_type_hints raises SyntaxError for it (HF's get_json_schema too)."""
    with pytest.raises(SyntaxError):
        hf.get_json_schema(unparsable_hint)
    with pytest.raises(ToolSchemaError, match=r"^tool unparsable_hint: its signature cannot be "
                       r"read \(Forward reference must be an expression"):
        function_schema(unparsable_hint)
