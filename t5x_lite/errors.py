"""Bad input from the user, and how the command lines report it.

Every error a user can cause (flags, configs, files, checkpoints, vocabularies, meshes) is a
`UserError`: a `ValueError` whose message says what is wrong and how to fix it. The command
lines (`train`, `infer`, `evaluate`, `convert`, `estimate`) print it as one line,
`<command>: error: <message>`, and exit 1; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import re
import sys
from typing import Callable, NoReturn


class UserError(ValueError):
    """Bad input: the message is the whole report."""


# Also one line: missing / unreadable files and directories named by flags.
CLI_ERRORS = (UserError, OSError)


def exit_with(prog: str, error: BaseException | str) -> NoReturn:
    """Exit 1 with `<prog>: error: <the message's first line>` on stderr."""
    text = str(error).strip()
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0]).strip()
    lines = text.splitlines()
    sys.exit(f"{prog}: error: {lines[0] if lines else type(error).__name__}")


def flags_parser(prog: str) -> Callable:
    """absl `app.run(main, flags_parser=...)`: absl's own parser, plus one error line for a
    ConfigDict override naming a key the config does not have (`--config.train.batch_sise=8`),
    which `ml_collections.config_flags` raises as AttributeError / KeyError while parsing."""
    from absl import app

    def parse(argv):
        try:
            return app.parse_flags_with_usage(argv)
        except (AttributeError, KeyError) as e:
            text = str(e.args[0] if e.args else e)
            key = (re.findall(r"\w+", text) or ["?"])[0]
            flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--")
                         and key in a.split("=")[0].split(".")[1:]), "a --config.* flag")
            hint = re.search(r'Did you mean "(\w+)"', text)
            exit_with(prog, f"unknown config key {key!r} in {flag}"
                      + (f"; did you mean {hint.group(1)!r}?" if hint else ""))

    return parse
