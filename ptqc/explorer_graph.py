"""A ptqc graph as a Model Explorer graph (its JSON graph format, written here without the package).

One graph: ``{"id", "nodes": [...]}``, each node ``{"id", "label", "namespace", "attrs",
"incomingEdges", "outputsMetadata"}`` (``model_explorer.graph_builder``). The node id is the FX
node name; the namespace is the module path with list indices kept on their list
(``model.layers.0.self_attn.q_proj`` -> ``model/layers.0/self_attn/q_proj``), which the app shows
as nested collapsible layers. Attributes (the info panel): op, module, layer, role, shape, dtype,
the quantization parameters (one line, then ``<kind>.<field>`` each) and a summary of the scale
tensors the node reads.
"""
from __future__ import annotations

import json

import torch
import torch.fx as fx

from ptqc.graph_json import _target_name
from ptqc.inspect import _quant_str, _shape
from ptqc.ir import QModel
from ptqc.passmanager import _short

GROUP_SUFFIX = "___group___"  # how the app names the group node of a namespace


def namespace(module: str) -> str:
    """``model.layers.0.mlp.experts`` -> ``model/layers.0/mlp/experts`` ("" for no module)."""
    if not module or module.startswith("_"):
        return ""
    parts: list[str] = []
    for p in module.split("."):
        if p.isdigit() and parts:
            parts[-1] += "." + p
        else:
            parts.append(p)
    return "/".join(parts)


def _kv(key: str, value) -> dict:
    return {"key": key, "value": value if isinstance(value, str) else json.dumps(value)}


def _quant_attrs(quant: dict) -> list[dict]:
    """``quant`` (one line) then ``<kind>.<field>`` for every field of every quantized tensor."""
    if not quant:
        return []
    out = [_kv("quant", _quant_str(quant))]
    for kind, p in quant.items():
        out += [_kv(f"{kind}.{k}", v) for k, v in p.items()]
    return out


def scale_summary(t: torch.Tensor) -> str:
    """``[256, 1] min 0.0012 max 0.031 mean 0.0071`` (float values of a scale tensor)."""
    f = t.detach().float()
    if not f.numel():
        return _shape(list(t.shape))
    return (f"{_shape(list(t.shape))} min {f.min().item():.4g} max {f.max().item():.4g} "
            f"mean {f.mean().item():.4g}")


def _scales(n: fx.Node, qm: QModel) -> list[dict]:
    """The scale tensors (get_attr targets naming ``scale``) node ``n`` reads, directly or through one
    producer (a linear reads its weight scale through dequantize_weight)."""
    seen, out = set(), []
    for a in [n, *n.all_input_nodes]:
        for s in a.all_input_nodes:
            if s.op == "get_attr" and "scale" in s.target.rsplit(".", 1)[-1] and s.target not in seen:
                seen.add(s.target)
                try:
                    out.append(_kv(f"scale {s.target.rsplit('.', 1)[-1]}", scale_summary(qm.store[s.target])))
                except KeyError:
                    pass
    return out


def op_label(target) -> str:
    """``aten.view.default`` -> ``view``, ``ptqc_npu.quant_matmul.default`` -> ``ptqc_npu.quant_matmul``."""
    return _short(target) if isinstance(target, torch._ops.OpOverload) and str(target).startswith(("aten.", "ptqc.")) \
        else str(target).removesuffix(".default") if isinstance(target, torch._ops.OpOverload) else _short(target)


def _label(n: fx.Node) -> str:
    if n.op == "call_function":
        return op_label(n.target)
    if n.op == "get_attr":
        return n.target.rsplit(".", 1)[-1]
    return n.name


def _module(n: fx.Node) -> str:
    if n.op == "get_attr":
        return n.target.rpartition(".")[0]
    return n.meta.get("ptqc", {}).get("module", "")


def node_json(n: fx.Node, qm: QModel) -> dict:
    """One Model Explorer node for FX node ``n``."""
    m = n.meta.get("ptqc", {})
    attrs = [_kv("op", _target_name(n.target) if n.op == "call_function" else n.op), _kv("name", n.name),
             _kv("module", _module(n))]
    attrs += [_kv(k, m[k]) for k in ("layer", "role") if m.get(k) is not None]
    attrs += [_kv("shape", _shape(n.meta.get("shape"))), _kv("dtype", n.meta.get("dtype") or "")]
    attrs += _quant_attrs(m.get("quant", {})) + _scales(n, qm)
    if n.op == "get_attr" and "scale" in n.target.rsplit(".", 1)[-1] and n.target in qm.store:
        attrs.append(_kv("values", scale_summary(qm.store[n.target])))
    out_meta = [_kv("tensor_name", n.name), _kv("shape", _shape(n.meta.get("shape"))),
                _kv("dtype", n.meta.get("dtype") or "")]
    return {"id": n.name, "label": _label(n), "namespace": namespace(_module(n)), "attrs": attrs,
            "incomingEdges": [{"sourceNodeId": a.name, "sourceNodeOutputId": "0", "targetNodeInputId": str(i)}
                              for i, a in enumerate(n.all_input_nodes)],
            "outputsMetadata": [{"id": "0", "attrs": out_meta}]}


def graph(qm: QModel, graph_id: str) -> dict:
    """The Model Explorer graph of ``qm`` (every node, weights included)."""
    return {"id": graph_id, "nodes": [node_json(n, qm) for n in qm.graph.nodes]}


def group_ids(g: dict, prefix: str) -> list[str]:
    """The app's ids of the group nodes of namespaces starting with ``prefix`` (e.g. ``model/layers.0``)."""
    spaces = {n["namespace"] for n in g["nodes"]}
    groups = set()
    for s in spaces:
        parts = s.split("/")
        groups |= {"/".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return sorted(s + GROUP_SUFFIX for s in groups if s.startswith(prefix))


def mark(g: dict, node_id: str, color: str, note: str) -> None:
    """Give node ``node_id`` a border colour and an attribute saying why (e.g. the first divergent node)."""
    for n in g["nodes"]:
        if n["id"] == node_id:
            n["style"] = {"borderColor": color, "hoveredBorderColor": color}
            n["attrs"].append(_kv("ptqc", note))
