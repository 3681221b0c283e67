"""Progress bars: one helper for every bar ptqc draws, shown only on a terminal.

Off the terminal (CI logs, pipes, files) a bar would print one line per refresh, so it is off
there; the log lines (pass timings, "wrote ...") still say what happens."""
from __future__ import annotations

import functools
import sys


def shown(quiet: bool = False) -> bool:
    """Are bars drawn: not ``quiet`` and stderr is a terminal."""
    return not quiet and sys.stderr.isatty()


def bar(iterable=None, *, quiet: bool = False, **kw):
    """A tqdm bar on stderr that disappears when done (``leave=False``), off unless :func:`shown`.
    Takes tqdm's arguments (``total``, ``desc``, ``unit``...) and offers its methods."""
    from tqdm.auto import tqdm

    kw.setdefault("leave", False)
    return tqdm(iterable, disable=not shown(quiet), **kw)


def factory(quiet: bool = False):
    """``progress(iterable=None, **kw)`` as library functions take it (diagnose, diff, perplexity)."""
    return functools.partial(bar, quiet=quiet)
