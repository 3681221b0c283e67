"""The graph interpreter (in the style of ``torch.fx.Interpreter``): runs fx nodes in order, frees
each value after its last use and calls hooks that specialisations override. :func:`execute` runs
a whole graph on a weight store, :class:`ptqc.calib.LayerRunner` one segment over many batches,
flatquant a decoder layer with its learnable pieces substituted.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from ptqc.errors import PtqcError


class Interpreter:
    """Runs ``nodes`` (of one graph, in order) on ``env``, a dict of values by node name, with the
    tensors of ``get_attr`` nodes from ``weights`` (by tensor name, moved to ``device``).

    A value leaves ``env`` after its last use among ``nodes`` unless it is in ``keep``. The values
    of weights that are not among ``nodes`` and of the nodes named in ``const`` go to
    ``self.consts`` instead: computed once, reused by every later run of this interpreter.
    ``device`` replaces the ``device=`` argument of the nodes that have one (arange etc.)."""

    def __init__(self, nodes, weights=None, *, device=None, keep=frozenset(), const=frozenset()):
        self.nodes, self.weights = list(nodes), weights
        self.device = torch.device(device) if device is not None else None
        self.keep, self.const = keep, const
        self.consts: dict[str, object] = {}
        self.last_use: dict[str, fx.Node] = {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                self.last_use[a.name] = n

    def run(self, env: dict, nodes=None):
        """Run ``nodes`` (default: all) on ``env``, updated in place. Returns the value of the
        output node, or None if there is none among them."""
        for n in self.nodes if nodes is None else nodes:
            if n.op == "output":
                return self.map(n.args[0], env)
            if n.name in self.consts:
                continue
            args, kwargs = self.map(n.args, env), self.map(n.kwargs, env)
            if self.device is not None and "device" in kwargs:
                kwargs = {**kwargs, "device": self.device}
            y = self.run_node(n, args, kwargs)
            (self.consts if n.name in self.const else env)[n.name] = y
            self.after_node(n, args, y)
            for a in n.all_input_nodes:
                if self.last_use.get(a.name) is n and a.name not in self.keep:
                    env.pop(a.name, None)
        return None

    def map(self, arg, env: dict):
        return fx.node.map_arg(arg, lambda a: self.value(a, env))

    def value(self, a: fx.Node, env: dict):
        if a.name in env:
            return env[a.name]
        if a.name in self.consts:
            return self.consts[a.name]
        return self.missing(a)

    def run_node(self, n: fx.Node, args, kwargs):
        if n.op == "call_function":
            return self.call_function(n, args, kwargs)
        if n.op == "get_attr":
            return self.fetch_attr(n)
        if n.op == "placeholder":
            return self.placeholder(n)
        raise PtqcError(f"unsupported node kind {n.op} ({n.name})")

    # ---- hooks ---------------------------------------------------------------------------------
    def call_function(self, n: fx.Node, args, kwargs):
        return n.target(*args, **kwargs)

    def fetch_attr(self, n: fx.Node):
        t = self.weights[n.target]
        return t if self.device is None else t.to(self.device)

    def placeholder(self, n: fx.Node):
        raise PtqcError(f"graph input {n.target!r} was not given")

    def after_node(self, n: fx.Node, args, y) -> None:
        """Sees every computed value ``y`` of node ``n`` (``args``: its input values)."""

    def missing(self, a: fx.Node):
        """The value of ``a`` when no run put it in the environment: a weight, fetched once."""
        if a.op != "get_attr":
            raise PtqcError(f"value {a.name} is not available")
        self.consts[a.name] = self.fetch_attr(a)
        return self.consts[a.name]


class GraphInterpreter(Interpreter):
    """A whole graph on a weight store; ``hook(node, value)`` sees every value, inputs and weights
    included."""

    def __init__(self, graph: fx.Graph, store, inputs: dict, *, device=None,
                 hook: Callable[[fx.Node, object], None] | None = None):
        super().__init__(graph.nodes, store, device=device)
        self.inputs, self.hook = inputs, hook

    def placeholder(self, n):
        return self.inputs[n.target] if n.target in self.inputs else super().placeholder(n)

    def after_node(self, n, args, y):
        if self.hook is not None:
            self.hook(n, y)


def execute(graph: fx.Graph, store, inputs: dict, *, device=None,
            hook: Callable[[fx.Node, object], None] | None = None):
    """Run a graph node by node (values are freed after their last use).

    ``hook(node, value)`` sees every computed value (diagnostics, NaN checks, diffs).
    ``device`` moves weights there and rewrites ``device=`` arguments (arange etc.).
    """
    if not graph.find_nodes(op="output"):
        raise PtqcError("graph has no output node")
    return GraphInterpreter(graph, store, inputs, device=device, hook=hook).run({})


__all__ = ["Interpreter", "GraphInterpreter", "execute"]
