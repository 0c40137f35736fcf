"""Bad input from the user.

Every error a user can cause (flags, configs, files, checkpoints, vocabularies, meshes) is a
`UserError`: a `ValueError` whose message says what is wrong and how to fix it. The command
lines print it as one line (`t5x_lite.cli`).
"""


class UserError(ValueError):
    """Bad input: the message is the whole report."""
