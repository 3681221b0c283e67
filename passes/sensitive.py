"""sensitive: mixed precision from measured sensitivity.

Writes a **precision plan** that the weight passes after it read (``Pass.options_for``): the
chosen layers (or linears, ``unit=linear``) are kept float (``keep=float``) or get more bits
(``keep=8``). A linear's sensitivity is measured on float inputs as the output error of a probe
quantization (RTN weights at ``w_bits``/``w_group``, per-token activations with ``a_bits``); a
unit's score is ``sqrt(sum ||y_q - y||^2 / sum ||y||^2)`` over its linears. Chosen: the ``top``
highest scores plus (``k`` > 0) every score above ``median + k * 1.4826 * MAD``.

MoE expert stacks are scored per expert on the rows routed to it (gate/up: its x, down: its
down input); an expert's error adds to its layer (``unit=layer``) and to its stack, which is one
unit under ``unit=linear``. ``unit=expert`` ranks the experts (gate, up and down of one expert of
one layer, ``model.layers.1.mlp.experts.3``) and plans the chosen ones at ``keep`` bits
(:func:`ptqc.experts.planned_bits`); the summary lists every expert's score.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqc import ops, quant
from ptqc.calib import calibrate
from ptqc.errors import PtqcError
from ptqc.experts import ExpertSite
from ptqc.ir import info
from ptqc.moe_calib import ExpertActs
from ptqc.observers import Samples
from ptqc.options import Selection
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import plan, weight_of


def robust_outliers(scores: dict, k: float) -> list:
    """Keys whose score exceeds median + k * 1.4826 * MAD (none when k <= 0)."""
    if k <= 0 or len(scores) < 3:
        return []
    v = torch.tensor(list(scores.values()), dtype=torch.float64)
    med = v.median()
    mad = 1.4826 * (v - med).abs().median()
    return [key for key, s in scores.items() if s > med + k * max(mad.item(), 1e-12)]


@register
class Sensitive(Pass):
    """Keep the most quantization-sensitive layers (or linears) in float or at more bits.

    Measures each linear's output error under a probe quantization (w_bits/w_group, and
    a_bits for per-token activations) on calibration data, ranks layers, and plans
    `keep=float` (skip) or `keep=<bits>` for the `top` worst plus those over median + k*MAD.
    Weight passes that run after it (rtn, gptq, ...) follow the plan.
    """

    name = "sensitive"
    experts = True
    requires = frozenset({"canonical"})
    provides = frozenset({"precision_plan"})
    forbids = frozenset({"weight_quant"})  # the plan must exist before weights are quantized

    @dataclass
    class Options(Selection):
        top: int = 1  # keep the N most sensitive units
        k: float = 0.0  # also keep units over median + k*MAD (0 = off)
        unit: str = "layer"  # layer | linear | expert
        keep: str = "float"  # float, or a bit width (e.g. 8)
        w_bits: int = 4
        w_group: int = 128
        a_bits: int = 0  # 0 = float activations in the probe
        samples: int = 512  # token rows sampled per linear

        def validate(self):
            if self.unit not in ("layer", "linear", "expert"):
                raise PtqcError(f"unit={self.unit!r}: use layer, linear or expert")
            if self.unit == "expert" and self.keep == "float":
                raise PtqcError("unit=expert: one expert of a stack cannot stay float; use keep=<bits> (e.g. keep=8)")
            if self.keep != "float" and not (self.keep.isdigit() and 2 <= int(self.keep) <= 8):
                raise PtqcError(f"keep={self.keep!r}: use float or a bit width 2..8")
            if self.top < 0 or self.k < 0:
                raise PtqcError("top and k must be >= 0")
            if not 2 <= self.w_bits <= 8 or not (self.a_bits == 0 or 2 <= self.a_bits <= 8):
                raise PtqcError("w_bits must be 2..8 and a_bits 0 (off) or 2..8")

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        wspec = quant.QuantSpec(o.w_bits, o.w_group, False)
        targets = {n.name: n for n, _, _ in plan(qm, self, spec_of=lambda mo: wspec)}  # shapes checked
        err: dict = {}  # module (or (stack module, expert)) -> (sum ||y_q - y||^2, sum ||y||^2)
        layer_of: dict = {}

        def observe(i):
            obs = {n: {"x": Samples(max_tokens=o.samples)} for n in qm.linears(layer=i) if n.name in targets}
            return obs | {node: {"acts": ExpertActs(qm.store.spec(node.args[3].target)[0][0], node.kwargs.get("act", "silu"),
                                                    node.kwargs.get("down_act_bits", 0), samples=o.samples)}
                          for node in qm.nodes(ops.MOE_EXPERTS, layer=i)
                          if any(ExpertSite(node, p).name in targets for p in ("gate", "up", "down"))}

        def apply(i, stats):
            for n, obs in stats.items():
                if "acts" in obs:
                    for site in (ExpertSite(n, p) for p in ("gate", "up", "down")):
                        if site.name in targets:
                            for e, w in enumerate(weight_of(qm, site)):
                                rows = obs["acts"].rows("h" if site.proj == "down" else "x", e)
                                if rows is not None:
                                    err[site.module, e], layer_of[site.module, e] = self._error(rows, w), i
                    continue
                err[info(n)["module"]], layer_of[info(n)["module"]] = self._error(obs["x"].result(), weight_of(qm, n)), i

        calibrate(qm, ctx, observe, apply, propagate="float", desc="sensitive")
        scores = self._scores(err, layer_of)
        ranked = sorted(scores, key=scores.get, reverse=True)
        chosen = list(dict.fromkeys(ranked[: o.top] + robust_outliers(scores, o.k)))
        entry = {"skip": True} if o.keep == "float" else {"bits": int(o.keep)}
        for key, i in layer_of.items():
            unit = self._unit(key, i)
            if unit in chosen:
                qm.plan[unit if o.unit == "expert" else key[0] if isinstance(key, tuple) else key] = dict(entry)
        ctx.info(f"sensitive: keeping {o.unit}s {chosen} at {o.keep}")
        summary = {"unit": o.unit, "chosen": chosen, "keep": o.keep,
                   "scores": {str(k): round(v, 6) for k, v in scores.items()}}
        per_expert = self._expert_scores(err)
        return PassResult(changed=bool(chosen), summary={**summary, **({"experts": per_expert} if per_expert else {})})

    def _error(self, x, w) -> tuple[float, float]:
        """(sum ||x Q(W)^T - x W^T||^2, sum ||x W^T||^2) under the probe quantization."""
        o = self.options
        x, w = x.float(), w.float().to(x.device)
        y = x @ w.t()
        xq = quant.fake_quantize(x, quant.QuantSpec(o.a_bits, 0, True)) if o.a_bits else x
        yq = xq @ quant.fake_quantize(w, quant.QuantSpec(o.w_bits, o.w_group, False)).t()
        return (yq - y).pow(2).sum().item(), y.pow(2).sum().item()

    def _unit(self, key, layer: int):
        """The unit a module (or (stack, expert)) belongs to under ``unit``."""
        u = self.options.unit
        if u == "layer":
            return layer
        if u == "linear":
            return key[0] if isinstance(key, tuple) else key
        return f"{key[0].rsplit('.', 1)[0]}.{key[1]}" if isinstance(key, tuple) else None

    def _scores(self, err: dict, layer_of: dict) -> dict:
        units: dict = {}
        for key, (e, r) in err.items():
            u = self._unit(key, layer_of[key])
            if u is not None:
                a, b = units.get(u, (0.0, 0.0))
                units[u] = (a + e, b + r)
        order = sorted(units) if self.options.unit == "layer" else list(units)
        return {u: (units[u][0] / max(units[u][1], 1e-30)) ** 0.5 for u in order}

    @staticmethod
    def _expert_scores(err: dict) -> dict:
        """{experts module: [score of each expert over its gate, up and down]} (routed rows only)."""
        sums: dict = {}
        for key, (e, r) in err.items():
            if isinstance(key, tuple):
                a = sums.setdefault(key[0].rsplit(".", 1)[0], {}).setdefault(key[1], [0.0, 0.0])
                a[0], a[1] = a[0] + e, a[1] + r
        return {m: {str(ex): round((a / max(b, 1e-30)) ** 0.5, 6) for ex, (a, b) in sorted(d.items())}
                for m, d in sums.items()}
