"""Bad input from the user, and the path checks that report it.

Every error a user can cause (flags, configs, files, checkpoints, vocabularies, meshes) is a
`UserError`: a `ValueError` whose message says what is wrong and how to fix it. The command
lines print it as one line (`t5x_lite.cli`).
"""


from __future__ import annotations

import os


class UserError(ValueError):
    """Bad input: the message is the whole report."""


def file_in_the_way(path) -> str | None:
    """The nearest existing ancestor of local `path` when it is a file (mkdir would say a bare
    '[Errno 17] File exists' / '[Errno 20] Not a directory'), else None."""
    text = os.fspath(path)
    if "://" in text:
        return None
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    return parent if os.path.exists(parent) and not os.path.isdir(parent) else None
