"""``ptqc inspect --web`` and ``ptqc diff --web``: ptqc graphs and their overlays as files Model
Explorer opens (:mod:`ptqc.explorer_graph`, :mod:`ptqc.explorer_overlays`), and the page address
that shows them (:mod:`ptqc.explorer_server` serves it).

An export directory holds per side ``<name>.json`` (a list of one graph, the app's JSON graph
format), ``<name>.<overlay>.json`` (node data) and ``explorer.json``: the app's ``data`` URL
parameter (models, node data and the pane layout: one pane, or two side by side for a diff), with
paths relative to the directory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ptqc import explorer_graph as eg
from ptqc import explorer_overlays as ov
from ptqc.errors import PtqcError
from ptqc.ir import QModel

MANIFEST = "explorer.json"
FIRST_DIVERGENT_COLOR = "#ff00ff"


@dataclass
class Side:
    """One pane: a graph, its overlays (file stem -> node data), the node to select, groups to open."""

    name: str
    graph: dict
    spec: str = ""
    overlays: dict = field(default_factory=dict)
    selected: str = ""
    expanded: list = field(default_factory=list)


def _first_quantized(qm: QModel) -> str:
    """The first quantized linear (else the first node with quantization parameters, else the first
    linear probe: lowered graphs keep no quantization records)."""
    from ptqc.ops import LINEAR
    from ptqc.probes import graph_probes

    quantized = [n for n in qm.graph.nodes if n.meta.get("ptqc", {}).get("quant")]
    if quantized:
        return next((n.name for n in quantized if n.target == LINEAR), quantized[0].name)
    try:
        return next((p.node.partition("#")[0] for p in graph_probes(qm) if p.kind == "linear"), "")
    except PtqcError:
        return ""


def side(qm: QModel, name: str) -> Side:
    """A pane for ``qm``: opened on its first quantized node (decoder layer 0 expanded)."""
    g = eg.graph(qm, name)
    sel = _first_quantized(qm)
    ns = next((n["namespace"] for n in g["nodes"] if n["id"] == sel), "")
    return Side(name, g, selected=sel, expanded=[ns + eg.GROUP_SUFFIX] if ns else [])


def _logits(qm: QModel) -> str | None:
    from ptqc.probes import logits_node

    try:
        return logits_node(qm.graph).name
    except PtqcError:
        return None


def add_diff(s: Side, qm: QModel, report: dict, which: str) -> None:
    """The diff report's overlays on side ``which`` (``a``/``b``), its first divergent node marked."""
    ids = {n["id"] for n in s.graph["nodes"]}
    s.overlays.update(ov.diff_overlays(report, which, s.graph["id"], ids, _logits(qm)))
    first = ov.first_divergent(report, which, ids, _logits(qm))
    if first is not None:
        eg.mark(s.graph, first, FIRST_DIVERGENT_COLOR,
                f"first node below {report['threshold_db']:g} dB SQNR ({report['first_below']})")
        s.selected = first
        ns = next(n["namespace"] for n in s.graph["nodes"] if n["id"] == first)
        s.expanded = [ns + eg.GROUP_SUFFIX] if ns else []


def add_diagnose(s: Side, qm: QModel, report: dict) -> None:
    from ptqc.probes import graph_probes

    nodes = {p.key: p.node.partition("#")[0] for p in graph_probes(qm)}
    s.overlays.update(ov.diagnose_overlays(report, s.graph["id"], nodes))


def add_kernels(s: Side, qm: QModel, lowered: QModel, namespace: str) -> None:
    s.overlays.update(ov.kernel_overlay(s.graph["id"], qm.graph, lowered.graph, namespace))


def add_report(s: Side, qm: QModel, path: Path) -> None:
    """Overlays from a report file: ``ptqc diff --json`` (side A when its spec is this pane's, else
    B) or ``ptqc diagnose``'s diagnostics.json."""
    try:
        rep = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PtqcError(f"cannot read overlay report {path}: {e}") from None
    fmt = rep.get("format") if isinstance(rep, dict) else None
    if fmt == "ptqc-diff":
        add_diff(s, qm, rep, "a" if rep["a"].get("spec") == s.spec else "b")
    elif fmt == "ptqc-diagnostics":
        add_diagnose(s, qm, rep)
    else:
        raise PtqcError(f"{path} is not a ptqc diff (--json) or diagnose (diagnostics.json) report")


def _pane(s: Side, width: float, selected: bool) -> dict:
    return {"deepestExpandedGroupNodeIds": s.expanded, "selectedNodeId": s.selected, "selectedGraphId": s.graph["id"],
            "selectedCollectionLabel": f"{s.name}.json", "widthFraction": width, "selected": selected}


def export(sides: list[Side], out: Path) -> dict:
    """Write the sides' graph and overlay files to ``out`` and the manifest; returns the URL data with
    absolute paths (what :func:`url` encodes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models, data, targets = [], [], []
    for s in sides:
        (out / f"{s.name}.json").write_text(json.dumps([s.graph]))
        models.append({"url": f"{s.name}.json"})
        for stem, nd in s.overlays.items():
            (out / f"{s.name}.{stem}.json").write_text(json.dumps(nd, allow_nan=False))
            data.append(f"{s.name}.{stem}.json")
            targets.append(f"{s.name}.json")
    panes = [_pane(s, 1 / len(sides), i == len(sides) - 1) for i, s in enumerate(sides)]  # B (quantized) selected
    manifest = {"models": models, "nodeData": data, "nodeDataTargets": targets, "uiState": {"paneStates": panes}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return absolute(manifest, out)


def absolute(manifest: dict, root: Path) -> dict:
    """The manifest with its file names made absolute paths under ``root`` (the app reads files by path)."""
    root = Path(root).resolve()
    return {**manifest, "models": [{**m, "url": str(root / m["url"])} for m in manifest["models"]],
            "nodeData": [str(root / p) for p in manifest["nodeData"]]}


def load_manifest(root: Path) -> dict:
    f = Path(root) / MANIFEST
    if not f.is_file():
        raise PtqcError(f"{root} has no {MANIFEST} (not a directory written by --web --export)")
    return absolute(json.loads(f.read_text()), root)


def url(port: int, data: dict) -> str:
    """The page showing ``data`` on the local server."""
    return f"http://127.0.0.1:{port}/?data={quote(json.dumps(data))}"
