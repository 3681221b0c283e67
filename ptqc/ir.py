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

:func:`execute` (:mod:`ptqc.interpreter`), :func:`propagate` (:mod:`ptqc.shapes`) and
:func:`graph_to_json`/:func:`graph_from_json` (:mod:`ptqc.graph_json`) are re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.fx as fx

from ptqc import ops
from ptqc.graph_json import graph_from_json, graph_to_json
from ptqc.interpreter import execute
from ptqc.model import WeightStore
from ptqc.shapes import propagate

ROLES_LINEAR = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


def info(node: fx.Node) -> dict:
    """The ptqc metadata dict of a node (created empty if missing)."""
    return node.meta.setdefault("ptqc", {})


def is_op(node: fx.Node, op) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == op


def is_cache_quantizer(node) -> bool:
    """A KV-cache quantizer the kv pass inserted (``quantize_act`` with a ``*_cache_quant`` role: k, v, and
    MLA's latent and rope key), as opposed to a linear's activation quantizer."""
    return is_op(node, ops.QUANTIZE_ACT) and str(info(node).get("role", "")).endswith("_cache_quant")


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


__all__ = ["QModel", "execute", "propagate", "info", "is_op", "graph_to_json", "graph_from_json",
           "ROLES_LINEAR"]
