"""Lowering rules for mixture-of-experts blocks: ``ptqc.moe_route`` -> a gating kernel, and
``ptqc.moe_experts`` on float stacks -> npu_moe_init_routing_v2 -> npu_grouped_matmul (gate|up)
-> npu_swiglu -> npu_grouped_matmul (down) -> npu_moe_finalize_routing. Patterns, checks and
rewrites; the table is in lower.py."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ptqc import ops
from ptqc.ir import info, is_op
from ptqc.lowering.ascend import ops as npu
from ptqc.patterns import Pat

aten = torch.ops.aten
ROUTE = Pat(ops.MOE_ROUTE, name="route")
EXPERTS = Pat(ops.MOE_EXPERTS, name="experts")
ROUTE_ARGS = (("top_k", 1), ("scoring", "softmax"), ("norm_topk_prob", False), ("n_group", 1), ("topk_group", 1),
              ("scale", 1.0), ("weights_dtype", None))
GATING = (npu.MOE_GATING_TOP_K_SOFTMAX, npu.MOE_GATING_TOP_K)
SWIGLU_ACTS = ("silu", "swish")
EPS = 1e-20  # ptqc.moe_route's renormalization epsilon, and the gating kernel's default


def route_args(r: fx.Node) -> dict:
    """top_k, scoring, norm_topk_prob, n_group, topk_group, scale, weights_dtype of a moe_route node."""
    out = {k: d for k, d in ROUTE_ARGS}
    out.update(zip((k for k, _ in ROUTE_ARGS), r.args[2:]))
    out.update(r.kwargs)
    return out


def _experts_count(lw, r: fx.Node) -> int:
    shape = r.args[0].meta.get("shape") or []
    if shape and isinstance(shape[-1], int):
        return shape[-1]
    return lw.qm.store.spec(r.args[0].args[1].target)[0][0]  # the router linear's weight [E, H]


def _softmax_kernel(a: dict, bias) -> bool:
    """npu_moe_gating_top_k_softmax takes plain softmax top-k; groups or a bias need npu_moe_gating_top_k."""
    return a["scoring"] == "softmax" and bias is None and a["n_group"] == 1


def check_route(lw, m) -> str | None:
    r = m["route"]
    a, e = route_args(r), _experts_count(lw, r)
    if a["scoring"] not in ("softmax", "sigmoid"):
        return f"no gating kernel scores experts with {a['scoring']!r} (softmax, sigmoid)"
    if a["scoring"] == "sigmoid" and not a["norm_topk_prob"]:
        return ("npu_moe_gating_top_k always renormalizes sigmoid weights (y / sum y); this router keeps them "
                "unnormalized (norm_topk_prob=false)")
    if _softmax_kernel(a, r.args[1]):
        return npu.check_moe_gating_top_k_softmax(e, a["top_k"])
    return npu.check_moe_gating_top_k(e, a["top_k"], a["n_group"], a["topk_group"])


def _dtype(n: fx.Node, default: torch.dtype) -> torch.dtype:
    dt = n.meta.get("dtype")
    return getattr(torch, dt.removeprefix("torch.")) if isinstance(dt, str) else (dt or default)


def rewrite_route(lw, m) -> None:
    """The kernel runs on float32 logits (the scores ptqc.moe_route computes); softmax weights are
    renormalized and scaled after it, sigmoid ones inside it; weights are cast as the route returns them."""
    r = m["route"]
    a, logits, bias = route_args(r), r.args[0], r.args[1]
    soft = a["scoring"] == "softmax"
    with lw.g.inserting_before(r):
        x = lw.new(aten.to.dtype, (logits, torch.float32), r, role="router_cast")
        if _softmax_kernel(a, bias):
            g = lw.new(npu.MOE_GATING_TOP_K_SOFTMAX, (x, None, a["top_k"]), r, role="gating")
        else:
            b = None if bias is None else lw.new(aten.to.dtype, (bias, torch.float32), r, role="router_cast")
            g = lw.new(npu.MOE_GATING_TOP_K, (x, a["top_k"], b, a["topk_group"], a["n_group"], 1, 0, 0 if soft else 1,
                                              False, 1.0 if soft else float(a["scale"]), EPS), r, role="gating")
        y = lw.new(operator.getitem, (g, 0), r, role="route_weights")
        ids = lw.new(operator.getitem, (g, 1), r, role="route_ids")
        if soft and a["norm_topk_prob"]:
            s = lw.new(aten.sum.dim_IntList, (y, [-1], True), r, role="route_renorm")
            y = lw.new(aten.div.Tensor, (y, lw.new(aten.add.Tensor, (s, EPS), r, role="route_renorm")), r,
                       role="route_renorm")
        if soft and a["scale"] != 1.0:
            y = lw.new(aten.mul.Tensor, (y, float(a["scale"])), r, role="route_scale")
        w = lw.new(aten.to.dtype, (y, a["weights_dtype"] or _dtype(logits, lw.dtype)), r, role="route_weights")
    for u in list(r.users):  # getitem(route, 0 | 1)
        u.replace_all_uses_with(w if u.args[1] == 0 else ids)
        lw.g.erase_node(u)
    lw.g.erase_node(r)


# ---- experts ------------------------------------------------------------------------------------
def _act(x: fx.Node) -> str:
    return x.kwargs.get("act", x.args[6] if len(x.args) > 6 else "silu")


def _stacks(x: fx.Node) -> tuple:
    return x.args[3], x.args[4], x.args[5]


def check_experts(lw, m) -> str | None:
    x = m["experts"]
    if _act(x) not in SWIGLU_ACTS:
        return f"npu_swiglu computes silu(gate) * up; experts with act={_act(x)!r} have no kernel here"
    if not all(w.op == "get_attr" for w in _stacks(x)):
        return "only float expert stacks lower to npu_grouped_matmul so far (these experts are quantized)"
    e, i, h = lw.qm.store.spec(x.args[3].target)[0]
    return (npu.check_moe_init_routing(e) or npu.check_grouped_matmul(e, h, 2 * i)
            or npu.check_grouped_matmul(e, i, h))


def routed_ids(lw, x: fx.Node) -> fx.Node:
    """int32 expert ids for npu_moe_init_routing_v2 (a gating kernel's already are)."""
    ids = x.args[2]
    if is_op(ids, operator.getitem) and ids.args[0].op == "call_function" and ids.args[0].target in GATING:
        return ids
    return lw.new(aten.to.dtype, (ids, torch.int32), x, role="route_ids")


def init_routing(lw, x: fx.Node, h: fx.Node, experts: int, quant_mode: int = -1, smooth=None) -> list[fx.Node]:
    """npu_moe_init_routing_v2 (dropless, counts per expert, gather index): its four outputs."""
    ids = routed_ids(lw, x)
    n = lw.new(aten.sym_numel.default, (ids,), x, role="route_ids")
    init = lw.new(npu.MOE_INIT_ROUTING_V2, (h, ids, smooth, None, n, -1, experts, 0, 1, True, quant_mode,
                                            [0, experts], 0), x, role="init_routing")
    return [lw.new(operator.getitem, (init, i), x, role=role)
            for i, role in enumerate(("expanded_x", "expanded_row_idx", "expert_tokens", "expanded_scale"))]


def finalize_routing(lw, x: fx.Node, y: fx.Node, row_idx: fx.Node) -> None:
    """npu_moe_finalize_routing (drop_pad_mode 2: row-major pairs) with the route weights as scales,
    cast to the expert output's dtype (the kernel takes one dtype), replacing ``x``."""
    scales = lw.new(aten.to.dtype, (x.args[1], lw.dtype), x, role="route_weights")
    out = lw.new(npu.MOE_FINALIZE_ROUTING, (y, None, None, None, scales, row_idx, None, 2), x, role="finalize_routing")
    x.replace_all_uses_with(out)
    lw.g.erase_node(x)


def _weight_t(lw, x: fx.Node, w: fx.Node, role: str) -> fx.Node:
    return lw.new(aten.transpose.int, (w, 1, 2), x, role=role)  # [E, out, in] -> the kernel's [E, K, N]


def rewrite_experts(lw, m) -> None:
    """gate and up stacked as one [E, 2I, H] weight (``<experts>.gate_up_proj.weight``): one grouped
    matmul, npu_swiglu, the down grouped matmul; tokens in expert-major order between the routing kernels."""
    x = m["experts"]
    gate, up, down = _stacks(x)
    e = lw.qm.store.spec(gate.target)[0][0]
    base = gate.target.rsplit(".", 2)[0]
    with lw.g.inserting_before(x):
        gu = lw.const(f"{base}.gate_up_proj.weight", torch.cat([lw.value(gate), lw.value(up)], 1))
        ex, row_idx, counts, _ = init_routing(lw, x, x.args[0], e)
        h = lw.new(npu.GROUPED_MATMUL, (ex, _weight_t(lw, x, gu, "weight_t"), counts, None, None, None, 1), x,
                   role="gate_up", module=f"{base}.gate_up_proj")
        h = lw.new(npu.SWIGLU, (h, -1), x, role="swiglu")
        y = lw.new(npu.GROUPED_MATMUL, (h, _weight_t(lw, x, down, "weight_t"), counts, None, None, None, 1), x,
                   role="down", module=f"{base}.down_proj")
        finalize_routing(lw, x, y, row_idx)
