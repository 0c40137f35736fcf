"""What the command lines (`python -m t5x_lite.<name>`) share: the one-line error report, the
flags parser that gives config-key typos that report, and the console log filter.

Every error a user can cause is a `t5x_lite.errors.UserError` (or an OSError on a path a flag
names): a command line prints it as `<command>: error: <message>` and exits 1. Anything else is
a bug and keeps its traceback.
"""
from __future__ import annotations

import os
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


def check_flagfiles(prog: str) -> None:
    """Exit with one line when a --flagfile of the command line cannot be read. Call it before
    defining a config flag: ml_collections' config_flags reads the flagfiles then (at import
    time), before `flags_parser` runs."""
    from absl import flags

    try:
        flags.FLAGS.read_flags_from_files(sys.argv, force_gnu=False)
    except flags.Error as e:
        exit_with(prog, _flag_error_text(e))


def flags_parser(prog: str) -> Callable:
    """absl `app.run(main, flags_parser=...)`: every flag error as one line, also what
    `ml_collections.config_flags` raises while parsing: an error in a config's `get_config(arg)`
    (absl wraps it with its traceback: the line kept is the exception's), a config file that
    fails to run (its file:line and the exception), and an override
    naming a key the config does not have (`--config.train.batch_sise=8`)."""
    from absl import flags

    def parse(argv):
        try:
            rest = flags.FLAGS(argv)
            for name in flags.FLAGS:
                error = _config_load_error(flags.FLAGS[name].value)
                if error is not None:  # a missing file, or an OSError raised in get_config
                    lines = str(error).strip().splitlines()
                    exit_with(prog, _raised_in_config(error, argv) or
                              f"--{name}: {lines[-1].strip() if lines else 'failed to load'}")
                failure = _not_a_config(flags.FLAGS[name])
                if failure:
                    exit_with(prog, f"--{name}: {failure}")
            return rest
        except flags.Error as e:
            # config_flags re-raises a TypeError / ValueError from get_config (the traceback
            # in its text) and absl wraps that: the outermost exception of the chain raised in
            # the config file is the user's (not the one it was handling: a KeyError turned
            # into a ValueError naming the known presets).
            cause = e.__context__
            while cause is not None and not isinstance(cause, UserError):  # a UserError:
                where = _raised_in_config(cause, argv)                     # its message is
                if where:                                                  # the report
                    exit_with(prog, where)
                cause = cause.__context__
            text = _flag_error_text(e)
            if "Traceback" in text:  # the last line: "package.module.SomeError: message"
                text = re.sub(r"^[\w.]+(Error|Exception): ", "", text.splitlines()[-1].strip())
            override = re.search(r"Unknown command line flag '(\w+)\.", text)
            if override and override.group(1) in flags.FLAGS:  # --config.x=... without --config
                text += (f"; --{override.group(1)}.* overrides need --{override.group(1)}=FILE "
                         "before them")
            exit_with(prog, text)
        except Exception as e:
            names = [a.split("=")[0] for a in argv[1:] if a.startswith("--")]  # "--config.x.y"
            if isinstance(e, AttributeError) and "has no attribute 'get_config'" in str(e):
                flag = next((n for n in names if "." not in n and f"'{n[2:]}_config'" in str(e)),
                            "--config")
                exit_with(prog, f"{flag}: the file defines no get_config()")
            where = _raised_in_config(e, argv)
            if where is not None:
                exit_with(prog, where)
            overrides = [n for n in names if "." in n and n[2:].split(".")[0] in flags.FLAGS]
            bad = next((o for o in overrides if not re.fullmatch(r"--\w+(\.\w+)+", o)), None)
            if bad:  # "batch-size", "train..x", "paths[0]": ml_collections' own tracebacks
                exit_with(prog, f"{bad}: not a config key path (names of letters, digits and _ "
                                "joined by dots)")
            if not isinstance(e, (AttributeError, KeyError)):
                if not overrides or not isinstance(e, (ValueError, IndexError, TypeError)):
                    raise
                line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                named = next((o for o in overrides if o.split(".", 1)[1] in line),
                             overrides[0] if len(overrides) == 1 else "a --config.* override")
                exit_with(prog, f"cannot apply {named}: {line}")
            text = str(e.args[0] if e.args else e)
            below = re.search(r"Attribute <class '(\w+)'>\.(\w+) does not exist.*lookup: ([\w.]+)",
                              text)  # a key below a value ("train.num_steps.x")
            if below:
                kind, key, path = below.groups()
                flag = next((o for o in overrides if o.endswith(f".{path}")), f"--config.{path}")
                exit_with(prog, f"{flag}: {path.rsplit('.', 1)[0]} is a {kind}, which has no key "
                                f"{key!r}")
            key = (re.findall(r"\w+", text) or ["?"])[0]
            flag = next((n for n in names if key in n.split(".")[1:]), "a --config.* flag")
            hint = re.search(r'Did you mean "(\w+)"', text)
            exit_with(prog, f"unknown config key {key!r} in {flag}"
                      + (f"; did you mean {hint.group(1)!r}?" if hint else ""))

    return parse


def _flag_error_text(error) -> str:
    """An absl flag error's text without absl's own "ERROR::" prefix."""
    return re.sub(r"^ERROR::\s*", "", str(error).strip())


def _raised_in_config(error: BaseException, argv) -> str | None:
    """`--flag: file:line: Type: message` when `error` was raised by running a config file
    named in argv (a syntax error, a failed import, an exception in get_config), else None."""
    where = _config_file_frame(error, argv)
    if where is None:
        return None
    msg = error.msg if isinstance(error, SyntaxError) else error
    hint = ("" if where.rsplit(":", 1)[0].endswith(".py") else
            " (a config is a Python file with get_config(), e.g. configs/tiny_t5.py)")
    return f"{where}: {type(error).__name__}: {msg}{hint}"


def _config_file_frame(error: BaseException, argv) -> str | None:
    """`--flag: file:line` when `error` was raised by running a config file named in argv
    (a syntax error, a failed import, an exception in get_config): the line that failed."""
    import os
    import traceback

    files = {}
    for i, a in enumerate(argv[1:], 1):
        name, eq, value = a.partition("=")
        if not eq and i + 1 < len(argv) and not a.startswith("--config."):
            value = argv[i + 1]
        path = value.split(":")[0]
        if name.startswith("--") and (path.endswith(".py") or os.path.isfile(path)):
            files[os.path.realpath(path)] = name
    if isinstance(error, SyntaxError) and error.filename:
        line = (error.filename, error.lineno)
    else:
        frames = [(f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
        line = next((f for f in reversed(frames) if os.path.realpath(f[0]) in files), None)
    if line is None or os.path.realpath(line[0]) not in files:
        return None
    return f"{files[os.path.realpath(line[0])]}: {line[0]}:{line[1]}"


def _not_a_config(flag) -> str | None:
    """A config file flag given on the command line whose get_config() returned something
    other than a ConfigDict (None: a forgotten `return`; a plain dict): what it returned."""
    import ml_collections

    if (type(flag.parser).__name__ != "ConfigFileFlagParser" or not flag.present
            or isinstance(flag.value, ml_collections.ConfigDict)):
        return None
    return (f"get_config() returned {type(flag.value).__name__}, not an ml_collections "
            "ConfigDict" + (" (a missing return?)" if flag.value is None else ""))


def _config_load_error(value) -> BaseException | None:
    """config_flags keeps a config file that failed to load (missing, or raising an OSError)
    as a placeholder that raises on first use: the error it failed with, or None."""
    if type(value).__name__ != "_ErrorConfig":
        return None
    try:
        value.any_key  # raises the load error
    except OSError as e:
        return e.__cause__ or e
    return None


class _Console:
    """INFO lines from t5x_lite only (orbax, tfds and jax log a page per checkpoint, dataset and
    file they touch); warnings and errors from everywhere but the expected ones."""

    # the package's own files (not any path holding "t5x_lite": a venv inside a checkout named
    # t5x_lite holds every library's)
    package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")

    def filter(self, record) -> bool:
        if record.levelno < 30:  # 30: std WARNING
            return os.path.abspath(record.pathname).startswith(self.package)
        return not str(record.msg).startswith(_EXPECTED_WARNINGS)


def quiet_console(level=None) -> None:
    """Filter the absl console handler (and set its verbosity, if given)."""
    from absl import logging

    if level is not None:
        logging.set_verbosity(level)
    logging.get_absl_handler().addFilter(_Console())
