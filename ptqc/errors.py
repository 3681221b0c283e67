"""User-facing errors.

Anything a user can cause (a missing file, a bad option, an unknown architecture...) raises
:class:`PtqcError`. The CLI prints its message as one line and exits with status 2; a traceback
is reserved for bugs in ptqc itself.
"""


class PtqcError(Exception):
    """An error caused by user input; the message says what is wrong and how to fix it."""


class CollapseError(PtqcError):
    """Non-finite values appeared while running a model (names the first node that produced them)."""
