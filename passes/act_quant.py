"""act_quant: place activation quantizers on linear inputs.

Every selected linear's input gets a ``ptqc.quantize_act`` node (the shared quantizer,
:func:`ptqc.quant.fake_quant_act`), one per distinct input (q/k/v and gate/up share theirs), which
every backend lowers. ``dynamic`` (default): scales from the activation at run time (group 0 per
token, g > 0 per group, -1 per tensor). ``static``: one calibrated per-tensor scale (and zero
point when asymmetric) stored as ``<module>.input_scale`` / ``.input_zero_point`` of the group's
first linear, from ``method`` absmax, percentile or mse (the clip ratio in 1.0, 0.95 .. 0.5 of
absmax with the lowest fake-quant MSE), calibrated layer by layer on the model as quantized so far.
Linears whose input is already quantized (e.g. by flatquant) are left alone. MoE experts get
dynamic per-token quantizers on x (not the router's) and on down's input (``down_act_bits``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from ptqc import experts, ops, quant
from ptqc.calib import calibrate
from ptqc.errors import PtqcError
from ptqc.ir import info, is_op
from ptqc.observers import MinMax, Percentile, Samples
from ptqc.options import Selection
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import plan


def placements(qm, p: Pass) -> list[tuple[fx.Node, list[fx.Node], object]]:
    """(input node, linears reading it, options) for every activation pass ``p`` quantizes (its
    options' ``act_spec()`` is not None; inputs already quantized are left alone). Linears of one
    input whose options differ (recipe overrides) get their own quantizer."""
    groups: dict = {}
    todo = [n for n in qm.linears() if not is_op(n.args[0], ops.QUANTIZE_ACT)]
    for n, o, spec in plan(qm, p, todo, spec_of=lambda mo: mo.act_spec()):
        if spec is not None:
            groups.setdefault((n.args[0], repr(o)), (n.args[0], [], o))[1].append(n)
    return list(groups.values())


def expert_inputs(qm, p: Pass, static: bool = False) -> dict:
    """Dynamic per-token quantizers on the inputs of every MoE experts node with a stack pass ``p``
    selects for activation quantization (:func:`ptqc.experts.quantize_inputs`): {experts module:
    record}. Static quantization of expert inputs is refused."""
    todo = [s for s in experts.sites(qm) if not is_op(s.node.args[0], ops.QUANTIZE_ACT)]
    specs: dict = {}
    for site, _, spec in plan(qm, p, todo, spec_of=lambda mo: mo.act_spec()):
        if spec is not None:
            if static:
                raise PtqcError(f"{site.module}: static activation quantization of MoE experts is not supported; "
                                "use dynamic (static=false) or exclude=experts")
            experts.check_act(spec, site)
            specs.setdefault(site.node, spec)
    return {info(n)["module"]: experts.quantize_inputs(qm, n, spec) for n, spec in specs.items()}


def insert_quantizer(qm, src: fx.Node, lins: list[fx.Node], spec: quant.QuantSpec, *, scale=None,
                     zero_point=None, method: str = "dynamic") -> fx.Node:
    """One ``quantize_act`` node on ``src`` feeding ``lins`` (static: scale/zero point stored
    under the first linear's name)."""
    first = info(lins[0])
    base = first["module"]
    g = qm.graph
    s_node = z_node = None
    with g.inserting_before(lins[0]):  # after src (lins read it), before every reader
        if scale is not None:
            qm.store[f"{base}.input_scale"] = scale.float().reshape(1).contiguous()
            s_node = g.get_attr(f"{base}.input_scale")
            if zero_point is not None:
                qm.store[f"{base}.input_zero_point"] = zero_point.to(torch.int8).reshape(1).contiguous()
                z_node = g.get_attr(f"{base}.input_zero_point")
        kind = (spec.kind,) if spec.kind != "int" else ()
        q = g.call_function(ops.QUANTIZE_ACT, (src, s_node, z_node, spec.bits, spec.group_size,
                                               spec.symmetric, spec.clip_ratio, *kind))
    rec = {"bits": spec.bits, "group": spec.group_size, "sym": spec.symmetric, "method": method,
           **({"kind": spec.kind} if kind else {})}
    info(q).update({"module": base, "layer": first.get("layer"), "role": "act_quant",
                    "quant": {"input": rec}, "shared_by": [info(n)["module"] for n in lins]})
    for n in lins:
        n.args = (q, *n.args[1:])
        info(n).setdefault("quant", {})["input"] = rec
        extra = {"scale": round(float(scale.reshape(-1)[0]), 8)} if scale is not None else {}
        qm.quant.setdefault(info(n)["module"], {})["input"] = {**rec, **extra}
    return q


def static_range(stats: dict, spec: quant.QuantSpec, method: str, percentile: float):
    """(scale, zero point) of a static per-tensor quantizer from the observers' results."""
    if method == "absmax":
        lo, hi = stats["minmax"].result()
    elif method == "percentile":
        if spec.symmetric:
            hi = stats["pct"].result()
            lo = -hi
        else:
            lo, hi = stats["pct"].result()
    else:  # mse: best clip ratio of the absmax range on a sample
        x = stats["x"].result().float()
        lo, hi = x.min(), x.max()
        best, best_err = 1.0, None
        for i in range(11):
            r = 1 - 0.05 * i
            s, z = quant.static_qparams(lo * r, hi * r, spec)
            err = (quant.fake_quant_act(x, s, z, spec) - x).pow(2).mean().item()
            if best_err is None or err < best_err:
                best, best_err = r, err
        lo, hi = lo * best, hi * best
    if not (torch.isfinite(torch.as_tensor(lo)) and torch.isfinite(torch.as_tensor(hi))):
        raise PtqcError("non-finite activation range during static calibration")
    return quant.static_qparams(torch.as_tensor(lo), torch.as_tensor(hi), spec)


def place(qm, ctx, groups, *, static: bool, method: str = "absmax", percentile: float = 99.99,
          samples: int = 2048, desc: str = "act_quant") -> dict:
    """Insert the quantizers of ``groups`` (from :func:`placements`, QuantSpec ``options.act_spec()``).
    Static ones are calibrated layer by layer."""
    if not static:
        for src, lins, o in groups:
            insert_quantizer(qm, src, lins, o.act_spec())
        return {"quantizers": len(groups), "dynamic": True}
    outside = [info(lins[0])["module"] for _, lins, _ in groups if info(lins[0]).get("layer") is None]
    if outside:
        raise PtqcError(f"static activation quantization of {outside[0]} (outside the decoder layers) is not "
                        "supported; exclude it (exclude=lm_head) or use dynamic quantization")
    by_layer: dict[int, list] = {}
    for g in groups:
        by_layer.setdefault(info(g[1][0])["layer"], []).append(g)

    def observe(i):
        obs = {}
        for _, lins, o in by_layer.get(i, []):
            s = o.act_spec()
            obs[lins[0]] = ({"minmax": MinMax()} if method == "absmax" else
                            {"pct": Percentile(q=percentile / 100, absolute=s.symmetric)} if method == "percentile" else
                            {"x": Samples(max_tokens=samples)})
        return obs

    scales = []

    def apply(i, stats):
        for src, lins, o in by_layer.get(i, []):
            spec = o.act_spec()
            scale, zp = static_range(stats[lins[0]], spec, method, percentile)
            insert_quantizer(qm, src, lins, spec, scale=scale, zero_point=zp, method=f"static-{method}")
            scales.append(float(scale.reshape(-1)[0]))

    summary = calibrate(qm, ctx, observe, apply, layers=sorted(by_layer), desc=desc)
    return {"quantizers": len(groups), "dynamic": False, **summary,
            "scale_range": [min(scales), max(scales)] if scales else None}


@register
class ActQuant(Pass):
    """Activation quantizers on linear inputs: dynamic per-token (default) or static calibrated.

    One `quantize_act` node per distinct input (q/k/v and gate/up share theirs). `static=true`
    calibrates one per-tensor scale per input (`method` absmax, percentile or mse). Weights are
    left alone: combine with a weight pass (`smooth,gptq:bits=8,act_quant`) or use `int8`/`w4a4`,
    which do both.
    """

    name = "act_quant"
    requires = frozenset({"canonical"})
    provides = frozenset({"act_quant"})

    @dataclass
    class Options(Selection):
        bits: int = 8
        sym: bool = True
        static: bool = False
        group: int = 0  # dynamic: 0 per token, g > 0 per group, -1 per tensor (static: always per tensor)
        method: Literal["absmax", "percentile", "mse"] = "absmax"
        percentile: float = 99.99

        def act_spec(self):
            return act_spec(self.bits, self.group, self.sym, self.static)

        def validate(self):
            check_act_options(self.bits, self.group, self.percentile)

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        groups = placements(qm, self)
        moe = expert_inputs(qm, self, o.static)
        summary = place(qm, ctx, groups, static=o.static, method=o.method, percentile=o.percentile)
        return PassResult(changed=bool(groups or moe), summary={**summary, **({"experts": len(moe)} if moe else {})})


def check_act_options(bits: int, group: int, percentile: float = 99.99) -> None:
    if not 2 <= bits <= 8:
        raise PtqcError(f"activation bits={bits} is outside 2..8 (use a weight-only pass for A16)")
    if group < -1:
        raise PtqcError(f"activation group={group}: use 0 (per token), a positive group size or -1 (per tensor)")
    if not 50.0 < percentile <= 100.0:
        raise PtqcError(f"percentile={percentile} must be in (50, 100]")


def act_spec(bits: int, group: int, sym: bool, static: bool) -> quant.QuantSpec:
    return quant.QuantSpec(bits, -1 if static else group, sym)
