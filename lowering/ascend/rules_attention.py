"""Lowering rules for ``ptqc.attention``: npu_fused_infer_attention_score (float K/V, or a static
int8 KV cache written by npu_quantize and read through antiquant scales), or matmul + a softmax
kernel + matmul. Patterns, checks and rewrites; the table is in lower.py."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ptqc import ops
from ptqc.ir import info, is_op
from ptqc.lowering.ascend import ops as npu
from ptqc.patterns import Pat

aten = torch.ops.aten
SHAPES_UNKNOWN = "attention shapes are unknown (run shape propagation first)"
SOFTCAP = ("npu_fused_infer_attention_score has no attention logit softcapping (Gemma 2; "
           "attention=keep keeps it float)")


def _quantized_kv(att: fx.Node) -> bool:
    return is_op(att.args[1], ops.QUANTIZE_ACT) or is_op(att.args[2], ops.QUANTIZE_ACT)


def _mla(att: fx.Node) -> bool:
    """Multi-head latent attention: query/key head dim (nope + rope) differs from the value's."""
    qs, ks, vs = _shape(att.args[0]), _shape(att.args[1]), _shape(att.args[2])
    return None not in (qs, ks, vs) and qs[-1] == ks[-1] != vs[-1]


MLA = Pat(ops.ATTENTION, name="att", where=_mla)
KV8 = Pat(ops.ATTENTION, name="att", where=_quantized_kv)
FLOAT = Pat(ops.ATTENTION, name="att", where=lambda att: not _quantized_kv(att))


def _shape(n: fx.Node):
    while n.meta.get("shape") is None and is_op(n, ops.QUANTIZE_ACT):
        n = n.args[0]
    return n.meta.get("shape")


def _dims(att: fx.Node):
    """(heads, kv heads, head dim), or None when the shapes are unknown."""
    qs, ks = _shape(att.args[0]), _shape(att.args[1])
    return None if qs is None or ks is None else (qs[1], ks[1], qs[3])


def _causal_window(att: fx.Node) -> tuple[bool, int]:
    causal = att.kwargs.get("causal", att.args[4] if len(att.args) > 4 else True)
    return causal, att.kwargs.get("window", att.args[5] if len(att.args) > 5 else -1)


def _kv_cache(lw, att: fx.Node, hkv: int, d: int):
    """(antiquant_scale, antiquant_offset) tensors of a static int8 K/V cache, or (None, reason)."""
    kq, vq = att.args[1], att.args[2]
    if not (is_op(kq, ops.QUANTIZE_ACT) or is_op(vq, ops.QUANTIZE_ACT)):
        return None, None
    if not (is_op(kq, ops.QUANTIZE_ACT) and is_op(vq, ops.QUANTIZE_ACT)):
        return None, "a KV cache with only one of K and V quantized has no Ascend kernel"
    scales, offsets = [], []
    for q in (kq, vq):
        x, scale, zp, bits = q.args[:4]
        if bits != 8:
            return None, f"{bits}-bit KV caches need the int4 decode path of npu_fused_infer_attention_score"
        if scale is None:
            return None, ("npu_fused_infer_attention_score reads a per-token (dynamic) KV8 cache only when "
                          "decoding (query length <= 16), a prompt needs static K and V scales (kv:k=channel,v=channel)")
        scales.append(lw.value(scale).float())
        offsets.append(None if zp is None else -lw.value(zp).float())
    per_tensor = all(s.numel() == 1 for s in scales)

    def pair(ts):  # per tensor: (2,); per channel (a per-tensor side expands exactly): (2, KV_N, 1, D)
        ts = [torch.zeros(1) if t is None else t for t in ts]
        return torch.cat([t.reshape(1) for t in ts]) if per_tensor else \
            torch.stack([t.expand(hkv, 1, d) for t in ts])
    return (pair(scales), None if all(o is None for o in offsets) else pair(offsets)), None


def keep_mla(lw, m) -> None:
    """MLA attention stays the float ptqc.attention op; the reason goes to the lowering's ``kept`` list."""
    att = m["att"]
    dqk, dv = _shape(att.args[0])[-1], _shape(att.args[2])[-1]
    lw.kept.append(f"{info(att)['module']}: MLA attention (qk head dim {dqk} != v head dim {dv}) stays float: "
                   "npu_fused_infer_attention_score takes K and V of one head dim, or MLA's absorbed latent "
                   "form (query_rope/key_rope), which ptqc does not build")


def check_fia(lw, m) -> str | None:
    if m["att"].kwargs.get("softcap"):
        return SOFTCAP
    dims = _dims(m["att"])
    if dims is None:
        return SHAPES_UNKNOWN
    h, hkv, d = dims
    return _kv_cache(lw, m["att"], hkv, d)[1] or npu.check_fused_infer_attention(h, hkv, d)


def check_softmax(lw, m) -> str | None:
    att = m["att"]
    dims = _dims(att)
    if att.kwargs.get("softcap"):
        return SOFTCAP
    if dims is None:
        return SHAPES_UNKNOWN
    causal, window = _causal_window(att)
    if not causal or window > 0:
        return f"attention={lw.attention} lowers causal attention without a sliding window only (use attention=fia)"
    if lw.seqlen:
        return (npu.check_scaled_masked_softmax((lw.seqlen, lw.seqlen)) if lw.attention == "softmax" else
                npu.check_dropout_with_add_softmax((None, dims[0], lw.seqlen, lw.seqlen)))
    return None


def _replace(lw, att: fx.Node, y: fx.Node) -> None:
    kv_in = att.args[1:3]
    att.replace_all_uses_with(y)
    lw.g.erase_node(att)
    for c in kv_in:
        if is_op(c, ops.QUANTIZE_ACT) and not c.users:
            lw.g.erase_node(c)


def rewrite_fia(lw, m) -> None:
    """BNSD, GQA through num_key_value_heads, sparse_mode 3 (right-down causal) or 4 (a band for a
    sliding window) on the shared (2048, 2048) mask; an int8 cache through antiquant scale/offset."""
    att = m["att"]
    q, k, v, scale = att.args[:4]
    causal, window = _causal_window(att)
    h, hkv, d = _dims(att)
    kv = _kv_cache(lw, att, hkv, d)[0]
    with lw.g.inserting_before(att):
        sparse, pre, nxt, mask = 0, npu.MAX_INT, npu.MAX_INT, None
        if causal:
            if "ascend.fia_mask" not in lw.qm.store:
                lw.qm.store["ascend.fia_mask"] = torch.ones(npu.FIA_MASK, npu.FIA_MASK, dtype=torch.bool).triu(1)
            mask = lw.g.get_attr("ascend.fia_mask")
            sparse = 3 if window <= 0 else 4
            if window > 0:
                pre, nxt = window - 1, 0
        sc = of = None
        if kv is not None:
            base = info(att)["module"]
            sc = lw.const(f"{base}.antiquant_scale", kv[0].to(lw.dtype))
            of = None if kv[1] is None else lw.const(f"{base}.antiquant_offset", kv[1].to(lw.dtype))
            k, v = _cache_write(lw, k, hkv, d, att), _cache_write(lw, v, hkv, d, att)
        y = lw.new(npu.FUSED_INFER_ATTENTION_SCORE, (q, k, v, mask, sc, of, h, hkv, scale, pre, nxt, "BNSD", sparse),
                   att, role="attention")
    _replace(lw, att, y)


def _cache_write(lw, q: fx.Node, hkv: int, d: int, att: fx.Node) -> fx.Node:
    """npu_quantize of K or V as the cache stores it: [B, S, KV_N * D] with per-channel scales, then
    viewed back to BNSD for the attention kernel."""
    x, scale, zp = q.args[:3]
    n = hkv * d
    base = info(att)["module"] + "." + info(q)["role"].split("_")[0]
    s = lw.const(f"{base}_cache_scale", lw.value(scale).float().expand(hkv, 1, d).reshape(n))
    o = None if zp is None else lw.const(f"{base}_cache_offset", lw.value(zp).float().expand(hkv, 1, d).reshape(n))
    t = lw.new(aten.transpose.int, (x, 1, 2), q, role="cache_layout")
    f = lw.new(aten.flatten.using_ints, (t, 2), q, role="cache_layout")
    c = lw.new(npu.QUANTIZE, (f, s, o, True), q, role=info(q)["role"])
    u = lw.new(aten.unflatten.int, (c, -1, [hkv, d]), q, role="cache_layout")
    return lw.new(aten.transpose.int, (u, 1, 2), q, role="kv_cache")


def _score_mask(lw, s: fx.Node, att: fx.Node, mode: str, h: int) -> fx.Node:
    """The causal mask over the scores ``s`` [B, H, S, S]: bool (True = masked) for the softmax
    kernel, additive (dtype min) for the add-softmax one. Built once, at the first attention
    that needs it, and shared by the later layers (same shape)."""
    key = (mode, h)
    if key not in lw.score_masks:
        ones = lw.new(aten.ones_like.default, (s,), att, role="mask")
        ones.kwargs = {"dtype": torch.bool}
        mask = lw.new(aten.triu.default, (ones, 1), att, role="mask")
        if mode != "softmax":
            zeros = lw.new(aten.zeros_like.default, (s,), att, role="mask")
            mask = lw.new(aten.masked_fill.Scalar, (zeros, mask, torch.finfo(lw.dtype).min), att, role="mask")
        lw.score_masks[key] = mask
    return lw.score_masks[key]


def rewrite_softmax(lw, m) -> None:
    """q k^T, npu_scaled_masked_softmax (or npu_dropout_with_add_softmax: attention=add_softmax, or
    softmax with fuse where the known seqlen and head count fit it), @ v; GQA K/V repeated."""
    att = m["att"]
    q, k, v, scale = att.args[:4]
    h, hkv, _ = _dims(att)
    mode = lw.attention
    if mode == "softmax" and lw.fuse and lw.seqlen in npu.ADD_SOFTMAX_SIZES and h % 32 == 0:
        mode = "add_softmax"  # the fused add + softmax kernel takes this shape for any batch
    with lw.g.inserting_before(att):
        if h != hkv:
            k = lw.new(aten.repeat_interleave.self_int, (k, h // hkv, 1), att, role="gqa")
            v = lw.new(aten.repeat_interleave.self_int, (v, h // hkv, 1), att, role="gqa")
        kt = lw.new(aten.transpose.int, (k, -2, -1), att, role="attention")
        s = lw.new(aten.matmul.default, (q, kt), att, role="attention_scores")
        mask = _score_mask(lw, s, att, mode, h)
        if mode == "softmax":
            p = lw.new(npu.SCALED_MASKED_SOFTMAX, (s, mask, scale, False), att, role="softmax")
        else:
            r = lw.new(npu.DROPOUT_WITH_ADD_SOFTMAX, (s, mask, scale, 0.0, -1), att, role="softmax")
            p = lw.new(operator.getitem, (r, 2), att, role="softmax")
        y = lw.new(aten.matmul.default, (p, v), att, role="attention")
    _replace(lw, att, y)
