"""kv: KV-cache quantization (KV8, KV4) at the cache boundary of every attention op.

A ``quantize_act`` node goes on the ``k`` and ``v`` inputs of ``ptqc.attention`` (after RoPE and
any online rotation), so every later query reads the quantized cache. ``k=channel`` (default:
keys have outlier channels; Ascend's per-channel antiquant_scale) and ``v=channel`` are static per
(KV head, channel), ``tensor`` static per tensor, ``k=head`` / ``v=token`` (default) dynamic per
token and KV head. Static scales (``<attention>.k_scale`` ``[heads_kv, 1, head_dim]`` or ``[1]``,
``.k_zero_point`` when asymmetric; same for v) come from the calibration min/max (``clip`` < 1
shrinks them), layer by layer on the model as quantized so far.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ptqc import ops, quant
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
        exclude: list[str] = modules()

        def validate(self):
            if not 2 <= self.bits <= 8:
                raise PtqcError(f"bits={self.bits} is outside 2..8")
            if not 0.0 < self.clip <= 1.0:
                raise PtqcError(f"clip={self.clip} must be in (0, 1]")

    def run(self, qm, ctx) -> PassResult:
        caches = [n for n in qm.nodes(ops.ATTENTION)  # attention ops whose cache is not quantized yet
                  if not any(is_op(a, ops.QUANTIZE_ACT) for a in n.args[1:3])]
        todo = [(n, mo) for n, mo, _ in plan(qm, self, caches)]
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
        return PassResult(changed=bool(todo), summary={**summary, "attention_ops": len(todo), "static": records})

    @staticmethod
    def _insert(qm, attn, arg: int, spec: quant.QuantSpec, scale=None, zero_point=None, which=None):
        g = qm.graph
        m = info(attn)
        which = which or ("k" if arg == 1 else "v")
        base = f"{m['module']}.{which}"
        s_node = z_node = None
        with g.inserting_before(attn):
            if scale is not None:
                qm.store[f"{base}_scale"] = scale.float().contiguous()
                s_node = g.get_attr(f"{base}_scale")
                if zero_point is not None:
                    qm.store[f"{base}_zero_point"] = zero_point.to(torch.int8).contiguous()
                    z_node = g.get_attr(f"{base}_zero_point")
            # static scales broadcast over [B, Hkv, S, D]; dynamic ones are per token per head (group 0)
            q = g.call_function(ops.QUANTIZE_ACT, (attn.args[arg], s_node, z_node, spec.bits, 0, spec.symmetric,
                                                   spec.clip_ratio if scale is None else 1.0))
        gran = ("dynamic per token/head" if scale is None else
                "static per tensor" if scale.numel() == 1 else "static per channel")
        rec = {"bits": spec.bits, "sym": spec.symmetric, "granularity": gran, "method": "kv"}
        info(q).update({"module": m["module"], "layer": m.get("layer"), "role": f"{which}_cache_quant",
                        "quant": {which: {**rec, "group": 0}}})
        args = list(attn.args)
        args[arg] = q
        attn.args = tuple(args)
        qm.quant.setdefault(m["module"], {})[f"{which}_cache"] = {**rec, **({"scale_shape": list(scale.shape)}
                                                                           if scale is not None else {})}
