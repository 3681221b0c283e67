"""Multi-head latent attention (DeepSeek-V2/V3 and look-alikes): what ptqc needs to know of it.

MLA traces with the generic frontend; its canonical form reads, per layer,

    input_norm -> q_a_proj -> q_a_layernorm -> q_b_proj              (or one q_proj without q LoRA)
    input_norm -> kv_a_proj_with_mqa -> split(latent, rope key)
                  latent -> kv_a_layernorm -> kv_b_proj -> split(k_nope, v)
    q = cat(q_nope, rope(q_rope)); k = cat(k_nope, expand(rope(k_rope)))   (decoupled rope, aten ops)
    ptqc.attention(q, k, v) with qk head dim (nope + rope) != v head dim -> o_proj

:data:`ROLES` names the MLA modules; :func:`prepare` refuses, before export, constructs ptqc does
not trace exactly (one line naming the module); :func:`rule_mla_key` turns the key transformers
assembles by slice copies into a fresh buffer back into a ``cat``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ptqc.errors import PtqcError

aten = torch.ops.aten

ROLES = {"q_a_proj": "q_a", "q_b_proj": "q_b", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv_b",
         "q_a_layernorm": "q_a_norm", "kv_a_layernorm": "kv_a_norm"}
_END = 2 ** 63 - 1


def is_mla(m: nn.Module) -> bool:
    return isinstance(getattr(m, "kv_a_proj_with_mqa", None), nn.Module)


def prepare(model: nn.Module) -> None:
    """Before export: refuse MLA constructs the trace would not reproduce exactly, naming the module;
    DeepSeek-V2's greedy routers ignore expert groups, so their group count is set to 1."""
    for name, m in model.named_modules():
        if is_mla(m) and getattr(m, "num_key_value_groups", 1) != 1:
            raise PtqcError(f"MLA attention {name} has num_key_value_heads != num_attention_heads "
                            f"({m.num_key_value_groups} groups): MLA expands its latent to every head, so the "
                            "config must set them equal (transformers cannot run it either)")
        method = getattr(m, "topk_method", None)
        if method == "greedy":
            m.num_group = 1
        elif method is not None and method != "noaux_tc" and (getattr(m, "num_group", 1) or 1) > 1:
            raise PtqcError(f"MoE router {name} uses topk_method={method!r} (groups scored by their best "
                            "expert), which ptqc.moe_route does not implement")


def _slice_write(n):
    """``slice_scatter(base, copy(slice(base), value), dim, start, end)`` -> (base, value, dim, start, end)."""
    if not (isinstance(n, fx.Node) and n.target == aten.slice_scatter.default):
        return None
    base, src, dim, start, end = (list(n.args) + [0, None, _END])[:5]
    if not (isinstance(src, fx.Node) and src.target == aten.copy.default and len(src.users) == 1):
        return None
    value = src.args[1]
    sv, vv = src.meta.get("val"), getattr(value, "meta", {}).get("val")
    if sv is None or vv is None or tuple(sv.shape) != tuple(vv.shape):
        return None  # copy_ would broadcast: not a plain piece
    return base, value, dim, start, end


def rule_mla_key(node: fx.Node) -> bool:
    """A fresh buffer filled by slice copies that tile its last dimension (MLA's key: k_nope then the
    rope key) -> ``cat(pieces, dim)``: the same values, and passes see the key's sources."""
    if _slice_write(node) is None or any(_slice_write(u) for u in node.users):
        return False
    pieces, cur = [], node
    while (w := _slice_write(cur)) is not None:
        cur, value, dim, start, end = w
        pieces.insert(0, (start, end, value, dim))
    if cur.target != aten.new_empty.default or len({p[3] for p in pieces}) != 1:
        return False
    size = cur.meta["val"].shape[pieces[0][3]]
    if not isinstance(size, int):
        return False
    bounds = [(s, min(e, size)) for s, e, _, _ in pieces]
    if bounds[0][0] != 0 or bounds[-1][1] != size or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
        return False
    with node.graph.inserting_before(node):
        new = node.graph.call_function(aten.cat.default, ([p[2] for p in pieces], pieces[0][3]))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    return True


def cache_points(attn: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """What an MLA attention caches: (the latent as ``kv_a_layernorm`` writes it, the rope key before
    it is broadcast to the heads), or None when ``attn`` is not MLA (its key is not cat(k_nope, rope key)
    with k_nope computed by ``kv_b_proj``). Quantizers already on either are looked through."""
    from ptqc import ops
    from ptqc.patterns import is_transparent

    def through(n, stop=lambda n: False):
        while isinstance(n, fx.Node) and (n.target == ops.QUANTIZE_ACT or is_transparent(n) and not stop(n)):
            n = n.args[0]
        return n

    k = attn.args[1]
    if not (isinstance(k, fx.Node) and k.target == aten.cat.default and len(k.args[0]) == 2):
        return None
    nope, rope = k.args[0]
    for _ in range(8):  # k_nope = split(view(kv_b_proj(latent)))[0], through getitem / split / transpose / view
        if not isinstance(nope, fx.Node) or nope.op != "call_function":
            return None
        if nope.target == ops.LINEAR:
            break
        nope = nope.args[0]
    if nope.target != ops.LINEAR or nope.meta.get("ptqc", {}).get("role") != "kv_b":
        return None
    latent = through(nope.args[0])
    if latent.meta.get("ptqc", {}).get("role") != "kv_a_norm":
        return None
    rope = through(rope, stop=lambda n: n.meta.get("shape", [0, 0])[1] == 1)
    shape = getattr(rope, "meta", {}).get("shape")
    if not shape or len(shape) != 4 or shape[1] != 1:
        return None
    return latent, rope


def is_cache_quantized(n: fx.Node) -> bool:
    """Does a kv-cache quantizer (role ``*_cache_quant``) read ``n``?"""
    from ptqc.ir import is_cache_quantizer

    return any(map(is_cache_quantizer, n.users))
