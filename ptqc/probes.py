"""The comparable points of a ptqc graph (*probes*), which ``ptqc diff`` and ``ptqc diagnose`` match
between two models by key:

* ``embed``           the embedding output;
* ``<module path>``   every linear, keyed by its module path (``model.layers.3.mlp.down_proj``;
                      ``#j`` appended when a module runs several times);
* ``layers.<i>``      the output of decoder layer i (the residual stream it leaves,
                      :func:`layer_output`);
* ``logits``.

A graph lowered in place to a backend's kernels has its probes from that backend
(:func:`ptqc.backends.lowered_by`). A probe may name a chunk of a node's output
(:func:`chunk_name`: a merged matmul split into the linears it holds).
"""
from __future__ import annotations

from dataclasses import dataclass

from ptqc import ops
from ptqc.calib import Segment, split
from ptqc.errors import PtqcError


@dataclass
class Probe:
    key: str
    kind: str  # embed | linear | layer | logits
    layer: int | None
    node: str  # FX node name ("logits": the graph output)
    role: str | None
    order: int


def layer_output(seg: Segment) -> str:
    """The value leaving a layer segment that later segments read (the residual stream)."""
    outs = [n.name for n in seg.nodes if n.name in seg.keep]
    if not outs:
        raise PtqcError(f"segment {seg.key} produces no value read by later segments")
    return outs[-1]


def linears(seg: Segment) -> dict[str, tuple[str, str | None]]:
    """node name -> (key, role) for the linears of a segment; key = module path (#j if repeated)."""
    out, seen = {}, {}
    for n in seg.nodes:
        if n.op == "call_function" and n.target == ops.LINEAR:
            m = n.meta.get("ptqc", {})
            mod = m.get("module") or n.name
            j = seen.get(mod, 0)
            seen[mod] = j + 1
            out[n.name] = (mod if j == 0 else f"{mod}#{j}", m.get("role"))
    return out


def logits_node(g):
    """The graph's logits node (the first output)."""
    out = next(n for n in g.nodes if n.op == "output").args[0]
    return out[0] if isinstance(out, (tuple, list)) else out


def graph_probes(qm) -> list[Probe]:
    """The probes of a ptqc graph, in graph order."""
    from ptqc import backends

    lowered = backends.lowered_by(qm)
    if lowered is not None:
        return lowered.probes(qm)
    order = {n.name: i for i, n in enumerate(qm.graph.nodes)}
    logits = logits_node(qm.graph)
    probes = []
    for n in qm.graph.nodes:
        if n.op == "call_function" and n.meta.get("ptqc", {}).get("role") == "embed" and n.target != ops.LINEAR:
            probes.append(Probe("embed", "embed", None, n.name, "embed", order[n.name]))
            break
    for seg in split(qm.graph):
        for name, (key, role) in linears(seg).items():
            if name != logits.name:
                probes.append(Probe(key, "linear", seg.layer, name, role, order[name]))
        if seg.layer is not None:
            out = layer_output(seg)
            probes.append(Probe(f"layers.{seg.layer}", "layer", seg.layer, out, None, order[out]))
    probes.append(Probe("logits", "logits", None, "logits", None, len(order)))
    return sorted(probes, key=lambda p: p.order)


def chunk_name(node: str, i: int, k: int) -> str:
    """The name of a probe on chunk i of k (last dimension) of a node's output."""
    return f"{node}#{i}/{k}"


def wanted(names) -> dict[str, list[tuple[str, int, int]]]:
    """node name -> [(probe name, chunk i, of k)] (k = 1: the whole value)."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for nm in names:
        base, sep, ch = nm.partition("#")
        i, k = (int(v) for v in ch.split("/")) if sep else (0, 1)
        out.setdefault(base, []).append((nm, i, k))
    return out


def capture(want: dict, got: dict, name: str, y) -> None:
    """Store the probes ``want`` takes from node ``name``'s value ``y`` into ``got`` (float, CPU)."""
    for probe, i, k in want.get(name, ()):
        v = y if k == 1 else y.chunk(k, -1)[i]
        got[probe] = v.detach().float().cpu()
