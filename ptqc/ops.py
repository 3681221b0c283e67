"""The ptqc operator dialect.

Canonical graphs use these ops instead of decomposed aten patterns, so passes match one node
(`ptqc.rms_norm`) instead of a pow/mean/rsqrt/mul chain. Each op has a CPU reference kernel
(the numerics every backend is diffed against) and a fake kernel, so a ptqc graph runs,
propagates shapes and re-exports with ``torch.export``.

    linear(x, w, b)                          y = x @ w.T + b
    rms_norm(x, w, eps, offset)              Llama/Qwen2 RMSNorm (offset=1 is Gemma's (1 + w))
    attention(q, k, v, scale, causal, window) softmax(q k^T * scale + mask) v, GQA by head groups
    dequantize_weight(codes, scale, zp, group, dtype)   integer weight codes -> float weight
    unpack_int4(packed)                      two int4 codes per int8 byte -> int8 codes
    quantize_act(x, scale, zp, bits, group, sym, clip)  activation fake-quant: dynamic (scale None:
                                             per token / group / tensor) or static (calibrated
                                             scale broadcast against x)
    transform(x, a, b)                       x @ (a kron b) along the last dim (x @ a without b):
                                             online Hadamard / FlatQuant Kronecker transforms

``EAGER`` maps each op to a plain differentiable function (activation fake-quant with a
straight-through estimator) for passes that train through a layer (flatquant).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ptqc import quant


@torch.library.custom_op("ptqc::linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, w, b)


@linear.register_fake
def _(x, w, b=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:  # Llama, Qwen2, Mistral: w * normed.to(input dtype)
        return w * h.to(dtype)
    return (h * (offset + w.float())).to(dtype)  # Gemma: computed in float32, then cast


@torch.library.custom_op("ptqc::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    return _rms_norm(x, w, eps, offset)


@rms_norm.register_fake
def _(x, w, eps, offset=0.0):
    dtype = torch.promote_types(x.dtype, w.dtype) if offset == 0.0 else x.dtype
    return x.new_empty(x.shape, dtype=dtype)


def causal_mask(q_len: int, k_len: int, window: int, device) -> torch.Tensor:
    """Boolean mask (True = attend): causal, optionally limited to the last `window` keys."""
    i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    mask = j <= i
    if window > 0:
        mask &= j > i - window
    return mask


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal: bool = True, window: int = -1) -> torch.Tensor:
    """q: [B, H, S, D]; k, v: [B, Hkv, S, D] with H a multiple of Hkv (grouped-query attention)."""
    if causal and window <= 0 and q.shape[2] == k.shape[2]:  # the common case: SDPA's causal kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    mask = causal_mask(q.shape[2], k.shape[2], window, q.device) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@torch.library.custom_op("ptqc::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              causal: bool = True, window: int = -1) -> torch.Tensor:
    return _attention(q, k, v, scale, causal, window)


@attention.register_fake
def _(q, k, v, scale, causal=True, window=-1):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("ptqc::dequantize_weight", mutates_args=())
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                      group_size: int, dtype: torch.dtype) -> torch.Tensor:
    return quant.dequantize(codes, scale, zero_point, group_size).to(dtype)


@dequantize_weight.register_fake
def _(codes, scale, zero_point, group_size, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


@torch.library.custom_op("ptqc::unpack_int4", mutates_args=())
def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return quant.unpack_int4(packed)


@unpack_int4.register_fake
def _(packed):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2))


@torch.library.custom_op("ptqc::quantize_act", mutates_args=())
def quantize_act(x: torch.Tensor, scale: Optional[torch.Tensor], zero_point: Optional[torch.Tensor],
                 bits: int, group: int, sym: bool, clip: float = 1.0) -> torch.Tensor:
    return quant.fake_quant_act(x, scale, zero_point, quant.QuantSpec(bits, group, sym, clip)).to(x.dtype)


@quantize_act.register_fake
def _(x, scale, zero_point, bits, group, sym, clip=1.0):
    return torch.empty_like(x)


def _transform(x: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    h = x.float()
    if b is None:
        return (h @ a.float()).to(x.dtype)
    n1, n2 = a.shape[0], b.shape[0]
    h = h.reshape(*x.shape[:-1], n1, n2)
    h = a.float().t() @ h @ b.float()  # vec(A^T X B) = x (A kron B) for row-major X
    return h.reshape(*x.shape[:-1], a.shape[1] * b.shape[1]).to(x.dtype)


@torch.library.custom_op("ptqc::transform", mutates_args=())
def transform(x: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _transform(x, a, b)


@transform.register_fake
def _(x, a, b=None):
    n = a.shape[1] * (b.shape[1] if b is not None else 1)
    return x.new_empty((*x.shape[:-1], n))


# The ops a pass may find in a canonical graph, by short name.
LINEAR = torch.ops.ptqc.linear.default
RMS_NORM = torch.ops.ptqc.rms_norm.default
ATTENTION = torch.ops.ptqc.attention.default
DEQUANTIZE_WEIGHT = torch.ops.ptqc.dequantize_weight.default
UNPACK_INT4 = torch.ops.ptqc.unpack_int4.default
QUANTIZE_ACT = torch.ops.ptqc.quantize_act.default
TRANSFORM = torch.ops.ptqc.transform.default


def _quantize_act_ste(x, scale, zero_point, bits, group, sym, clip=1.0):
    """Fake-quant whose gradient w.r.t. x is the identity (straight-through estimator)."""
    with torch.no_grad():
        q = quant.fake_quant_act(x.detach(), scale, zero_point, quant.QuantSpec(bits, group, sym, clip)).to(x.dtype)
    return x + (q - x).detach()


# Differentiable implementations (same numerics as the custom ops above, autograd-friendly).
EAGER = {
    LINEAR: lambda x, w, b=None: F.linear(x, w, b),
    RMS_NORM: _rms_norm,
    ATTENTION: _attention,
    TRANSFORM: _transform,
    QUANTIZE_ACT: _quantize_act_ste,
}
