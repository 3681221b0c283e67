"""Quantized matmul kernels: npu_quant_matmul (int8 x int8, int4 x int4) and
npu_weight_quant_batchmatmul (W8A16 / W4A16). See ops.py."""
from __future__ import annotations

from typing import Optional

import torch

from ptqc.errors import PtqcError
from ptqc.lowering.ascend.ops_quant import (_npu, _require, _saturate_round, _torch_npu, deq_scale_value,
                                             unpack_int4x8)

MAX_KN = 65535  # npu_quant_matmul: K and N at most 65535


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
    _require(check_quant_matmul(k, n))
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
    _require(check_weight_quant_batchmatmul(antiquant_group_size))
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

