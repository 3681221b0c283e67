"""Lowering rules for linears: activation quantization + quantized matmul (W8A8 dynamic and static,
W4A4 with or without the transform before it), weight-only matmuls, gate/up + SwiGLU + quant,
and the transforms no kernel took. Patterns, checks and rewrites; the table is in lower.py."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ptqc import ops, quant
from ptqc.ir import info, is_op
from ptqc.lowering.ascend import ops as npu
from ptqc.lowering.ascend import ops_mx as npu_mx
from ptqc.lowering.ascend import ops_quant as npu_quant
from ptqc.patterns import Pat

aten = torch.ops.aten
ANY, TRUTHY = Pat(), Pat(where=bool)
ACT_REASON = ("only int8 activations (dynamic symmetric per token, static per tensor, or W8A8_MIX), "
              "int4 dynamic symmetric per-token ones and MX (blocks of 32) lower")


def _clip(q: fx.Node) -> float:
    return q.args[6] if len(q.args) > 6 else 1.0


def _act_quant(clip_one: bool = False):  # a linear reads it (MoE experts' input quantizers: rules_moe)
    return lambda q: (info(q).get("role") == "act_quant" and (not clip_one or _clip(q) == 1.0)
                      and any(is_op(u, ops.LINEAR) for u in q.users))


def _single_use(n: fx.Node) -> bool:
    return len(n.users) == 1


# quantize_act(x, scale, zp, bits, group, sym[, clip]) read by linears (role act_quant)
INT4_TRANSFORM = Pat(ops.QUANTIZE_ACT, (Pat(ops.TRANSFORM, name="t", where=_single_use), None, ANY, 4, 0, TRUTHY),
                     name="q", where=_act_quant())
INT4_DYNAMIC = Pat(ops.QUANTIZE_ACT, (ANY, None, ANY, 4, 0, TRUTHY), name="q", where=_act_quant())
SMOOTHED = Pat(aten.mul.Tensor, (ANY, Pat(name="smooth")), name="mul",
               where=lambda n: _single_use(n) and info(n).get("role") == "smooth_scale")
INT8_DYNAMIC_SMOOTH = Pat(ops.QUANTIZE_ACT, (SMOOTHED, None, ANY, 8, 0, TRUTHY), name="q", where=_act_quant(True))
INT8_DYNAMIC = Pat(ops.QUANTIZE_ACT, (ANY, None, ANY, 8, 0, TRUTHY), name="q", where=_act_quant(True))
INT8_STATIC = Pat(ops.QUANTIZE_ACT, (ANY, Pat(name="scale", where=lambda s: s is not None), ANY, 8), name="q",
                  where=_act_quant())
INT8_MIX = Pat(ops.QUANTIZE_ACT, (ANY, Pat(name="scale", where=lambda s: s is not None), ANY, 8, 0, TRUTHY, ANY, "mix"),
               name="q", where=_act_quant())
MX = Pat(ops.QUANTIZE_ACT, (ANY, None, ANY, ANY, 32, TRUTHY, ANY, "mx"), name="q", where=_act_quant())
ACT_QUANT = Pat(ops.QUANTIZE_ACT, name="q", where=_act_quant())
WEIGHT_ONLY = Pat(ops.LINEAR, (Pat(where=lambda x: not is_op(x, ops.QUANTIZE_ACT)), Pat(ops.DEQUANTIZE_WEIGHT)),
                  name="lin")


def _gate_up(name: str) -> Pat:  # quant_matmul(x, t(codes), view(scale), None, tscale, bias=None) used once
    return Pat(npu.QUANT_MATMUL, (Pat(name="x"), Pat(aten.t.default, (Pat(name=f"{name}_codes"),)),
                                  Pat(aten.view.default, (Pat(name=f"{name}_scale"),)), ANY, Pat(name="tscale"), None),
               name=name, where=_single_use)


SWIGLU = Pat(aten.mul.Tensor, (Pat(aten.silu.default, (_gate_up("gate"),), name="act"), _gate_up("up")), name="mul",
             where=lambda n: _single_use(n) and is_op(next(iter(n.users)), npu.DYNAMIC_QUANT))
FLOAT_TRANSFORM = Pat(ops.TRANSFORM, name="t")


def weight_parts(lin: fx.Node):
    """(codes get_attr, scale node, zp node or None, group) of a quantized linear, or None."""
    dq = lin.args[1]
    if not is_op(dq, ops.DEQUANTIZE_WEIGHT):
        return None
    return dq.args[0], dq.args[1], dq.args[2], dq.args[3]  # codes may be unpack_int4(packed)


def codes_value(lw, codes: fx.Node) -> torch.Tensor:
    if is_op(codes, ops.UNPACK_INT4):
        from ptqc import quant

        return quant.unpack_int4(lw.value(codes.args[0]))
    return lw.value(codes)


def _linears(q: fx.Node) -> list[fx.Node]:
    return [u for u in q.users if is_op(u, ops.LINEAR)]


def _linear_reason(lw, lin: fx.Node, a_bits: int) -> str | None:
    parts = weight_parts(lin)
    if parts is None:
        return "its weight is float"
    codes, _, zp, group = parts
    w_bits = info(lin).get("quant", {}).get("weight", {}).get("bits", 0)
    if a_bits == 8 and w_bits == 4:
        return ("W4A8 (int8 activations x int4 weights) has no documented npu_quant_matmul combination "
                "(int8 x int8, or int4 x int4 packed in int32); use w4a4 or int8")
    if a_bits == 4 and (w_bits != 4 or zp is not None or group != 0):
        return "W4A4 needs int4 symmetric per-channel weights (npu_quant_matmul on int4 x int4)"
    if a_bits == 8 and (w_bits != 8 or zp is not None or group != 0):
        return "W8A8 needs int8 symmetric per-channel weights"
    n, k = codes_value(lw, codes).shape
    if a_bits == 4 and (k % 8 or n % 8):
        return f"int4 npu_quant_matmul needs K and N to be multiples of 8 (packed 8 per int32; got K={k}, N={n})"
    return npu.check_quant_matmul(k, n)


def is_w4a8(lw, m) -> bool:
    """Every linear the quantizer feeds has int4 weights (W4A8_DYNAMIC)."""
    lins = _linears(m["q"])
    return bool(lins) and all(weight_parts(lin) is not None and
                              info(lin).get("quant", {}).get("weight", {}).get("bits") == 4 for lin in lins)


def rewrite_w4a8_weight_only(lw, m) -> None:
    """Dense W4A8_DYNAMIC as vllm-ascend 0.23 serves it (npu_weight_quant_batchmatmul on float activations):
    the linears read the quantizer's input; the weight_only rule then takes their int4 weights."""
    q = m["q"]
    for lin in _linears(q):
        lin.replace_input_with(q, q.args[0])
    if not q.users:
        lw.g.erase_node(q)


def check_int8(lw, m) -> str | None:
    return next((w for w in (_linear_reason(lw, lin, 8) for lin in _linears(m["q"])) if w), None)


def check_int4(lw, m) -> str | None:
    clip = _clip(m["q"])
    why = next((w for w in (_linear_reason(lw, lin, 4) for lin in _linears(m["q"])) if w), None)
    if why or clip == 1.0:
        return why
    if "t" not in m:
        return (f"int4 per-token quantization with clip ratio {clip:.4g} lowers only fused with a Kronecker "
                "transform before it (npu_kronecker_quant); npu_dynamic_quant takes no clip ratio")
    fit = _transform_kernel(lw, m["t"], clip)
    return f"{fit}, and the clip ratio {clip:.4g} has no other kernel" if isinstance(fit, str) else None


def static_scale(lw, m) -> bool:
    return lw.value(m["scale"]).numel() == 1


def transform_fits(lw, m) -> bool:
    clip = _clip(m["q"])
    return (lw.fuse or clip != 1.0) and (clip != 1.0 or not isinstance(_transform_kernel(lw, m["t"], clip), str))


def _transform_kernel(lw, t: fx.Node, clip: float):
    """(kernel, float32 operands) of a transform + per-token int4 quantization, or the reason none fits:
    ``x (a kron b)`` is npu_kronecker_quant(p1 = a^T, p2 = b, clip); ``x a`` (no b) is
    npu_rotate_quant(a) when clip is 1 and a fits it, else npu_kronecker_quant(p1 = [[1]], p2 = a)."""
    a, b = t.args[1], t.args[2] if len(t.args) > 2 else None
    av = lw.value(a).float()
    if b is None:
        if clip == 1.0 and npu.check_rotate_quant(av.shape[0], av.shape[1]) is None and av.shape[0] == av.shape[1]:
            return npu.ROTATE_QUANT, (av,)
        p1, p2 = torch.ones(1, 1), av
    else:
        p1, p2 = av.t(), lw.value(b).float()
    if p1.shape[0] != p1.shape[1] or p2.shape[0] != p2.shape[1]:
        return "npu_kronecker_quant takes square factors"
    return npu.check_kronecker_quant(p1.shape[0], p2.shape[0]) or (npu.KRONECKER_QUANT, (p1, p2))


# ---- rewrites: one quantization kernel per quantize_act node, then a quant_matmul per linear ------
def _act_codes(lw, q: fx.Node, kernel_node: fx.Node) -> tuple[fx.Node, fx.Node]:
    codes = lw.new(operator.getitem, (kernel_node, 0), q, role="act_codes")
    return codes, lw.new(operator.getitem, (kernel_node, 1), q, role="act_scale")


def _matmuls(lw, q: fx.Node, lins: list[fx.Node], codes: fx.Node, tscale: fx.Node | None) -> None:
    for lin in lins:
        quant_matmul(lw, lin, codes, tscale, q)
    lw.g.erase_node(q)


def rewrite_int8_dynamic(lw, m) -> None:
    q, lins = m["q"], _linears(m["q"])
    x = q.args[0] if "mul" not in m else m["mul"].args[0]
    with lw.g.inserting_before(q):
        dq = lw.new(npu.DYNAMIC_QUANT, (x, m.get("smooth")), q, role="dynamic_quant")
        codes, tscale = _act_codes(lw, q, dq)
    _matmuls(lw, q, lins, codes, tscale)
    if "mul" in m:
        lw.g.erase_node(m["mul"])


def rewrite_int8_static(lw, m) -> None:
    q, lins = m["q"], _linears(m["q"])
    zp = q.args[2]
    with lw.g.inserting_before(q):
        zpf = None if zp is None else lw.const(f"{zp.target.removesuffix('_zero_point')}_offset", lw.value(zp).float())
        codes = lw.new(npu.QUANTIZE, (q.args[0], q.args[1], zpf, True), q, role="quantize")
    _matmuls(lw, q, lins, codes, None)


def check_int8_mix(lw, m) -> str | None:
    if m["q"].args[2] is not None or lw.value(m["scale"]).numel() != 1:
        return "W8A8_MIX lowers with a symmetric per-tensor decode scale (the per-token matmul takes no offset)"
    return check_int8(lw, m)


def rewrite_int8_mix(lw, m) -> None:
    """W8A8_MIX: pd_mix_quant (dynamic per token at prefill, the static scale at decode), per-token matmuls."""
    q, lins = m["q"], _linears(m["q"])
    with lw.g.inserting_before(q):
        k = lw.new(npu_quant.PD_MIX_QUANT, (q.args[0], q.args[1]), q, role="pd_mix_quant")
        codes, tscale = _act_codes(lw, q, k)
    _matmuls(lw, q, lins, codes, tscale)


def check_mx(lw, m) -> str | None:
    bits = m["q"].args[3]
    for lin in _linears(m["q"]):
        wq = info(lin).get("quant", {}).get("weight", {})
        if wq.get("kind") != "mx" or wq.get("bits") != bits:
            return f"MX activations (bits {bits}) need MX weights of the same element type (npu_quant_matmul)"
        why = npu_mx.check_mx(codes_value(lw, weight_parts(lin)[0]).shape[1])
        if why:
            return why
    return None


def rewrite_mx(lw, m) -> None:
    """npu_dynamic_mx_quant, then one MX npu_quant_matmul per linear (weights [k, n], E8M0 scales [k / 32, n])."""
    q, lins = m["q"], _linears(m["q"])
    with lw.g.inserting_before(q):
        k = lw.new(npu_mx.DYNAMIC_MX_QUANT, (q.args[0], q.args[3]), q, role="dynamic_mx_quant")
        codes, xs = _act_codes(lw, q, k)
    for lin in lins:
        wc, ws, _, _ = weight_parts(lin)
        base = info(lin)["module"]
        bias = lin.args[2] if len(lin.args) > 2 else None
        with lw.g.inserting_before(lin):
            wt = lw.const(f"{base}.weight_mx", codes_value(lw, wc).t().contiguous())
            st = lw.const(f"{base}.weight_scale_e8m0", quant.mx_exponent(lw.value(ws)).t().contiguous())
            y = lw.new(npu_mx.MX_QUANT_MATMUL, (codes, xs, wt, st, bias, lw.dtype), lin)
        lin.replace_all_uses_with(y)
        lw.g.erase_node(lin)
    lw.g.erase_node(q)


def rewrite_int4(lw, m) -> None:
    """npu_dynamic_quant(int4), or npu_kronecker_quant / npu_rotate_quant taking the transform before it."""
    q, lins, x = m["q"], _linears(m["q"]), m["q"].args[0]
    with lw.g.inserting_before(q):
        if "t" not in m:
            dq = lw.new(npu.DYNAMIC_QUANT_INT4, (x, None), q, role="dynamic_quant")
        else:
            kernel, mats = _transform_kernel(lw, x, _clip(q))
            rotate = kernel == npu.ROTATE_QUANT
            base = info(x).get("module") or info(q)["module"]
            names = ("rotation",) if rotate else ("kronecker_p1", "kronecker_p2")
            consts = [lw.const(f"{base}.{nm}", t.to(lw.dtype)) for nm, t in zip(names, mats)]
            args = (x.args[0], *consts, True) if rotate else (x.args[0], *consts, float(_clip(q)))
            dq = lw.new(kernel, args, q, role="rotate_quant" if rotate else "kronecker_quant")
        codes, tscale = _act_codes(lw, q, dq)
    _matmuls(lw, q, lins, codes, tscale)
    if "t" in m and not x.users:
        lw.g.erase_node(x)


def quant_matmul(lw, lin: fx.Node, codes_x: fx.Node, tscale: fx.Node | None, q: fx.Node) -> None:
    wc, ws, _, _ = weight_parts(lin)
    bias = lin.args[2] if len(lin.args) > 2 else None
    base = info(lin)["module"]
    int4 = q.args[3] == 4
    with lw.g.inserting_before(lin):
        if int4:  # W4A4: weight packed offline 8 per int32 along K ([n, k / 8]), passed as its .t()
            wc = lw.const(f"{base}.weight_packed", npu.convert_weight_to_int4pack(codes_value(lw, wc).to(torch.int32)))
        wt = lw.new(aten.t.default, (wc,), lin, role="weight_t")
        if tscale is None:
            y = _static_matmul(lw, lin, codes_x, wt, q)
        else:  # dynamic: per-channel weight scale, per-token activation scale
            wsv = lw.new(aten.view.default, (ws, [-1]), lin, role="weight_scale")
            y = lw.new(npu.QUANT_MATMUL, (codes_x, wt, wsv, None, tscale, None if int4 else bias, lw.dtype), lin)
            if int4 and bias is not None:  # int4 takes an int32 bias only: the float bias added after (vllm-ascend)
                y = lw.new(aten.add.Tensor, (y, bias), lin)
    lin.replace_all_uses_with(y)
    lw.g.erase_node(lin)


def _static_matmul(lw, lin: fx.Node, codes_x: fx.Node, wt: fx.Node, q: fx.Node) -> fx.Node:
    """deq_scale = trans_quant_param(input_scale * w_scale) (``truncate=false``: float32), quant_bias
    = round(bias / deq_scale) - sum_k W_q[n, k] * zp (``int_bias=false``: the float bias added after)."""
    wc, ws = weight_parts(lin)[:2]
    bias = lin.args[2] if len(lin.args) > 2 else None
    w_s = lw.value(ws).float().reshape(-1)
    deq = lw.value(q.args[1]).float() * w_s
    deq_t = npu.trans_quant_param(deq) if lw.truncate else deq
    deq_f = npu.deq_scale_value(deq_t) if lw.truncate else deq
    qb = torch.zeros_like(w_s)
    if bias is not None and lw.int_bias:
        qb = lw.value(bias).float() / deq_f
    if q.args[2] is not None:
        qb = qb - codes_value(lw, wc).float().sum(1) * lw.value(q.args[2]).float()
    base = info(lin)["module"]
    deq_n = lw.const(f"{base}.deq_scale", deq_t)
    qb_n = lw.const(f"{base}.quant_bias", torch.round(qb).to(torch.int32))
    y = lw.new(npu.QUANT_MATMUL, (codes_x, wt, deq_n, None, None, qb_n, lw.dtype), lin)
    if bias is not None and not lw.int_bias:  # float bias after dequantization
        y = lw.new(aten.add.Tensor, (y, bias), lin)
    return y


# ---- weight-only, SwiGLU, float transforms ------------------------------------------------------------
def check_weight_only(lw, m) -> str | None:
    return npu.check_weight_quant_batchmatmul(weight_parts(m["lin"])[3])


def rewrite_weight_only(lw, m) -> None:
    lin = m["lin"]
    codes, ws, zp, group = weight_parts(lin)
    bias = lin.args[2] if len(lin.args) > 2 else None
    base = info(lin)["module"]
    s = lw.value(ws).float()
    with lw.g.inserting_before(lin):
        ct = lw.new(aten.t.default, (codes,), lin, role="weight_t")
        st = lw.const(f"{base}.antiquant_scale", s.t().contiguous() if group else s.reshape(-1))
        ot = None
        if zp is not None:
            o = -lw.value(zp).float()
            ot = lw.const(f"{base}.antiquant_offset", o.t().contiguous() if group else o.reshape(-1))
        y = lw.new(npu.WEIGHT_QUANT_BATCHMATMUL, (lin.args[0], ct, st, ot, bias, group), lin)
    lin.replace_all_uses_with(y)
    lw.g.erase_node(lin)


def swiglu_fits(lw, m) -> bool:  # too wide for the kernel: gate/up and the dynamic quant stay separate
    return lw.fuse and npu.check_swiglu_quant(2 * codes_value(lw, m["gate_codes"]).shape[0]) is None


def rewrite_swiglu(lw, m) -> None:
    gate, mul = m["gate"], m["mul"]
    base = info(gate)["module"].rsplit(".", 1)[0] + ".gate_up_proj"
    with lw.g.inserting_before(gate):
        wcat = lw.const(f"{base}.weight", torch.cat([codes_value(lw, m["gate_codes"]), codes_value(lw, m["up_codes"])]))
        scat = lw.const(f"{base}.weight_scale",
                        torch.cat([lw.value(m["gate_scale"]), lw.value(m["up_scale"])]).reshape(-1).float())
        wt = lw.new(aten.t.default, (wcat,), gate, role="weight_t", module=base)
        gu = lw.new(npu.QUANT_MATMUL, (m["x"], wt, scat, None, m["tscale"], None, lw.dtype), gate, role="gate_up",
                    module=base)
    dq = next(iter(mul.users))
    with lw.g.inserting_before(dq):
        sq = lw.new(npu.SWIGLU_QUANT, (gu, True, dq.args[1]), dq, role="swiglu_quant")
    dq.replace_all_uses_with(sq)
    for n in (dq, mul, m["act"], m["up"], gate):
        lw.g.erase_node(n)


def _as_dtype(lw, a: fx.Node) -> fx.Node:
    t = lw.value(a)
    return a if t.dtype == lw.dtype else lw.const(f"{a.target}_{str(lw.dtype)[6:]}", t.to(lw.dtype))


def rewrite_transform(lw, m) -> None:
    """``x a`` or ``vec(a^T X b)`` as float matmuls in the activation dtype."""
    t = m["t"]
    x, a = t.args[0], t.args[1]
    b = t.args[2] if len(t.args) > 2 else None
    with lw.g.inserting_before(t):
        an = _as_dtype(lw, a)
        if b is None:
            y = lw.new(aten.matmul.default, (x, an), t, role="float_transform")
        else:
            bn = _as_dtype(lw, b)
            n1, n2 = lw.value(a).shape[0], lw.value(b).shape[0]
            u = lw.new(aten.unflatten.int, (x, -1, [n1, n2]), t, role="transform_layout")
            at = lw.new(aten.t.default, (an,), t, role="transform_layout")
            h = lw.new(aten.matmul.default, (at, u), t, role="transform_matmul")
            h = lw.new(aten.matmul.default, (h, bn), t, role="transform_matmul")
            y = lw.new(aten.flatten.using_ints, (h, -2, -1), t, role="float_transform")
    t.replace_all_uses_with(y)
    lw.g.erase_node(t)
