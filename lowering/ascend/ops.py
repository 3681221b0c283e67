"""Ascend operators as ``ptqc_npu`` torch ops: torch_npu on an NPU, a CPU emulation elsewhere.

Every op a lowered graph calls is registered here once. When its first tensor lives on an NPU
the op calls the torch_npu kernel; otherwise it runs the emulation below, written from the
torch_npu documentation (``torch_npu/_op_plugin_docs.py`` in the wheel; summary in
``shared/reference/ascend-ops.md``). torch_npu is imported only inside the NPU branch.

Documented numerics the emulation reproduces bit for bit:

* int8 x int8 matmuls accumulate in **int32** (``torch._int_mm``); an int32 bias is added to the
  accumulator, a float bias after scaling;
* quantization **divides** by the scale (``div_mode=True``), rounds **half to even** and
  **saturates** to [-128, 127]; static quantization adds the offset **before** rounding
  (``round(x / scale + offset)``), dynamic quantization is symmetric per token
  (``scale = rowmax|x * smooth| / 127``);
* ``npu_trans_quant_param`` keeps only the top 19 bits of a float32 scale (sign, exponent, 10
  mantissa bits): ``int64 = (bits & 0xFFFFE000) | 1 << 46``; ``npu_quant_matmul`` reads that
  truncated scale back;
* ``npu_weight_quant_batchmatmul`` **adds** ``antiquant_offset`` (= minus the zero point):
  ``x @ ((w + offset) * scale)``; the weight is dequantized in x's dtype (fp16/bf16);
* outputs are rounded to the requested dtype (fp16/bf16) once, at the end;
* int4 (W4A4): per-token ``scale = rowmax / 7`` (times ``clip_ratio`` for npu_kronecker_quant),
  half-to-even rounding saturated to [-8, 7], codes packed 8 per int32 (element j in bits
  [4j, 4j + 4): the docs only say "interleaved", this is the W4A16 byte layout read as int32);
  ``npu_quant_matmul`` on int32 operands unpacks them and accumulates exactly with ``_int_mm``.

Where the documentation is silent the choice is stated: intermediate arithmetic is float32;
the fused add+RMSNorm+quant kernels quantize the float32 norm output (the unfused sequence
quantizes the fp16/bf16-rounded ``npu_rms_norm`` output, so the two can differ in the last
code); a token row of zeros gets scale 0 and codes 0.

Shape limits the lowering must respect are checked by ``check_*`` functions that return the
reason a kernel cannot take a shape (or None).
"""
from __future__ import annotations

from typing import Optional

import torch

from ptqc.errors import PtqcError

MAX_KN = 65535  # npu_quant_matmul: K and N at most 65535


def _npu(x: torch.Tensor) -> bool:
    return x.device.type == "npu"


def _torch_npu():
    import torch_npu  # noqa: F401 - only on an Ascend machine

    return torch_npu


def _saturate_round(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(v), -128, 127).to(torch.int8)


# ---- activation quantization ------------------------------------------------------------------
@torch.library.custom_op("ptqc_npu::dynamic_quant", mutates_args=())
def dynamic_quant(x: torch.Tensor, smooth_scales: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_dynamic_quant: per-token symmetric int8. Returns (codes int8, scale float32 x.shape[:-1])."""
    if _npu(x):
        return _torch_npu().npu_dynamic_quant(x, smooth_scales=smooth_scales)
    h = x.float()
    if smooth_scales is not None:
        h = h * smooth_scales.float()
    scale = h.abs().amax(-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return _saturate_round(h / safe.unsqueeze(-1)), scale


@dynamic_quant.register_fake
def _(x, smooth_scales=None):
    return torch.empty(x.shape, dtype=torch.int8, device=x.device), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("ptqc_npu::quantize", mutates_args=())
def quantize(x: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor] = None,
             div_mode: bool = True) -> torch.Tensor:
    """npu_quantize to int8: ``round(x / scales + zero_points)`` saturated (scales broadcast on the last dim)."""
    if _npu(x):
        return _torch_npu().npu_quantize(x, scales, zero_points, torch.qint8, -1, div_mode)
    v = x.float() / scales.float() if div_mode else x.float() * scales.float()
    if zero_points is not None:
        v = v + zero_points.float()
    return _saturate_round(v)


@quantize.register_fake
def _(x, scales, zero_points=None, div_mode=True):
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


# ---- scale conversion -------------------------------------------------------------------------
@torch.library.custom_op("ptqc_npu::trans_quant_param", mutates_args=())
def trans_quant_param(scale: torch.Tensor, round_mode: int = 0) -> torch.Tensor:
    """npu_trans_quant_param: float32 dequant scale -> int64 with only the top 19 float bits kept
    (round_mode 0 truncates, 1 rounds to nearest). The offset form is not emulated."""
    if _npu(scale):
        return _torch_npu().npu_trans_quant_param(scale, None, round_mode)
    bits = scale.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if round_mode == 1:
        bits = torch.minimum(bits + 0x1000, torch.full_like(bits, 0xFFFFFFFF))
    return (bits & 0xFFFFE000) | (1 << 46)


@trans_quant_param.register_fake
def _(scale, round_mode=0):
    return scale.new_empty(scale.shape, dtype=torch.int64)


def deq_scale_value(q: torch.Tensor) -> torch.Tensor:
    """The float32 scale an int64 ``npu_trans_quant_param`` result stands for."""
    low = (q & 0xFFFFFFFF).to(torch.int64)
    low = torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32)
    return low.view(torch.float32)


def truncate19(scale: torch.Tensor) -> torch.Tensor:
    """A float32 scale as the NPU sees it after npu_trans_quant_param (round_mode 0)."""
    return deq_scale_value(trans_quant_param(scale.float()))


# ---- matmuls -----------------------------------------------------------------------------------
def check_quant_matmul(k: int, n: int) -> str | None:
    if k > MAX_KN or n > MAX_KN:
        return f"npu_quant_matmul takes K and N up to {MAX_KN} (got K={k}, N={n})"
    return None


@torch.library.custom_op("ptqc_npu::quant_matmul", mutates_args=())
def quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor] = None,
                 pertoken_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """npu_quant_matmul: x1 int8 [..., m, k] @ x2 int8 [k, n], int32 accumulation, then
    ``acc * scale[n] * pertoken_scale[m] (+ bias)`` in the output dtype (int8 when None)."""
    if _npu(x1):
        if x1.dtype == torch.int32:  # int4: x1 only as a contiguous 2-D (m, k / 8), pertoken_scale (m,)
            lead = x1.shape[:-1]
            out = _torch_npu().npu_quant_matmul(
                x1.reshape(-1, x1.shape[-1]).contiguous(), x2, scale, offset=offset, bias=bias, output_dtype=output_dtype,
                pertoken_scale=None if pertoken_scale is None else pertoken_scale.reshape(-1))
            return out.reshape(*lead, out.shape[-1])
        return _torch_npu().npu_quant_matmul(x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale,
                                             bias=bias, output_dtype=output_dtype)
    if x1.dtype == torch.int32 and x2.dtype == torch.int32:  # int4 x int4, packed 8 per int32
        x1, x2 = _int4_operands(x1, x2)
    k, n = x2.shape
    why = check_quant_matmul(k, n)
    if why:
        raise PtqcError(why)
    if x1.dtype != torch.int8 or x2.dtype != torch.int8:
        raise PtqcError(f"quant_matmul emulation takes int8 operands or int4 ones packed in int32 "
                        f"(got {x1.dtype}, {x2.dtype})")
    lead = x1.shape[:-1]
    acc = torch._int_mm(x1.reshape(-1, k).contiguous(), x2.contiguous()).reshape(*lead, n)
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias
    if output_dtype == torch.int32:
        return acc
    s = deq_scale_value(scale) if scale.dtype == torch.int64 else scale.float()
    out = acc.float() * s
    if pertoken_scale is not None:
        out = out * pertoken_scale.float().reshape(*lead, 1)
    if bias is not None and bias.dtype != torch.int32:
        out = out + bias.float()
    if output_dtype is None or output_dtype == torch.int8:
        if offset is not None:
            out = out + offset.float()
        return _saturate_round(out)
    return out.to(output_dtype)


@quant_matmul.register_fake
def _(x1, x2, scale, offset=None, pertoken_scale=None, bias=None, output_dtype=None):
    n = x2.shape[1] * 8 if x1.dtype == torch.int32 and x2.shape[0] == x1.shape[-1] * 8 else x2.shape[1]
    return x1.new_empty((*x1.shape[:-1], n), dtype=output_dtype or torch.int8)


def _int4_operands(x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (x1 [..., m, k], x2 [k, n]) of npu_quant_matmul's int4 operands packed 8 per int32:
    x1 (m, k / 8); x2 (k, n / 8) packed along n, or (k / 8, n), the transpose of an (n, k / 8) weight
    packed along k (what npu_convert_weight_to_int4pack makes of an (n, k) weight)."""
    k = x1.shape[-1] * 8
    if x2.shape[0] == k:
        w = unpack_int4x8(x2)
    elif x2.shape[0] * 8 == k:
        w = unpack_int4x8(x2.t()).t()
    else:
        raise PtqcError(f"int4 quant_matmul: x2 {tuple(x2.shape)} fits neither (k, n / 8) nor (k / 8, n) for k={k}")
    return unpack_int4x8(x1), w.contiguous()


def check_weight_quant_batchmatmul(group: int) -> str | None:
    if group and group % 32:
        return f"npu_weight_quant_batchmatmul takes group sizes that are multiples of 32 (got {group})"
    return None


@torch.library.custom_op("ptqc_npu::weight_quant_batchmatmul", mutates_args=())
def weight_quant_batchmatmul(x: torch.Tensor, weight: torch.Tensor, antiquant_scale: torch.Tensor,
                             antiquant_offset: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                             antiquant_group_size: int = 0) -> torch.Tensor:
    """npu_weight_quant_batchmatmul (W8A16/W4A16): ``x @ ((weight + offset) * scale) + bias``;
    weight int8 codes [k, n]; scale/offset [n] (per channel) or [k / group, n] (per group)."""
    if _npu(x):
        return _torch_npu().npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset, None, None,
                                                         bias, antiquant_group_size)
    why = check_weight_quant_batchmatmul(antiquant_group_size)
    if why:
        raise PtqcError(why)
    w = weight.float()
    s = antiquant_scale.to(x.dtype).float()
    o = antiquant_offset.to(x.dtype).float() if antiquant_offset is not None else None
    if antiquant_group_size:
        s = s.repeat_interleave(antiquant_group_size, 0)
        o = o.repeat_interleave(antiquant_group_size, 0) if o is not None else None
    if o is not None:
        w = w + o
    w = (w * s).to(x.dtype)  # dequantized in the activation dtype, as the kernel does
    out = x.float() @ w.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@weight_quant_batchmatmul.register_fake
def _(x, weight, antiquant_scale, antiquant_offset=None, bias=None, antiquant_group_size=0):
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


# ---- norms (plain and fused with the residual add and quantization) -------------------------------
def _rms(h: torch.Tensor, gamma: torch.Tensor, eps: float):
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h * rstd * gamma.float(), rstd


@torch.library.custom_op("ptqc_npu::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_rms_norm: (y in x's dtype, rstd float32 [..., 1])."""
    if _npu(x):
        return _torch_npu().npu_rms_norm(x, gamma, epsilon)
    y, rstd = _rms(x.float(), gamma, epsilon)
    return y.to(x.dtype), rstd


@rms_norm.register_fake
def _(x, gamma, epsilon=1e-6):
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("ptqc_npu::add_rms_norm", mutates_args=())
def add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor,
                 epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_add_rms_norm: (rms_norm(x1 + x2) * gamma, rstd, x1 + x2)."""
    if _npu(x1):
        return _torch_npu().npu_add_rms_norm(x1, x2, gamma, epsilon)
    s = x1.float() + x2.float()
    y, rstd = _rms(s, gamma, epsilon)
    return y.to(x1.dtype), rstd, s.to(x1.dtype)


@add_rms_norm.register_fake
def _(x1, x2, gamma, epsilon=1e-6):
    return torch.empty_like(x1), x1.new_empty((*x1.shape[:-1], 1), dtype=torch.float32), torch.empty_like(x1)


@torch.library.custom_op("ptqc_npu::add_rms_norm_quant", mutates_args=())
def add_rms_norm_quant(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, scales1: torch.Tensor,
                       zero_points1: Optional[torch.Tensor] = None, epsilon: float = 1e-6,
                       div_mode: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_add_rms_norm_quant: residual add + RMSNorm + static int8 quantization in one kernel.
    Returns (codes int8, x1 + x2)."""
    if _npu(x1):
        y1, _, x_out = _torch_npu().npu_add_rms_norm_quant(x1, x2, gamma, scales1, zero_points1, None,
                                                            epsilon=epsilon, div_mode=div_mode)
        return y1, x_out
    s = x1.float() + x2.float()
    y, _ = _rms(s, gamma, epsilon)
    return quantize(y, scales1, zero_points1, div_mode), s.to(x1.dtype)


@add_rms_norm_quant.register_fake
def _(x1, x2, gamma, scales1, zero_points1=None, epsilon=1e-6, div_mode=True):
    return torch.empty(x1.shape, dtype=torch.int8, device=x1.device), torch.empty_like(x1)


@torch.library.custom_op("ptqc_npu::add_rms_norm_dynamic_quant", mutates_args=())
def add_rms_norm_dynamic_quant(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor,
                               smooth_scale1: Optional[torch.Tensor] = None,
                               epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_add_rms_norm_dynamic_quant (one output path): residual add + RMSNorm + per-token
    dynamic int8 quantization with optional smooth scales. Returns (codes, x1 + x2, scale)."""
    if _npu(x1):
        y1, _, x_out, s1, _ = _torch_npu().npu_add_rms_norm_dynamic_quant(x1, x2, gamma, smooth_scale1=smooth_scale1,
                                                                          epsilon=epsilon)
        return y1, x_out, s1
    s = x1.float() + x2.float()
    y, _ = _rms(s, gamma, epsilon)
    codes, scale = dynamic_quant(y, smooth_scale1)
    return codes, s.to(x1.dtype), scale


@add_rms_norm_dynamic_quant.register_fake
def _(x1, x2, gamma, smooth_scale1=None, epsilon=1e-6):
    return (torch.empty(x1.shape, dtype=torch.int8, device=x1.device), torch.empty_like(x1),
            x1.new_empty(x1.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("ptqc_npu::swiglu_quant", mutates_args=())
def swiglu_quant(x: torch.Tensor, activate_left: bool = True,
                 smooth_scales: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_swiglu_quant, dynamic mode (quant_mode=1): activate_left=True computes
    ``swish(x[..., :n]) * x[..., n:]`` (False: ``swish(second half) * first half``), then
    per-token int8 quantization as dynamic_quant, with ``smooth_scales`` (float32 [1, n], one
    group) multiplied in first. The last dim is even and at most 8192. Returns (codes, scale)."""
    if _npu(x):
        return _torch_npu().npu_swiglu_quant(x, smooth_scales=smooth_scales, activate_left=activate_left, quant_mode=1)
    why = check_swiglu_quant(x.shape[-1])
    if why:
        raise PtqcError(why)
    a, b = x.float().chunk(2, -1)
    h = torch.nn.functional.silu(a) * b if activate_left else torch.nn.functional.silu(b) * a
    return dynamic_quant(h, None if smooth_scales is None else smooth_scales.reshape(-1))


def check_swiglu_quant(n2: int) -> str | None:
    if n2 % 2 or n2 > 8192:
        return f"npu_swiglu_quant takes an even last dim of at most 8192 (2 x intermediate = {n2})"
    return None


@swiglu_quant.register_fake
def _(x, activate_left=True, smooth_scales=None):
    shape = (*x.shape[:-1], x.shape[-1] // 2)
    return torch.empty(shape, dtype=torch.int8, device=x.device), x.new_empty(x.shape[:-1], dtype=torch.float32)


# ---- int4 (W4A4): packing, per-token int4 quantization, Kronecker/rotation transforms + quant ----
# Packing order (the torch_npu docs only say "8 int4 per int32, interleaved"): element j of each
# group of 8 along the last dim sits in bits [4j, 4j + 4) of the int32, two's complement, i.e.
# low nibble first -- the msModelSlim W4A16 byte layout (pack_int4) read as little-endian int32,
# which is how vllm-ascend's modelslim path builds int32 int4 weights (int8 pairs .view(int32)).
MAX_KRONECKER_TOKENS = 32768  # npu_kronecker_quant dim 0 limit (vllm-ascend splits larger batches)
ROTATE_QUANT_K = (16, 1024)  # npu_rotate_quant (A2/A3): rotation [K, K], K in [16, 1024]
ROTATE_QUANT_N = (128, 16000)  # ... x 2-D, last dim in [128, 16000], divisible by 8 and by K


def pack_int4x8(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes (any int dtype, values in [-8, 7]) -> int32, 8 per element along the last
    dim, element j in bits [4j, 4j + 4)."""
    if codes.shape[-1] % 8:
        raise PtqcError(f"cannot pack {codes.shape[-1]} int4 codes 8 per int32: the last dimension must be a multiple of 8")
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, 8) & 0xF
    word = (c << (4 * torch.arange(8, device=codes.device))).sum(-1)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def unpack_int4x8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4x8`: int8 codes in [-8, 7], last dim x 8 (sign-extended nibbles)."""
    w = packed.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8, device=packed.device))
    nib = w & 0xF
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8).reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def _int4_codes(h: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int4 of float32 ``h`` [..., n]: scale = rowmax|h| * clip / 7, codes =
    round half-even(h / scale) saturated to [-8, 7] (clip < 1 makes the saturation bite), packed."""
    scale = h.abs().amax(-1) * clip / 7.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(h / safe.unsqueeze(-1)), -8, 7)
    return pack_int4x8(codes), scale


@torch.library.custom_op("ptqc_npu::convert_weight_to_int4pack", mutates_args=())
def convert_weight_to_int4pack(weight: torch.Tensor) -> torch.Tensor:
    """npu_convert_weight_to_int4pack: int32 codes [r, c] in [-8, 7] -> int32 [r, c / 8] (order above).
    An (n, k) weight packed along k and passed transposed is x2 = (k / 8, n) for quant_matmul."""
    if _npu(weight):
        return _torch_npu().npu_convert_weight_to_int4pack(weight.to(torch.int32))
    if weight.numel() and (weight.min() < -8 or weight.max() > 7):
        raise PtqcError("npu_convert_weight_to_int4pack takes values in [-8, 7]")
    return pack_int4x8(weight)


@convert_weight_to_int4pack.register_fake
def _(weight):
    return weight.new_empty((*weight.shape[:-1], weight.shape[-1] // 8), dtype=torch.int32)


def check_int4_last_dim(n: int, what: str = "npu_dynamic_quant (int4)") -> str | None:
    if n % 8:
        return f"{what} needs the last dimension to be a multiple of 8 (int4 packed 8 per int32; got {n})"
    return None


@torch.library.custom_op("ptqc_npu::dynamic_quant_int4", mutates_args=())
def dynamic_quant_int4(x: torch.Tensor, smooth_scales: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_dynamic_quant(dst_type=torch.quint4x2): per-token symmetric int4, ``scale = rowmax|x *
    smooth| / 7`` (DTYPE_MAX of int4), ``y = round(x * smooth / scale)``. Returns (codes int32
    [..., k / 8] packed 8 per int32, scale float32 x.shape[:-1]). Doc silent, chosen: float32
    arithmetic, half-to-even rounding and saturation to [-8, 7] as the int8 path."""
    if _npu(x):
        return _torch_npu().npu_dynamic_quant(x, smooth_scales=smooth_scales, dst_type=torch.quint4x2)
    why = check_int4_last_dim(x.shape[-1])
    if why:
        raise PtqcError(why)
    h = x.float()
    if smooth_scales is not None:
        h = h * smooth_scales.float()
    return _int4_codes(h)


@dynamic_quant_int4.register_fake
def _(x, smooth_scales=None):
    return (x.new_empty((*x.shape[:-1], x.shape[-1] // 8), dtype=torch.int32),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


def check_kronecker_quant(m: int, n: int) -> str | None:
    if n % 8:
        return f"npu_kronecker_quant needs the right factor's size N to be a multiple of 8 (got M={m}, N={n})"
    return None


@torch.library.custom_op("ptqc_npu::kronecker_quant", mutates_args=())
def kronecker_quant(x: torch.Tensor, kronecker_p1: torch.Tensor, kronecker_p2: torch.Tensor,
                    clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_kronecker_quant(dst_dtype=int32): two small matmuls, then per-token int4 quantization.

    The kernel takes x [K, M, N] (K tokens), p1 [M, M], p2 [N, N]; here x is [..., M * N] and is
    viewed as [tokens, M, N] (outputs reshaped back): returns (codes int32 [..., M * N / 8],
    quant_scale float32 [...]). The docs give no formula; chosen, following FlatQuant and
    vllm-ascend's W4A4_FLATQUANT_DYNAMIC (which passes ``left_trans.t()`` as p1):
    ``y_k = p1 @ x_k @ p2`` (so row-major ``vec(y_k) = vec(x_k) (p1^T kron p2)``; ptqc's
    ``transform(x, a, b) = x (a kron b)`` is p1 = a^T, p2 = b), float32 with (p1 @ x) @ p2 order,
    then ``scale = rowmax|y| * clip_ratio / 7``, ``round_half_even(y / scale)`` saturated to
    [-8, 7], packed as above. On an NPU more than 32768 tokens are split (kernel limit)."""
    m, n = kronecker_p1.shape[0], kronecker_p2.shape[0]
    lead = x.shape[:-1]
    if _npu(x):
        x3 = x.reshape(-1, m, n)
        parts = [_torch_npu().npu_kronecker_quant(c, kronecker_p1, kronecker_p2, clip_ratio=clip_ratio,
                                                  dst_dtype=torch.int32)
                 for c in torch.split(x3, MAX_KRONECKER_TOKENS, 0)]
        codes = torch.cat([p[0] for p in parts]).reshape(*lead, m * n // 8)
        return codes, torch.cat([p[1].reshape(-1) for p in parts]).reshape(lead)
    why = check_kronecker_quant(m, n)
    if why:
        raise PtqcError(why)
    if x.shape[-1] != m * n:
        raise PtqcError(f"npu_kronecker_quant: last dim {x.shape[-1]} != M * N = {m} * {n}")
    h = x.float().reshape(*lead, m, n)
    y = (kronecker_p1.float() @ h) @ kronecker_p2.float()
    return _int4_codes(y.reshape(*lead, m * n), clip_ratio)


@kronecker_quant.register_fake
def _(x, kronecker_p1, kronecker_p2, clip_ratio=1.0):
    return (x.new_empty((*x.shape[:-1], x.shape[-1] // 8), dtype=torch.int32),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


def check_rotate_quant(k: int, n: int) -> str | None:
    lo, hi = ROTATE_QUANT_K
    if not lo <= k <= hi:
        return f"npu_rotate_quant takes a rotation [K, K] with K in [{lo}, {hi}] (got K={k})"
    lo, hi = ROTATE_QUANT_N
    if not lo <= n <= hi or n % 8 or n % k:
        return (f"npu_rotate_quant needs the last dim in [{lo}, {hi}], divisible by 8 and by K "
                f"(got {n}, K={k})")
    return None


@torch.library.custom_op("ptqc_npu::rotate_quant", mutates_args=())
def rotate_quant(x: torch.Tensor, rotation: torch.Tensor, int4: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_rotate_quant (A2/A3: dst_dtype int8 or quint4x2, scale_alg 0, alpha None): every block of
    K along the last dim is multiplied by rotation [K, K] (``x (I kron R)``; the 950 variant takes
    one rotation per block, which pins down the block reading), then per-token symmetric dynamic
    quantization as npu_dynamic_quant. x is [..., N] (the kernel takes 2-D [M, N]; viewed so).
    Returns (codes: int32 [..., N / 8] when ``int4`` else int8 [..., N], scale float32 [...]).
    Chosen where the docs are silent: float32 arithmetic, round half to even ("rint"), saturation."""
    k, n = rotation.shape[0], x.shape[-1]
    lead = x.shape[:-1]
    if _npu(x):
        y, s = _torch_npu().npu_rotate_quant(x.reshape(-1, n), rotation,
                                             dst_dtype=torch.quint4x2 if int4 else torch.int8)
        return y.reshape(*lead, y.shape[-1]), s.reshape(lead)
    why = check_rotate_quant(k, n)
    if why:
        raise PtqcError(why)
    h = (x.float().reshape(*lead, n // k, k) @ rotation.float()).reshape(*lead, n)
    if int4:
        return _int4_codes(h)
    return dynamic_quant(h)


@rotate_quant.register_fake
def _(x, rotation, int4=True):
    n = x.shape[-1]
    codes = (x.new_empty((*x.shape[:-1], n // 8), dtype=torch.int32) if int4
             else x.new_empty(x.shape, dtype=torch.int8))
    return codes, x.new_empty(x.shape[:-1], dtype=torch.float32)


# ---- softmax -----------------------------------------------------------------------------------
def check_scaled_masked_softmax(shape) -> str | None:
    h, w = shape[-2], shape[-1]
    for name, d in (("H", h), ("W", w)):
        if not isinstance(d, int) or not 32 <= d <= 4096 or d % 32:
            return (f"npu_scaled_masked_softmax needs the last two dims in [32, 4096] and multiples of 32 "
                    f"({name}={d})")
    return None


@torch.library.custom_op("ptqc_npu::scaled_masked_softmax", mutates_args=())
def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor, scale: float = 1.0,
                          fixed_triu_mask: bool = False) -> torch.Tensor:
    """npu_scaled_masked_softmax: softmax((x * scale).masked_fill(mask, -inf)) (mask True = masked)."""
    if _npu(x):
        return _torch_npu().npu_scaled_masked_softmax(x, mask, scale, fixed_triu_mask)
    why = check_scaled_masked_softmax(tuple(x.shape))
    if why:
        raise PtqcError(why)
    if fixed_triu_mask:
        h, w = x.shape[-2:]
        mask = torch.ones(h, w, dtype=torch.bool, device=x.device).triu(1)
    h = (x.float() * scale).masked_fill(mask, float("-inf"))
    return torch.softmax(h, -1).to(x.dtype)


@scaled_masked_softmax.register_fake
def _(x, mask, scale=1.0, fixed_triu_mask=False):
    return torch.empty_like(x)


ADD_SOFTMAX_SIZES = (128, 256, 384, 512)


def check_dropout_with_add_softmax(shape) -> str | None:
    n, c, h, w = shape
    if h not in ADD_SOFTMAX_SIZES or w not in ADD_SOFTMAX_SIZES:
        return f"npu_dropout_with_add_softmax needs H and W in {list(ADD_SOFTMAX_SIZES)} (got H={h}, W={w})"
    if isinstance(n, int) and isinstance(c, int) and (n * c) % 32:
        return f"npu_dropout_with_add_softmax needs N * C divisible by 32 (got {n} * {c})"
    return None


@torch.library.custom_op("ptqc_npu::dropout_with_add_softmax", mutates_args=())
def dropout_with_add_softmax(x: torch.Tensor, x1: torch.Tensor, alpha: float, prob: float = 0.0,
                             dim: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_dropout_with_add_softmax: ``y = x1 + x * alpha``, softmax over the last dim, then dropout
    with drop probability ``prob`` (0 at inference, as torch_npu's contrib attention passes it).
    Returns (mask, softmax, dropout output); the lowering reads output 2 like torch_npu's contrib
    code. x and x1 have the same 4-d shape, H and W in {128, 256, 384, 512}, N * C % 32 == 0."""
    if _npu(x):
        return _torch_npu().npu_dropout_with_add_softmax(x, x1, alpha, prob, dim)
    if dim != -1 or x.dim() != 4 or x1.shape != x.shape:
        raise PtqcError(f"npu_dropout_with_add_softmax takes two 4-d tensors of one shape and dim=-1 "
                        f"(got {tuple(x.shape)}, {tuple(x1.shape)}, dim={dim})")
    why = check_dropout_with_add_softmax(tuple(x.shape))
    if why:
        raise PtqcError(why)
    if prob != 0.0:
        raise PtqcError("the emulation of npu_dropout_with_add_softmax is for inference: prob must be 0")
    y = torch.softmax(x1.float() + x.float() * alpha, -1).to(x.dtype)
    return torch.ones(x.shape, dtype=torch.uint8, device=x.device), y, y.clone()


@dropout_with_add_softmax.register_fake
def _(x, x1, alpha, prob=0.0, dim=-1):
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device), torch.empty_like(x), torch.empty_like(x)


# ---- fused attention (prompt/incremental flash attention, int8 KV cache through antiquant) --------
FIA_MASK = 2048  # sparse_mode 2/3/4 take this "optimized" (2048, 2048) upper-triangular bool mask
MAX_INT = 2147483647


def check_fused_infer_attention(num_heads: int, num_kv_heads: int, head_dim: int) -> str | None:
    if num_kv_heads and (num_heads % num_kv_heads or num_heads // num_kv_heads > 64):
        return (f"npu_fused_infer_attention_score needs num_heads a multiple of num_key_value_heads with a ratio "
                f"<= 64 (got {num_heads} / {num_kv_heads})")
    if head_dim > 512:
        return f"npu_fused_infer_attention_score takes head_dim <= 512 (got {head_dim})"
    return None


def fia_keep(q_len: int, kv_len: int, sparse_mode: int, pre_tokens: int, next_tokens: int, device) -> torch.Tensor | None:
    """Which (query, key) pairs a sparse mode computes (True = attend); None = all."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    if sparse_mode == 2:  # leftUpCausal
        return j <= i
    if sparse_mode == 3:  # rightDownCausal: the last query sees every key
        return j <= i + (kv_len - q_len)
    if sparse_mode == 4:  # band, right-down aligned: [i - pre_tokens, i + next_tokens]
        d = j - i - (kv_len - q_len)
        return (d >= -pre_tokens) & (d <= next_tokens)
    return None


@torch.library.custom_op("ptqc_npu::fused_infer_attention_score", mutates_args=())
def fused_infer_attention_score(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                atten_mask: Optional[torch.Tensor] = None,
                                antiquant_scale: Optional[torch.Tensor] = None,
                                antiquant_offset: Optional[torch.Tensor] = None,
                                num_heads: int = 1, num_key_value_heads: int = 0, scale: float = 1.0,
                                pre_tokens: int = MAX_INT, next_tokens: int = MAX_INT,
                                input_layout: str = "BNSD", sparse_mode: int = 0) -> torch.Tensor:
    """npu_fused_infer_attention_score (output 0): ``softmax(scale * q k^T + mask) v``, BNSD layout,
    GQA through ``num_key_value_heads``. An int8 key/value is a quantized KV cache, dequantized
    inside the kernel with the combined antiquant parameters: index 0 for K, 1 for V,
    ``(x + antiquant_offset) * antiquant_scale`` (the offset is ADDED, as in the weight-only
    matmul), per channel (shape (2, KV_N, 1, D)) or per tensor (shape (2,)); the docs allow this
    with a prompt (Q_S >= 2) only in float16 and with the parameters in the query's dtype.
    Masks: sparse_mode 0 uses ``atten_mask`` as given (True = not computed), 2/3 are the
    left-up / right-down causal masks and 4 a right-down band of ``pre_tokens`` / ``next_tokens``,
    all three reading the optimized (2048, 2048) mask.

    Emulation choices (the docs are silent): the dequantized K/V are rounded to the query dtype,
    scores, softmax and the product with V are float32 ("high precision" mode, computed by
    torch's SDPA like ``ptqc.attention``, so a float32 graph lowers bit for bit), the output is
    rounded to the query dtype once. float32 queries are accepted by the emulation only."""
    if _npu(query):
        return _torch_npu().npu_fused_infer_attention_score(
            query, key, value, atten_mask=atten_mask, antiquant_scale=antiquant_scale,
            antiquant_offset=antiquant_offset, num_heads=num_heads, num_key_value_heads=num_key_value_heads,
            scale=scale, pre_tokens=pre_tokens, next_tokens=next_tokens, input_layout=input_layout,
            sparse_mode=sparse_mode)[0]
    if input_layout != "BNSD":
        raise PtqcError(f"the emulation of npu_fused_infer_attention_score takes input_layout BNSD (got {input_layout})")
    b, n, sq, d = query.shape
    nkv = key.shape[1]
    why = check_fused_infer_attention(num_heads, num_key_value_heads, d)
    if why or n != num_heads or nkv != (num_key_value_heads or num_heads) or key.shape != value.shape:
        raise PtqcError(why or f"npu_fused_infer_attention_score: query {tuple(query.shape)} / key "
                        f"{tuple(key.shape)} / value {tuple(value.shape)} do not match num_heads={num_heads}, "
                        f"num_key_value_heads={num_key_value_heads}")
    k, v = key, value
    if key.dtype == torch.int8:
        if value.dtype != torch.int8 or antiquant_scale is None:
            raise PtqcError("npu_fused_infer_attention_score: an int8 key needs an int8 value and antiquant_scale")
        if tuple(antiquant_scale.shape) not in ((2,), (2, nkv, 1, d)):
            raise PtqcError(f"antiquant_scale must be (2,) per tensor or (2, {nkv}, 1, {d}) per channel in BNSD "
                            f"(got {tuple(antiquant_scale.shape)})")
        if antiquant_offset is not None and antiquant_offset.shape != antiquant_scale.shape:
            raise PtqcError("antiquant_offset must have antiquant_scale's shape")
        if antiquant_scale.dtype != query.dtype:
            raise PtqcError(f"antiquant_scale must have the query's dtype {query.dtype} (got {antiquant_scale.dtype})")
        s = antiquant_scale.float().reshape(2, -1, 1, d) if antiquant_scale.dim() > 1 else antiquant_scale.float()
        o = None if antiquant_offset is None else antiquant_offset.float().reshape(s.shape)

        def deq(x, i):
            h = x.float() if o is None else x.float() + o[i]
            return (h * s[i]).to(query.dtype)

        k, v = deq(key, 0), deq(value, 1)
    skv = k.shape[2]
    if sparse_mode in (2, 3, 4) and (atten_mask is None or tuple(atten_mask.shape[-2:]) != (FIA_MASK, FIA_MASK)):
        raise PtqcError(f"sparse_mode {sparse_mode} needs the optimized ({FIA_MASK}, {FIA_MASK}) atten_mask")
    rep = n // nkv
    qf, kf, vf = query.float(), k.float(), v.float()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if sparse_mode == 3 and sq == skv:  # the causal prompt: SDPA's causal path, as ptqc.attention runs it
        out = sdpa(qf, kf, vf, is_causal=sq > 1, scale=scale, enable_gqa=rep > 1)
    else:
        keep = fia_keep(sq, skv, sparse_mode, pre_tokens, next_tokens, query.device)
        if sparse_mode in (0, 1) and atten_mask is not None:
            keep = ~atten_mask.bool()
        out = sdpa(qf, kf.repeat_interleave(rep, 1), vf.repeat_interleave(rep, 1), attn_mask=keep, scale=scale)
    return out.to(query.dtype)


@fused_infer_attention_score.register_fake
def _(query, key, value, atten_mask=None, antiquant_scale=None, antiquant_offset=None, num_heads=1,
      num_key_value_heads=0, scale=1.0, pre_tokens=MAX_INT, next_tokens=MAX_INT, input_layout="BNSD", sparse_mode=0):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


DYNAMIC_QUANT = torch.ops.ptqc_npu.dynamic_quant.default
QUANTIZE = torch.ops.ptqc_npu.quantize.default
TRANS_QUANT_PARAM = torch.ops.ptqc_npu.trans_quant_param.default
QUANT_MATMUL = torch.ops.ptqc_npu.quant_matmul.default
WEIGHT_QUANT_BATCHMATMUL = torch.ops.ptqc_npu.weight_quant_batchmatmul.default
RMS_NORM = torch.ops.ptqc_npu.rms_norm.default
ADD_RMS_NORM = torch.ops.ptqc_npu.add_rms_norm.default
ADD_RMS_NORM_QUANT = torch.ops.ptqc_npu.add_rms_norm_quant.default
ADD_RMS_NORM_DYNAMIC_QUANT = torch.ops.ptqc_npu.add_rms_norm_dynamic_quant.default
SCALED_MASKED_SOFTMAX = torch.ops.ptqc_npu.scaled_masked_softmax.default
DROPOUT_WITH_ADD_SOFTMAX = torch.ops.ptqc_npu.dropout_with_add_softmax.default
FUSED_INFER_ATTENTION_SCORE = torch.ops.ptqc_npu.fused_infer_attention_score.default
SWIGLU_QUANT = torch.ops.ptqc_npu.swiglu_quant.default
DYNAMIC_QUANT_INT4 = torch.ops.ptqc_npu.dynamic_quant_int4.default
KRONECKER_QUANT = torch.ops.ptqc_npu.kronecker_quant.default
ROTATE_QUANT = torch.ops.ptqc_npu.rotate_quant.default
CONVERT_WEIGHT_TO_INT4PACK = torch.ops.ptqc_npu.convert_weight_to_int4pack.default
