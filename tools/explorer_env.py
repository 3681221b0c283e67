#!/usr/bin/env python3
"""Make (once) the peer venv of Google's Model Explorer, which ``ptqc inspect --web`` and ``ptqc diff
--web`` start when ``model_explorer`` does not import in ptqc's own environment (users: ``pip install
'ptqc[web]'``), and which ``tests/test_explorer_browser.py`` uses.

    python3 tools/explorer_env.py [--root DIR]

In ``.cache/explorer/`` (ignored by git): ``venv/`` with ``ai-edge-model-explorer`` (pinned below)
and its dependencies. Idempotent: a stamp file records what was installed. Prints the venv's
python. Exit 3 with ``skip: REASON`` on stdout when the package index cannot be reached and the venv
is not there yet.
"""
from __future__ import annotations

import argparse
import fcntl
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "ai-edge-model-explorer==0.1.34"
INDEX = "https://pypi.org/simple"
SKIP = 3


def stamp_text() -> str:
    return f"{PACKAGE} python{sys.version_info[0]}.{sys.version_info[1]}"


def reachable() -> str | None:
    """None when the package index answers, else why not."""
    try:
        urllib.request.urlopen(f"{INDEX}/{PACKAGE.split('==')[0]}/", timeout=30).close()
        return None
    except OSError as e:
        return f"the package registry cannot be reached ({INDEX}: {e})"


def make(venv: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    PACKAGE], check=True)


def ensure(root: Path) -> Path:
    """The venv's python, made first if missing or stale; exit 3 if the index is out of reach."""
    root.mkdir(parents=True, exist_ok=True)
    py, stamp = root / "venv" / "bin" / "python", root / "stamp"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time (CI and a test session may race)
        if stamp.is_file() and stamp.read_text() == stamp_text() and py.is_file():
            return py
        why = reachable()
        if why:
            print(f"skip: {why}")
            raise SystemExit(SKIP)
        stamp.unlink(missing_ok=True)
        make(root / "venv")
        stamp.write_text(stamp_text())
    return py


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=HERE.parent / ".cache" / "explorer")
    print(ensure(ap.parse_args(argv).root.resolve()))


if __name__ == "__main__":
    main()
