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
* outputs are rounded to the requested dtype (fp16/bf16) once, at the end.

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
        return _torch_npu().npu_quant_matmul(x1, x2, scale, offset=offset, pertoken_scale=pertoken_scale,
                                             bias=bias, output_dtype=output_dtype)
    k, n = x2.shape
    why = check_quant_matmul(k, n)
    if why:
        raise PtqcError(why)
    if x1.dtype != torch.int8 or x2.dtype != torch.int8:
        raise PtqcError(f"quant_matmul emulation takes int8 operands (got {x1.dtype}, {x2.dtype})")
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
    return x1.new_empty((*x1.shape[:-1], x2.shape[1]), dtype=output_dtype or torch.int8)


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
def swiglu_quant(x: torch.Tensor, activate_left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_swiglu_quant, dynamic mode (quant_mode=1): activate_left=True computes
    ``swish(x[..., :n]) * x[..., n:]`` (False: ``swish(second half) * first half``), then
    per-token int8 quantization as dynamic_quant. Returns (codes, scale)."""
    if _npu(x):
        return _torch_npu().npu_swiglu_quant(x, activate_left=activate_left, quant_mode=1)
    a, b = x.float().chunk(2, -1)
    h = torch.nn.functional.silu(a) * b if activate_left else torch.nn.functional.silu(b) * a
    return dynamic_quant(h)


@swiglu_quant.register_fake
def _(x, activate_left=True):
    shape = (*x.shape[:-1], x.shape[-1] // 2)
    return torch.empty(shape, dtype=torch.int8, device=x.device), x.new_empty(x.shape[:-1], dtype=torch.float32)


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
SWIGLU_QUANT = torch.ops.ptqc_npu.swiglu_quant.default
