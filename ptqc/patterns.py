"""Finding structure in a ptqc graph: the matching helpers passes share.

Passes ask structural questions ("which linears read this norm's output?", "which linears share
one input?", "which linear produces what o_proj reads?"). Shape-only ops (view, reshape, transpose,
casts...) are transparent to them.

    norm_groups(qm)        [(rms_norm node, [linears it feeds])]      e.g. input_norm -> q, k, v
    shared_input_groups(qm)[(producer node, [linears reading it])]    q/k/v, gate/up share inputs
    producer_linear(qm, n) the linear whose output reaches n's input through shape ops only,
                           or through attention's value path (v_proj -> o_proj)
"""
from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx

from ptqc import ops
from ptqc.ir import QModel, is_op

aten = torch.ops.aten

# Ops that only move or relabel data: a per-channel scale passes through them unchanged.
TRANSPARENT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.clone.default, aten.contiguous.default, aten._to_copy.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
}


def activation_input(linear: fx.Node) -> fx.Node:
    """The node whose value a linear reads, looking through shape-only ops."""
    return skip_transparent(linear.args[0])


def skip_transparent(n: fx.Node) -> fx.Node:
    while is_transparent(n):
        n = n.args[0]
    return n


def is_transparent(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in TRANSPARENT


def shared_input_groups(qm: QModel) -> list[tuple[fx.Node, list[fx.Node]]]:
    """Linears grouped by the (non-transparent) node they read, in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for lin in qm.linears():
        groups.setdefault(activation_input(lin), []).append(lin)
    return list(groups.items())


def norm_groups(qm: QModel) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(rms_norm, linears fed only through shape ops) for every norm that feeds linears."""
    return [(src, lins) for src, lins in shared_input_groups(qm) if is_op(src, ops.RMS_NORM)]


def producer_linear(qm: QModel, linear: fx.Node) -> fx.Node | None:
    """The linear that (per channel) produces what ``linear`` reads: through shape ops, or
    through attention's value path (o_proj reads attention(q, k, v): its channels are v's)."""
    src = activation_input(linear)
    if is_op(src, ops.LINEAR):
        return src
    if is_op(src, ops.ATTENTION):
        v = skip_transparent(src.args[2])
        return v if is_op(v, ops.LINEAR) else None
    if is_op(src, aten.mul.Tensor):  # gated MLP: act(gate(x)) * up(x) -> down reads up's channels
        for a in src.args:
            a = skip_transparent(a) if isinstance(a, fx.Node) else a
            if is_op(a, ops.LINEAR):
                return a
    return None


# ---- a small pattern language over fx nodes (after tinygrad's UPat) ---------------------------------
class Pat:
    """A pattern over a value of an fx graph: ``op`` (a call target, a tuple of them, or None for any
    value); ``args``, patterns (or constants, compared with ==) for the leading arguments; ``where``,
    a predicate; ``name`` binds the value (bound twice: the same value); ``through`` ops (casts) are
    looked through first; ``commute`` also tries two arguments swapped. ``match`` returns the
    bindings {name: value}, or None."""

    __slots__ = ("op", "args", "name", "where", "through", "commute")

    def __init__(self, op=None, args=None, name=None, where=None, through=(), commute=False):
        self.op = op if op is None or isinstance(op, tuple) else (op,)
        self.args, self.name, self.where, self.through, self.commute = args, name, where, through, commute

    def match(self, x, bound: dict | None = None) -> dict | None:
        while self.through and is_call(x) and x.target in self.through:
            x = x.args[0]
        if self.op is not None and not (is_call(x) and x.target in self.op):
            return None
        bound = dict(bound or {})
        if self.args is not None:
            if not is_call(x) or len(x.args) < len(self.args):
                return None
            orders = (x.args, x.args[1::-1]) if self.commute else (x.args,)
            bound = next((b for b in (_match_all(self.args, a, bound) for a in orders) if b is not None), None)
            if bound is None:
                return None
        if self.where is not None and not self.where(x):
            return None
        if self.name is not None:
            if self.name in bound and bound[self.name] is not x:
                return None
            bound[self.name] = x
        return bound


def is_call(x) -> bool:
    return isinstance(x, fx.Node) and x.op == "call_function"


def _match_all(pats, values, bound: dict) -> dict | None:
    for p, v in zip(pats, values):
        if isinstance(p, Pat):
            bound = p.match(v, bound)
            if bound is None:
                return None
        elif v is not p and (isinstance(v, fx.Node) or v != p):
            return None
    return bound


def match_module(path: str, role: str | None, patterns) -> bool:
    """Does a module match any pattern? A pattern matches the full module path, a suffix of it
    (``down_proj`` or ``layers.3.*``) or the module's role (``lm_head``, ``down``)."""
    for pat in patterns:
        if pat == role or fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(path, "*." + pat):
            return True
    return False
