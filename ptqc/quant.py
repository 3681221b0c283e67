"""The one quantizer definition of ptqc.

Every quantized tensor in ptqc (weights by RTN/GPTQ/AWQ..., activations, KV cache) is
described by a :class:`QuantSpec` and goes through the functions below; fake-quant, the Ascend
emulation and the ONNX lowering all call them, so a number means the same thing everywhere.

Conventions
-----------
* Grouping is along the **last dimension**. ``group_size > 0``: groups of that many elements;
  ``group_size == 0``: one group per row (per output channel for a weight ``[out, in]``, per
  token for an activation ``[..., hidden]``); ``group_size == -1``: the whole tensor.
  ``scale`` (and ``zero_point``) have shape ``x.shape[:-1] + (n_groups,)`` (all ones for
  per-tensor).
* Codes are **signed** integers in ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``, stored as int8.
* Symmetric: ``scale = amax / qmax``, ``q = clamp(round(x / scale), qmin, qmax)``,
  ``x' = q * scale``; no zero point.
* Asymmetric: the range ``[min(x, 0), max(x, 0)]`` maps onto ``[qmin, qmax]``:
  ``scale = (max - min) / (2^b - 1)``, ``zero_point = clamp(qmin - round(min / scale))``,
  ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``, ``x' = (q - zero_point) * scale``.
  (Ascend's ``antiquant_offset`` / msModelSlim's ``weight_offset`` is ``-zero_point``.)
* ``clip_ratio`` shrinks the range before the scale is computed (clip search tunes it).
* Rounding is round-half-to-even (``torch.round``, ONNX ``Round``), and quantization divides
  by the scale (``x / scale``), never multiplies by its reciprocal: the two differ in the
  last bit, and every backend must agree.
* All arithmetic is float32; scales are float32, zero points int8.

Kinds (``QuantSpec.kind``)
--------------------------
* ``"int"`` (default): the integer codes above.
* ``"mx"``: OCP Microscaling (MX v1.0): blocks of ``group_size`` (32) elements share a power-of-two
  scale ``2^(floor(log2(amax)) - emax_elem)`` (an E8M0 exponent, clamped to [-127, 127]; an all-zero
  block has scale 1); elements are FP8 E4M3 (``bits`` 8: emax 8, max 448) or FP4 E2M1 (``bits`` 4:
  emax 2, max 6), rounded to nearest even on the element grid and saturated to +-max. Codes are the
  element values, stored as float8_e4m3fn (exact for both); ``x' = code * scale``.
* ``"mix"``: int activation codes whose scale depends on the phase (vllm-ascend's W8A8_MIX):
  dynamic per token (``group_size`` 0) when the input holds more than one token per sequence
  (prefill), the calibrated static scale when it holds one (decode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqc.errors import PtqcError


KINDS = ("int", "mx", "mix")
MX_BLOCK = 32
# bits -> (name, mantissa bits, min normal exponent, max value, emax): OCP MX v1.0 element formats
MX_ELEMENTS = {8: ("E4M3", 3, -6, 448.0, 8), 4: ("E2M1", 1, 0, 6.0, 2)}


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    group_size: int = 0  # >0 group, 0 per row (channel / token), -1 per tensor
    symmetric: bool = True
    clip_ratio: float = 1.0
    kind: str = "int"  # "int", "mx" (OCP MX: E8M0 block scales, FP8/FP4 elements), "mix" (see above)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PtqcError(f"quantization kind {self.kind!r} is unknown (known: {', '.join(KINDS)})")
        if self.kind == "mx" and (self.bits not in MX_ELEMENTS or self.group_size != MX_BLOCK or not self.symmetric):
            raise PtqcError(f"MX quantization takes bits 8 (FP8 E4M3) or 4 (FP4 E2M1), blocks of {MX_BLOCK} and "
                            f"no zero point (got bits={self.bits}, group={self.group_size}, sym={self.symmetric})")
        if not 1 <= self.bits <= 8:
            raise PtqcError(f"bits={self.bits} is outside 1..8 (ptqc stores codes as int8)")
        if self.group_size < -1:
            raise PtqcError(f"group size {self.group_size} is invalid: use a positive size, 0 (per channel) or -1 (per tensor)")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise PtqcError(f"clip_ratio={self.clip_ratio} must be in (0, 1]")
        if self.symmetric and self.bits == 1:
            raise PtqcError("1-bit symmetric quantization has no levels; use asymmetric or a binarization pass")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def check_fits(self, n: int, what: str = "tensor") -> None:
        """Refuse a group size that does not divide the last dimension (lists the valid ones)."""
        g = self.group_size
        if g > 0 and n % g:
            valid = [d for d in (32, 64, 128, 256, 512, 1024) if n % d == 0]
            raise PtqcError(
                f"group size {g} does not divide the input dimension {n} of {what}; "
                f"valid group sizes: {', '.join(map(str, valid)) or 'none of 32..1024'}, or 0 for per channel")

    def describe(self) -> str:
        if self.kind == "mx":
            return f"mxfp{self.bits} ({MX_ELEMENTS[self.bits][0]}, E8M0 per {self.group_size})"
        g = {0: "per-channel", -1: "per-tensor"}.get(self.group_size, f"g{self.group_size}")
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``x`` as ``[..., n_groups, g]`` (float32)."""
    x = x.float()
    if group_size == -1:
        return x.reshape(*([1] * (x.dim() - 1)), 1, -1)
    g = x.shape[-1] if group_size == 0 else group_size
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def compute_qparams(x: torch.Tensor, spec: QuantSpec, *, xmin: torch.Tensor | None = None,
                    xmax: torch.Tensor | None = None):
    """Scale and zero point (None when symmetric) for ``x`` under ``spec``.

    ``xmin``/``xmax`` (shape of the result) override the observed range, e.g. from a
    calibration observer; otherwise the range is the min/max of each group of ``x``.
    """
    spec.check_fits(x.shape[-1])
    if spec.kind == "mx":
        return mx_scale(_grouped(x, spec.group_size).abs().amax(-1), spec.bits), None
    if xmin is None or xmax is None:
        xg = _grouped(x, spec.group_size)
        xmin, xmax = xg.amin(-1), xg.amax(-1)
    xmin = xmin.float() * spec.clip_ratio
    xmax = xmax.float() * spec.clip_ratio
    if spec.symmetric:
        amax = torch.maximum(xmin.abs(), xmax.abs())
        scale = amax / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, None
    xmin = torch.clamp(xmin, max=0.0)
    xmax = torch.clamp(xmax, min=0.0)
    scale = (xmax - xmin) / float((1 << spec.bits) - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(spec.qmin - torch.round(xmin / scale), spec.qmin, spec.qmax)
    return scale, zero_point.to(torch.int8)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (int8 tensor, values in ``[qmin, qmax]``) of ``x``; MX: element values (float8_e4m3fn)."""
    xg = _grouped(x, spec.group_size)
    if spec.kind == "mx":
        return round_fp(xg / scale.unsqueeze(-1), spec.bits).reshape(x.shape).to(torch.float8_e4m3fn)
    q = torch.div(xg, scale.unsqueeze(-1)).round_()
    if zero_point is not None:
        q.add_(zero_point.unsqueeze(-1))
    return q.clamp_(spec.qmin, spec.qmax).reshape(x.shape).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               group_size: int) -> torch.Tensor:
    """Float32 values of integer codes: ``(q - zero_point) * scale``."""
    qg = _grouped(codes, group_size)
    if zero_point is not None:
        qg = qg - zero_point.float().unsqueeze(-1)
    return (qg * scale.unsqueeze(-1)).reshape(codes.shape)


def rtn(x: torch.Tensor, spec: QuantSpec):
    """Round-to-nearest of ``x`` on its own range: (codes, scale, zero point)."""
    scale, zp = compute_qparams(x, spec)
    return quantize(x, scale, zp, spec), scale, zp


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """quantize + dequantize in one call, in ``x``'s dtype."""
    codes, scale, zp = rtn(x, spec)
    return dequantize(codes, scale, zp, spec.group_size).to(x.dtype)


# ---- activations -----------------------------------------------------------------------------
def quantize_static(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    spec: QuantSpec) -> torch.Tensor:
    """Integer codes of ``x`` with a fixed (calibrated) scale that broadcasts against ``x``:
    shape ``[1]`` per tensor, ``[..., C]`` per channel of the last dimension (e.g. a K cache's
    ``[heads, 1, head_dim]``). Same rounding, division and saturation as :func:`quantize`."""
    q = torch.round(x.float() / scale.float())
    if zero_point is not None:
        q = q + zero_point.float()
    return torch.clamp(q, spec.qmin, spec.qmax).to(torch.int8)


def dequantize_static(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    q = codes.float()
    if zero_point is not None:
        q = q - zero_point.float()
    return q * scale.float()


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                   spec: QuantSpec) -> torch.Tensor:
    """Activation fake-quant (float32 result). ``scale is None``: dynamic, qparams computed from
    ``x`` itself under ``spec`` (group 0: per token, the Ascend ``npu_dynamic_quant`` rule
    ``scale = rowmax|x| / qmax``; g > 0: per group of the last dim; -1: per tensor).
    Otherwise static with the given broadcastable scale (:func:`quantize_static`); a static
    scale already includes any clipping, so ``spec.clip_ratio`` only shrinks dynamic ranges."""
    if spec.kind == "mix":
        one_token = x.dim() >= 2 and x.shape[-2] == 1
        scale, zero_point = (scale, zero_point) if one_token else (None, None)
        spec = QuantSpec(spec.bits, 0, True, spec.clip_ratio) if scale is None else spec
    if scale is None:
        return fake_quantize(x.float(), spec)
    return dequantize_static(quantize_static(x, scale, zero_point, spec), scale, zero_point)


def static_qparams(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec):
    """Scale (and zero point) from an observed range, any shape (per tensor: 0-d or [1])."""
    xmin, xmax = xmin.float().reshape(-1), xmax.float().reshape(-1)
    return compute_qparams(torch.zeros(xmin.shape[0], 1), QuantSpec(spec.bits, 0, spec.symmetric, spec.clip_ratio),
                           xmin=xmin, xmax=xmax)


# ---- MX (OCP Microscaling) ---------------------------------------------------------------------
def mx_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Power-of-two block scale ``2^(floor(log2(amax)) - emax_elem)`` (float32), the exponent clamped to
    E8M0's [-127, 127]; 1 for an all-zero block."""
    emax = MX_ELEMENTS[bits][4]
    _, e = torch.frexp(amax.float())  # amax = m * 2^e, m in [0.5, 1): floor(log2(amax)) = e - 1
    exp = torch.clamp(e - 1 - emax, -127, 127)
    return torch.where(amax > 0, torch.exp2(exp.float()), torch.ones_like(amax, dtype=torch.float32))


def round_fp(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``v`` (float32) rounded to nearest even on the FP8 E4M3 / FP4 E2M1 grid, saturated to +-max."""
    _, mbits, emin, vmax, _ = MX_ELEMENTS[bits]
    _, e = torch.frexp(v)
    step = torch.exp2((torch.clamp(e - 1, min=emin) - mbits).float())  # spacing of the grid around |v|
    return torch.clamp(torch.round(v / step) * step, -vmax, vmax)


def mx_exponent(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 byte (uint8, exponent + 127) of a power-of-two MX scale."""
    return (torch.log2(scale.float()).round() + 127).to(torch.uint8)


def mx_scale_of(e8m0: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`mx_exponent`: the float32 scale of E8M0 bytes."""
    return torch.exp2(e8m0.to(torch.float32) - 127)


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 element values -> uint8, two per byte along the last dimension, low nibble first
    (nibble = sign << 3 | index of |v| in 0, 0.5, 1, 1.5, 2, 3, 4, 6: the E2M1 bit pattern)."""
    if values.shape[-1] % 2:
        raise PtqcError(f"cannot pack {values.shape[-1]} FP4 values two per byte: the last dimension must be even")
    v = values.float()
    grid = torch.tensor(FP4_VALUES)
    idx = (v.abs().unsqueeze(-1) == grid).to(torch.int64).argmax(-1)
    if not bool((grid[idx] == v.abs()).all()):
        raise PtqcError("values off the FP4 E2M1 grid cannot be packed")
    nib = (idx | (torch.signbit(v).to(torch.int64) << 3)).reshape(*v.shape[:-1], -1, 2)
    return (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: float32 values, last dimension doubled."""
    b = packed.to(torch.int64)
    nib = torch.stack([b & 0xF, b >> 4], -1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    mag = torch.tensor(FP4_VALUES)[nib & 7]
    return torch.where(nib >= 8, -mag, mag)


# ---- storage ---------------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes per int8 byte along the last dimension, low nibble first (the
    msModelSlim W4A16 / Ascend layout): byte = (c[2i] & 0xF) | (c[2i+1] << 4)."""
    if codes.shape[-1] % 2:
        raise PtqcError(f"cannot pack {codes.shape[-1]} codes two per byte: the last dimension must be even")
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise PtqcError("codes outside [-8, 7] do not fit in 4 bits")
    c = codes.to(torch.int16).reshape(*codes.shape[:-1], -1, 2)
    b = (c[..., 0] & 0xF) | ((c[..., 1] & 0xF) << 4)
    return torch.where(b > 127, b - 256, b).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes, last dimension doubled (sign-extended nibbles)."""
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(packed, 4), 4)  # int8 shifts: arithmetic
    hi = torch.bitwise_right_shift(packed, 4)
    return torch.stack([lo, hi], -1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
