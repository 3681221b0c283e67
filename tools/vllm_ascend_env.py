#!/usr/bin/env python3
"""Make (once) the peer venv that runs vllm-ascend's real loader on the CPU, for
``tools/vllm_ascend_load.py`` and ``tests/test_vllm_ascend_load.py``.

    python3 tools/vllm_ascend_env.py [--root DIR] [--print python|pythonpath]

In ``.cache/vllm-ascend/`` (ignored by git): ``venv/`` with torch 2.13.0 (the CPU wheel) and
``tools/vllm_ascend_requirements.txt`` installed with ``--no-deps`` (vllm-ascend 0.23.0,
transformers, vllm's small requirements: exact pins, nothing resolved), and ``vllm-src/vllm``:
the ``vllm/`` package of vllm 0.23.0's source release (its wheel is a CUDA build pinned to
another torch), put on PYTHONPATH by the caller. pip never runs with that tree on the path.

Idempotent: a stamp file records what was installed; a second run does nothing. Prints JSON
``{"python", "pythonpath"}`` (or the one field ``--print`` names). Exit 3 with ``skip: REASON``
on stdout when PyPI cannot be reached and the venv is not there yet.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "vllm_ascend_requirements.txt"
TORCH = "torch==2.13.0"
VLLM_SDIST = ("vllm", "vllm-0.23.0.tar.gz", "760269db3d9611e12e524681df1bca0977d5d2f5fcb4481cc34d33efc4ae7ff5")
INDEX = "https://pypi.org/simple"
SKIP = 3


def stamp_text() -> str:
    """What the venv was made from; a change remakes it."""
    h = hashlib.sha256(REQUIREMENTS.read_bytes() + repr((TORCH, VLLM_SDIST, sys.version_info[:2])).encode())
    return h.hexdigest()


def reachable() -> str | None:
    """None when the package index answers, else why not."""
    try:
        urllib.request.urlopen(f"{INDEX}/{VLLM_SDIST[0]}/", timeout=30).close()
        return None
    except OSError as e:
        return f"the package registry cannot be reached ({INDEX}: {e})"


def fetch_vllm_source(dest: Path) -> None:
    """vllm's source release from the index (sha256 checked); only its ``vllm/`` package is kept."""
    name, fname, sha = VLLM_SDIST
    req = urllib.request.Request(f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        files = json.load(r)["files"]
    url = next(f["url"] for f in files if f["filename"] == fname)
    with urllib.request.urlopen(url, timeout=600) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != sha:
        raise SystemExit(f"{fname}: sha256 mismatch (expected {sha})")
    top = fname.removesuffix(".tar.gz") + "/"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(top + "vllm/")]
        for m in members:
            m.name = m.name.removeprefix(top)
        tf.extractall(tmp, members=members, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def pip(venv: Path, *args: str) -> None:
    env_py = venv / "bin" / "python"
    subprocess.run([str(env_py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def make(root: Path) -> None:
    venv, src = root / "venv", root / "vllm-src"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip(venv, TORCH)
    pip(venv, "--no-deps", "-r", str(REQUIREMENTS))
    fetch_vllm_source(src)


def ensure(root: Path) -> dict:
    """The venv's python and PYTHONPATH, made first if missing or stale; exit 3 if PyPI is out of reach."""
    root.mkdir(parents=True, exist_ok=True)
    out = {"python": str(root / "venv" / "bin" / "python"), "pythonpath": str(root / "vllm-src")}
    stamp = root / "stamp"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time (CI and a test session may race)
        if stamp.is_file() and stamp.read_text() == stamp_text():
            return out
        why = reachable()
        if why:
            print(f"skip: {why}")
            raise SystemExit(SKIP)
        stamp.unlink(missing_ok=True)
        make(root)
        stamp.write_text(stamp_text())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=HERE.parent / ".cache" / "vllm-ascend")
    ap.add_argument("--print", dest="field", choices=["python", "pythonpath"])
    a = ap.parse_args(argv)
    out = ensure(a.root.resolve())
    print(out[a.field] if a.field else json.dumps(out))


if __name__ == "__main__":
    main()
