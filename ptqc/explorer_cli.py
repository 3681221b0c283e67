"""The ``--web`` options ``ptqc inspect`` and ``ptqc diff`` share."""
from __future__ import annotations

from pathlib import Path

import click


def web_options(f):
    """``--web``, ``--port``, ``--no-browser``, ``--export DIR``."""
    for opt in reversed([
        click.option("--web", is_flag=True, help="Show the graph in Model Explorer (pip install 'ptqc[web]'), "
                     "served on 127.0.0.1 until Ctrl-C."),
        click.option("--port", type=click.IntRange(1, 65535), default=None,
                     help="With --web: the server's port [a free one]."),
        click.option("--no-browser", is_flag=True, help="With --web: print the address, do not open a browser."),
        click.option("--export", "export_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                     help="Write the Model Explorer graph and overlay JSON files to this directory."),
    ]):
        f = opt(f)
    return f
