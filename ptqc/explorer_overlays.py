"""Per-node overlays for Model Explorer (its node-data JSON: ``{graph id: {"name", "results": {node
id: {"value"}}, "gradient"}}``, ``model_explorer.node_data_builder.ModelNodeData``).

* :func:`diff_overlays`: a ``ptqc diff`` report's SQNR dB, max relative error and cosine on the
  nodes of either side (``node_a`` / ``node_b``); an exact probe gets ``EXACT_DB``.
* :func:`diagnose_overlays`: a ``ptqc diagnose`` report's relative error of every linear and
  decoder layer output, local and accumulated.
* :func:`kernel_overlay`: the Ascend kernel each node is (a lowered graph) or became (a graph
  lowered in memory, matched by module and role).

Colours: a gradient from red (worst value) to green (best); string values get one colour per value.
"""
from __future__ import annotations

import math

import torch.fx as fx

from ptqc.diff_metrics import sqnr_value
from ptqc.explorer_graph import op_label

EXACT_DB = 160.0  # the SQNR shown for a probe with no error at all
RED_TO_GREEN = [{"stop": 0, "bgColor": "#d7191c"}, {"stop": 0.5, "bgColor": "#fdae61"},
                {"stop": 1, "bgColor": "#1a9641"}]
GREEN_TO_RED = [{"stop": 1 - g["stop"], "bgColor": g["bgColor"]} for g in reversed(RED_TO_GREEN)]
PALETTE = ("#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#d9d9d9",
           "#bc80bd", "#ccebc5", "#ffed6f")


def node_data(graph_id: str, name: str, values: dict, higher_is_better: bool = True) -> dict:
    """Node-data JSON of one graph: numeric ``values`` on a red-to-green gradient (worst red)."""
    return {graph_id: {"name": name, "results": {k: {"value": v} for k, v in values.items()},
                       "gradient": RED_TO_GREEN if higher_is_better else GREEN_TO_RED}}


def label_data(graph_id: str, name: str, values: dict[str, str]) -> dict:
    """Node-data JSON of one graph with string values, one background colour per distinct value."""
    colors = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(sorted(set(values.values())))}
    return {graph_id: {"name": name, "results": {k: {"value": v, "bgColor": colors[v]} for k, v in values.items()},
                       "showExpandedSummaryOnGroupNode": True}}


def probe_node(name: str, ids: set, logits: str | None) -> str | None:
    """The graph node a probe names (``node#i/k``: a chunk of ``node``; ``logits``: the logits node)."""
    name = logits if name == "logits" else name.partition("#")[0]
    return name if name in ids else None


def _worst(out: dict, node: str, v: float, higher_is_better: bool) -> None:
    if node not in out or (v < out[node] if higher_is_better else v > out[node]):
        out[node] = v


def diff_values(report: dict, side: str, ids: set, logits: str | None) -> dict[str, dict]:
    """Per metric (``sqnr_db``, ``max_rel``, ``cosine``): node id of side ``a``/``b`` -> value (a node
    holding several probes shows the worst). Probes without finite values are left out."""
    out: dict[str, dict] = {"sqnr_db": {}, "max_rel": {}, "cosine": {}}
    for r in report["rows"]:
        node = probe_node(r[f"node_{side}"], ids, logits)
        if node is None or not r["finite"]:
            continue
        _worst(out["sqnr_db"], node, min(sqnr_value(r), EXACT_DB), True)
        if r["max_rel"] is not None:
            _worst(out["max_rel"], node, r["max_rel"], False)
        if r["cosine"] is not None:
            _worst(out["cosine"], node, r["cosine"], True)
    return out


def diff_overlays(report: dict, side: str, graph_id: str, ids: set, logits: str | None) -> dict[str, dict]:
    """File stem -> node data: the diff's three metrics on one side's graph."""
    vals = diff_values(report, side, ids, logits)
    return {"diff-max_rel": node_data(graph_id, "diff max rel error", vals["max_rel"], higher_is_better=False),
            "diff-cosine": node_data(graph_id, "diff cosine", vals["cosine"]),
            "diff-sqnr_db": node_data(graph_id, "diff SQNR dB", vals["sqnr_db"])}  # the last one shows first


def first_divergent(report: dict, side: str, ids: set, logits: str | None) -> str | None:
    """The node of the first probe under the report's threshold, on side ``a``/``b``."""
    key = report.get("first_below")
    row = next((r for r in report["rows"] if r["key"] == key), None)
    return None if row is None else probe_node(row[f"node_{side}"], ids, logits)


def diagnose_overlays(report: dict, graph_id: str, probe_nodes: dict[str, str]) -> dict[str, dict]:
    """File stem -> node data: relative error of every linear (by module key) and decoder layer output
    (``layers.<i>``), local and accumulated; ``probe_nodes`` maps probe keys to node ids."""
    out = {}
    for mode in ("local", "accumulated"):
        vals: dict[str, float] = {}
        for lay in report["layers"]:
            items = [(f"layers.{lay['layer']}", lay["output"])] + list(lay["linears"].items())
            for key, rec in items:
                v = rec[mode].get("rel_error")
                node = probe_nodes.get(key)
                if node is not None and v is not None and math.isfinite(v):
                    _worst(vals, node, v, False)
        out[f"diagnose-rel_error-{mode}"] = node_data(graph_id, f"diagnose rel error ({mode})", vals,
                                                      higher_is_better=False)
    return out


def kernels_by_module(lowered: fx.Graph, namespace: str) -> dict[tuple, str]:
    """(module, role) -> the ``namespace`` kernels a lowered graph runs for it (``+``-joined, in order)."""
    out: dict[tuple, list] = {}
    for n in lowered.nodes:
        if n.op == "call_function" and str(n.target).startswith(namespace + "."):
            m = n.meta.get("ptqc", {})
            ks = out.setdefault((m.get("module", ""), m.get("role")), [])
            if op_label(n.target) not in ks:
                ks.append(op_label(n.target))
    return {k: "+".join(v) for k, v in out.items()}


def kernel_values(graph: fx.Graph, lowered: fx.Graph, namespace: str) -> dict[str, str]:
    """Node id -> its kernel: itself in a lowered graph; else the kernels of its (module, role), or its
    module's when the role is the module's only one, in ``lowered``."""
    own = {n.name: op_label(n.target) for n in graph.nodes
           if n.op == "call_function" and str(n.target).startswith(namespace + ".")}
    if own or graph is lowered:
        return own
    table = kernels_by_module(lowered, namespace)
    out = {}
    for n in graph.nodes:
        m = n.meta.get("ptqc", {})
        if n.op == "call_function" and m.get("role") and (m.get("module", ""), m["role"]) in table:
            out[n.name] = table[(m.get("module", ""), m["role"])]
    return out


def kernel_overlay(graph_id: str, graph: fx.Graph, lowered: fx.Graph, namespace: str) -> dict[str, dict]:
    return {"kernels": label_data(graph_id, "Ascend kernel", kernel_values(graph, lowered, namespace))}
