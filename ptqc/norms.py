"""Norm ops of a canonical graph: RMSNorm (``ptqc.rms_norm``) and LayerNorm (``ptqc.layer_norm``).

LayerNorm families (GPT-NeoX/Pythia, StableLM, Phi-2, Falcon) trace to ``aten.layer_norm`` over
the last dimension; :func:`rule_layer_norm` makes it ``ptqc.layer_norm(x, w, b, eps)``. Passes ask
:func:`is_norm` where either kind can take a fold, and :func:`fold_scale` divides a norm's output
channels by ``s`` exactly: RMSNorm ``(w + offset) / s - offset``; LayerNorm ``w / s`` and ``b / s``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ptqc import ops
from ptqc.errors import PtqcError
from ptqc.ir import info, is_op

aten = torch.ops.aten
NORMS = (ops.RMS_NORM, ops.LAYER_NORM)


def is_norm(n) -> bool:
    return any(is_op(n, op) for op in NORMS)


def _get_attr_or_none(a) -> bool:
    return a is None or isinstance(a, fx.Node) and a.op == "get_attr"


def rule_layer_norm(node: fx.Node) -> bool:
    """aten.layer_norm(x, [H], w, b, eps) over the last dim -> ptqc.layer_norm(x, w, b, eps)."""
    if node.target != aten.layer_norm.default:
        return False
    x, shape, *rest = node.args
    w, b, eps = (list(rest) + [None, None, 1e-5])[:3]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if len(shape) != 1 or val is None or val.shape[-1] != shape[0] or not (_get_attr_or_none(w) and _get_attr_or_none(b)):
        return False
    from ptqc.frontend import _replace

    _replace(node, ops.LAYER_NORM, (x, w, b, float(eps)))
    return True


def fold_scale(qm, norm: fx.Node, s: torch.Tensor) -> None:
    """Divide the output channels of ``norm`` by ``s`` in its weights (the float model then
    needs its readers' input columns multiplied by ``s``)."""
    store, s = qm.store, s.float()
    w = norm.args[1]
    if is_op(norm, ops.RMS_NORM):
        offset = norm.args[3] if len(norm.args) > 3 else norm.kwargs.get("offset", 0.0)
        store[w.target] = ((store[w.target].float() + offset) / s - offset).to(qm.dtype)
        return
    if w is None:
        raise PtqcError(f"cannot fold scales into {info(norm).get('module')}: a LayerNorm without a weight")
    b = norm.args[2]
    store[w.target] = (store[w.target].float() / s).to(qm.dtype)
    if b is not None:
        store[b.target] = (store[b.target].float() / s).to(qm.dtype)
