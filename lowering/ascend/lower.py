"""Lowering a quantized ptqc graph to Ascend operators (``ptqc_npu::*``, see ops.py).

Rewrite rules, applied in this order; each matches a small pattern of the fake-quant graph and
replaces it with the kernels an Ascend engineer would call:

    W8A8 dynamic   quantize_act(x, None) -> linear(., dequantize_weight(int8 codes, per channel))
                   => c, s = dynamic_quant(x)              (ONE per quantize_act node: shared by
                      quant_matmul(c, codes^T, w_scale,          q/k/v and by gate/up)
                                   pertoken_scale=s, bias)
    W8A8 static    quantize_act(x, input_scale, zp) -> linear(...)
                   => c = quantize(x, input_scale, zp)
                      quant_matmul(c, codes^T, deq_scale, bias=quant_bias)
                      deq_scale = trans_quant_param(input_scale * w_scale) (int64, 19-bit
                      truncated; ``truncate=false`` keeps float32), quant_bias (int32) =
                      round(bias / deq_scale) - sum_k W_q[n, k] * zp (``int_bias=false``:
                      the float bias is added after dequantization instead, no rounding)
    weight-only    linear(x, dequantize_weight(codes, scale, zp, group))       (W8A16 / W4A16)
                   => weight_quant_batchmatmul(x, codes^T, scale^T, -zp^T, bias, group)
    RMSNorm        rms_norm(x)                   => rms_norm(x)[0]  (Gemma's 1 + w folded)
                   rms_norm(add(a, b))           => add_rms_norm(a, b)            (fuse=true)
                   dynamic_quant(add_rms_norm)   => add_rms_norm_dynamic_quant    (fuse=true)
                   quantize(add_rms_norm)        => add_rms_norm_quant            (fuse=true)
    SwiGLU + quant dynamic_quant(silu(gate) * up) with gate/up sharing one dynamic quant
                   => one quant_matmul on the concatenated [gate; up] weight, then
                      swiglu_quant(., dynamic) feeding down_proj               (fuse=true)

With ``fuse=false`` every linear gets its own quantization kernel (the naive lowering, kept for
comparison). A linear no rule takes (e.g. int4 activations, a group size the kernel refuses, K
over 65535) stops the lowering with the reason, unless ``fallback=true`` leaves it as a float
fake-quant op. Attention stays ``ptqc.attention`` (softmax / KV8 attention lowering is not
done yet).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ptqc import ops
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, is_op
from ptqc.lowering.ascend import ops as npu

aten = torch.ops.aten
QUANT_KERNELS = (npu.DYNAMIC_QUANT, npu.QUANTIZE)  # standalone quantization kernels
FUSED_QUANT = (npu.ADD_RMS_NORM_DYNAMIC_QUANT, npu.ADD_RMS_NORM_QUANT, npu.SWIGLU_QUANT)


def _new(g: fx.Graph, target, args, like: fx.Node, role=None, module=None) -> fx.Node:
    n = g.call_function(target, tuple(args))
    m = info(like)
    info(n).update({"module": module or m.get("module"), "layer": m.get("layer"), "role": role or m.get("role")})
    return n


def _const(qm: QModel, g: fx.Graph, name: str, t: torch.Tensor) -> fx.Node:
    qm.store[name] = t.contiguous()
    return g.get_attr(name)


def _weight_parts(lin: fx.Node):
    """(codes get_attr, scale node, zp node or None, group) of a quantized linear, or None."""
    dq = lin.args[1]
    if not is_op(dq, ops.DEQUANTIZE_WEIGHT):
        return None
    return dq.args[0], dq.args[1], dq.args[2], dq.args[3]  # codes may be unpack_int4(packed)


def _bits(lin: fx.Node) -> int:
    return info(lin).get("quant", {}).get("weight", {}).get("bits", 0)


def _codes_value(qm, codes: fx.Node) -> torch.Tensor:
    if is_op(codes, ops.UNPACK_INT4):
        from ptqc import quant

        return quant.unpack_int4(qm.store[codes.args[0].target])
    return qm.store[codes.target]


class Lowering:
    def __init__(self, qm: QModel, fuse: bool = True, truncate: bool = True, fallback: bool = False,
                 int_bias: bool = True):
        self.qm, self.g = qm, qm.graph
        self.fuse, self.truncate, self.fallback, self.int_bias = fuse, truncate, fallback, int_bias
        self.refused: list[str] = []
        self.dtype = qm.dtype

    def refuse(self, node: fx.Node, why: str) -> None:
        msg = f"{info(node).get('module')}: {why}"
        if not self.fallback:
            raise PtqcError(f"cannot lower {msg} to Ascend kernels; allow fallback=true to keep it as a float op")
        self.refused.append(msg)

    # ---- linears -------------------------------------------------------------------------
    def act_kind(self, q: fx.Node) -> str | None:
        x, scale, zp, bits, group, sym, *rest = q.args
        clip = rest[0] if rest else 1.0
        if bits != 8:
            return None
        if scale is None and group == 0 and sym and clip == 1.0:
            return "dynamic"
        if scale is not None and self.qm.store[scale.target].numel() == 1:
            return "static"
        return None

    def linear_ok(self, lin: fx.Node) -> str | None:
        parts = _weight_parts(lin)
        if parts is None:
            return "its weight is float"
        codes, s, zp, group = parts
        if _bits(lin) != 8 or zp is not None or group != 0:
            return "W8A8 needs int8 symmetric per-channel weights"
        n, k = _codes_value(self.qm, codes).shape
        return npu.check_quant_matmul(k, n)

    def lower_act_groups(self) -> None:
        for q in [n for n in self.g.nodes if is_op(n, ops.QUANTIZE_ACT) and info(n).get("role") == "act_quant"]:
            lins = [u for u in q.users if is_op(u, ops.LINEAR)]
            kind = self.act_kind(q)
            why = None if kind else "only int8 activations (dynamic symmetric per token, or static per tensor) lower"
            why = why or next((w for w in map(self.linear_ok, lins) if w), None)
            if why:
                self.refuse(q, why)
                continue
            x = q.args[0]
            with self.g.inserting_before(q):
                if kind == "dynamic":
                    dq = _new(self.g, npu.DYNAMIC_QUANT, (x, None), q, role="dynamic_quant")
                    codes = _new(self.g, operator.getitem, (dq, 0), q, role="act_codes")
                    tscale = _new(self.g, operator.getitem, (dq, 1), q, role="act_scale")
                else:
                    zp = q.args[2]
                    zpf = None
                    if zp is not None:
                        zpf = _const(self.qm, self.g, f"{zp.target.removesuffix('_zero_point')}_offset",
                                     self.qm.store[zp.target].float())
                    codes = _new(self.g, npu.QUANTIZE, (x, q.args[1], zpf, True), q, role="quantize")
                    tscale = None
            for lin in lins:
                self.lower_quant_matmul(lin, codes, tscale, q)
            self.g.erase_node(q)

    def lower_quant_matmul(self, lin: fx.Node, codes_x: fx.Node, tscale: fx.Node | None, q: fx.Node) -> None:
        wc, ws, _, _ = _weight_parts(lin)
        bias = lin.args[2] if len(lin.args) > 2 else None
        base = info(lin)["module"]
        with self.g.inserting_before(lin):
            wt = _new(self.g, aten.t.default, (wc,), lin, role="weight_t")
            if tscale is not None:  # dynamic: per-channel weight scale, per-token activation scale
                wsv = _new(self.g, aten.view.default, (ws, [-1]), lin, role="weight_scale")
                y = _new(self.g, npu.QUANT_MATMUL, (codes_x, wt, wsv, None, tscale, bias, self.dtype), lin)
            else:  # static: deq_scale and quant_bias computed offline
                s_in = self.qm.store[q.args[1].target].float()
                w_s = self.qm.store[ws.target].float().reshape(-1)
                deq = s_in * w_s
                deq_t = npu.trans_quant_param(deq) if self.truncate else deq
                deq_f = npu.deq_scale_value(deq_t) if self.truncate else deq
                qb = torch.zeros_like(w_s)
                if bias is not None and self.int_bias:
                    qb = self.qm.store[bias.target].float() / deq_f
                if q.args[2] is not None:
                    zp = self.qm.store[q.args[2].target].float()
                    qb = qb - _codes_value(self.qm, wc).float().sum(1) * zp
                deq_n = _const(self.qm, self.g, f"{base}.deq_scale", deq_t)
                qb_n = _const(self.qm, self.g, f"{base}.quant_bias", torch.round(qb).to(torch.int32))
                y = _new(self.g, npu.QUANT_MATMUL, (codes_x, wt, deq_n, None, None, qb_n, self.dtype), lin)
                if bias is not None and not self.int_bias:  # float bias after dequantization
                    y = _new(self.g, aten.add.Tensor, (y, bias), lin)
        lin.replace_all_uses_with(y)
        self.g.erase_node(lin)

    def lower_weight_only(self) -> None:
        for lin in [n for n in self.g.nodes if is_op(n, ops.LINEAR)]:
            parts = _weight_parts(lin)
            if parts is None or is_op(lin.args[0], ops.QUANTIZE_ACT):
                continue
            codes, ws, zp, group = parts
            why = npu.check_weight_quant_batchmatmul(group)
            if why:
                self.refuse(lin, why)
                continue
            bias = lin.args[2] if len(lin.args) > 2 else None
            base = info(lin)["module"]
            s = self.qm.store[ws.target].float()
            with self.g.inserting_before(lin):
                ct = _new(self.g, aten.t.default, (codes,), lin, role="weight_t")
                st = _const(self.qm, self.g, f"{base}.antiquant_scale", s.t().contiguous() if group else s.reshape(-1))
                ot = None
                if zp is not None:
                    o = -self.qm.store[zp.target].float()
                    ot = _const(self.qm, self.g, f"{base}.antiquant_offset", o.t().contiguous() if group else o.reshape(-1))
                y = _new(self.g, npu.WEIGHT_QUANT_BATCHMATMUL, (lin.args[0], ct, st, ot, bias, group), lin)
            lin.replace_all_uses_with(y)
            self.g.erase_node(lin)

    # ---- SwiGLU + quant: gate/up as one matmul, then swiglu_quant for down_proj --------------
    def fuse_swiglu(self) -> None:
        for mul in [n for n in self.g.nodes if is_op(n, aten.mul.Tensor)]:
            users = list(mul.users)
            if len(users) != 1 or not is_op(users[0], npu.DYNAMIC_QUANT):
                continue
            a, b = mul.args
            if not (is_op(a, aten.silu.default) and is_op(a.args[0], npu.QUANT_MATMUL) and is_op(b, npu.QUANT_MATMUL)):
                continue
            gate, up = a.args[0], b
            if gate.args[0] is not up.args[0] or gate.args[4] is not up.args[4] or len(gate.users) != 1 \
                    or len(up.users) != 1 or gate.args[5] is not None or up.args[5] is not None:
                continue
            wg, wu = gate.args[1].args[0], up.args[1].args[0]  # t(codes)
            sg, su = gate.args[2].args[0], up.args[2].args[0]  # view(scale)
            base = info(gate)["module"].rsplit(".", 1)[0] + ".gate_up_proj"
            with self.g.inserting_before(gate):
                wcat = _const(self.qm, self.g, f"{base}.weight",
                              torch.cat([_codes_value(self.qm, wg), _codes_value(self.qm, wu)]))
                scat = _const(self.qm, self.g, f"{base}.weight_scale",
                              torch.cat([self.qm.store[sg.target], self.qm.store[su.target]]).reshape(-1).float())
                wt = _new(self.g, aten.t.default, (wcat,), gate, role="weight_t", module=base)
                gu = _new(self.g, npu.QUANT_MATMUL, (gate.args[0], wt, scat, None, gate.args[4], None, self.dtype), gate,
                          role="gate_up", module=base)
            dq = users[0]
            with self.g.inserting_before(dq):
                sq = _new(self.g, npu.SWIGLU_QUANT, (gu,), dq, role="swiglu_quant")
            dq.replace_all_uses_with(sq)
            for n in (dq, mul, a, b, gate):
                self.g.erase_node(n)

    # ---- norms -----------------------------------------------------------------------------
    def lower_norms(self) -> None:
        for norm in [n for n in self.g.nodes if is_op(n, ops.RMS_NORM)]:
            x, w, eps = norm.args[:3]
            offset = norm.args[3] if len(norm.args) > 3 else 0.0
            with self.g.inserting_before(norm):
                if offset:
                    w = _const(self.qm, self.g, f"{w.target}_plus_offset", self.qm.store[w.target].float() + offset)
                users = list(norm.users)
                quantizer = users[0] if len(users) == 1 and users[0].target in QUANT_KERNELS else None
                if self.fuse and is_op(x, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in x.args):
                    a, b = x.args
                    if quantizer is not None and quantizer.target == npu.DYNAMIC_QUANT:
                        fused = _new(self.g, npu.ADD_RMS_NORM_DYNAMIC_QUANT, (a, b, w, None, eps), norm,
                                     role="add_rms_norm_dynamic_quant")
                        self._rewire_tuple(quantizer, fused, {0: 0, 1: 2})
                        out_sum = 1
                    elif quantizer is not None:  # static
                        zp = quantizer.args[2]  # constants made here: the quantizer's come after the norm
                        fused = _new(self.g, npu.ADD_RMS_NORM_QUANT,
                                     (a, b, w, self._per_channel(quantizer.args[1], w),
                                      None if zp is None else self._per_channel(zp, w), eps, True),
                                     norm, role="add_rms_norm_quant")
                        y = _new(self.g, operator.getitem, (fused, 0), norm, role="act_codes")
                        quantizer.replace_all_uses_with(y)
                        self.g.erase_node(quantizer)
                        out_sum = 1
                    else:
                        fused = _new(self.g, npu.ADD_RMS_NORM, (a, b, w, eps), norm, role=info(norm).get("role"))
                        y = _new(self.g, operator.getitem, (fused, 0), norm)
                        norm.replace_all_uses_with(y)
                        out_sum = 2
                    s = _new(self.g, operator.getitem, (fused, out_sum), norm, role="residual")
                    x.replace_all_uses_with(s)
                    if not norm.users:
                        self.g.erase_node(norm)
                    self.g.erase_node(x)
                    continue
                r = _new(self.g, npu.RMS_NORM, (x, w, eps), norm)
                y = _new(self.g, operator.getitem, (r, 0), norm)
            norm.replace_all_uses_with(y)
            self.g.erase_node(norm)

    def _rewire_tuple(self, old: fx.Node, new: fx.Node, index_map: dict[int, int]) -> None:
        """Point getitem(old, i) users at getitem(new, index_map[i])."""
        for u in list(old.users):
            if u.target is operator.getitem:
                u.args = (new, index_map[u.args[1]])
        self.g.erase_node(old)

    def _per_channel(self, scale: fx.Node, w: fx.Node) -> fx.Node:
        n = self.qm.store.spec(w.target)[0][-1]
        return _const(self.qm, self.g, f"{scale.target}_per_channel", self.qm.store[scale.target].float().expand(n))

    def run(self) -> dict:
        self.lower_act_groups()
        self.lower_weight_only()
        if self.fuse:
            self.fuse_swiglu()
        self.lower_norms()
        self.g.eliminate_dead_code()
        return {"refused": self.refused, "kernels": kernel_counts(self.qm)}


def kernel_counts(qm: QModel) -> dict:
    """Per decoder layer: standalone quantization kernels, fused norm/activation+quant kernels,
    quantized matmuls (the numbers ``ptqc inspect --ops`` shows)."""
    out: dict = {}
    for n in qm.graph.nodes:
        if n.op != "call_function":
            continue
        layer = info(n).get("layer")
        if layer is None:
            continue
        c = out.setdefault(layer, {"standalone_quant": 0, "fused_quant": 0, "quant_matmul": 0, "weight_quant_matmul": 0})
        if n.target in QUANT_KERNELS:
            c["standalone_quant"] += 1
        elif n.target in FUSED_QUANT:
            c["fused_quant"] += 1
        elif n.target == npu.QUANT_MATMUL:
            c["quant_matmul"] += 1
        elif n.target == npu.WEIGHT_QUANT_BATCHMATMUL:
            c["weight_quant_matmul"] += 1
    return dict(sorted(out.items()))


def lower(qm: QModel, fuse: bool = True, truncate: bool = True, fallback: bool = False, int_bias: bool = True) -> dict:
    return Lowering(qm, fuse, truncate, fallback, int_bias).run()


def kernel_report(qm: QModel) -> list[dict]:
    """Quantization kernels per decoder layer: naive (one per quantized linear), shared (one per
    quantize_act node, ``fuse=false``), fused (``fuse=true``). A graph that is already lowered is
    reported as it is."""
    if any(str(n.target).startswith("ptqc_npu.") for n in qm.graph.nodes if n.op == "call_function"):
        return [{"layer": k, "fused": c["standalone_quant"], "fused_kernels": c["fused_quant"],
                 "quant_matmul": c["quant_matmul"]} for k, c in kernel_counts(qm).items()]
    shared, fused = qm.clone(), qm.clone()
    lower(shared, fuse=False, fallback=True)
    lower(fused, fuse=True, fallback=True)
    s, f = kernel_counts(shared), kernel_counts(fused)
    return [{"layer": k, "naive": s[k]["quant_matmul"], "shared": s[k]["standalone_quant"],
             "fused": f.get(k, {}).get("standalone_quant", 0), "fused_kernels": f.get(k, {}).get("fused_quant", 0),
             "quant_matmul": f.get(k, {}).get("quant_matmul", 0)} for k in s]
