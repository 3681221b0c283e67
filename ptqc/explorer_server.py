"""Model Explorer's local server (PyPI ``ai-edge-model-explorer``, a peer: ``pip install
'ptqc[web]'``), bound to 127.0.0.1.

It runs in a subprocess, from this Python when ``model_explorer`` imports here, else from the
Python named by ``PTQC_EXPLORER_PYTHON`` or the peer venv ``tools/explorer_env.py`` makes
(``.cache/explorer/venv`` of a source checkout). The page loads our JSON files through the
server's file reader, so nothing but the app itself is served; its check for a newer release (a call
to PyPI) is switched off.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ptqc.errors import PtqcError

HOST = "127.0.0.1"
PEER_VENV = Path(__file__).resolve().parents[1] / ".cache" / "explorer" / "venv"
# The app asks its server for a newer release (PyPI, GitHub): answered here without a network call.
SERVE = ("import sys\nfrom model_explorer import server\n"
         "server._check_new_version = lambda print_msg=True: {'version': '', 'runningVersion': '', 'releaseUrl': '', "
         "'desktopAppUrl': ''}\n"
         "server.start(host=sys.argv[1], port=int(sys.argv[2]), no_open_in_browser=True)\n")


def python() -> str:
    """The interpreter that has ``model_explorer``."""
    if os.environ.get("PTQC_EXPLORER_PYTHON"):
        return os.environ["PTQC_EXPLORER_PYTHON"]
    if importlib.util.find_spec("model_explorer") is not None:
        return sys.executable
    peer = PEER_VENV / "bin" / "python"
    if peer.is_file():
        return str(peer)
    raise PtqcError("Model Explorer is not installed: pip install 'ptqc[web]' (or, in a source checkout, "
                    "python3 tools/explorer_env.py); --export DIR writes the files without it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/check_health", timeout=2) as r:
            return r.read() == b"model_explorer_ok"
    except OSError:
        return False


def start(port: int | None = None, timeout: float = 120.0, **popen) -> tuple[subprocess.Popen, int]:
    """Start the server on ``port`` (a free one when None); returns it once it answers."""
    port = port or free_port()
    if in_use(port):
        raise PtqcError(f"port {port} is already in use")
    proc = subprocess.Popen([python(), "-c", SERVE, HOST, str(port)], **popen)
    try:
        _wait_healthy(proc, port, timeout)
    except BaseException:
        stop(proc)
        raise
    return proc, port


def _wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> None:
    t0 = time.monotonic()
    while not healthy(port):
        if proc.poll() is not None:
            raise PtqcError(f"Model Explorer's server exited with status {proc.returncode} before answering")
        if time.monotonic() - t0 > timeout:
            raise PtqcError(f"Model Explorer's server did not answer on port {port} within {timeout:g}s")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
