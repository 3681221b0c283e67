"""What ``--web`` / ``--export`` do: build the panes of ``ptqc inspect`` and ``ptqc diff``, write them,
and serve them in Model Explorer until interrupted."""
from __future__ import annotations

import re
import shutil
import signal
import tempfile
import webbrowser
from pathlib import Path

from ptqc import explorer, explorer_server
from ptqc.errors import PtqcError

KERNEL_BACKEND = "ascend"


def safe_name(spec: str) -> str:
    """A file name for a side spec (``out/w8:ascend`` -> ``w8-ascend``)."""
    path, _, target = spec.partition(":")
    name = Path(path.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{name}-{target}" if target else name)


def _lowered(spec: str, dtype: str, trust_remote_code: bool):
    """The graph ``spec`` as its backend runs it (``PATH:ascend``: lowered in memory)."""
    from ptqc import diff

    t = diff.open_target(spec, dtype, trust_remote_code)
    t.close()
    return t.qm


def kernels(s: explorer.Side, qm, spec: str, dtype: str, trust_remote_code: bool) -> None:
    """The Ascend kernel overlay: ``qm``'s own kernels if lowered, else those of ``spec`` lowered in memory."""
    from ptqc import backends

    b = backends.get(KERNEL_BACKEND)
    lowered = qm if backends.lowered_by(qm) is b else _lowered(f"{spec.partition(':')[0]}:{KERNEL_BACKEND}", dtype,
                                                               trust_remote_code)
    explorer.add_kernels(s, qm, lowered, b.op_namespace)


def inspect_sides(spec: str, dtype: str, trust_remote_code: bool, reports=(), with_kernels: bool = False):
    """The one pane of ``ptqc inspect SPEC --web``: the artifact or model directory (``PATH:TARGET``: as
    that backend runs it), with the overlays of ``reports`` (diff / diagnose JSON) and the kernels."""
    from ptqc import artifact

    path = Path(spec.partition(":")[0])
    qm = _lowered(spec, dtype, trust_remote_code) if ":" in spec else artifact.load_any(path, dtype, trust_remote_code)
    s = explorer.side(qm, safe_name(spec))
    s.spec = spec
    for r in reports:
        explorer.add_report(s, qm, r)
    if with_kernels:
        kernels(s, qm, spec, dtype, trust_remote_code)
    return [s]


def diff_sides(ta, tb, report: dict):
    """The two panes of ``ptqc diff A B --web``: each side's graph as it ran, with the diff overlays; B
    opens on its first divergent node (else first quantized), A on the overlay's statistics per group."""
    out = []
    for which, t in (("a", ta), ("b", tb)):
        s = explorer.side(t.qm, f"{which.upper()}-{safe_name(t.spec)}")
        s.spec = t.spec
        explorer.add_diff(s, t.qm, report, which)
        out.append(s)
    out[0].selected = ""
    return out


def show(sides, *, web: bool, port: int | None, export_dir: Path | None, browser: bool, echo) -> None:
    """Write the panes (to ``export_dir``, else a temporary directory, removed afterwards); with ``web``,
    serve them until Ctrl-C, opening the page in the default browser unless ``browser`` is false."""
    out = Path(export_dir) if export_dir else Path(tempfile.mkdtemp(prefix="ptqc-explorer-"))
    data = explorer.export(sides, out)
    if export_dir:
        echo(f"wrote {out}/ ({explorer.MANIFEST}, {sum(1 + len(s.overlays) for s in sides)} graph and overlay "
             f"files; view with: ptqc inspect {out} --web)")
    try:
        if web:
            serve(data, port=port, browser=browser, echo=echo)
    finally:
        if not export_dir:
            shutil.rmtree(out, ignore_errors=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(data: dict, *, port: int | None, browser: bool, echo) -> None:
    """Serve ``data`` until Ctrl-C or SIGTERM (the server stops with us)."""
    old, proc = signal.signal(signal.SIGTERM, _interrupt), None
    try:
        proc, port = explorer_server.start(port)
        url = explorer.url(port, data)
        echo(f"Model Explorer on http://127.0.0.1:{port}/ (Ctrl-C stops it); the graph:\n{url}")
        if browser:
            webbrowser.open(url)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        if proc is not None:
            explorer_server.stop(proc)
    if proc is not None and proc.returncode not in (0, -15, None):
        raise PtqcError(f"Model Explorer's server exited with status {proc.returncode}")


def serve_export(root: Path, *, port: int | None, browser: bool, echo) -> None:
    """``ptqc inspect DIR --web`` on a directory written by ``--export``."""
    serve(explorer.load_manifest(root), port=port, browser=browser, echo=echo)
