"""The ptqc operator dialect.

Canonical graphs use these ops instead of decomposed aten patterns, so passes match one node
(`ptqc.rms_norm`) instead of a pow/mean/rsqrt/mul chain. Each op has a CPU reference kernel
(the numerics every backend is diffed against) and a fake kernel, so a ptqc graph runs,
propagates shapes and re-exports with ``torch.export``.

    linear(x, w, b)                          y = x @ w.T + b
    rms_norm(x, w, eps, offset)              Llama/Qwen2 RMSNorm (offset=1 is Gemma's (1 + w))
    attention(q, k, v, scale, causal, window, softcap)  softmax(q k^T * scale + mask) v, GQA by head
                                             groups; softcap > 0: scores capped (Gemma 2)
    layer_norm(x, w, b, eps)                 LayerNorm over the last dim, weight and bias optional
    dequantize_weight(codes, scale, zp, group, dtype)   integer weight codes -> float weight
    unpack_int4(packed)                      two int4 codes per int8 byte -> int8 codes
    quantize_act(x, scale, zp, bits, group, sym, clip, kind)  activation fake-quant: dynamic (scale
                                             None: per token / group / tensor) or static (calibrated
                                             scale broadcast against x); kind "mx" / "mix": quant.py
    transform(x, a, b)                       x @ (a kron b) along the last dim (x @ a without b):
                                             online Hadamard / FlatQuant Kronecker transforms
    moe_route(logits, bias, top_k, ...)      router logits [T, E] -> top-k (weights, ids) [T, k]:
                                             softmax or sigmoid scores, grouped top-k, renorm, scale
    moe_experts(x, weights, ids, gate, up, down, act, down_act_bits)   sum over k of weights *
                                             expert_ids(x); per-expert weights stacked [E, out, in];
                                             down's input fake-quantized per token if down_act_bits

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
               causal: bool = True, window: int = -1, softcap: float = 0.0) -> torch.Tensor:
    """q: [B, H, S, D]; k, v: [B, Hkv, S, D] with H a multiple of Hkv (grouped-query attention).
    ``softcap`` > 0 caps the scores as Gemma 2 does: ``softcap * tanh(scores / softcap)``."""
    if causal and window <= 0 and softcap <= 0 and q.shape[2] == k.shape[2]:  # SDPA's causal kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    mask = causal_mask(q.shape[2], k.shape[2], window, q.device) if causal else None
    if softcap <= 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = torch.tanh(q @ k.transpose(2, 3) * scale / softcap) * softcap  # as the eager path computes it
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


@torch.library.custom_op("ptqc::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              causal: bool = True, window: int = -1, softcap: float = 0.0) -> torch.Tensor:
    return _attention(q, k, v, scale, causal, window, softcap)


@attention.register_fake
def _(q, k, v, scale, causal=True, window=-1, softcap=0.0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _layer_norm(x: torch.Tensor, w: Optional[torch.Tensor], b: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


@torch.library.custom_op("ptqc::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, w: Optional[torch.Tensor], b: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return _layer_norm(x, w, b, eps)


@layer_norm.register_fake
def _(x, w, b, eps):
    return torch.empty_like(x)


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
                 bits: int, group: int, sym: bool, clip: float = 1.0, kind: str = "int") -> torch.Tensor:
    return quant.fake_quant_act(x, scale, zero_point, quant.QuantSpec(bits, group, sym, clip, kind)).to(x.dtype)


@quantize_act.register_fake
def _(x, scale, zero_point, bits, group, sym, clip=1.0, kind="int"):
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


MOE_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
            "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _moe_route(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, scoring: str = "softmax",
               norm_topk_prob: bool = False, n_group: int = 1, topk_group: int = 1, scale: float = 1.0,
               weights_dtype: Optional[torch.dtype] = None):
    """Top-k routing of tokens (rows of ``logits`` [T, E]) to experts: (weights, int64 ids), both [T, k].

    Scores are softmax or sigmoid of the logits (in float32); experts are chosen on scores + ``bias``
    (DeepSeek-V3's e_score_correction_bias), among the ``topk_group`` best of ``n_group`` groups
    (a group scores its two best experts) when ``n_group`` > 1; weights are the chosen scores,
    renormalized to sum 1 if ``norm_topk_prob``, times ``scale``, cast to ``weights_dtype``
    (None: the logits' dtype)."""
    scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        best = grouped.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=logits.device).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.unsqueeze(-1).expand_as(grouped).reshape(t, e), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    w = scores.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return (w * scale).to(weights_dtype or logits.dtype), ids


@torch.library.custom_op("ptqc::moe_route", mutates_args=())
def moe_route(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, scoring: str = "softmax",
              norm_topk_prob: bool = False, n_group: int = 1, topk_group: int = 1, scale: float = 1.0,
              weights_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _moe_route(logits, bias, top_k, scoring, norm_topk_prob, n_group, topk_group, scale, weights_dtype)


@moe_route.register_fake
def _(logits, bias, top_k, scoring="softmax", norm_topk_prob=False, n_group=1, topk_group=1, scale=1.0,
      weights_dtype=None):
    shape = (*logits.shape[:-1], top_k)
    return logits.new_empty(shape, dtype=weights_dtype or logits.dtype), logits.new_empty(shape, dtype=torch.long)


def moe_hidden(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str = "silu",
               down_act_bits: int = 0) -> torch.Tensor:
    """One expert's down input act(h gate^T) * (h up^T), fake-quantized dynamically per token,
    symmetric, to ``down_act_bits`` (0: float)."""
    y = MOE_ACTS[act](F.linear(h, gate)) * F.linear(h, up)
    if down_act_bits:
        y = quant.fake_quant_act(y, None, None, quant.QuantSpec(down_act_bits, 0, True)).to(y.dtype)
    return y


def _moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor,
                 up: torch.Tensor, down: torch.Tensor, act: str = "silu", down_act_bits: int = 0) -> torch.Tensor:
    """x [T, H]; weights, ids [T, k]; gate, up [E, I, H]; down [E, H, I]. Each token's output is
    the sum over its k experts e of weight * down_e(act(gate_e x) * up_e x) (the down input
    quantized as :func:`moe_hidden` says): products in the promoted dtype of the expert output
    and the weights, summed in float32 (as transformers' default grouped_mm experts), cast to x's dtype."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tok, pos = torch.where(ids == e)
        y = F.linear(moe_hidden(x[tok], gate[e], up[e], act, down_act_bits), down[e])
        out.index_add_(0, tok, (y * weights[tok, pos, None]).float())
    return out.to(x.dtype)


@torch.library.custom_op("ptqc::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor, act: str = "silu", down_act_bits: int = 0) -> torch.Tensor:
    return _moe_experts(x, weights, ids, gate, up, down, act, down_act_bits)


@moe_experts.register_fake
def _(x, weights, ids, gate, up, down, act="silu", down_act_bits=0):
    return torch.empty_like(x)


# The ops a pass may find in a canonical graph, by short name.
LINEAR = torch.ops.ptqc.linear.default
RMS_NORM = torch.ops.ptqc.rms_norm.default
ATTENTION = torch.ops.ptqc.attention.default
LAYER_NORM = torch.ops.ptqc.layer_norm.default
DEQUANTIZE_WEIGHT = torch.ops.ptqc.dequantize_weight.default
UNPACK_INT4 = torch.ops.ptqc.unpack_int4.default
QUANTIZE_ACT = torch.ops.ptqc.quantize_act.default
TRANSFORM = torch.ops.ptqc.transform.default
MOE_ROUTE = torch.ops.ptqc.moe_route.default
MOE_EXPERTS = torch.ops.ptqc.moe_experts.default


def _quantize_act_ste(x, scale, zero_point, bits, group, sym, clip=1.0, kind="int"):
    """Fake-quant whose gradient w.r.t. x is the identity (straight-through estimator)."""
    with torch.no_grad():
        q = quant.fake_quant_act(x.detach(), scale, zero_point, quant.QuantSpec(bits, group, sym, clip, kind)).to(x.dtype)
    return x + (q - x).detach()


# Differentiable implementations (same numerics as the custom ops above, autograd-friendly).
EAGER = {
    LINEAR: lambda x, w, b=None: F.linear(x, w, b),
    RMS_NORM: _rms_norm,
    ATTENTION: _attention,
    LAYER_NORM: _layer_norm,
    TRANSFORM: _transform,
    QUANTIZE_ACT: _quantize_act_ste,
    MOE_ROUTE: _moe_route,
    MOE_EXPERTS: _moe_experts,
}
