"""Mixture-of-experts kernels: routing (npu_moe_gating_top_k_softmax, npu_moe_gating_top_k), token
permutation (npu_moe_init_routing_v2), expert matmuls (npu_grouped_matmul, single-tensor form),
npu_swiglu and the weighted combine (npu_moe_finalize_routing). See ops.py.

Documented semantics the emulations follow (Ascend/op-plugin ``docs/context/torch_npu-*.md``):

* expanded rows are **expert-major**: the T x K (token, slot) pairs, flattened row-major
  (``r = t * K + k``), stably sorted by expert id; ``expanded_x[j] = x[sorted[j] // K]``;
* ``expanded_row_idx`` (row_idx_type 0, gather) gives for each pair ``r`` its expanded row:
  ``expanded_row_idx[sorted[j]] = j``; ``npu_moe_finalize_routing(drop_pad_mode=2)`` reads it
  row-major (``r = t * K + k``), drop_pad_mode 0 column-major (``r = t + k * T``, the v1 layout);
* ``group_list`` holds tokens per expert (group_list_type 1) or their cumulative sum (type 0);
* sigmoid gating always renormalizes the chosen weights (``y / (sum y + eps) * scale``); softmax
  gating only scales them; experts are chosen on ``score + bias``, the weights are the scores.

Where the documentation is silent: arithmetic in float32, one rounding to the output dtype at the
end; expanded rows outside ``active_expert_range`` are zeros with index -1.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ptqc import quant
from ptqc.errors import PtqcError
from ptqc.lowering.ascend.ops_quant import (_npu, _require, _torch_npu, deq_scale_value, dynamic_quant,
                                             unpack_int4x8)

MAX_GATING_EXPERTS = 2048  # npu_moe_gating_top_k: experts per token row
MAX_SOFTMAX_K = 1024  # npu_moe_gating_top_k_softmax
MAX_GROUPS = 1024  # npu_grouped_matmul: group_list entries (tensor form)
INNER_LIMIT = 65536  # npu_grouped_matmul: the last dim of x and of weight
MAX_ROUTING_EXPERTS = 10240  # npu_moe_init_routing_v2 (count / cumsum modes)


def _emulated(what: str, ok: bool) -> None:
    if not ok:
        raise PtqcError(f"{what} is not emulated on CPU")


# ---- routing ----------------------------------------------------------------------------------
def check_moe_gating_top_k(e: int, k: int, group_count: int, k_group: int) -> str | None:
    """npu_moe_gating_top_k's limits (torch_npu docs: experts <= 2048, more than 2 per group ...)."""
    per = e // group_count if group_count > 0 and e % group_count == 0 else 0
    if per <= 2:
        return (f"npu_moe_gating_top_k needs the experts to split evenly into groups of more than 2 "
                f"({e} experts in {group_count} groups)")
    if -(-per // 32) * 32 * group_count > MAX_GATING_EXPERTS:
        return f"npu_moe_gating_top_k takes at most {MAX_GATING_EXPERTS} experts (32-aligned per group; got {e})"
    if not 1 <= k_group <= group_count or not 1 <= k <= per * k_group:
        return f"npu_moe_gating_top_k needs 1 <= topk_group <= n_group and 1 <= top_k <= {per} x topk_group"
    return None


def check_moe_gating_top_k_softmax(e: int, k: int) -> str | None:
    if not 0 < k <= min(e, MAX_SOFTMAX_K):
        return f"npu_moe_gating_top_k_softmax takes 0 < k <= min(experts, {MAX_SOFTMAX_K}) (got k={k}, {e} experts)"
    return None


@torch.library.custom_op("ptqc_npu::moe_gating_top_k_softmax", mutates_args=())
def moe_gating_top_k_softmax(x: torch.Tensor, finished: Optional[torch.Tensor] = None,
                             k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_moe_gating_top_k_softmax: (top-k of softmax(x) in x's dtype, their int32 expert ids,
    row_idx = arange(T * k) laid out [k, T] and transposed)."""
    if _npu(x):
        return _torch_npu().npu_moe_gating_top_k_softmax(x, finished, k)
    _emulated("npu_moe_gating_top_k_softmax with finished rows", finished is None)
    why = check_moe_gating_top_k_softmax(x.shape[-1], k)
    if why:
        raise PtqcError(why)
    y, idx = x.float().softmax(-1).topk(k, dim=-1)
    t = idx[..., 0].numel()
    row = torch.arange(t * k, dtype=torch.int32, device=x.device).reshape(k, t).t().reshape(idx.shape)
    return y.to(x.dtype), idx.to(torch.int32), row


@moe_gating_top_k_softmax.register_fake
def _(x, finished=None, k=1):
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int32), x.new_empty(shape, dtype=torch.int32)


def _group_mask(choice: torch.Tensor, group_count: int, k_group: int, group_select_mode: int) -> torch.Tensor:
    """``choice`` with the experts outside each row's best ``k_group`` groups set to -inf (a group
    scores its best expert, or with group_select_mode 1 the sum of its best two)."""
    t, e = choice.shape
    grouped = choice.view(t, group_count, e // group_count)
    score = grouped.amax(-1) if group_select_mode == 0 else grouped.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros(t, group_count, dtype=torch.bool, device=choice.device)
    keep.scatter_(1, score.topk(k_group, dim=-1).indices, True)
    return choice.masked_fill(~keep.unsqueeze(-1).expand_as(grouped).reshape(t, e), float("-inf"))


@torch.library.custom_op("ptqc_npu::moe_gating_top_k", mutates_args=())
def moe_gating_top_k(x: torch.Tensor, k: int, bias: Optional[torch.Tensor] = None, k_group: int = 1,
                     group_count: int = 1, group_select_mode: int = 0, renorm: int = 0, norm_type: int = 0,
                     out_flag: bool = False, routed_scaling_factor: float = 1.0,
                     eps: float = 1e-20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_moe_gating_top_k (DeepSeek-V3 routing): scores softmax (norm_type 0) or sigmoid (1) of
    x; experts chosen on scores + bias within the best k_group of group_count groups; weights are
    the chosen scores, for sigmoid divided by (their sum + eps), times routed_scaling_factor.
    Returns (weights in x's dtype, int32 expert ids, the float32 scores)."""
    if _npu(x):
        return _torch_npu().npu_moe_gating_top_k(
            x, k, bias=bias, k_group=k_group, group_count=group_count, group_select_mode=group_select_mode,
            renorm=renorm, norm_type=norm_type, out_flag=out_flag, routed_scaling_factor=routed_scaling_factor,
            eps=eps)
    _emulated(f"npu_moe_gating_top_k renorm={renorm} (documented: 0 only)", renorm == 0)
    why = check_moe_gating_top_k(x.shape[-1], k, group_count, k_group)
    if why:
        raise PtqcError(why)
    scores = x.float().softmax(-1) if norm_type == 0 else x.float().sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if group_count > 1:
        choice = _group_mask(choice, group_count, k_group, group_select_mode)
    idx = choice.topk(k, dim=-1).indices
    y = scores.gather(-1, idx)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    return (y * routed_scaling_factor).to(x.dtype), idx.to(torch.int32), scores


@moe_gating_top_k.register_fake
def _(x, k, bias=None, k_group=1, group_count=1, group_select_mode=0, renorm=0, norm_type=0, out_flag=False,
      routed_scaling_factor=1.0, eps=1e-20):
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int32), x.new_empty(x.shape, dtype=torch.float32)


# ---- token permutation ------------------------------------------------------------------------
def check_moe_init_routing(experts: int) -> str | None:
    if experts > MAX_ROUTING_EXPERTS:
        return f"npu_moe_init_routing_v2 takes at most {MAX_ROUTING_EXPERTS} experts (got {experts})"
    return None


def _sorted_pairs(expert_idx: torch.Tensor, start: int, end: int):
    """(pair indices r = t * K + k sorted stably by expert, their experts) for experts in [start, end)."""
    flat = expert_idx.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    keep = (flat[order] >= start) & (flat[order] < end)
    return order[keep], flat[order[keep]]


@torch.library.custom_op("ptqc_npu::moe_init_routing_v2", mutates_args=())
def moe_init_routing_v2(x: torch.Tensor, expert_idx: torch.Tensor, scale: Optional[torch.Tensor] = None,
                        offset: Optional[torch.Tensor] = None, active_num: int = -1, expert_capacity: int = -1,
                        expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                        expert_tokens_num_flag: bool = False, quant_mode: int = 0,
                        active_expert_range: Optional[List[int]] = None,
                        row_idx_type: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_moe_init_routing_v2, dropless: (expanded_x [T*K, H] expert-major, expanded_row_idx int32
    [T*K], tokens per expert of active_expert_range int64 (count, or cumsum with
    expert_tokens_num_type 0), expanded_scale float32 [T*K]). quant_mode 1 quantizes the expanded
    rows per token to int8 (with ``scale`` [experts, H] as per-expert smooth scales) and returns
    the quantization scales; -1 copies them (``scale`` [T], if given, is permuted alongside)."""
    rng = list(active_expert_range or [])
    if _npu(x):
        return _torch_npu().npu_moe_init_routing_v2(
            x, expert_idx, scale=scale, offset=offset, active_num=active_num, expert_capacity=expert_capacity,
            expert_num=expert_num, drop_pad_mode=drop_pad_mode, expert_tokens_num_type=expert_tokens_num_type,
            expert_tokens_num_flag=expert_tokens_num_flag, quant_mode=quant_mode, active_expert_range=rng,
            row_idx_type=row_idx_type)
    _emulated(f"npu_moe_init_routing_v2 drop_pad_mode={drop_pad_mode} quant_mode={quant_mode} "
              f"expert_tokens_num_type={expert_tokens_num_type}",
              drop_pad_mode == 0 and quant_mode in (-1, 1) and expert_tokens_num_type in (0, 1) and offset is None)
    t, k = expert_idx.shape
    start, end = rng if rng else (0, expert_num)
    pairs, experts = _sorted_pairs(expert_idx, start, end)
    n = pairs.numel()
    rows = x[pairs // k]
    exp_scale = torch.zeros(t * k, dtype=torch.float32, device=x.device)
    if quant_mode == 1:
        smooth = None if scale is None else scale.float()[experts - start]
        rows, exp_scale[:n] = _quantize_rows(rows, smooth)
    elif scale is not None:
        exp_scale[:n] = scale.float()[pairs // k]
    expanded = rows.new_zeros((t * k, x.shape[1]))
    expanded[:n] = rows
    row_idx = torch.full((t * k,), -1, dtype=torch.int32, device=x.device)
    if row_idx_type == 0:
        row_idx[pairs] = torch.arange(n, dtype=torch.int32, device=x.device)
    else:
        row_idx[:n] = pairs.to(torch.int32)
    counts = torch.bincount(experts - start, minlength=end - start).to(torch.int64)
    return expanded, row_idx, counts if expert_tokens_num_type == 1 else counts.cumsum(0), exp_scale


def _quantize_rows(rows: torch.Tensor, smooth: torch.Tensor | None):
    """Per-row symmetric int8 (npu_dynamic_quant's numerics), rows multiplied by ``smooth`` first."""
    h = rows.float() if smooth is None else rows.float() * smooth
    return dynamic_quant(h)


@moe_init_routing_v2.register_fake
def _(x, expert_idx, scale=None, offset=None, active_num=-1, expert_capacity=-1, expert_num=-1, drop_pad_mode=0,
      expert_tokens_num_type=0, expert_tokens_num_flag=False, quant_mode=0, active_expert_range=None, row_idx_type=0):
    rows = expert_idx.numel()
    start, end = list(active_expert_range) if active_expert_range else (0, expert_num)
    dtype = torch.int8 if quant_mode == 1 else x.dtype
    return (x.new_empty((rows, x.shape[1]), dtype=dtype), x.new_empty((rows,), dtype=torch.int32),
            x.new_empty((end - start,), dtype=torch.int64), x.new_empty((rows,), dtype=torch.float32))


# ---- expert matmuls ---------------------------------------------------------------------------
def check_grouped_matmul(groups: int, k: int, n: int) -> str | None:
    if groups > MAX_GROUPS:
        return f"npu_grouped_matmul takes at most {MAX_GROUPS} groups (got {groups} experts)"
    if max(k, n) >= INNER_LIMIT:
        return f"npu_grouped_matmul needs K and N below {INNER_LIMIT} (got K={k}, N={n})"
    return None


def _group_sizes(group_list: torch.Tensor, group_list_type: int) -> list[int]:
    g = group_list.long()
    _emulated(f"npu_grouped_matmul group_list_type={group_list_type}", group_list_type in (0, 1))
    return (g if group_list_type == 1 else torch.diff(g, prepend=g.new_zeros(1))).tolist()


def uint64_scale(scale: torch.Tensor) -> torch.Tensor:
    """A float32 scale as the UINT64 the A8W4 grouped matmul takes: its bits in the low 32 bits of an
    int64 (how vllm-ascend's W4A8 MoE loader builds it: float32 viewed as uint32, widened)."""
    return scale.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _int_mm(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(rows.contiguous(), w.contiguous())


def _antiquant(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """One expert's ``(weight + antiquant_offset) * antiquant_scale`` [K, N] in the activation dtype:
    scale/offset [N] (per channel) or [G, N] (G groups along K), computed by :func:`ptqc.quant.dequantize`
    (groups along the last dim, so on the transposes; the offset is minus a zero point)."""
    s = scale.to(dtype).float().reshape(-1, w.shape[1]).t()
    zp = None if offset is None else -offset.to(dtype).float().reshape(-1, w.shape[1]).t()
    group = w.shape[0] // s.shape[1] if s.shape[1] > 1 else 0
    return quant.dequantize(w.t(), s, zp, group).t().to(dtype)


def _a8w4(rows: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``(x - 8) @ w * scale + bias`` over the G groups along K of ``scale`` [G, N] (uint64): the
    int32 products exact (``x @ w - 8 * sum_k w``), then float32."""
    s = deq_scale_value(scale).reshape(-1, w.shape[1])
    gs = w.shape[0] // s.shape[0]
    y = bias.float().expand(rows.shape[0], -1)
    for j in range(s.shape[0]):
        wj = w[j * gs:(j + 1) * gs]
        acc = _int_mm(rows[:, j * gs:(j + 1) * gs], wj) - 8 * wj.int().sum(0)
        y = y + acc.float() * s[j]
    return y


def _mode(x: torch.Tensor, weight: torch.Tensor, scale, per_token_scale, antiquant_scale, bias) -> str:
    """Which documented formula applies: float, antiquant (A16W8/A16W4), a8w8, a8w4."""
    int4 = weight.dtype == torch.int32
    if x.dtype != torch.int8:
        _emulated(f"npu_grouped_matmul on {x.dtype} x {weight.dtype} without antiquant_scale",
                  (antiquant_scale is not None) == (int4 or weight.dtype == torch.int8))
        return "float" if antiquant_scale is None else "antiquant"
    _emulated(f"npu_grouped_matmul on int8 x {weight.dtype}", weight.dtype in (torch.int8, torch.int32))
    if scale is None or per_token_scale is None:
        raise PtqcError("int8 npu_grouped_matmul emulation needs scale and per_token_scale (per-token quantization)")
    if int4 and (bias is None or scale.dtype != torch.int64):
        raise PtqcError("A8W4 npu_grouped_matmul takes a UINT64 scale and the float bias 8 * sum_k(weight * scale)")
    return "a8w4" if int4 else "a8w8"


def _group_rows(mode: str, rows: torch.Tensor, w: torch.Tensor, e: int, bias, scale, aq_scale, aq_offset,
                pts: torch.Tensor | None) -> torch.Tensor:
    """One expert's rows through the formula of ``mode`` (float32)."""
    if mode == "a8w4":
        return _a8w4(rows, w, scale[e], bias[e]) * pts.float().unsqueeze(-1)
    if mode == "a8w8":
        y = _int_mm(rows, w)
        if bias is not None and bias.dtype == torch.int32:
            y = y + bias[e]
        y = y.float() * scale[e].float() * pts.float().unsqueeze(-1)
    else:
        if mode == "antiquant":
            w = _antiquant(w, aq_scale[e], None if aq_offset is None else aq_offset[e], rows.dtype)
        y = rows.float() @ w.float()
    return y if bias is None or bias.dtype == torch.int32 else y + bias[e].float()


@torch.library.custom_op("ptqc_npu::grouped_matmul", mutates_args=())
def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_list: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                   per_token_scale: Optional[torch.Tensor] = None, group_list_type: int = 0,
                   output_dtype: Optional[torch.dtype] = None, antiquant_scale: Optional[torch.Tensor] = None,
                   antiquant_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """npu_grouped_matmul with one x [M, K], one weight [E, K, N] and one output (split_item 3,
    group_type 0: rows split by group_list), per group e (torch_npu docs; A8W4: aclnnGroupedMatmulV5):

    * float: ``x_e @ weight_e + bias_e``;
    * antiquant (float x, int8 weight or int4 packed 8 per int32 along N, [E, K, N / 8]):
      ``x_e @ ((weight_e + antiquant_offset_e) * antiquant_scale_e) + bias_e``, scale/offset [E, N]
      (per channel) or [E, G, N] (per group), the weight dequantized in x's dtype;
    * A8W8 (int8 x, int8 weight): ``(x_e @ weight_e) * scale_e * per_token_scale`` (scale [E, N]),
      int32 accumulation (an int32 bias added to it);
    * A8W4 (int8 x, int4 weight [E, K, N / 8]): ``((x_e - 8) @ weight_e * scale_e + bias_e) *
      per_token_scale`` with scale UINT64 [E, G, N] (:func:`uint64_scale`) and the float bias
      ``8 * sum_k(weight_e * scale_e)`` [E, N] computed offline, so it equals ``x_e @ (weight_e *
      scale_e) * per_token_scale``.

    Float32 arithmetic, one rounding to output_dtype (default: x's dtype, float32 for int8 x)."""
    if _npu(x):
        lst = lambda t: None if t is None else [t]  # noqa: E731
        return _torch_npu().npu_grouped_matmul(
            [x], [weight], bias=lst(bias), scale=lst(scale), per_token_scale=lst(per_token_scale),
            antiquant_scale=lst(antiquant_scale), antiquant_offset=lst(antiquant_offset), group_list=group_list,
            split_item=3, group_type=0, group_list_type=group_list_type, output_dtype=output_dtype)[0]
    w = unpack_int4x8(weight) if weight.dtype == torch.int32 else weight
    _require(check_grouped_matmul(w.shape[0], w.shape[1], w.shape[2]))
    mode = _mode(x, weight, scale, per_token_scale, antiquant_scale, bias)
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(_group_sizes(group_list, group_list_type)):
        if c:
            pts = None if per_token_scale is None else per_token_scale[start:start + c]
            out[start:start + c] = _group_rows(mode, x[start:start + c], w[e], e, bias, scale, antiquant_scale,
                                               antiquant_offset, pts)
        start += c
    return out.to(output_dtype or (x.dtype if x.dtype != torch.int8 else torch.float32))


@grouped_matmul.register_fake
def _(x, weight, group_list, bias=None, scale=None, per_token_scale=None, group_list_type=0, output_dtype=None,
      antiquant_scale=None, antiquant_offset=None):
    dtype = output_dtype or (x.dtype if x.dtype != torch.int8 else torch.float32)
    n = weight.shape[2] * (8 if weight.dtype == torch.int32 else 1)
    return x.new_empty((x.shape[0], n), dtype=dtype)


@torch.library.custom_op("ptqc_npu::swiglu", mutates_args=())
def swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """npu_swiglu: ``swish(A) * B`` for the halves A, B of x along ``dim``."""
    if _npu(x):
        return _torch_npu().npu_swiglu(x, dim=dim)
    a, b = x.float().chunk(2, dim)
    return (F.silu(a) * b).to(x.dtype)


@swiglu.register_fake
def _(x, dim=-1):
    shape = list(x.shape)
    shape[dim] //= 2
    return x.new_empty(shape)


# ---- combine ----------------------------------------------------------------------------------
@torch.library.custom_op("ptqc_npu::moe_finalize_routing", mutates_args=())
def moe_finalize_routing(expanded_permuted_rows: torch.Tensor, skip1: Optional[torch.Tensor],
                         skip2: Optional[torch.Tensor], bias: Optional[torch.Tensor], scales: Optional[torch.Tensor],
                         expanded_src_to_dst_row: torch.Tensor, export_for_source_row: Optional[torch.Tensor],
                         drop_pad_mode: int = 0) -> torch.Tensor:
    """npu_moe_finalize_routing, dropless (drop_pad_mode 0 or 2): ``out[t] = skip1[t] + skip2[t] +
    sum_k scales[t, k] * (rows[src_to_dst[r(t, k)]] + bias[expert[t, k]])``."""
    if _npu(expanded_permuted_rows):
        return _torch_npu().npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales,
                                                     expanded_src_to_dst_row, export_for_source_row, drop_pad_mode)
    _emulated(f"npu_moe_finalize_routing drop_pad_mode={drop_pad_mode}", drop_pad_mode in (0, 2))
    like = scales if scales is not None else export_for_source_row
    if like is None:
        raise PtqcError("npu_moe_finalize_routing emulation needs scales or export_for_source_row (for K)")
    t, k = like.shape
    idx = expanded_src_to_dst_row.long()
    idx = idx.reshape(t, k) if drop_pad_mode == 2 else idx.reshape(k, t).t()
    rows = expanded_permuted_rows.float()[idx]  # [T, K, H]
    if bias is not None:
        rows = rows + bias.float()[export_for_source_row.long()]
    if scales is not None:
        rows = rows * scales.float().unsqueeze(-1)
    out = rows.sum(1)
    for s in (skip1, skip2):
        if s is not None:
            out = out + s.float()
    return out.to(expanded_permuted_rows.dtype)


@moe_finalize_routing.register_fake
def _(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row, export_for_source_row,
      drop_pad_mode=0):
    like = scales if scales is not None else export_for_source_row
    return expanded_permuted_rows.new_empty((like.shape[0], expanded_permuted_rows.shape[-1]))
