"""What the ``ptqc`` commands share: one-line errors, ``--quiet``, log lines, plugin loading."""
from __future__ import annotations

import functools
import sys

import click

from ptqc.errors import PtqcError


def fail(msg: str, code: int = 2):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def friendly(fn):
    """Turn PtqcError (and Ctrl-C) into one line and a non-zero exit code."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except PtqcError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted", 130)
    return wrapper


def streams_weights(fn):
    """For commands that stream a model's weights layer by layer: fix the allocator first
    (:func:`ptqc.model.steady_malloc`), so freed layers go back to the system."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from ptqc.model import steady_malloc

        steady_malloc()
        return fn(*a, **kw)
    return wrapper


def quiet_option(fn):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines.")(fn)


def log(quiet: bool, msg: str):
    if not quiet:
        click.echo(msg, err=True)


def load_plugins(plugins):
    from ptqc import pipeline

    pipeline.load_builtin_passes()
    for p in plugins:
        pipeline.load_plugin(p)
