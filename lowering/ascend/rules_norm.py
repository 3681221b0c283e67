"""Lowering rules for RMSNorm: npu_rms_norm, and with ``fuse`` the residual add (+ the quantization
kernel after it) as npu_add_rms_norm / npu_add_rms_norm_dynamic_quant / npu_add_rms_norm_quant.
Patterns and rewrites; the table is in lower.py. Gemma's ``1 + w`` is folded into the weight."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ptqc import ops
from ptqc.ir import info
from ptqc.lowering.ascend import ops as npu
from ptqc.patterns import Pat

aten = torch.ops.aten
QUANT_KERNELS = (npu.DYNAMIC_QUANT, npu.QUANTIZE)  # standalone quantization kernels
_NODE = lambda name: Pat(name=name, where=lambda a: isinstance(a, fx.Node))  # noqa: E731
RESIDUAL = Pat(aten.add.Tensor, (_NODE("a"), _NODE("b")), name="x")


def quantizer(norm: fx.Node) -> fx.Node | None:
    """The quantization kernel that alone reads the norm's output, if any."""
    users = list(norm.users)
    return users[0] if len(users) == 1 and users[0].target in QUANT_KERNELS else None


def _norm(x: Pat, quant=None) -> Pat:
    where = None if quant is False else lambda n: getattr(quantizer(n), "target", None) == quant
    return Pat(ops.RMS_NORM, (x, Pat(name="w"), Pat(name="eps")), name="norm", where=where)


ADD_NORM_DYNAMIC_QUANT = _norm(RESIDUAL, npu.DYNAMIC_QUANT)
ADD_NORM_QUANT = _norm(RESIDUAL, npu.QUANTIZE)
ADD_NORM = _norm(RESIDUAL)
NORM = _norm(Pat(name="x"), False)


def _weight(lw, norm: fx.Node) -> fx.Node:
    w = norm.args[1]
    offset = norm.args[3] if len(norm.args) > 3 else 0.0
    return lw.const(f"{w.target}_plus_offset", lw.value(w).float() + offset) if offset else w


def _per_channel(lw, scale: fx.Node, w: fx.Node) -> fx.Node:
    n = lw.qm.store.spec(w.target)[0][-1]
    return lw.const(f"{scale.target}_per_channel", lw.value(scale).float().expand(n))


def _residual(lw, m, fused: fx.Node, index: int) -> None:
    """The sum output of the fused kernel replaces the residual add."""
    norm, x = m["norm"], m["x"]
    with lw.g.inserting_before(norm):
        s = lw.new(operator.getitem, (fused, index), norm, role="residual")
    x.replace_all_uses_with(s)
    if not norm.users:
        lw.g.erase_node(norm)
    lw.g.erase_node(x)


def rewrite_add_norm_dynamic_quant(lw, m) -> None:
    norm, dq = m["norm"], quantizer(m["norm"])
    with lw.g.inserting_before(norm):
        w = _weight(lw, norm)
        sm = dq.args[1]  # smooth scales: a constant, read again here (before the norm)
        sm = None if sm is None else lw.g.get_attr(sm.target)
        fused = lw.new(npu.ADD_RMS_NORM_DYNAMIC_QUANT, (m["a"], m["b"], w, sm, m["eps"]), norm,
                       role="add_rms_norm_dynamic_quant")
    for u in list(dq.users):  # (codes, scale) -> outputs 0 and 2 of the fused kernel
        if u.target is operator.getitem:
            u.args = (fused, {0: 0, 1: 2}[u.args[1]])
    lw.g.erase_node(dq)
    _residual(lw, m, fused, 1)


def rewrite_add_norm_quant(lw, m) -> None:
    norm, qz = m["norm"], quantizer(m["norm"])
    with lw.g.inserting_before(norm):
        w = _weight(lw, norm)
        zp = qz.args[2]  # constants made here: the quantizer's come after the norm
        fused = lw.new(npu.ADD_RMS_NORM_QUANT, (m["a"], m["b"], w, _per_channel(lw, qz.args[1], w),
                                                None if zp is None else _per_channel(lw, zp, w), m["eps"], True),
                       norm, role="add_rms_norm_quant")
        y = lw.new(operator.getitem, (fused, 0), norm, role="act_codes")
    qz.replace_all_uses_with(y)
    lw.g.erase_node(qz)
    _residual(lw, m, fused, 1)


def rewrite_add_norm(lw, m) -> None:
    norm = m["norm"]
    with lw.g.inserting_before(norm):
        fused = lw.new(npu.ADD_RMS_NORM, (m["a"], m["b"], _weight(lw, norm), m["eps"]), norm,
                       role=info(norm).get("role"))
        y = lw.new(operator.getitem, (fused, 0), norm)
    norm.replace_all_uses_with(y)
    _residual(lw, m, fused, 2)


def rewrite_norm(lw, m) -> None:
    norm = m["norm"]
    with lw.g.inserting_before(norm):
        r = lw.new(npu.RMS_NORM, (m["x"], _weight(lw, norm), m["eps"]), norm)
        y = lw.new(operator.getitem, (r, 0), norm)
    norm.replace_all_uses_with(y)
    lw.g.erase_node(norm)


LAYER_NORM = Pat(ops.LAYER_NORM, (Pat(name="x"), Pat(name="w"), Pat(name="b"), Pat(name="eps")), name="norm")


def rewrite_layer_norm(lw, m) -> None:
    """LayerNorm (GPT-NeoX, StableLM, Phi-2, Falcon) -> aten.layer_norm, which torch_npu runs as its
    LayerNorm kernel; torch_npu has no add + LayerNorm (+ quantization) fusion to lower it to."""
    norm = m["norm"]
    x = m["x"]
    shape = lw.qm.store.spec(m["w"].target)[0] if m["w"] is not None else norm.meta.get("shape", [None])[-1:]
    with lw.g.inserting_before(norm):
        y = lw.new(aten.layer_norm.default, (x, list(shape)[-1:], m["w"], m["b"], m["eps"]), norm)
    norm.replace_all_uses_with(y)
    lw.g.erase_node(norm)
