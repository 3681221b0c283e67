"""``mode="integer"``: real integer kernels for quantized linears.

A linear with int8 (or fewer-bit) symmetric per-channel weight codes whose input is a symmetric
int ``quantize_act`` (dynamic per token, or static per tensor) runs as::

    q_x   = <qact>/codes (int8, shared by q/k/v...), s_x = <qact>/scale
    acc   = MatMulInteger(q_x, Transpose(q_w))                  <linear>/acc  int32
    y     = Mul(Mul(Cast(acc, float), s_x), s_w) (+ b)          <linear>

bit for bit ``(q_x.int() @ q_w.int().T).float() * s_x * s_w (+ b)`` from :mod:`ptqc.quant`'s codes.
Weight-only linears use ``com.microsoft.MatMulNBits`` when it can hold the codes: signed codes
stored unsigned as ``q + 8`` (4 bits) or ``q + 128`` (8 bits), zero points likewise (absent when
symmetric: the kernel's default), block size the group size when a power of two >= 16 (per
channel: the largest power of two in 16..256 dividing K, the scale repeated over the blocks);
otherwise ``DequantizeLinear`` + ``MatMul``. Derived initializers are named after the HF tensor:
``<w>.int8``, ``<w>.uint8``, ``<w>.nbits``, ``<w>_scale.nbits``, ``<w>_zero_point.nbits``.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from onnx import TensorProto

from ptqc import ops
from ptqc.ir import is_op
from ptqc.lowering.checkpoint import weight_codes
from ptqc.lowering.onnx.dialect import act_codes, act_qparams
from ptqc.lowering.onnx.emitter import F32, I32, MS_DOMAIN, _bytes

NBITS_MAX_PER_CHANNEL_BLOCK = 256


def _codes_source(w: fx.Node):
    """(get_attr of the codes, packed?) of a dequantize_weight node, or None."""
    c = w.args[0]
    if isinstance(c, fx.Node) and c.op == "get_attr":
        return c, False
    if is_op(c, ops.UNPACK_INT4) and isinstance(c.args[0], fx.Node) and c.args[0].op == "get_attr":
        return c.args[0], True
    return None


def _act_ok(qa: fx.Node, L) -> bool:
    x, scale, zp, bits, group, sym, *rest = (list(qa.args) + [1.0])[:7]
    if len(qa.args) > 7 and qa.args[7] != "int":  # mx / mix: fake-quant only
        return False
    if not sym or zp is not None or bits > 8:
        return False
    if scale is None:
        return group == 0 or group == L.shape(x)[-1]  # per token
    return isinstance(scale, fx.Node) and math.prod(L.shape(scale)) == 1  # static per tensor


def _weight_bits(lin: fx.Node, L, w: fx.Node) -> int:
    q = lin.meta.get("ptqc", {}).get("quant", {}).get("weight", {})
    if isinstance(q.get("bits"), int):
        return q["bits"]
    src, packed = _codes_source(w)
    if packed:
        return 4
    c = L.qm.store[src.target]
    lo, hi = int(c.min()), int(c.max())
    return 8 if lo < -8 or hi > 7 else 4


def _nbits_block(group: int, k: int) -> int | None:
    if group > 0 and group != k:
        return group if group >= 16 and group & (group - 1) == 0 else None
    b = NBITS_MAX_PER_CHANNEL_BLOCK
    while b >= 16:
        if k % b == 0:
            return b
        b //= 2
    return None


def plan(L) -> None:
    """Decide, per linear, the integer kernel (``w8a8``, ``nbits``) and which quantize_act /
    dequantize_weight / unpack_int4 nodes are then read by nobody (not emitted)."""
    L.int_plan = {}
    for lin in L.qm.linears():
        x, w = lin.args[0], lin.args[1]
        if not is_op(w, ops.DEQUANTIZE_WEIGHT) or _codes_source(w) is None or L.dt(x) != torch.float32:
            continue
        codes, _, zp, group, _ = w.args
        k = L.shape(codes)[-1] * (2 if is_op(codes, ops.UNPACK_INT4) else 1)
        if is_op(x, ops.QUANTIZE_ACT):
            if _act_ok(x, L) and zp is None and group in (0, k):  # symmetric per-channel weights
                L.int_plan[lin.name] = "w8a8"
        elif group != -1 and _nbits_block(group, k) is not None:
            L.int_plan[lin.name] = "nbits"

    def only_integer_readers(node, arg):
        return bool(node.users) and all(u.name in L.int_plan and u.args[arg] is node and
                                        node not in (u.args[2:] + tuple(u.kwargs.values())) for u in node.users)

    for n in L.qm.graph.nodes:
        if is_op(n, ops.DEQUANTIZE_WEIGHT) and only_integer_readers(n, 1):
            L.skip.add(n.name)
            if is_op(n.args[0], ops.UNPACK_INT4) and len(n.args[0].users) == 1:
                L.skip.add(n.args[0].name)
        elif is_op(n, ops.QUANTIZE_ACT) and only_integer_readers(n, 0) and \
                all(L.int_plan[u.name] == "w8a8" for u in n.users):
            L.skip.add(n.name)


def _weight_codes(L, w: fx.Node, u8: bool) -> str:
    """The codes [out, in] of dequantize_weight ``w`` as an initializer: int8 (packed int4 codes
    unpacked at export: ``<w>.int8``), or (``u8``, for the u8u8 kernel) + 128 as uint8 (``<w>.uint8``)."""
    src, packed = _codes_source(w)
    if not (packed or u8):
        return L.weight(src)
    shape, _ = L.qm.store.spec(src.target)
    dims = [shape[0], shape[1] * (2 if packed else 1)]
    if u8:
        data = lambda: _bytes((weight_codes(L.qm, w).to(torch.int16) + 128).to(torch.uint8))  # noqa: E731
        return L.add_init(f"{L.weight_name(src)}.uint8", TensorProto.UINT8, dims, data, math.prod(dims))
    return L.add_init(f"{L.weight_name(src)}.int8", TensorProto.INT8, dims, lambda: _bytes(weight_codes(L.qm, w)),
                      math.prod(dims))


def act_int(L, qa: fx.Node) -> tuple[str, str]:
    """(scale, codes) of a quantize_act node's input, emitted once under its name: int8 codes
    (``<qact>/codes``), or codes + 128 as uint8 (``<qact>/codes_u8``) for the u8 kernels."""
    if qa.name in L._act_cache:
        return L._act_cache[qa.name]
    x, scale, zp, bits, group, sym, *rest = (list(qa.args) + [1.0])[:7]
    clip = qa.kwargs.get("clip", rest[0])
    saved, L.prefix = L.prefix, qa.name
    try:
        h = L.cast(L.v(x), L.dt(x), torch.float32)
        if scale is None:
            s, _ = act_qparams(L, h, bits, 0, True, clip)
            L.vtype[s] = (F32, L.shape(x)[:-1] + [1])
        else:
            s = L.cast(L.v(scale), L.dt(scale), torch.float32)
        offset = 0 if L.int_kernel == "s8s8" else 128
        q = act_codes(L, h, s, None, bits, offset)
        L.vtype[q] = (TensorProto.UINT8 if offset else TensorProto.INT8, L.shape(x))
    finally:
        L.prefix = saved
    L._act_cache[qa.name] = (s, q)
    return s, q


def linear(L, n: fx.Node, x, w, b=None) -> str | None:
    """The planned integer kernel of linear ``n``, or None (no integer kernel: lowered as in fake mode)."""
    kind = L.int_plan.get(n.name)
    return None if kind is None else {"w8a8": _w8a8, "nbits": _nbits}[kind](L, n, x, w, b)


def _w8a8(L, n, x, w, b):
    s_x, q_x = act_int(L, x)
    u8 = L.int_kernel == "u8u8"
    q_w = _weight_codes(L, w, u8)
    # same int32 sums: (q_x + 128 - 128) (q_w [+ 128 - 128])
    zps = [] if L.int_kernel == "s8s8" else [L.const(128, TensorProto.UINT8)] * (1 + u8)
    acc = L.op("MatMulInteger", q_x, L.op("Transpose", q_w, perm=[1, 0], name="w_t"), *zps, name="acc", dtype=I32,
               shape=L.shape(n))
    y = L.op("Mul", L.op("Cast", acc, to=F32), s_x)
    y = L.op("Mul", y, L.op("Reshape", L.v(w.args[1]), L.ints([-1])))
    if b is not None:
        y = L.op("Add", y, L.cast(L.v(b), L.dt(b), torch.float32))
    L.integer_linears.append(n.name)
    return L.cast(y, torch.float32, L.dt(n))


def _nbits(L, n, x, w, b):
    src, packed = _codes_source(w)
    _, scale, zp, group, _ = w.args
    shape, _ = L.qm.store.spec(src.target)
    N, K = shape[0], shape[1] * (2 if packed else 1)
    group = 0 if group == K else group
    block = _nbits_block(group, K)
    bits = 4 if (packed or _weight_bits(n, L, w) <= 4) else 8
    offset = 1 << (bits - 1)
    nb = K // block
    rep = 1 if group > 0 else nb  # a per-channel scale repeated over the blocks
    base = L.weight_name(src)

    def codes_u8():
        u = (weight_codes(L.qm, w).to(torch.int16) + offset).to(torch.uint8).reshape(N, K)
        if bits == 4:
            u = u[:, 0::2] | (u[:, 1::2] << 4)
        return _bytes(u.contiguous())

    blob = bits * block // 8
    bv = L.add_init(f"{base}.nbits", TensorProto.UINT8, [N, nb, blob], codes_u8, N * nb * blob)
    sname = L.weight_name(scale)
    sv = L.add_init(f"{sname}.nbits", F32, [N * nb],
                    lambda t=scale.target: _bytes(L.qm.store[t].float().reshape(N, -1).repeat_interleave(rep, 1)),
                    N * nb * 4)
    zv = None
    if zp is not None:
        zname = L.weight_name(zp)

        def zp_u8(t=zp.target):
            z = (L.qm.store[t].reshape(N, -1).to(torch.int16) + offset).repeat_interleave(rep, 1)
            z = z.to(torch.uint8)
            if bits == 4:
                if z.shape[1] % 2:
                    z = torch.cat([z, z.new_full((N, 1), offset)], 1)
                z = z[:, 0::2] | (z[:, 1::2] << 4)
            return _bytes(z.contiguous())
        zlen = N * (math.ceil(nb / 2) if bits == 4 else nb)
        zv = L.add_init(f"{zname}.nbits", TensorProto.UINT8, [zlen], zp_u8, zlen)
    bias = None if b is None else L.cast(L.v(b), L.dt(b), torch.float32)
    L.nbits_linears.append(n.name)
    y = L.op("MatMulNBits", L.v(x), bv, sv, zv, None, bias, domain=MS_DOMAIN, K=K, N=N, bits=bits,
             block_size=block, accuracy_level=1)
    return L.cast(y, torch.float32, L.dt(n))
