"""What the command lines (`python -m t5x_lite.<name>`) share: the one-line error report, the
flags parser that gives config-key typos that report, and the console log filter.

Every error a user can cause is a `t5x_lite.errors.UserError` (or an OSError on a path a flag
names): a command line prints it as `<command>: error: <message>` and exits 1. Anything else is
a bug and keeps its traceback.
"""
from __future__ import annotations

import re
import sys
from typing import Callable, NoReturn

from t5x_lite.errors import UserError

ERRORS = (UserError, OSError)

# The custom builder configs of our tfds builders (default corpus, local files) are expected:
# tfds warns about each on every open.
_EXPECTED_WARNINGS = ("Using custom data configuration",)


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


class _Console:
    """INFO lines from t5x_lite only (orbax, tfds and jax log a page per checkpoint, dataset and
    file they touch); warnings and errors from everywhere but the expected ones."""

    def filter(self, record) -> bool:
        if record.levelno < 30:  # 30: std WARNING
            return "t5x_lite" in record.pathname
        return not str(record.msg).startswith(_EXPECTED_WARNINGS)


def quiet_console(level=None) -> None:
    """Filter the absl console handler (and set its verbosity, if given)."""
    from absl import logging

    if level is not None:
        logging.set_verbosity(level)
    logging.get_absl_handler().addFilter(_Console())
