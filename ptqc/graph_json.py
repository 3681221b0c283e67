"""The graph file format (``graph.json``): a ptqc graph as JSON, and back.

Call targets are written as ``op:<namespace>.<op>.<overload>`` (torch ops) or
``py:<module>:<qualname>`` (Python functions). A graph that names a torch op of a namespace not
registered yet (a backend's, e.g. ``ptqc_npu`` in lowered graphs) loads the modules that define
it from the entry-point group ``ptqc.ops`` (``namespace = "module"``), so reading a graph needs
no backend imported beforehand and the core imports none.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import math

import torch
import torch.fx as fx

import ptqc.ops  # noqa: F401  (registers torch.ops.ptqc.*)
from ptqc.errors import PtqcError

OPS_ENTRY_POINT_GROUP = "ptqc.ops"


def _target_name(t) -> str:
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t._schema.name.split("::")
        return f"op:{ns}.{name}.{t._overloadname}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        ns, name = t._qualified_op_name.split("::")
        return f"op:{ns}.{name}"
    mod = getattr(t, "__module__", None) or "builtins"
    return f"py:{mod}:{t.__qualname__}"


def _attr_path(obj, parts):
    for part in parts:
        obj = getattr(obj, part)
    return obj


def load_op_namespace(ns: str) -> bool:
    """Import the modules the ``ptqc.ops`` entry points name for torch ops namespace ``ns``;
    were there any?"""
    eps = importlib.metadata.entry_points(group=OPS_ENTRY_POINT_GROUP, name=ns)
    for ep in eps:
        ep.load()
    return bool(eps)


def _resolve_op(path: str):
    """``torch.ops.<path>``, registering its namespace through the ``ptqc.ops`` entry points if needed."""
    parts = path.split(".")
    try:
        return _attr_path(torch.ops, parts)
    except AttributeError:
        if not load_op_namespace(parts[0]):
            raise PtqcError(f"graph calls torch op {path!r}, whose namespace {parts[0]!r} no installed package "
                            f"registers (entry-point group {OPS_ENTRY_POINT_GROUP!r})") from None
    return _attr_path(torch.ops, parts)


def _resolve_target(s: str):
    kind, _, rest = s.partition(":")
    if kind == "op":
        return _resolve_op(rest)
    mod, _, qual = rest.partition(":")
    return _attr_path(importlib.import_module(mod if mod != "_operator" else "operator"), qual.split("."))


_TORCH_ENUMS = {torch.dtype: "dtype", torch.layout: "layout", torch.memory_format: "memory_format"}


def _enc(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, bool) or a is None or isinstance(a, (int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, (list, tuple)):
        return {("list" if isinstance(a, list) else "tuple"): [_enc(x) for x in a]}
    if isinstance(a, dict):
        return {"dict": {k: _enc(v) for k, v in a.items()}}
    for kind, tag in _TORCH_ENUMS.items():
        if isinstance(a, kind):
            return {tag: str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, slice):
        return {"slice": [_enc(a.start), _enc(a.stop), _enc(a.step)]}
    raise PtqcError(f"cannot serialize graph argument {a!r} of type {type(a).__name__}")


def _dec(a, nodes):
    if isinstance(a, dict):
        (k, v), = a.items()
        if k == "node":
            return nodes[v]
        if k == "float":
            return float(v)
        if k == "list":
            return [_dec(x, nodes) for x in v]
        if k == "tuple":
            return tuple(_dec(x, nodes) for x in v)
        if k == "dict":
            return {kk: _dec(vv, nodes) for kk, vv in v.items()}
        if k in _TORCH_ENUMS.values():
            return getattr(torch, v)
        if k == "device":
            return torch.device(v)
        if k == "slice":
            return slice(*(_dec(x, nodes) for x in v))
        raise PtqcError(f"unknown tag {k!r} in serialized graph")
    return a


def graph_to_json(graph: fx.Graph) -> dict:
    out = []
    for n in graph.nodes:
        rec = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            rec["target"] = _target_name(n.target)
        elif n.op in ("get_attr", "placeholder"):
            rec["target"] = n.target
        rec["args"] = _enc(n.args)
        rec["kwargs"] = _enc(dict(n.kwargs))
        meta = {k: n.meta[k] for k in ("ptqc", "shape", "dtype") if k in n.meta}
        if meta:
            rec["meta"] = meta
        out.append(rec)
    return {"format": "ptqc-graph", "version": 1, "nodes": out}


def graph_from_json(data: dict) -> fx.Graph:
    if data.get("format") != "ptqc-graph":
        raise PtqcError("not a ptqc graph file")
    g = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for rec in data["nodes"]:
        args = _dec(rec["args"], nodes)
        kwargs = _dec(rec["kwargs"], nodes)
        op = rec["op"]
        if op not in ("placeholder", "get_attr", "call_function", "output"):
            raise PtqcError(f"unknown node kind {op!r} in serialized graph")
        if op == "call_function":
            target = _resolve_target(rec["target"])
        elif op == "output":
            target = "output"
        else:
            target = rec["target"]
        n = g.create_node(op, target, tuple(args), kwargs, name=rec["name"])
        n.meta.update(json.loads(json.dumps(rec.get("meta", {}))))
        nodes[rec["name"]] = n
    g.lint()
    return g

