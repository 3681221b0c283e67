"""ONNX translations of the non-int activation kinds of :mod:`ptqc.quant` (``quantize_act`` with kind
``mx`` or ``mix``), exactly as the quantizer computes them.

MX (opset 21): ``floor(log2(amax))`` as ``Floor(Log(a) / ln 2)`` corrected by one either way against
``Pow(2, e)`` (exact for every float32), the block scale ``Pow(2, Clip(e - emax, -127, 127))`` (1 for an
all-zero block), the elements rounded to nearest even on the FP8 E4M3 / FP4 E2M1 grid by arithmetic
(``Round(v / step) * step``, ``step = 2^(max(floor(log2|v|), emin) - mantissa bits)``, saturated).
Weights need no translation: their E4M3 / E2M1 values are FLOAT8E4M3FN initializers read by a blocked
DequantizeLinear (block 32). FP4 and the E8M0 scale type are not used (ONNX has FLOAT4E2M1 from opset 23
and FLOAT8E8M0 from opset 24; ptqc emits opset 21), so the element and scale *values* are exact but
not their storage types.
mix: both branches computed, ``Where`` on the sequence length (one token: the static scale).
"""
from __future__ import annotations

import math

from ptqc import quant
from ptqc.lowering.onnx.emitter import F32, I64


def floor_log2(L, a: str) -> str:
    """floor(log2(a)) of positive float32 ``a`` (-inf for 0), exact."""
    e = L.op("Floor", L.op("Div", L.op("Log", a), L.const(math.log(2.0))))
    p = L.op("Pow", L.const(2.0), e)
    up = L.op("Cast", L.op("GreaterOrEqual", a, L.op("Mul", p, L.const(2.0))), to=F32)
    down = L.op("Cast", L.op("Less", a, p), to=F32)
    return L.op("Sub", L.op("Add", e, up), down, name="floor_log2")


def round_fp(L, v: str, bits: int) -> str:
    """:func:`ptqc.quant.round_fp` of float32 ``v``."""
    _, mbits, emin, vmax, _ = quant.MX_ELEMENTS[bits]
    e = L.op("Max", floor_log2(L, L.op("Abs", v)), L.const(float(emin)))
    step = L.op("Pow", L.const(2.0), L.op("Sub", e, L.const(float(mbits))))
    q = L.op("Mul", L.op("Round", L.op("Div", v, step)), step)
    return L.op("Clip", q, L.const(-vmax), L.const(vmax), name="elements")


def mx_fake_quant(L, h: str, bits: int, lead: list, last: int) -> str:
    """MX fake-quant of float32 ``h`` [..., last] in blocks of 32 along the last dim."""
    emax = quant.MX_ELEMENTS[bits][4]
    hg = L.op("Reshape", h, L.ints(lead + [last // quant.MX_BLOCK, quant.MX_BLOCK]))
    amax = L.op("ReduceMax", L.op("Abs", hg), L.ints([-1]), keepdims=1)
    e = L.op("Clip", L.op("Sub", floor_log2(L, amax), L.const(float(emax))), L.const(-127.0), L.const(127.0))
    s = L.op("Where", L.op("Greater", amax, L.const(0.0)), L.op("Pow", L.const(2.0), e), L.const(1.0), name="scale")
    y = L.op("Mul", round_fp(L, L.op("Div", hg, s), bits), s)
    return L.op("Reshape", y, L.ints(lead + [last]))


def mix_select(L, x: str, static: str, dynamic: str) -> str:
    """``static`` where ``x`` holds one token per sequence (dim -2 of size 1), else ``dynamic``."""
    n = L.op("Gather", L.op("Shape", x), L.const(-2, I64), axis=0)
    return L.op("Where", L.op("Equal", n, L.const(1, I64)), static, dynamic, name="mix")
