"""kv: KV-cache quantization (KV8, KV4) at the cache boundary of every attention op.

A ``quantize_act`` node goes on the ``k`` and ``v`` inputs of ``ptqc.attention`` (after RoPE and
any online rotation), so every later query reads the quantized cache. ``k=channel`` (default:
keys have outlier channels; Ascend's per-channel antiquant_scale) and ``v=channel`` are static per
(KV head, channel), ``tensor`` static per tensor, ``k=head`` / ``v=token`` (default) dynamic per
token and KV head. Static scales (``<attention>.k_scale`` ``[heads_kv, 1, head_dim]`` or ``[1]``,
``.k_zero_point`` when asymmetric; same for v) come from the calibration min/max (``clip`` < 1
shrinks them), layer by layer on the model as quantized so far.

MLA attention (DeepSeek-V2/V3) caches neither K nor V but the latent ``kv_a_layernorm`` writes
(kv_lora_rank channels, from which ``kv_b_proj`` makes every head's k_nope and V) and the rope key
(one head of qk_rope_head_dim, broadcast to the heads). There the quantizers go on those two, with
``k``'s granularity: ``channel`` static per channel (``<attention>.latent_scale`` ``[kv_lora_rank]``,
``.rope_key_scale`` ``[rope dim]``), ``tensor`` static per tensor (vllm-ascend's FAKQuant: int8, one
scale), ``head`` dynamic per token; ``v`` does not apply. ``rope_key=false`` keeps the rope key in
the model dtype, as vllm-ascend's FAKQuant does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ptqc import mla, ops, quant
from ptqc.calib import calibrate
from ptqc.errors import PtqcError
from ptqc.ir import info, is_op
from ptqc.observers import MinMax
from ptqc.options import Selection, modules
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import plan


class CacheRange(MinMax):
    """Min/max of a K or V input [B, Hkv, S, D] of attention: per (head, channel) or per tensor."""

    def __init__(self, arg: int, per_channel: bool):
        super().__init__("input", per_channel=per_channel)
        self.arg = arg

    def update(self, x):
        b, h, s, d = x.shape
        super().update(x.detach().transpose(1, 2).reshape(b * s, h * d))


@register
class KV(Pass):
    """KV-cache quantization: K per channel (static) and V per token (dynamic), int8 by default.

    `bits=4` for KV4; `k`/`v` pick channel|head|token|tensor granularity (see `ptqc passes kv`).
    Inserted on attention's K/V inputs, after RoPE and any rotation, so it composes with rotate.
    MLA: on the cached latent and rope key instead, with `k`'s granularity (`rope_key=false`: latent only).
    """

    name = "kv"
    requires = frozenset({"canonical"})
    provides = frozenset({"kv_quant"})

    @dataclass
    class Options(Selection):
        bits: int = 8
        k: Literal["channel", "head", "tensor"] = "channel"
        v: Literal["token", "channel", "tensor"] = "token"
        sym: bool = True
        clip: float = 1.0
        rope_key: bool = True  # MLA: quantize the cached rope key too (vllm-ascend's FAKQuant does not)
        exclude: list[str] = modules()

        def validate(self):
            if not 2 <= self.bits <= 8:
                raise PtqcError(f"bits={self.bits} is outside 2..8")
            if not 0.0 < self.clip <= 1.0:
                raise PtqcError(f"clip={self.clip} must be in (0, 1]")

    def run(self, qm, ctx) -> PassResult:
        caches = [n for n in qm.nodes(ops.ATTENTION)  # attention ops whose cache is not quantized yet
                  if not any(is_op(a, ops.QUANTIZE_ACT) for a in n.args[1:3])]
        points = {n: p for n in caches if (p := mla.cache_points(n)) is not None}
        caches = [n for n in caches if n not in points or not mla.is_cache_quantized(points[n][0])]
        planned = [(n, mo) for n, mo, _ in plan(qm, self, caches)]
        todo = [(n, mo) for n, mo in planned if n not in points]
        latent = MLACache(qm, ctx, [(n, mo, points[n]) for n, mo in planned if n in points])
        static = [(n, mo) for n, mo in todo if mo.k != "head" or mo.v != "token"]
        records = []

        def spec(mo):
            return quant.QuantSpec(mo.bits, 0, mo.sym, mo.clip)

        for n, mo in todo:  # dynamic ones need no calibration
            if mo.k == "head":
                self._insert(qm, n, 1, spec(mo))
            if mo.v == "token":
                self._insert(qm, n, 2, spec(mo))

        by_layer = {info(n)["layer"]: (n, mo) for n, mo in static}

        def observe(i):
            n, mo = by_layer[i]
            obs = {}
            if mo.k != "head":
                obs["k"] = CacheRange(1, mo.k == "channel")
            if mo.v != "token":
                obs["v"] = CacheRange(2, mo.v == "channel")
            return {n: obs}

        shapes = {info(n)["layer"]: (n.args[1].meta["shape"][1], n.args[1].meta["shape"][3]) for n, _ in static}

        def apply(i, stats):
            n, mo = by_layer[i]
            hkv, d = shapes[i]
            for which, arg in (("k", 1), ("v", 2)):
                if which not in stats[n]:
                    continue
                lo, hi = stats[n][which].result()
                sp = spec(mo)
                scale, zp = quant.static_qparams(lo, hi, sp)
                shape = (hkv, 1, d) if getattr(mo, which) == "channel" else (1,)
                self._insert(qm, n, arg, sp, scale.reshape(shape), None if zp is None else zp.reshape(shape), which)
                records.append({"layer": i, "cache": which, "granularity": getattr(mo, which),
                                "scale_max": round(float(scale.max()), 6)})

        summary = calibrate(qm, ctx, observe, apply, layers=sorted(by_layer), desc="kv") if static else {}
        mla_summary = latent.run()
        return PassResult(changed=bool(planned), summary={**summary, "attention_ops": len(planned),
                                                          "static": records + mla_summary.pop("static"),
                                                          **mla_summary})

    @staticmethod
    def _insert(qm, attn, arg: int, spec: quant.QuantSpec, scale=None, zero_point=None, which=None):
        which = which or ("k" if arg == 1 else "v")
        with qm.graph.inserting_before(attn):
            q = cache_quantizer(qm, attn, attn.args[arg], spec, scale, zero_point, which)
        args = list(attn.args)
        args[arg] = q
        attn.args = tuple(args)


def cache_quantizer(qm, attn, src, spec: quant.QuantSpec, scale, zero_point, which: str):
    """A ``quantize_act`` of ``src`` (at the graph's insertion point) for ``attn``'s ``which`` cache,
    with its scale tensors stored as ``<attention>.<which>_scale`` / ``_zero_point``."""
    g, m = qm.graph, info(attn)
    base = f"{m['module']}.{which}"
    s_node = z_node = None
    if scale is not None:
        qm.store[f"{base}_scale"] = scale.float().contiguous()
        s_node = g.get_attr(f"{base}_scale")
        if zero_point is not None:
            qm.store[f"{base}_zero_point"] = zero_point.to(torch.int8).contiguous()
            z_node = g.get_attr(f"{base}_zero_point")
    # static scales broadcast over the cached tensor; dynamic ones are per token (per head) (group 0)
    q = g.call_function(ops.QUANTIZE_ACT, (src, s_node, z_node, spec.bits, 0, spec.symmetric,
                                           spec.clip_ratio if scale is None else 1.0))
    gran = ("dynamic per token/head" if scale is None else
            "static per tensor" if scale.numel() == 1 else "static per channel")
    rec = {"bits": spec.bits, "sym": spec.symmetric, "granularity": gran, "method": "kv"}
    info(q).update({"module": m["module"], "layer": m.get("layer"), "role": f"{which}_cache_quant",
                    "quant": {which: {**rec, "group": 0}}})
    qm.quant.setdefault(m["module"], {})[f"{which}_cache"] = {**rec, **({"scale_shape": list(scale.shape)}
                                                                       if scale is not None else {})}
    return q


def quantize_after(qm, attn, src, spec: quant.QuantSpec, scale, zero_point, which: str):
    """:func:`cache_quantizer` right after ``src``, read by everything that read ``src``."""
    with qm.graph.inserting_before(src.next):
        q = cache_quantizer(qm, attn, src, spec, scale, zero_point, which)
    src.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
    return q


class MLACache:
    """The kv pass on MLA attention ops ``[(attn, options, (latent, rope key))]``: quantizers after the
    cached latent and rope key, dynamic (``k=head``) or static from calibration, layer by layer."""

    def __init__(self, qm, ctx, items):
        self.qm, self.ctx, self.items = qm, ctx, items
        self.records: list[dict] = []

    @staticmethod
    def points(mo, latent, rope) -> list[tuple[str, object]]:
        return [("latent", latent)] + ([("rope_key", rope)] if mo.rope_key else [])

    def insert(self, attn, src, mo, which, scale=None, zero_point=None):
        quantize_after(self.qm, attn, src, quant.QuantSpec(mo.bits, 0, mo.sym, mo.clip), scale, zero_point, which)

    def run(self) -> dict:
        static = {}
        for attn, mo, (latent, rope) in self.items:
            if mo.k == "head":
                for which, src in self.points(mo, latent, rope):
                    self.insert(attn, src, mo, which)
            else:
                static[info(attn)["layer"]] = (attn, mo, self.points(mo, latent, rope))

        def observe(i):
            _, mo, pts = static[i]
            return {src: {which: MinMax("output", per_channel=mo.k == "channel")} for which, src in pts}

        def apply(i, stats):
            attn, mo, pts = static[i]
            for which, src in pts:
                lo, hi = stats[src][which].result()
                scale, zp = quant.static_qparams(lo, hi, quant.QuantSpec(mo.bits, 0, mo.sym, mo.clip))
                shape = (src.meta["shape"][-1],) if mo.k == "channel" else (1,)
                self.insert(attn, src, mo, which, scale.reshape(shape), None if zp is None else zp.reshape(shape))
                self.records.append({"layer": i, "cache": which, "granularity": mo.k,
                                     "scale_max": round(float(scale.max()), 6)})

        summary = (calibrate(self.qm, self.ctx, observe, apply, layers=sorted(static), desc="kv (MLA)")
                   if static else None)
        return {"mla_attention_ops": len(self.items), "static": self.records,
                **({"mla_calibration": summary} if summary else {})}
