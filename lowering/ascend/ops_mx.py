"""MX kernels of Ascend 950 (vllm-ascend's W8A8_MXFP8 / W4A4_MXFP4): npu_dynamic_mx_quant and the MX form
of npu_quant_matmul. See ops.py; the numerics are ptqc.quant's ``mx`` kind (OCP MX v1.0).

CPU emulation choices where the torch_npu docs are silent: the block scale is OCP's
``floor(log2(amax)) - emax_elem`` (vllm-ascend passes ``round_mode="round"`` for FP4: round to
nearest even, saturating), elements are held as float8_e4m3fn values (exact for E2M1 too, where the
NPU packs two per byte), and the matmul multiplies the dequantized operands with float32
accumulation, then rounds once to the output dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from ptqc import quant
from ptqc.errors import PtqcError
from ptqc.lowering.ascend.ops_quant import _npu, _torch_npu


def check_mx(k: int) -> str | None:
    if k % quant.MX_BLOCK:
        return f"MX quantization needs the reduced dimension to be a multiple of {quant.MX_BLOCK} (got {k})"
    return None


@torch.library.custom_op("ptqc_npu::dynamic_mx_quant", mutates_args=())
def dynamic_mx_quant(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_dynamic_mx_quant(x, dst_type=float8_e4m3fn (bits 8) | float4_e2m1fn_x2 (bits 4)): blocks of
    32 along the last dim. Returns (elements float8_e4m3fn [..., k], E8M0 scales uint8 [..., k / 32])."""
    if _npu(x):
        if bits != 8:
            raise PtqcError("dynamic_mx_quant: the NPU's FP4 output is packed float4_e2m1fn_x2; only the "
                            "CPU emulation returns FP4 elements unpacked")
        y, s = _torch_npu().npu_dynamic_mx_quant(x, dst_type=torch.float8_e4m3fn)
        return y, s.view(torch.uint8).reshape(*x.shape[:-1], -1)
    spec = quant.QuantSpec(bits, quant.MX_BLOCK, True, kind="mx")
    codes, scale, _ = quant.rtn(x.float(), spec)
    return codes, quant.mx_exponent(scale)


@dynamic_mx_quant.register_fake
def _(x, bits):
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty((*x.shape[:-1], x.shape[-1] // quant.MX_BLOCK), dtype=torch.uint8))


@torch.library.custom_op("ptqc_npu::mx_quant_matmul", mutates_args=())
def mx_quant_matmul(x1: torch.Tensor, x1_scale: torch.Tensor, x2: torch.Tensor, x2_scale: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """npu_quant_matmul with MX operands (group_sizes [1, 1, 32]): x1 elements [..., m, k] with E8M0
    ``x1_scale`` [..., m, k / 32] (pertoken_scale), x2 elements [k, n] with E8M0 ``x2_scale`` [k / 32, n]
    (scale): ``sum_k (x1 * 2^(s1 - 127)) (x2 * 2^(s2 - 127))`` in float32, + bias (float32), in
    ``output_dtype``. The NPU path is not wired (its weight scale is laid out [k / 64, n, 2])."""
    if _npu(x1):
        raise PtqcError("mx_quant_matmul: run the lowered MX graph on the CPU (NPU dispatch not wired)")
    k = x2.shape[0]
    if x1.shape[-1] != k or x1_scale.shape[-1] * quant.MX_BLOCK != k or x2_scale.shape[0] * quant.MX_BLOCK != k:
        raise PtqcError(f"mx_quant_matmul: shapes {list(x1.shape)} x {list(x2.shape)} with scales "
                        f"{list(x1_scale.shape)}, {list(x2_scale.shape)} do not fit blocks of {quant.MX_BLOCK}")
    a = x1.float() * quant.mx_scale_of(x1_scale).repeat_interleave(quant.MX_BLOCK, -1)
    b = x2.float() * quant.mx_scale_of(x2_scale).repeat_interleave(quant.MX_BLOCK, 0)
    out = a @ b
    if bias is not None:
        out = out + bias.float()
    return out.to(output_dtype or torch.float32)


@mx_quant_matmul.register_fake
def _(x1, x1_scale, x2, x2_scale, bias=None, output_dtype=None):
    return x1.new_empty((*x1.shape[:-1], x2.shape[1]), dtype=output_dtype or torch.float32)


DYNAMIC_MX_QUANT = torch.ops.ptqc_npu.dynamic_mx_quant.default
MX_QUANT_MATMUL = torch.ops.ptqc_npu.mx_quant_matmul.default
