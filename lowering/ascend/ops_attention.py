"""Attention kernels: the softmax kernels (npu_scaled_masked_softmax, npu_dropout_with_add_softmax)
and npu_fused_infer_attention_score (float or int8 KV cache through antiquant). See ops.py."""
from __future__ import annotations

from typing import Optional

import torch

from ptqc.errors import PtqcError
from ptqc.lowering.ascend.ops_quant import _npu, _require, _torch_npu


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
    _require(check_scaled_masked_softmax(tuple(x.shape)))
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
    _require(check_dropout_with_add_softmax(tuple(x.shape)))
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
        k, v = _antiquant(key, value, antiquant_scale, antiquant_offset, query)
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


def _antiquant(key: torch.Tensor, value: torch.Tensor, scale: Optional[torch.Tensor], offset: Optional[torch.Tensor],
               query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 K/V cache dequantized as npu_fused_infer_attention_score does: ``(x + offset[i]) * scale[i]``
    (index 0 for K, 1 for V), rounded to the query dtype."""
    nkv, d, dtype = key.shape[1], query.shape[3], query.dtype
    if value.dtype != torch.int8 or scale is None:
        raise PtqcError("npu_fused_infer_attention_score: an int8 key needs an int8 value and antiquant_scale")
    if tuple(scale.shape) not in ((2,), (2, nkv, 1, d)):
        raise PtqcError(f"antiquant_scale must be (2,) per tensor or (2, {nkv}, 1, {d}) per channel in BNSD "
                        f"(got {tuple(scale.shape)})")
    if offset is not None and offset.shape != scale.shape:
        raise PtqcError("antiquant_offset must have antiquant_scale's shape")
    if scale.dtype != dtype:
        raise PtqcError(f"antiquant_scale must have the query's dtype {dtype} (got {scale.dtype})")
    s = scale.float().reshape(2, -1, 1, d) if scale.dim() > 1 else scale.float()
    o = None if offset is None else offset.float().reshape(s.shape)

    def deq(x, i):
        h = x.float() if o is None else x.float() + o[i]
        return (h * s[i]).to(dtype)

    return deq(key, 0), deq(value, 1)


@fused_infer_attention_score.register_fake
def _(query, key, value, atten_mask=None, antiquant_scale=None, antiquant_offset=None, num_heads=1,
      num_key_value_heads=0, scale=1.0, pre_tokens=MAX_INT, next_tokens=MAX_INT, input_layout="BNSD", sparse_mode=0):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))

