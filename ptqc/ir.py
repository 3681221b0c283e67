"""The ptqc graph IR: a torch.fx graph in the ptqc dialect plus its weights.

A :class:`QModel` is what every pass receives. Its ``graph`` is a plain ``torch.fx.Graph``:

* one ``placeholder`` (``input_ids``, int64 ``[batch, seq]``) and one output (the logits);
* ``get_attr`` nodes whose target is the **Hugging Face tensor name**
  (``model.layers.3.self_attn.q_proj.weight``), resolved through ``qm.store`` (a lazy
  :class:`~ptqc.model.WeightStore`), so weights save back under their original names;
* ``call_function`` nodes calling ptqc ops (:mod:`ptqc.ops`) or aten ops.

Every call node carries ``node.meta["ptqc"]``: ``module`` (module path), ``layer`` (decoder
layer index or None), ``role`` (q, k, v, o, gate, up, down, lm_head, embed, input_norm,
post_attention_norm, final_norm, attention, or None) and, once quantized, ``quant`` (the
quantization parameters). ``node.meta["shape"]``/``["dtype"]`` are filled by :func:`propagate`
(``"B"``/``"S"`` for the batch and sequence dimensions).
"""
from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.fx as fx

import ptqc.ops  # noqa: F401  (registers torch.ops.ptqc.*)
from ptqc import ops
from ptqc.errors import PtqcError
from ptqc.model import WeightStore

ROLES_LINEAR = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


def info(node: fx.Node) -> dict:
    """The ptqc metadata dict of a node (created empty if missing)."""
    return node.meta.setdefault("ptqc", {})


def is_op(node: fx.Node, op) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == op


@dataclass
class QModel:
    """A model being compiled: canonical graph + weights + what has been done to it."""

    graph: fx.Graph
    store: WeightStore
    config: object  # transformers.PretrainedConfig
    dtype: torch.dtype = torch.float32
    source: str = ""  # the input model directory
    properties: set = field(default_factory=set)
    history: list = field(default_factory=list)  # one record per pass run
    quant: dict = field(default_factory=dict)  # module path -> quantization parameters (manifest)
    plan: dict = field(default_factory=dict)  # module path -> option overrides / {"skip": True} (mixed precision)

    # ---- queries -----------------------------------------------------------------------------
    def nodes(self, op=None, role=None, layer=None) -> Iterator[fx.Node]:
        for n in self.graph.nodes:
            if op is not None and not is_op(n, op):
                continue
            m = n.meta.get("ptqc", {})
            if role is not None and m.get("role") not in ((role,) if isinstance(role, str) else role):
                continue
            if layer is not None and m.get("layer") != layer:
                continue
            yield n

    def linears(self, role=None, layer=None) -> list[fx.Node]:
        return list(self.nodes(ops.LINEAR, role=role, layer=layer))

    @property
    def num_layers(self) -> int:
        layers = [n.meta["ptqc"]["layer"] for n in self.graph.nodes
                  if n.meta.get("ptqc", {}).get("layer") is not None]
        return max(layers) + 1 if layers else 0

    def weight_names(self) -> list[str]:
        return [n.target for n in self.graph.nodes if n.op == "get_attr"]

    def clone(self) -> "QModel":
        """An independent copy: new graph and metadata; weights shared until a pass writes one."""
        import copy

        store = copy.copy(self.store)
        for attr in ("overlay", "aliases", "files", "_cache", "written"):  # new dicts; the tensors are shared
            setattr(store, attr, dict(getattr(self.store, attr)))
        return QModel(graph=graph_from_json(graph_to_json(self.graph)), store=store, config=self.config,
                      dtype=self.dtype, source=self.source, properties=set(self.properties),
                      history=copy.deepcopy(self.history), quant=copy.deepcopy(self.quant), plan=copy.deepcopy(self.plan))

    # ---- execution ---------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, **kw) -> torch.Tensor:
        return execute(self.graph, self.store, {"input_ids": input_ids}, **kw)

    def graph_module(self) -> fx.GraphModule:
        """A self-contained GraphModule (all weights materialized), e.g. for torch.export."""
        return fx.GraphModule({n: self.store[n] for n in self.weight_names()}, self.graph)


def get_attr_value(store: WeightStore, node: fx.Node, device=None):
    t = store[node.target]
    return t if device is None else t.to(device)


def execute(graph: fx.Graph, store: WeightStore, inputs: dict, *, device=None,
            hook: Callable[[fx.Node, object], None] | None = None, stop_at: fx.Node | None = None):
    """Run a graph node by node (values are freed after their last use).

    ``hook(node, value)`` sees every computed value (diagnostics, NaN checks, diffs).
    ``device`` moves weights there and rewrites ``device=`` arguments (arange etc.).
    """
    env: dict[fx.Node, object] = {}
    last_use: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        for a in n.all_input_nodes:
            last_use[a] = n
    dev = torch.device(device) if device is not None else None
    for n in graph.nodes:
        if n.op == "placeholder":
            if n.target not in inputs:
                raise PtqcError(f"graph input {n.target!r} was not given")
            val = inputs[n.target]
        elif n.op == "get_attr":
            val = get_attr_value(store, n, dev)
        elif n.op == "call_function":
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            if dev is not None and "device" in kwargs:
                kwargs = {**kwargs, "device": dev}
            val = n.target(*args, **kwargs)
        elif n.op == "output":
            return fx.node.map_arg(n.args[0], lambda a: env[a])
        else:
            raise PtqcError(f"unsupported node kind {n.op} ({n.name})")
        env[n] = val
        if hook is not None:
            hook(n, val)
        if n is stop_at:
            return val
        for a in n.all_input_nodes:
            if last_use.get(a) is n:
                env.pop(a, None)
    raise PtqcError("graph has no output node")


# ---- shape propagation ---------------------------------------------------------------------
_PROBE = ((2, 16), (3, 17))  # two input shapes; dims that follow them are B and S


def _meta_store(store: WeightStore, graph: fx.Graph):
    class _Meta:
        def __getitem__(self, name):
            shape, dtype = store.spec(name)
            return torch.empty(shape, dtype=dtype, device="meta")
    return _Meta()


def propagate(graph: fx.Graph, store: WeightStore) -> None:
    """Run the graph on meta tensors for two input shapes and record each node's shape and dtype.

    Raises PtqcError naming the node if the graph does not type-check."""
    results = []
    for shape in _PROBE:
        vals: dict[fx.Node, object] = {}
        ids = torch.zeros(shape, dtype=torch.long, device="meta")
        try:
            execute(graph, _meta_store(store, graph), {"input_ids": ids}, device="meta",
                    hook=lambda n, v: vals.__setitem__(n, v))
        except PtqcError:
            raise
        except Exception as e:  # noqa: BLE001
            bad = [n for n in graph.nodes if n.op == "call_function" and n not in vals]
            where = bad[0].format_node() if bad else "?"
            raise PtqcError(f"graph does not type-check at {where}: {str(e).splitlines()[0]}") from None
        results.append(vals)
    a, b = results
    for n in graph.nodes:
        va, vb = a.get(n), b.get(n)
        if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            dims = []
            for x, y in zip(va.shape, vb.shape):
                dims.append(x if x == y else {(2, 3): "B", (16, 17): "S"}.get((x, y), "?"))
            n.meta["shape"] = dims
            n.meta["dtype"] = str(va.dtype).removeprefix("torch.")
        else:
            n.meta.pop("shape", None)
            n.meta.pop("dtype", None)


# ---- serialization ---------------------------------------------------------------------------
def _target_name(t) -> str:
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t._schema.name.split("::")
        return f"op:{ns}.{name}.{t._overloadname}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        ns, name = t._qualified_op_name.split("::")
        return f"op:{ns}.{name}"
    mod = getattr(t, "__module__", None) or "builtins"
    return f"py:{mod}:{t.__qualname__}"


def _resolve_target(s: str):
    kind, _, rest = s.partition(":")
    if kind == "op":
        if rest.startswith("ptqc_npu."):  # lowered graphs: register the Ascend ops first
            importlib.import_module("ptqc.lowering.ascend.ops")
        obj = torch.ops
        for part in rest.split("."):
            obj = getattr(obj, part)
        return obj
    mod, _, qual = rest.partition(":")
    obj = importlib.import_module(mod if mod != "_operator" else "operator")
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


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
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
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
        if k in ("dtype", "layout", "memory_format"):
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


__all__ = ["QModel", "execute", "propagate", "info", "is_op", "graph_to_json", "graph_from_json",
           "ROLES_LINEAR"]
