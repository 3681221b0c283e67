"""The KV-cache part of the Ascend export: C8 for dense attention, FAKQuant for MLA (vllm-ascend 0.23.0).

C8        ``kv_cache_type: "C8"``: static int8 K and V of every attention, as ``<k_proj|v_proj>.kv_cache_scale``
          and ``.kv_cache_offset`` [KV_N * D] (see :mod:`export`'s docstring).
FAKQuant  ``fa_quant_type: "FAKQuant"`` (its ``methods/kv_c8.py``, ``attention/mla_v1.py``): MLA caches the
          latent in int8 with one static scale per layer (``quant_kscale`` = 1 / ``fa_k.scale`` over the
          kv_lora_rank channels; ``fa_k.scale`` dequantizes key and value, both read from the latent), the
          rope key in the model dtype. Per MLA attention ``<attention>.fa_k.scale`` and ``.fa_v.scale``
          [1, 1] (float32, as msModelSlim writes them), ``.fa_k.offset`` / ``.fa_v.offset`` [1, 1] int8
          zeros; typed ``FAQuant``; a layer is quantized where its ``fa_k.scale`` is. ``fa_q`` is not
          written: ptqc does not quantize MLA's query, and vllm-ascend quantizes it dynamically (A5) or not.
          From ``kv:k=tensor,rope_key=false``.
"""
from __future__ import annotations

import torch

from ptqc import mla, ops
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, is_cache_quantizer, is_op
from ptqc.lowering import checkpoint
from ptqc.lowering.ascend.layout import C8_MODEL_TYPES, kv_shape


def _c8_tensors(qm: QModel) -> tuple[dict, str | None]:
    """C8 tensors of every attention's static int8 K/V quantizers, or ({}, why not)."""
    out: dict = {}
    atts = [n for n in qm.graph.nodes if is_op(n, ops.ATTENTION)]
    quantized = [a for a in atts if any(is_op(x, ops.QUANTIZE_ACT) for x in a.args[1:3])]
    if not quantized:
        return {}, None
    hkv, d = kv_shape(qm)
    for a in atts:
        base = info(a)["module"]
        for which, arg in (("k", 1), ("v", 2)):
            q = a.args[arg]
            if not is_op(q, ops.QUANTIZE_ACT):
                return {}, f"{base}: {which} is not quantized; C8 quantizes K and V of every layer"
            if q.args[1] is None or q.args[3] != 8:
                return {}, (f"{base}: C8 needs static int8 K and V scales (kv:k=channel,v=channel), "
                            f"found {'dynamic' if q.args[1] is None else str(q.args[3]) + '-bit'} {which}")
            scale = qm.store[q.args[1].target].float().expand(hkv, 1, d).reshape(-1)
            zp = q.args[2]
            off = torch.zeros_like(scale) if zp is None else qm.store[zp.target].float().expand(hkv, 1, d).reshape(-1)
            proj = f"{base}.{which}_proj"
            out[f"{proj}.kv_cache_scale"] = scale.contiguous()
            out[f"{proj}.kv_cache_offset"] = off.contiguous()
    mtype = getattr(qm.config, "model_type", None)
    if mtype not in C8_MODEL_TYPES:
        raise PtqcError(f"C8 (static int8 KV cache) does not load for model_type {mtype!r} in vllm-ascend 0.23 "
                        f"(its C8 weights load only for {', '.join(C8_MODEL_TYPES)}); compile without the kv pass")
    return out, None


def _fa_tensors(qm: QModel) -> tuple[dict, str | None]:
    """FAKQuant tensors of every MLA attention whose latent has a static per-tensor int8 quantizer, or
    ({}, why not)."""
    out: dict = {}
    for att in qm.nodes(ops.ATTENTION):
        pts = mla.cache_points(att)
        if pts is None:
            continue
        qs = {info(u)["role"]: u for p in pts for u in p.users if is_cache_quantizer(u)}
        q, base = qs.get("latent_cache_quant"), info(att)["module"]
        if q is None:
            continue
        if "rope_key_cache_quant" in qs:
            return {}, f"{base}: FAKQuant keeps the rope key in the model dtype (compile kv:rope_key=false)"
        if q.args[1] is None or q.args[2] is not None or q.args[3] != 8 or qm.store[q.args[1].target].numel() != 1:
            return {}, (f"{base}: FAKQuant has one static symmetric int8 latent scale per layer "
                        "(compile kv:k=tensor,rope_key=false)")
        scale = qm.store[q.args[1].target].float().reshape(1, 1)
        for which in ("fa_k", "fa_v"):
            out[f"{base}.{which}.scale"] = scale.clone()
            out[f"{base}.{which}.offset"] = torch.zeros(1, 1, dtype=torch.int8)
    return out, None


def tensors(qm: QModel) -> dict:
    """``tensors`` and ``desc`` (their types) to write, ``handled`` (store tensors they replace: the cache
    quantizers' own scales are never written as FLOAT), ``head`` (description keys), ``optional`` (one line)."""
    c8, why = _c8_tensors(qm)
    fa, fa_why = _fa_tensors(qm)
    head = {**({"kv_cache_type": "C8", "kv_quant_type": "C8"} if c8 else {}),  # msModelSlim writes both
            **({"fa_quant_type": "FAKQuant"} if fa else {})}
    done = " + ".join(k for k, v in (("C8", c8), ("FAKQuant", fa)) if v)
    whys = "; ".join(w for w in (why, fa_why) if w)
    return {"tensors": c8 | fa, "desc": dict.fromkeys(c8, "C8") | dict.fromkeys(fa, "FAQuant"),
            "handled": checkpoint.store_inputs(*filter(is_cache_quantizer, qm.nodes(ops.QUANTIZE_ACT))), "head": head,
            "optional": f"{done or 'none'}{f' (not exported: {whys})' if whys else ''}"
            if done or not whys else f"not exported ({whys})"}
