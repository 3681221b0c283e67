"""RMSNorm kernels, plain and fused with the residual add and quantization, and SwiGLU +
quantization. See ops.py."""
from __future__ import annotations

from typing import Optional

import torch

from ptqc.lowering.ascend.ops_quant import _npu, _require, _torch_npu, dynamic_quant, quantize


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
    _require(check_swiglu_quant(x.shape[-1]))
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

