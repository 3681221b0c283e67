"""Lowering rules for mixture-of-experts blocks: ``ptqc.moe_route`` -> a gating kernel, and
``ptqc.moe_experts`` -> npu_moe_init_routing_v2 -> npu_grouped_matmul (gate|up) -> npu_swiglu ->
npu_grouped_matmul (down) -> npu_moe_finalize_routing, on float stacks, weight-only ones
(antiquant scale/offset), or W8A8 / W4A8 dynamic ones (per-token int8 of the routed tokens in
init_routing, npu_dynamic_quant of down's input). Patterns, checks, rewrites and the table
:data:`RULES` (the "moe" phase of lower.py's)."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ptqc import ops
from ptqc.experts import PROJS
from ptqc.ir import info, is_op
from ptqc.lowering.ascend import ops as npu
from ptqc.lowering.ascend.ops_moe import uint64_scale
from ptqc.lowering.ascend.rules_linear import codes_value
from ptqc.patterns import Pat

aten = torch.ops.aten
ROUTE = Pat(ops.MOE_ROUTE, name="route")
EXPERTS = Pat(ops.MOE_EXPERTS, name="experts")
ROUTE_ARGS = (("top_k", 1), ("scoring", "softmax"), ("norm_topk_prob", False), ("n_group", 1), ("topk_group", 1),
              ("scale", 1.0), ("weights_dtype", None))
GATING = (npu.MOE_GATING_TOP_K_SOFTMAX, npu.MOE_GATING_TOP_K)
SWIGLU_ACTS = ("silu", "swish")
EPS = 1e-20  # ptqc.moe_route's renormalization epsilon, and the gating kernel's default
A8W4_MAX_K = 18432  # aclnnGroupedMatmulV5, A8W4: k <= 18432


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


def down_act_bits(x: fx.Node) -> int:
    return x.kwargs.get("down_act_bits", x.args[7] if len(x.args) > 7 else 0)


def _stacks(x: fx.Node) -> tuple:
    return x.args[3], x.args[4], x.args[5]


def _clip_one(q: fx.Node) -> bool:
    return (q.args[6] if len(q.args) > 6 else 1.0) == 1.0


def w_bits(x: fx.Node) -> int:
    """Bits of the experts' quantized stacks (the widest of gate, up, down)."""
    return max(info(w).get("quant", {}).get("weight", {}).get("bits", 8) for w in _stacks(x))


ANY = Pat()
FLOAT_X = Pat(where=lambda a: not is_op(a, ops.QUANTIZE_ACT))
FLOAT_W = Pat(where=lambda w: isinstance(w, fx.Node) and w.op == "get_attr")
DEQ = Pat(ops.DEQUANTIZE_WEIGHT)
DYNAMIC8 = Pat(ops.QUANTIZE_ACT, (Pat(name="src"), None, None, 8, 0, True), name="q", where=_clip_one)
EXPERTS = Pat(ops.MOE_EXPERTS, name="experts")
FLOAT = Pat(ops.MOE_EXPERTS, (FLOAT_X, ANY, ANY, FLOAT_W, FLOAT_W, FLOAT_W), name="experts",
            where=lambda x: not down_act_bits(x))
WEIGHT_ONLY = Pat(ops.MOE_EXPERTS, (FLOAT_X, ANY, ANY, DEQ, DEQ, DEQ), name="experts",
                  where=lambda x: not down_act_bits(x))
A8 = Pat(ops.MOE_EXPERTS, (DYNAMIC8, ANY, ANY, DEQ, DEQ, DEQ), name="experts", where=lambda x: down_act_bits(x) == 8)


def _shape_reason(lw, x: fx.Node) -> str | None:
    if _act(x) not in SWIGLU_ACTS:
        return f"npu_swiglu computes silu(gate) * up; experts with act={_act(x)!r} have no kernel here"
    gate, up = (info(w).get("quant", {}).get("weight") for w in _stacks(x)[:2])
    if gate != up:
        return f"gate_proj and up_proj run as one grouped matmul: quantize them alike (got {gate} and {up})"
    gw = x.args[3]
    e, i, h = _codes(lw, gw).shape if is_op(gw, ops.DEQUANTIZE_WEIGHT) else lw.qm.store.spec(gw.target)[0]
    return (npu.check_moe_init_routing(e) or npu.check_grouped_matmul(e, h, 2 * i)
            or npu.check_grouped_matmul(e, i, h))


def check_experts(lw, m) -> str | None:
    return _shape_reason(lw, m["experts"])


def _parts(lw, x: fx.Node) -> list[tuple]:
    """(codes int8 [E, out, in], scale float32 [E, out, G], zero point or None, group) of gate, up, down."""
    return [(_codes(lw, w), lw.value(w.args[1]).float(), None if w.args[2] is None else lw.value(w.args[2]), w.args[3])
            for w in _stacks(x)]


def _codes(lw, dq: fx.Node) -> torch.Tensor:
    return codes_value(lw, dq.args[0])


def check_weight_only(lw, m) -> str | None:
    x = m["experts"]
    why = _shape_reason(lw, x)
    if why:
        return why
    for (c, s, z, g), p in zip(_parts(lw, x), PROJS):
        int4 = _bits(x, p) <= 4
        if not int4 and g:
            return (f"{p}_proj: npu_grouped_matmul takes int8 expert weights per channel only (group {g}); "
                    "use int4 or group=0")
        if int4 and c.shape[1] % 8:
            return (f"{p}_proj: int4 expert weights pack 8 per int32 along the output dim ({c.shape[1]} is not a "
                    "multiple of 8)")
    return None


def _bits(x: fx.Node, proj: str) -> int:
    return info(_stacks(x)[PROJS.index(proj)]).get("quant", {}).get("weight", {}).get("bits", 8)


def _a8_reason(lw, x: fx.Node, int4: bool) -> str | None:
    why = _shape_reason(lw, x)
    if why:
        return why
    for (c, s, z, g), p in zip(_parts(lw, x), PROJS):
        if z is not None or g:
            return (f"{p}_proj: W{'4' if int4 else '8'}A8 experts need symmetric per-channel weights "
                    f"(npu_grouped_matmul with per-channel scale and per-token scale)")
        if int4 and (c.shape[1] % 8 or c.shape[2] > A8W4_MAX_K):
            return (f"{p}_proj: the A8W4 grouped matmul needs N a multiple of 8 and K <= {A8W4_MAX_K} "
                    f"(got N, K = {tuple(c.shape[1:])})")
    return None


def check_w8a8(lw, m) -> str | None:
    return _a8_reason(lw, m["experts"], False)


def check_w4a8(lw, m) -> str | None:
    return _a8_reason(lw, m["experts"], True)


def unsupported(lw, m) -> str:
    x = m["experts"]
    q = x.args[0]
    a = f"int{q.args[3]} group {q.args[4]}" if is_op(q, ops.QUANTIZE_ACT) else "float"
    return (f"MoE experts lower with float stacks, weight-only stacks, or int8 dynamic symmetric per-token inputs "
            f"(x and down's input) on int8/int4 stacks (got x {a}, down_act_bits={down_act_bits(x)}, "
            f"stacks {'float' if FLOAT_W.match(x.args[3]) else f'int{w_bits(x)}'})")


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


def _chain(lw, m, operands, quantized: bool) -> None:
    """init_routing (quant_mode 1: per-token int8 of each routed token copy), grouped matmul gate|up,
    npu_swiglu (then npu_dynamic_quant of down's input), grouped matmul down, finalize_routing.
    ``operands(lw, x)``: the two grouped matmuls' (weight, bias, scale, antiquant_scale, antiquant_offset)."""
    x = m["experts"]
    base = _base(x)
    e = lw.qm.store.spec(_base_weight(x))[0][0]
    with lw.g.inserting_before(x):
        first, down = operands(lw, x)
        ex, row_idx, counts, xs = init_routing(lw, x, m["src"] if quantized else x.args[0], e, 1 if quantized else -1)
        w, b, s, aq, ao = first
        h = lw.new(npu.GROUPED_MATMUL, (ex, w, counts, b, s, xs if quantized else None, 1, lw.dtype, aq, ao), x,
                   role="gate_up", module=f"{base}.gate_up_proj")
        h = lw.new(npu.SWIGLU, (h, -1), x, role="swiglu")
        hs = None
        if quantized:
            dq = lw.new(npu.DYNAMIC_QUANT, (h, None), x, role="moe_dynamic_quant")
            h = lw.new(operator.getitem, (dq, 0), x, role="act_codes")
            hs = lw.new(operator.getitem, (dq, 1), x, role="act_scale")
        w, b, s, aq, ao = down
        y = lw.new(npu.GROUPED_MATMUL, (h, w, counts, b, s, hs, 1, lw.dtype, aq, ao), x, role="down",
                   module=f"{base}.down_proj")
        finalize_routing(lw, x, y, row_idx)
    if quantized and not m["q"].users:
        lw.g.erase_node(m["q"])


def _base(x: fx.Node) -> str:
    """``model.layers.N.mlp.experts``: where the lowered operands are named."""
    return _base_weight(x).rsplit(".", 2)[0]


def _base_weight(x: fx.Node) -> str:
    w = x.args[3]
    while w.op != "get_attr":
        w = w.args[0]
    return w.target


def float_operands(lw, x: fx.Node) -> tuple[tuple, tuple]:
    """Float stacks: gate and up as one [E, 2I, H] weight (``<experts>.gate_up_proj.weight``), both
    weights read transposed."""
    gate, up, down = _stacks(x)
    gu = lw.const(f"{_base(x)}.gate_up_proj.weight", torch.cat([lw.value(gate), lw.value(up)], 1))
    return tuple((_weight_t(lw, x, w, "weight_t"), None, None, None, None) for w in (gu, down))


def rewrite_experts(lw, m) -> None:
    _chain(lw, m, float_operands, False)


def _gate_up(parts: list[tuple]) -> tuple:
    """gate and up stacked along the output dim: (codes, scale, zero point, group) of [E, 2I, H]."""
    (cg, sg, zg, g), (cu, su, zu, _) = parts[:2]
    return torch.cat([cg, cu], 1), torch.cat([sg, su], 1), None if zg is None else torch.cat([zg, zu], 1), g


def _operands(lw, x: fx.Node, scheme: str) -> tuple[tuple, tuple]:
    """The gate|up and down grouped matmul operands of quantized stacks, as constants named
    ``<experts>.<proj>.gmm_*`` (built by :data:`OPERANDS`)."""
    parts = _parts(lw, x)
    out = []
    for proj, (codes, s, z, g) in (("gate_up_proj", _gate_up(parts)), ("down_proj", parts[2])):
        bits = max(_bits(x, "gate"), _bits(x, "up")) if proj == "gate_up_proj" else _bits(x, "down")
        t = OPERANDS[scheme](codes, s, z, bits, lw.dtype)
        name = f"{_base(x)}.{proj}.gmm_"
        out.append(tuple(None if t.get(k) is None else lw.const(name + k, t[k]) for k in GMM_OPERANDS))
    return out[0], out[1]


def _kn(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[E, out, in] codes as the kernel's [E, K, N]: int8, or int4 packed 8 per int32 along N."""
    w = codes.transpose(1, 2).contiguous()
    return npu.pack_int4x8(w) if bits <= 4 else w.to(torch.int8)


def _per_channel_or_group(t: torch.Tensor, dtype) -> torch.Tensor:
    """[E, out, G] -> [E, out] (G = 1) or [E, G, out], in ``dtype``."""
    return (t[..., 0] if t.shape[-1] == 1 else t.transpose(1, 2)).to(dtype).contiguous()


def weight_only_operands(codes, s, z, bits, dtype) -> dict:
    """A16W8 / A16W4: antiquant_scale and antiquant_offset (= -zero point) in the activation dtype."""
    return {"weight": _kn(codes, bits), "antiquant_scale": _per_channel_or_group(s, dtype),
            "antiquant_offset": None if z is None else _per_channel_or_group(-z.float(), dtype)}


def w8a8_operands(codes, s, z, bits, dtype) -> dict:
    """A8W8 dynamic: int8 weight, float32 per-channel scale [E, N]."""
    return {"weight": _kn(codes, 8), "scale": s[..., 0].contiguous()}


def w4a8_operands(codes, s, z, bits, dtype) -> dict:
    """A8W4: int4 weight [E, K, N / 8], UINT64 scale [E, 1, N], bias 8 * sum_k(W * scale) [E, N]."""
    sc = s[..., 0]
    bias = 8 * (codes.float() * sc.unsqueeze(-1)).sum(-1)
    return {"weight": _kn(codes, 4), "scale": uint64_scale(sc).unsqueeze(1).contiguous(), "bias": bias}


GMM_OPERANDS = ("weight", "bias", "scale", "antiquant_scale", "antiquant_offset")
OPERANDS = {"weight_only": weight_only_operands, "w8a8": w8a8_operands, "w4a8": w4a8_operands}


def rewrite_weight_only(lw, m) -> None:
    _chain(lw, m, lambda lw, x: _operands(lw, x, "weight_only"), False)


def rewrite_w8a8(lw, m) -> None:
    _chain(lw, m, lambda lw, x: _operands(lw, x, "w8a8"), True)


def rewrite_w4a8(lw, m) -> None:
    _chain(lw, m, lambda lw, x: _operands(lw, x, "w4a8"), True)


INIT, GMM, FINAL = "npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_moe_finalize_routing"
A8_WHEN = {"w8a8": lambda lw, m: w_bits(m["experts"]) > 4, "w4a8": lambda lw, m: w_bits(m["experts"]) <= 4}
RULES = (  # name, doc, kernels, pattern, rewrite, check, when: the "moe" phase of lower.RULES
    ("moe_route", "MoE router top-k: softmax top-k kernel (renorm/scale after it), or the grouped sigmoid/bias gating "
     "kernel", ("npu_moe_gating_top_k_softmax", "npu_moe_gating_top_k"), ROUTE, rewrite_route, check_route, None),
    ("moe_experts", "float MoE experts: init_routing, grouped matmul gate|up, swiglu, grouped matmul down, finalize",
     (INIT, GMM, "npu_swiglu", FINAL), FLOAT, rewrite_experts, check_experts, None),
    ("moe_experts_weight_only", "W8A16 / W4A16 experts (per channel, int4 also per group): antiquant grouped matmuls",
     (INIT, GMM, "npu_swiglu", FINAL), WEIGHT_ONLY, rewrite_weight_only, check_weight_only, None),
    ("moe_experts_w8a8", "W8A8 dynamic experts: per-token int8 in init_routing and npu_dynamic_quant, int8 grouped "
     "matmuls", (INIT, GMM, "npu_swiglu", "npu_dynamic_quant", FINAL), A8, rewrite_w8a8, check_w8a8, A8_WHEN["w8a8"]),
    ("moe_experts_w4a8", "W4A8 dynamic experts: as W8A8 with int4 weights (A8W4 grouped matmul, scale bias)",
     (INIT, GMM, "npu_swiglu", "npu_dynamic_quant", FINAL), A8, rewrite_w4a8, check_w4a8, A8_WHEN["w4a8"]),
    ("moe_experts_unsupported", "any other expert quantization: refused", (), EXPERTS, None, unsupported, None),
)
