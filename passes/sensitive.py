"""sensitive: mixed precision from measured sensitivity.

Writes a **precision plan** that the weight passes after it read (``Pass.options_for``): the
chosen layers (or linears, ``unit=linear``) are kept float (``keep=float``) or get more bits
(``keep=8``). A linear's sensitivity is measured on float inputs as the output error of a probe
quantization (RTN weights at ``w_bits``/``w_group``, per-token activations with ``a_bits``); a
unit's score is ``sqrt(sum ||y_q - y||^2 / sum ||y||^2)`` over its linears. Chosen: the ``top``
highest scores plus (``k`` > 0) every score above ``median + k * 1.4826 * MAD``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqc import quant
from ptqc.calib import calibrate
from ptqc.errors import PtqcError
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
    requires = frozenset({"canonical"})
    provides = frozenset({"precision_plan"})
    forbids = frozenset({"weight_quant"})  # the plan must exist before weights are quantized

    @dataclass
    class Options(Selection):
        top: int = 1  # keep the N most sensitive units
        k: float = 0.0  # also keep units over median + k*MAD (0 = off)
        unit: str = "layer"  # layer | linear
        keep: str = "float"  # float, or a bit width (e.g. 8)
        w_bits: int = 4
        w_group: int = 128
        a_bits: int = 0  # 0 = float activations in the probe
        samples: int = 512  # token rows sampled per linear

        def validate(self):
            if self.unit not in ("layer", "linear"):
                raise PtqcError(f"unit={self.unit!r}: use layer or linear")
            if self.keep != "float" and not (self.keep.isdigit() and 2 <= int(self.keep) <= 8):
                raise PtqcError(f"keep={self.keep!r}: use float or a bit width 2..8")
            if self.top < 0 or self.k < 0:
                raise PtqcError("top and k must be >= 0")
            if not 2 <= self.w_bits <= 8 or not (self.a_bits == 0 or 2 <= self.a_bits <= 8):
                raise PtqcError("w_bits must be 2..8 and a_bits 0 (off) or 2..8")

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        wspec = quant.QuantSpec(o.w_bits, o.w_group, False)
        aspec = quant.QuantSpec(o.a_bits, 0, True) if o.a_bits else None
        targets = {n.name: n for n, _, _ in plan(qm, self, spec_of=lambda mo: wspec)}  # shapes checked
        err: dict[str, float] = {}  # module -> sum ||y_q - y||^2
        ref: dict[str, float] = {}  # module -> sum ||y||^2
        layer_of: dict[str, int] = {}

        def observe(i):
            return {n: {"x": Samples(max_tokens=o.samples)} for n in qm.linears(layer=i) if n.name in targets}

        def apply(i, stats):
            for n, obs in stats.items():
                x = obs["x"].result().float()
                w = weight_of(qm, n).float().to(x.device)
                y = x @ w.t()
                xq = quant.fake_quantize(x, aspec) if aspec else x
                yq = xq @ quant.fake_quantize(w, wspec).t()
                mod = n.meta["ptqc"]["module"]
                err[mod], ref[mod], layer_of[mod] = (yq - y).pow(2).sum().item(), y.pow(2).sum().item(), i

        calibrate(qm, ctx, observe, apply, propagate="float", desc="sensitive")
        if o.unit == "layer":
            units: dict = {}
            for mod, i in layer_of.items():
                e, r = units.get(i, (0.0, 0.0))
                units[i] = (e + err[mod], r + ref[mod])
            scores = {i: (e / max(r, 1e-30)) ** 0.5 for i, (e, r) in sorted(units.items())}
        else:
            scores = {mod: (err[mod] / max(ref[mod], 1e-30)) ** 0.5 for mod in err}
        ranked = sorted(scores, key=scores.get, reverse=True)
        chosen = list(dict.fromkeys(ranked[: o.top] + robust_outliers(scores, o.k)))
        entry = {"skip": True} if o.keep == "float" else {"bits": int(o.keep)}
        for mod, i in layer_of.items():
            if (i if o.unit == "layer" else mod) in chosen:
                qm.plan[mod] = dict(entry)
        ctx.info(f"sensitive: keeping {o.unit}s {chosen} at {o.keep}")
        return PassResult(changed=bool(chosen), summary={
            "unit": o.unit, "chosen": chosen, "keep": o.keep,
            "scores": {str(k): round(v, 6) for k, v in scores.items()}})
