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
    W4A4 dynamic   quantize_act(x, None, bits=4, per token, sym) -> linear(., int4 codes, per channel)
                   => c, s = dynamic_quant_int4(x)         (npu_dynamic_quant(dst_type=quint4x2):
                      quant_matmul(c, W^T, w_scale,             codes int32 [.., k / 8]; one per
                                   pertoken_scale=s) + bias     quantize_act node)
                      W = convert_weight_to_int4pack(codes) int32 [n, k / 8] packed offline along K
                      (8 per int32, low nibble first), passed transposed; the float bias is added
                      after (int4 quant_matmul takes an int32 bias only)
    transform+int4 quantize_act(transform(x, a, b), None, bits=4, clip) -> int4 linears
                   => c, s = kronecker_quant(x, a^T, b, clip)   (npu_kronecker_quant: FlatQuant's
                      P1 kron P2 and rotate's online Hadamard a kron b; N = b's size % 8 == 0)
                   quantize_act(transform(x, a), ..., clip=1), a [K, K] fitting npu_rotate_quant
                   => c, s = rotate_quant(x, a)                 (x a with no b; else
                                                                 kronecker_quant(x, [[1]], a, clip))
                      (fuse=true; with fuse=false only where the clip ratio < 1 needs it: the
                      kernel npu_dynamic_quant has no clip ratio, which is refused otherwise)
    transform      transform(x, a, b) no kernel above took (Q/K Hadamards, before int8 or float
                   inputs) => float matmuls in the activation dtype: x @ a, or
                      flatten(a^T @ unflatten(x) @ b)   (counted as ``float_transform``)
    weight-only    linear(x, dequantize_weight(codes, scale, zp, group))       (W8A16 / W4A16)
                   => weight_quant_batchmatmul(x, codes^T, scale^T, -zp^T, bias, group)
    RMSNorm        rms_norm(x)                   => rms_norm(x)[0]  (Gemma's 1 + w folded)
                   rms_norm(add(a, b))           => add_rms_norm(a, b)            (fuse=true)
                   dynamic_quant(add_rms_norm)   => add_rms_norm_dynamic_quant    (fuse=true)
    smooth scales  dynamic_quant(x * c) (smooth:fold=false) => dynamic_quant(x, smooth_scales=c),
                   then carried into add_rms_norm_dynamic_quant / swiglu_quant   (fuse=true)
                   quantize(add_rms_norm)        => add_rms_norm_quant            (fuse=true)
    SwiGLU + quant dynamic_quant(silu(gate) * up) with gate/up sharing one dynamic quant
                   => one quant_matmul on the concatenated [gate; up] weight, then
                      swiglu_quant(., dynamic) feeding down_proj               (fuse=true)
    Attention      attention(q, k, v) (float K/V)                        (attention=fia, default)
                   => fused_infer_attention_score(q, k, v, mask, BNSD, GQA num_key_value_heads,
                      sparse_mode 3 = right-down causal, or 4 = band for a sliding window)
                   attention(q, quantize_act(k, k_scale), quantize_act(v, v_scale))  (static KV8)
                   => kc = quantize(k as [B, S, KV_N * D], per-channel scale, offset)  (cache
                      write, as vllm-ascend's C8 does; same for v; counted as cache_quant)
                      fused_infer_attention_score(q, kc, vc, antiquant_scale (2, KV_N, 1, D),
                                                  antiquant_offset = -zero point)
                   A dynamic (per-token) K or V is refused: the kernel reads it only in decode
                   (query length <= 16). Note the lowered prompt reads its own int8 cache, as the
                   fake-quant graph does; vllm-ascend's PrefillNoCache runs the prompt on float K/V.
                   attention(q, k, v) (float)        (attention=softmax | add_softmax, causal only)
                   => s = q @ k^T; scaled_masked_softmax(s, triu mask, scale) @ v, or
                      dropout_with_add_softmax(s, additive mask, scale, p=0)[2] @ v
                      (shape limits checked at run time, and when lowering if seqlen is given;
                      attention=softmax with fuse picks the fused add-softmax form where the
                      known seqlen is 128/256/384/512 and the head count a multiple of 32)

With ``fuse=false`` every linear gets its own quantization kernel (the naive lowering, kept for
comparison). A linear no rule takes (e.g. W4A8: no int8 x int4 npu_quant_matmul is documented;
int4 activations with a clip ratio and no Kronecker transform before them; a group size the
kernel refuses; K over 65535) stops the lowering with the reason, unless ``fallback=true`` leaves it as a float
fake-quant op (an attention the kernels cannot take stays ``ptqc.attention``).
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
INT4_QUANT_KERNELS = (npu.DYNAMIC_QUANT_INT4,)  # standalone too; kept out of QUANT_KERNELS (no int4 norm fusion)
TRANSFORM_QUANT = (npu.KRONECKER_QUANT, npu.ROTATE_QUANT)  # transform + quantization: counted as fused_quant
ATTENTION_MODES = ("fia", "softmax", "add_softmax", "keep")
ATTENTION_KERNELS = (npu.FUSED_INFER_ATTENTION_SCORE, npu.SCALED_MASKED_SOFTMAX, npu.DROPOUT_WITH_ADD_SOFTMAX)
CACHE_ROLES = ("k_cache_quant", "v_cache_quant")


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
                 int_bias: bool = True, attention: str = "fia", seqlen: int = 0):
        self.qm, self.g = qm, qm.graph
        self.fuse, self.truncate, self.fallback, self.int_bias = fuse, truncate, fallback, int_bias
        if attention not in ATTENTION_MODES:
            raise PtqcError(f"attention={attention!r} is not one of {', '.join(ATTENTION_MODES)}")
        self.attention, self.seqlen = attention, seqlen
        self._score_masks: dict = {}
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
        if bits == 4 and scale is None and group == 0 and sym:
            return "dynamic4"  # W4A4; a clip ratio < 1 only lowers through npu_kronecker_quant
        if bits != 8:
            return None
        if scale is None and group == 0 and sym and clip == 1.0:
            return "dynamic"
        if scale is not None and self.qm.store[scale.target].numel() == 1:
            return "static"
        return None

    def linear_ok(self, lin: fx.Node, a_bits: int = 8) -> str | None:
        parts = _weight_parts(lin)
        if parts is None:
            return "its weight is float"
        codes, s, zp, group = parts
        if a_bits == 8 and _bits(lin) == 4:
            return ("W4A8 (int8 activations x int4 weights) has no documented npu_quant_matmul combination "
                    "(int8 x int8, or int4 x int4 packed in int32); use w4a4 or int8")
        if a_bits == 4 and (_bits(lin) != 4 or zp is not None or group != 0):
            return "W4A4 needs int4 symmetric per-channel weights (npu_quant_matmul on int4 x int4)"
        if a_bits == 8 and (_bits(lin) != 8 or zp is not None or group != 0):
            return "W8A8 needs int8 symmetric per-channel weights"
        n, k = _codes_value(self.qm, codes).shape
        if a_bits == 4 and (k % 8 or n % 8):
            return f"int4 npu_quant_matmul needs K and N to be multiples of 8 (packed 8 per int32; got K={k}, N={n})"
        return npu.check_quant_matmul(k, n)

    def lower_act_groups(self) -> None:
        for q in [n for n in self.g.nodes if is_op(n, ops.QUANTIZE_ACT) and info(n).get("role") == "act_quant"]:
            lins = [u for u in q.users if is_op(u, ops.LINEAR)]
            kind = self.act_kind(q)
            why = None if kind else ("only int8 activations (dynamic symmetric per token, or static per tensor) and "
                                     "int4 dynamic symmetric per-token ones lower")
            why = why or next((w for w in (self.linear_ok(lin, 4 if kind == "dynamic4" else 8) for lin in lins) if w), None)
            if why:
                self.refuse(q, why)
                continue
            if kind == "dynamic4":
                self.lower_int4_group(q, lins)
                continue
            x = q.args[0]
            smooth = None
            if kind == "dynamic" and self.fuse and is_op(x, aten.mul.Tensor) and len(x.users) == 1 \
                    and info(x).get("role") == "smooth_scale":  # smooth:fold=false -> the kernel's smooth_scales
                x, smooth = x.args
            with self.g.inserting_before(q):
                if kind == "dynamic":
                    dq = _new(self.g, npu.DYNAMIC_QUANT, (x, smooth), q, role="dynamic_quant")
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
            mul = q.args[0]
            for lin in lins:
                self.lower_quant_matmul(lin, codes, tscale, q)
            self.g.erase_node(q)
            if smooth is not None:
                self.g.erase_node(mul)

    def lower_quant_matmul(self, lin: fx.Node, codes_x: fx.Node, tscale: fx.Node | None, q: fx.Node) -> None:
        wc, ws, _, _ = _weight_parts(lin)
        bias = lin.args[2] if len(lin.args) > 2 else None
        base = info(lin)["module"]
        with self.g.inserting_before(lin):
            if q.args[3] == 4:  # W4A4: weight packed offline 8 per int32 along K ([n, k / 8]), passed as its .t()
                packed = npu.convert_weight_to_int4pack(_codes_value(self.qm, wc).to(torch.int32))
                wt = _new(self.g, aten.t.default, (_const(self.qm, self.g, f"{base}.weight_packed", packed),), lin,
                          role="weight_t")
                wsv = _new(self.g, aten.view.default, (ws, [-1]), lin, role="weight_scale")
                y = _new(self.g, npu.QUANT_MATMUL, (codes_x, wt, wsv, None, tscale, None, self.dtype), lin)
                if bias is not None:  # int4 takes an int32 bias only: the float bias is added after (as vllm-ascend)
                    y = _new(self.g, aten.add.Tensor, (y, bias), lin)
                lin.replace_all_uses_with(y)
                self.g.erase_node(lin)
                return
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

    # ---- W4A4: per-token int4 quantization, fused with the transform before it where a kernel fits --
    def _transform_quant(self, t: fx.Node, clip: float):
        """(kernel, float32 operands) of a transform + per-token int4 quantization, or the reason none fits:
        ``x (a kron b)`` is npu_kronecker_quant(p1 = a^T, p2 = b, clip); ``x a`` (no b) is
        npu_rotate_quant(a) when clip is 1 and a fits it, else npu_kronecker_quant(p1 = [[1]], p2 = a)."""
        a, b = t.args[1], t.args[2] if len(t.args) > 2 else None
        av = self.qm.store[a.target].float()
        if b is None:
            if clip == 1.0 and npu.check_rotate_quant(av.shape[0], av.shape[1]) is None and av.shape[0] == av.shape[1]:
                return npu.ROTATE_QUANT, (av,)
            p1, p2 = torch.ones(1, 1), av
        else:
            p1, p2 = av.t(), self.qm.store[b.target].float()
        if p1.shape[0] != p1.shape[1] or p2.shape[0] != p2.shape[1]:
            return "npu_kronecker_quant takes square factors"
        return npu.check_kronecker_quant(p1.shape[0], p2.shape[0]) or (npu.KRONECKER_QUANT, (p1, p2))

    def lower_int4_group(self, q: fx.Node, lins: list[fx.Node]) -> None:
        """W4A4 dynamic: one int4 quantization kernel per quantize_act node (dynamic_quant_int4, or
        kronecker_quant / rotate_quant taking the transform that feeds it), then int4 quant_matmuls."""
        x = q.args[0]
        clip = q.args[6] if len(q.args) > 6 else 1.0
        fused = None
        if is_op(x, ops.TRANSFORM) and len(x.users) == 1 and (self.fuse or clip != 1.0):
            fused = self._transform_quant(x, clip)
            if isinstance(fused, str):
                if clip != 1.0:
                    self.refuse(q, f"{fused}, and the clip ratio {clip:.4g} has no other kernel")
                    return
                fused = None
        if fused is None and clip != 1.0:
            self.refuse(q, f"int4 per-token quantization with clip ratio {clip:.4g} lowers only fused with a Kronecker "
                           "transform before it (npu_kronecker_quant); npu_dynamic_quant takes no clip ratio")
            return
        with self.g.inserting_before(q):
            if fused is None:
                dq = _new(self.g, npu.DYNAMIC_QUANT_INT4, (x, None), q, role="dynamic_quant")
            else:
                kernel, mats = fused
                base = info(x).get("module") or info(q)["module"]
                names = ("rotation",) if kernel == npu.ROTATE_QUANT else ("kronecker_p1", "kronecker_p2")
                consts = [_const(self.qm, self.g, f"{base}.{nm}", m.to(self.dtype)) for nm, m in zip(names, mats)]
                args = (x.args[0], *consts, True) if kernel == npu.ROTATE_QUANT else (x.args[0], *consts, float(clip))
                dq = _new(self.g, kernel, args, q, role="rotate_quant" if kernel == npu.ROTATE_QUANT else "kronecker_quant")
            codes = _new(self.g, operator.getitem, (dq, 0), q, role="act_codes")
            tscale = _new(self.g, operator.getitem, (dq, 1), q, role="act_scale")
        for lin in lins:
            self.lower_quant_matmul(lin, codes, tscale, q)
        self.g.erase_node(q)
        if fused is not None and not x.users:
            self.g.erase_node(x)

    def _as_dtype(self, a: fx.Node) -> fx.Node:
        t = self.qm.store[a.target]
        return a if t.dtype == self.dtype else _const(self.qm, self.g, f"{a.target}_{str(self.dtype)[6:]}", t.to(self.dtype))

    def lower_transforms(self) -> None:
        """ptqc.transform nodes no fused kernel took (Q/K rotations, transforms before int8 or float
        inputs): plain float matmuls in the activation dtype, ``x a`` or ``vec(a^T X b)``."""
        for t in [n for n in self.g.nodes if is_op(n, ops.TRANSFORM)]:
            x, a = t.args[0], t.args[1]
            b = t.args[2] if len(t.args) > 2 else None
            with self.g.inserting_before(t):
                an = self._as_dtype(a)
                if b is None:
                    y = _new(self.g, aten.matmul.default, (x, an), t, role="float_transform")
                else:
                    bn = self._as_dtype(b)
                    n1, n2 = self.qm.store[a.target].shape[0], self.qm.store[b.target].shape[0]
                    u = _new(self.g, aten.unflatten.int, (x, -1, [n1, n2]), t, role="transform_layout")
                    at = _new(self.g, aten.t.default, (an,), t, role="transform_layout")
                    h = _new(self.g, aten.matmul.default, (at, u), t, role="transform_matmul")
                    h = _new(self.g, aten.matmul.default, (h, bn), t, role="transform_matmul")
                    y = _new(self.g, aten.flatten.using_ints, (h, -2, -1), t, role="float_transform")
            t.replace_all_uses_with(y)
            self.g.erase_node(t)

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
            if npu.check_swiglu_quant(2 * _codes_value(self.qm, gate.args[1].args[0]).shape[0]):
                continue  # too wide for the kernel: gate/up and the dynamic quant stay separate
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
                sq = _new(self.g, npu.SWIGLU_QUANT, (gu, True, dq.args[1]), dq, role="swiglu_quant")
            dq.replace_all_uses_with(sq)
            for n in (dq, mul, a, b, gate):
                self.g.erase_node(n)

    # ---- attention: fused attention (float or int8 KV cache) or matmul + softmax kernel + matmul -------
    def _shape(self, n: fx.Node):
        while n.meta.get("shape") is None and is_op(n, ops.QUANTIZE_ACT):
            n = n.args[0]
        return n.meta.get("shape")

    def _mask(self, name: str, t: torch.Tensor) -> fx.Node:
        if name not in self.qm.store:
            self.qm.store[name] = t
        return self.g.get_attr(name)

    def _kv_cache(self, att: fx.Node, hkv: int, d: int):
        """(antiquant_scale, antiquant_offset) tensors of a static int8 K/V cache, or (None, reason)."""
        kq, vq = att.args[1], att.args[2]
        if not (is_op(kq, ops.QUANTIZE_ACT) or is_op(vq, ops.QUANTIZE_ACT)):
            return None, None
        if not (is_op(kq, ops.QUANTIZE_ACT) and is_op(vq, ops.QUANTIZE_ACT)):
            return None, "a KV cache with only one of K and V quantized has no Ascend kernel"
        scales, offsets = [], []
        for q in (kq, vq):
            x, scale, zp, bits = q.args[:4]
            if bits != 8:
                return None, f"{bits}-bit KV caches need the int4 decode path of npu_fused_infer_attention_score"
            if scale is None:
                return None, ("npu_fused_infer_attention_score reads a per-token (dynamic) KV8 cache only when "
                              "decoding (query length <= 16), a prompt needs static K and V scales (kv:k=channel,v=channel)")
            scales.append(self.qm.store[scale.target].float())
            offsets.append(None if zp is None else -self.qm.store[zp.target].float())
        if all(s.numel() == 1 for s in scales):  # per tensor: shape (2,)
            sc = torch.cat([s.reshape(1) for s in scales])
            of = None if all(o is None for o in offsets) else torch.cat(
                [(o if o is not None else torch.zeros(1)).reshape(1) for o in offsets])
        else:  # per channel (a per-tensor side expands exactly): (2, KV_N, 1, D)
            sc = torch.stack([s.expand(hkv, 1, d) for s in scales])
            of = None if all(o is None for o in offsets) else torch.stack(
                [(o if o is not None else torch.zeros(1)).expand(hkv, 1, d) for o in offsets])
        return (sc, of), None

    def _cache_write(self, q: fx.Node, hkv: int, d: int, att: fx.Node) -> fx.Node:
        """npu_quantize of K or V as the cache stores it: [B, S, KV_N * D] with per-channel scales, then
        viewed back to BNSD for the attention kernel."""
        x, scale, zp = q.args[:3]
        n = hkv * d
        base = info(att)["module"] + "." + info(q)["role"].split("_")[0]
        s = _const(self.qm, self.g, f"{base}_cache_scale", self.qm.store[scale.target].float().expand(hkv, 1, d).reshape(n))
        o = None if zp is None else _const(self.qm, self.g, f"{base}_cache_offset",
                                            self.qm.store[zp.target].float().expand(hkv, 1, d).reshape(n))
        t = _new(self.g, aten.transpose.int, (x, 1, 2), q, role="cache_layout")
        f = _new(self.g, aten.flatten.using_ints, (t, 2), q, role="cache_layout")
        c = _new(self.g, npu.QUANTIZE, (f, s, o, True), q, role=info(q)["role"])
        u = _new(self.g, aten.unflatten.int, (c, -1, [hkv, d]), q, role="cache_layout")
        return _new(self.g, aten.transpose.int, (u, 1, 2), q, role="kv_cache")

    def _score_mask(self, s: fx.Node, att: fx.Node, mode: str, h: int) -> fx.Node:
        """The causal mask over the scores ``s`` [B, H, S, S]: bool (True = masked) for the softmax
        kernel, additive (dtype min) for the add-softmax one. Built once, at the first attention
        that needs it, and shared by the later layers (same shape)."""
        key = (mode, h)
        if key not in self._score_masks:
            ones = _new(self.g, aten.ones_like.default, (s,), att, role="mask")
            ones.kwargs = {"dtype": torch.bool}
            mask = _new(self.g, aten.triu.default, (ones, 1), att, role="mask")
            if mode != "softmax":
                zeros = _new(self.g, aten.zeros_like.default, (s,), att, role="mask")
                mask = _new(self.g, aten.masked_fill.Scalar, (zeros, mask, torch.finfo(self.dtype).min), att,
                            role="mask")
            self._score_masks[key] = mask
        return self._score_masks[key]

    def lower_attention(self) -> None:
        for att in [n for n in self.g.nodes if is_op(n, ops.ATTENTION)]:
            q, k, v, scale = att.args[:4]
            causal = att.kwargs.get("causal", att.args[4] if len(att.args) > 4 else True)
            window = att.kwargs.get("window", att.args[5] if len(att.args) > 5 else -1)
            qs, ks = self._shape(q), self._shape(k)
            if qs is None or ks is None:
                self.refuse(att, "attention shapes are unknown (run shape propagation first)")
                continue
            h, hkv, d = qs[1], ks[1], qs[3]
            kv, why = self._kv_cache(att, hkv, d)
            mode = "fia" if kv is not None else self.attention
            if mode == "keep" or why:
                if why:
                    self.refuse(att, why)
                continue
            why = npu.check_fused_infer_attention(h, hkv, d) if mode == "fia" else None
            if mode != "fia" and (not causal or window > 0):
                why = f"attention={mode} lowers causal attention without a sliding window only (use attention=fia)"
            if mode != "fia" and self.seqlen and not why:
                why = (npu.check_scaled_masked_softmax((self.seqlen, self.seqlen)) if mode == "softmax" else
                       npu.check_dropout_with_add_softmax((None, h, self.seqlen, self.seqlen)))
            if why:
                self.refuse(att, why)
                continue
            if mode == "softmax" and self.fuse and self.seqlen in npu.ADD_SOFTMAX_SIZES and h % 32 == 0:
                mode = "add_softmax"  # the fused add + softmax kernel takes this shape for any batch
            with self.g.inserting_before(att):
                if mode == "fia":
                    sparse, pre, nxt, mask = 0, npu.MAX_INT, npu.MAX_INT, None
                    if causal:
                        mask = self._mask("ascend.fia_mask", torch.ones(npu.FIA_MASK, npu.FIA_MASK, dtype=torch.bool).triu(1))
                        sparse = 3 if window <= 0 else 4
                        if window > 0:
                            pre, nxt = window - 1, 0
                    sc = of = None
                    if kv is not None:
                        base = info(att)["module"]
                        sc = _const(self.qm, self.g, f"{base}.antiquant_scale", kv[0].to(self.dtype))
                        of = None if kv[1] is None else _const(self.qm, self.g, f"{base}.antiquant_offset", kv[1].to(self.dtype))
                        k = self._cache_write(k, hkv, d, att)
                        v = self._cache_write(v, hkv, d, att)
                    y = _new(self.g, npu.FUSED_INFER_ATTENTION_SCORE,
                             (q, k, v, mask, sc, of, h, hkv, scale, pre, nxt, "BNSD", sparse), att, role="attention")
                else:
                    if h != hkv:
                        k = _new(self.g, aten.repeat_interleave.self_int, (k, h // hkv, 1), att, role="gqa")
                        v = _new(self.g, aten.repeat_interleave.self_int, (v, h // hkv, 1), att, role="gqa")
                    kt = _new(self.g, aten.transpose.int, (k, -2, -1), att, role="attention")
                    s = _new(self.g, aten.matmul.default, (q, kt), att, role="attention_scores")
                    mask = self._score_mask(s, att, mode, h)
                    if mode == "softmax":
                        p = _new(self.g, npu.SCALED_MASKED_SOFTMAX, (s, mask, scale, False), att, role="softmax")
                    else:
                        r = _new(self.g, npu.DROPOUT_WITH_ADD_SOFTMAX, (s, mask, scale, 0.0, -1), att, role="softmax")
                        p = _new(self.g, operator.getitem, (r, 2), att, role="softmax")
                    y = _new(self.g, aten.matmul.default, (p, v), att, role="attention")
            kv_in = att.args[1:3]
            att.replace_all_uses_with(y)
            self.g.erase_node(att)
            for c in kv_in:
                if is_op(c, ops.QUANTIZE_ACT) and not c.users:
                    self.g.erase_node(c)

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
                        sm = quantizer.args[1]  # smooth scales: a constant, read again here (before the norm)
                        sm = None if sm is None else self.g.get_attr(sm.target)
                        fused = _new(self.g, npu.ADD_RMS_NORM_DYNAMIC_QUANT, (a, b, w, sm, eps), norm,
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
        self.lower_attention()
        self.lower_act_groups()
        self.lower_weight_only()
        if self.fuse:
            self.fuse_swiglu()
        self.lower_transforms()
        self.lower_norms()
        self.g.eliminate_dead_code()
        return {"refused": self.refused, "kernels": kernel_counts(self.qm)}


def kernel_counts(qm: QModel) -> dict:
    """Per decoder layer: standalone quantization kernels (int8 and int4 dynamic_quant, quantize),
    fused norm/activation/transform + quant kernels (kronecker_quant and rotate_quant count here),
    quantized matmuls (the numbers ``ptqc inspect --ops`` shows); ``float_transform`` (transforms
    run as plain float matmuls) appears only in layers that have one."""
    out: dict = {}
    for n in qm.graph.nodes:
        if n.op != "call_function":
            continue
        layer = info(n).get("layer")
        if layer is None:
            continue
        c = out.setdefault(layer, {"standalone_quant": 0, "fused_quant": 0, "quant_matmul": 0, "weight_quant_matmul": 0,
                                   "cache_quant": 0, "attention": 0})
        if n.target in QUANT_KERNELS and info(n).get("role") in CACHE_ROLES:
            c["cache_quant"] += 1  # writing K/V into the int8 cache (C8), not an activation quantization
        elif n.target in ATTENTION_KERNELS:
            c["attention"] += 1
        elif n.target in QUANT_KERNELS:
            c["standalone_quant"] += 1
        elif n.target in FUSED_QUANT or n.target in TRANSFORM_QUANT:
            c["fused_quant"] += 1
        elif n.target in INT4_QUANT_KERNELS:
            c["standalone_quant"] += 1
        elif info(n).get("role") == "float_transform":  # a transform run as plain float matmuls (key only when > 0)
            c["float_transform"] = c.get("float_transform", 0) + 1
        elif n.target == npu.QUANT_MATMUL:
            c["quant_matmul"] += 1
        elif n.target == npu.WEIGHT_QUANT_BATCHMATMUL:
            c["weight_quant_matmul"] += 1
    return dict(sorted(out.items()))


def lower(qm: QModel, fuse: bool = True, truncate: bool = True, fallback: bool = False, int_bias: bool = True,
          attention: str = "fia", seqlen: int = 0) -> dict:
    return Lowering(qm, fuse, truncate, fallback, int_bias, attention, seqlen).run()


def kernel_report(qm: QModel) -> list[dict]:
    """Quantization kernels per decoder layer: naive (one per quantized linear), shared (one per
    quantize_act node, ``fuse=false``), fused (``fuse=true``). A graph that is already lowered is
    reported as it is."""
    def lowered(c):  # what the fused lowering runs besides standalone quantization
        return {"fused_kernels": c.get("fused_quant", 0), "quant_matmul": c.get("quant_matmul", 0),
                "cache_quant": c.get("cache_quant", 0), "attention": c.get("attention", 0),
                "float_transform": c.get("float_transform", 0)}

    if any(str(n.target).startswith("ptqc_npu.") for n in qm.graph.nodes if n.op == "call_function"):
        return [{"layer": k, "fused": c["standalone_quant"], **lowered(c)} for k, c in kernel_counts(qm).items()]
    shared, fused = qm.clone(), qm.clone()
    lower(shared, fuse=False, fallback=True)
    lower(fused, fuse=True, fallback=True)
    s, f = kernel_counts(shared), kernel_counts(fused)
    return [{"layer": k, "naive": s[k]["quant_matmul"], "shared": s[k]["standalone_quant"],
             "fused": f.get(k, {}).get("standalone_quant", 0), **lowered(f.get(k, {}))} for k in s]
