"""ONNX translations of the ptqc dialect (:mod:`ptqc.ops`), registered in :data:`TABLE`; ``mode="integer"``
linears go to :mod:`.integer` first."""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from onnx import TensorProto

from ptqc import ops
from ptqc.errors import PtqcError
from ptqc.ir import is_op
from ptqc.lowering.onnx import kinds
from ptqc.lowering.onnx.emitter import F32, I8, I32, I64, _bytes, _torch_dtype, lowers, onnx_dtype


@lowers(ops.LINEAR, torch.ops.aten.linear.default)
def _linear(L, n, x, w, b=None):
    if L.mode == "integer":
        from ptqc.lowering.onnx import integer

        out = integer.linear(L, n, x, w, b)
        if out is not None:
            return out
    if is_op(w, ops.DEQUANTIZE_WEIGHT) and w.name in L.skip:
        wt = weight_t(L, w)  # DequantizeLinear of the transposed codes: W^T [in, out]
    else:
        wt = L.op("Transpose", L.v(w), perm=[1, 0], name="w_t")
    y = L.op("MatMul", L.v(x), wt)
    if b is not None:
        y = L.op("Add", y, L.v(b))
    return y


def weight_t(L, dq: fx.Node) -> str:
    """W^T [in, out] of a dequantize_weight node read only by linears, as
    ``DequantizeLinear(Transpose(codes))`` (emitted once, named ``<dq>/T``). Transposing the float
    output instead would be ``Transpose(DequantizeLinear(int8))``, a pattern onnxruntime's
    transpose optimizer rewrites into an invalid graph (the model then fails to load)."""
    if dq.name in L._wt_cache:
        return L._wt_cache[dq.name]
    codes, scale, zero_point, group_size, dtype = dq.args
    saved, L.prefix = L.prefix, dq.name
    try:
        cv, n_in = _codes_value(L, codes), L.shape(codes)[-1]
        if zero_point is not None:
            y = L.op("Transpose", explicit_dequantize(L, cv, scale, zero_point, group_size, n_in), perm=[1, 0],
                     name="T")
        else:
            ct = L.op("Transpose", cv, perm=[1, 0], name="codes_t")
            y = dequantize_linear(L, ct, scale, group_size, n_in, transposed=True, name="T")
        y = L.cast(y, torch.float32, _torch_dtype(dtype))
    finally:
        L.prefix = saved
    L._wt_cache[dq.name] = y
    return y


@lowers(ops.RMS_NORM)
def _rms_norm(L, n, x, w, eps, offset=0.0):
    dt = L.dt(x)
    h = L.cast(L.v(x), dt, torch.float32)
    ms = L.op("ReduceMean", L.op("Mul", h, h), L.ints([-1]), keepdims=1)
    h = L.op("Mul", h, L.op("Reciprocal", L.op("Sqrt", L.op("Add", ms, L.const(eps)))))
    if offset == 0.0:  # w * normed.to(input dtype), in the promoted dtype
        out_dt = L.dt(n)
        return L.op("Mul", L.cast(L.v(w), L.dt(w), out_dt), L.cast(h, torch.float32, out_dt))
    wf = L.cast(L.v(w), L.dt(w), torch.float32)
    return L.cast(L.op("Mul", h, L.op("Add", L.const(offset), wf)), torch.float32, dt)


@lowers(ops.LAYER_NORM)
def _layer_norm(L, n, x, w, b, eps):
    """LayerNormalization over the last dim, in float32 (weight and bias cast to it)."""
    if w is None:
        raise PtqcError(f"node {n.name}: a LayerNorm without a weight has no ONNX translation here")
    dt = L.dt(x)
    args = [L.cast(L.v(x), dt, torch.float32), L.cast(L.v(w), L.dt(w), torch.float32)]
    if b is not None:
        args.append(L.cast(L.v(b), L.dt(b), torch.float32))
    return L.cast(L.op("LayerNormalization", *args, axis=-1, epsilon=float(eps)), torch.float32, dt)


@lowers(ops.ATTENTION)
def _attention(L, n, q, k, v, scale, causal=True, window=-1, softcap=0.0):
    """softmax(q k^T * scale + causal/window mask) v; GQA by viewing q as [B, Hkv, rep, S, D];
    ``softcap`` > 0: scores -> softcap * tanh(scores / softcap) before the mask."""
    H, Hkv, D = L.shape(q)[1], L.shape(k)[1], L.shape(q)[3]
    Dv = L.shape(v)[3]
    if not all(isinstance(d, int) for d in (H, Hkv, D, Dv)):
        raise PtqcError(f"node {n.name}: attention needs static head counts and head sizes")
    rep = H // Hkv
    qv, kv, vv = L.v(q), L.v(k), L.v(v)
    if rep > 1:
        qv = L.op("Reshape", qv, L.ints([0, Hkv, rep, -1, D]))
        kv = L.op("Unsqueeze", kv, L.ints([2]))
        vv = L.op("Unsqueeze", vv, L.ints([2]))
    r = 5 if rep > 1 else 4
    kt = L.op("Transpose", kv, perm=[*range(r - 2), r - 1, r - 2])
    s = L.op("Mul", L.op("MatMul", qv, kt), L.const(scale, onnx_dtype(L.dt(q))))
    if softcap > 0:
        cap = L.const(softcap, onnx_dtype(L.dt(q)))
        s = L.op("Mul", L.op("Tanh", L.op("Div", s, cap)), cap)
    if causal:
        sq = L.op("Squeeze", L.op("Shape", L.v(q), start=2, end=3), L.ints([0]))
        sk = L.op("Squeeze", L.op("Shape", L.v(k), start=2, end=3), L.ints([0]))
        zero, one = L.const(0, I64), L.const(1, I64)
        i = L.op("Add", L.op("Range", zero, sq, one), L.op("Sub", sk, sq))
        j = L.op("Range", zero, sk, one)
        i2 = L.op("Unsqueeze", i, L.ints([1]))
        j2 = L.op("Unsqueeze", j, L.ints([0]))
        mask = L.op("LessOrEqual", j2, i2)
        if window > 0:
            mask = L.op("And", mask, L.op("Greater", j2, L.op("Sub", i2, L.const(window, I64))))
        s = L.op("Where", mask, s, L.const(-math.inf, onnx_dtype(L.dt(q))))
    # softmax as torch's CPU flash kernel computes it: exp(s - max), weights @ v, then / sum
    e = L.op("Exp", L.op("Sub", s, L.op("ReduceMax", s, L.ints([-1]), keepdims=1)))
    o = L.op("Div", L.op("MatMul", e, vv), L.op("ReduceSum", e, L.ints([-1]), keepdims=1))
    if rep > 1:
        o = L.op("Reshape", o, L.ints([0, H, -1, Dv]))
    return o


def _codes_value(L, codes: fx.Node) -> str:
    """Weight codes as an ONNX value: packed int4 codes read directly as an INT4 initializer (``int4``)."""
    packed = _packed_codes(L, codes) if L.int4 else None
    return int4_weight(L, packed) if packed is not None else L.v(codes)


def _packed_codes(L, codes) -> fx.Node | None:
    """The get_attr of packed int4 codes when ``codes`` is unpack_int4(get_attr) used only here."""
    if is_op(codes, ops.UNPACK_INT4) and isinstance(codes.args[0], fx.Node) and codes.args[0].op == "get_attr" \
            and len(codes.users) == 1:
        return codes.args[0]
    return None


def int4_weight(L, packed: fx.Node) -> str:
    """A packed int4 weight [out, in/2] (int8 bytes) as an ONNX INT4 initializer [out, in] (same bytes)."""
    shape, _ = L.qm.store.spec(packed.target)
    dims = [*shape[:-1], shape[-1] * 2]
    name = L.weight_name(packed)
    return L.add_init(name, TensorProto.INT4, dims, lambda t=packed.target: _bytes(L.qm.store[t]),
                      math.prod(shape))


@lowers(ops.UNPACK_INT4)
def _unpack_int4(L, n, packed):
    """int8 bytes -> two sign-extended int4 codes each (low nibble first), in integer ops."""
    if n.name in L.skip:
        return None
    r = L.rank(packed)
    x = L.op("Cast", L.v(packed), to=I32)
    u = L.op("BitwiseAnd", x, L.const(255, I32))

    def sext(v):
        return L.op("Where", L.op("GreaterOrEqual", v, L.const(8, I32)), L.op("Sub", v, L.const(16, I32)), v)
    lo = sext(L.op("BitwiseAnd", u, L.const(15, I32)))
    hi = sext(L.op("Div", u, L.const(16, I32)))
    both = L.op("Concat", L.op("Unsqueeze", lo, L.ints([-1])), L.op("Unsqueeze", hi, L.ints([-1])), axis=-1)
    return L.op("Cast", L.op("Reshape", both, L.ints([0] * (r - 1) + [-1])), to=I8)


def dequantize_linear(L, codes: str, scale: fx.Node, group: int, n_in: int, transposed: bool = False,
                      name: str | None = None) -> str:
    """DequantizeLinear of symmetric weight codes [out, in] (``transposed``: [in, out]) with ptqc
    scales [out, groups]: per channel (``axis`` = the output dim), per tensor (a scalar) or per
    group along the input dim (opset 21 ``block_size``). Int8 or INT4 codes."""
    n_out = L.qm.store.spec(scale.target)[0][0]
    if group in (0, n_in):
        dims, attrs = [n_out], {"axis": 1 if transposed else 0}
    elif group == -1:
        dims, attrs = [], {}
    else:
        dims, attrs = None, {"axis": 0 if transposed else 1, "block_size": group}
    s = L.v(scale)
    if dims is not None:
        s = L.op("Reshape", s, L.ints(dims))
    elif transposed:
        s = L.op("Transpose", s, perm=[1, 0])
    return L.op("DequantizeLinear", codes, s, None, name=name, **attrs)


def explicit_dequantize(L, codes: str, scale: fx.Node, zp: fx.Node, group: int, n_in: int) -> str:
    """``(Cast(q) - Cast(zp)) * scale`` on codes [out, in], exactly :func:`ptqc.quant.dequantize`.

    Used for asymmetric weights instead of DequantizeLinear with a zero point: onnxruntime 1.32's
    DequantizeLinear -> MatMul fusion (QDQSelectorActionTransformer, on by default) computes wrong
    results with signed int8/int4 zero points (errors of order 1 on unit-scale weights), so an
    exported model with them would be wrong in a default session."""
    q = L.op("Cast", codes, to=F32)
    z = L.op("Cast", L.v(zp), to=F32)
    s = L.v(scale)
    if group in (0, -1, n_in):  # scale and zero point [out, 1] / [1, 1] broadcast
        return L.op("Mul", L.op("Sub", q, z), s)
    qg = L.op("Reshape", q, L.ints([0, n_in // group, group]))
    yg = L.op("Mul", L.op("Sub", qg, L.op("Unsqueeze", z, L.ints([-1]))), L.op("Unsqueeze", s, L.ints([-1])))
    return L.op("Reshape", yg, L.ints([0, n_in]))


@lowers(ops.DEQUANTIZE_WEIGHT)
def _dequantize_weight(L, n, codes, scale, zero_point, group_size, dtype):
    if n.name in L.skip:  # fused into its readers: linears read W^T (weight_t), integer kernels the codes
        return None
    if L.rank(codes) != 2:
        raise PtqcError(f"node {n.name}: dequantize_weight of a {L.rank(codes)}-d tensor is not supported")
    cv, n_in = _codes_value(L, codes), L.shape(codes)[-1]
    y = (explicit_dequantize(L, cv, scale, zero_point, group_size, n_in) if zero_point is not None
         else dequantize_linear(L, cv, scale, group_size, n_in))
    return L.cast(y, torch.float32, _torch_dtype(dtype))


def act_qparams(L, hg: str, bits: int, group: int, sym: bool, clip: float) -> tuple[str, str | None]:
    """Dynamic scale (and float zero point) of the grouped float32 activation ``hg``, exactly as
    :func:`ptqc.quant.compute_qparams` (symmetric: ``ReduceMax(Abs(x)) [* clip] / qmax``)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    axes = [] if group == -1 else [L.ints([-1])]
    if sym:
        amax = L.op("ReduceMax", L.op("Abs", hg), *axes, keepdims=1)
        if clip != 1.0:
            amax = L.op("Mul", amax, L.const(clip))
        s = L.op("Div", amax, L.const(float(qmax)))
        return L.op("Where", L.op("Greater", s, L.const(0.0)), s, L.const(1.0), name="scale", dtype=F32), None
    lo = L.op("ReduceMin", hg, *axes, keepdims=1)
    hi = L.op("ReduceMax", hg, *axes, keepdims=1)
    if clip != 1.0:
        lo, hi = L.op("Mul", lo, L.const(clip)), L.op("Mul", hi, L.const(clip))
    lo, hi = L.op("Min", lo, L.const(0.0)), L.op("Max", hi, L.const(0.0))
    s = L.op("Div", L.op("Sub", hi, lo), L.const(float((1 << bits) - 1)))
    s = L.op("Where", L.op("Greater", s, L.const(0.0)), s, L.const(1.0), name="scale", dtype=F32)
    z = L.op("Clip", L.op("Sub", L.const(float(qmin)), L.op("Round", L.op("Div", lo, s))),
             L.const(float(qmin)), L.const(float(qmax)))
    z = L.op("Cast", L.op("Cast", z, to=I8, name="zero_point", dtype=I8), to=F32)
    return s, z


def act_codes(L, hg: str, s: str, z: str | None, bits: int, offset: int = 0) -> str:
    """int8 codes: Div (never a reciprocal multiply) -> Round (half to even) [+ zp] -> Clip -> Cast.
    ``offset=128``: the codes + 128 as uint8 (``codes_u8``, for u8 MatMulInteger kernels)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = L.op("Round", L.op("Div", hg, s))
    if z is not None:
        q = L.op("Add", q, z)
    q = L.op("Clip", q, L.const(float(qmin)), L.const(float(qmax)))
    if offset:
        return L.op("Cast", L.op("Add", q, L.const(float(offset))), to=TensorProto.UINT8, name="codes_u8",
                    dtype=TensorProto.UINT8)
    return L.op("Cast", q, to=I8, name="codes", dtype=I8)


@lowers(ops.QUANTIZE_ACT)
def _quantize_act(L, n, x, scale, zero_point, bits, group, sym, clip=1.0, kind="int"):
    if n.name in L.skip:  # integer mode: every reader uses the codes directly
        return None
    dt, lead, last = L.dt(x), [0] * (L.rank(x) - 1), L.shape(x)[-1]
    h = L.cast(L.v(x), dt, torch.float32)
    if kind == "mx":
        y = kinds.mx_fake_quant(L, h, bits, lead, last)
    elif kind == "mix":  # W8A8_MIX: static at one token, dynamic per token otherwise
        y = kinds.mix_select(L, L.v(x), _int_fake_quant(L, h, scale, zero_point, bits, group, sym, clip, lead, last),
                             _int_fake_quant(L, h, None, None, bits, 0, True, clip, lead, last))
    else:
        y = _int_fake_quant(L, h, scale, zero_point, bits, group, sym, clip, lead, last)
    return L.cast(y, torch.float32, dt)


def _int_fake_quant(L, h, scale, zero_point, bits, group, sym, clip, lead, last) -> str:
    """Integer activation fake-quant of float32 ``h`` (:func:`ptqc.quant.fake_quant_act`)."""
    grouped = scale is None and group > 0 and group != last
    if grouped:
        h = L.op("Reshape", h, L.ints(lead + [last // group, group]))
    if scale is None:  # dynamic
        s, z = act_qparams(L, h, bits, group, sym, clip)
    else:  # static: calibrated scale broadcast against x
        s = L.cast(L.v(scale), L.dt(scale), torch.float32)
        z = None if zero_point is None else L.op("Cast", L.v(zero_point), to=F32)
    q = L.op("Cast", act_codes(L, h, s, z, bits), to=F32)
    if z is not None:
        q = L.op("Sub", q, z)
    y = L.op("Mul", q, s)
    if grouped:
        y = L.op("Reshape", y, L.ints(lead + [last]))
    return y


@lowers(ops.TRANSFORM)
def _transform(L, n, x, a, b=None):
    dt = L.dt(x)
    h = L.cast(L.v(x), dt, torch.float32)
    av = L.cast(L.v(a), L.dt(a), torch.float32)
    if b is None:
        return L.cast(L.op("MatMul", h, av), torch.float32, dt)
    bv = L.cast(L.v(b), L.dt(b), torch.float32)
    r = L.rank(x)
    n1, n2 = L.shape(a)[0], L.shape(b)[0]
    m1, m2 = L.shape(a)[1], L.shape(b)[1]
    hr = L.op("Reshape", h, L.ints([0] * (r - 1) + [n1, n2]))
    t = L.op("MatMul", L.op("MatMul", L.op("Transpose", av, perm=[1, 0]), hr), bv)  # (A^T X) B
    return L.cast(L.op("Reshape", t, L.ints([0] * (r - 1) + [m1 * m2])), torch.float32, dt)
