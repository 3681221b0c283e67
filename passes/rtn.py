"""rtn: round-to-nearest weight-only quantization.

The baseline every other weight method is measured against. For each selected linear it
computes per-group (or per-channel) scales and zero points from the weight's min/max with the
shared quantizer (:mod:`ptqc.quant`), rounds to the nearest level, and stores integer codes plus
scales; the graph dequantizes them in front of the matmul (fake-quant: compute stays float).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ptqc import quant
from ptqc.errors import PtqcError
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import select_linears, set_quantized_weight, weight_of


def quantize_linear(qm, n, spec: quant.QuantSpec, method: str = "rtn") -> float:
    """Round-to-nearest one linear's weight with the shared quantizer; returns the relative
    weight error ||Q(W) - W|| / ||W||. Other passes (int8, w4a4, ...) call this too."""
    w = weight_of(qm, n).float()
    scale, zp = quant.compute_qparams(w, spec)
    codes = quant.quantize(w, scale, zp, spec)
    deq = quant.dequantize(codes, scale, zp, spec.group_size)
    rel = ((deq - w).norm() / w.norm().clamp_min(1e-12)).item()
    set_quantized_weight(qm, n, spec, codes, scale, zp, method, {"rel_error": round(rel, 6)})
    return rel


@register
class RTN(Pass):
    """Round-to-nearest weight-only quantization (W2..W8, per channel or per group).

    Codes are signed int8 in [-2^(b-1), 2^(b-1)-1]; asymmetric adds an int8 zero point per group.
    `include`/`exclude` take module patterns (full path, suffix such as `down_proj` or
    `layers.0.*`, or a role such as `lm_head`), separated by `|`; lm_head is kept float by default.
    Recipes can set per-module options (`overrides:`) and a `sensitive` pass before it can keep
    layers at higher precision.
    """

    name = "rtn"
    requires = frozenset({"canonical"})
    provides = frozenset({"weight_quant"})

    @dataclass
    class Options:
        bits: int = 4
        group: int = 128  # 0 = per output channel
        sym: bool = False
        clip: float = 1.0  # shrink the min/max range by this ratio before computing scales
        include: list[str] = field(default_factory=lambda: ["*"])
        exclude: list[str] = field(default_factory=lambda: ["lm_head"])

        def validate(self):
            if not 2 <= self.bits <= 8:
                raise PtqcError(f"bits={self.bits} is outside 2..8")
            if self.group < 0:
                raise PtqcError(f"group={self.group} must be 0 (per channel) or a positive group size")
            quant.QuantSpec(self.bits, self.group, self.sym, self.clip)

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        plan = []  # (linear, spec): per-module options from recipe overrides / the precision plan
        for n in select_linears(qm, o.include, o.exclude):
            mo = self.options_for(qm, n)
            if mo is None:
                continue
            spec = quant.QuantSpec(mo.bits, mo.group, mo.sym, mo.clip)
            spec.check_fits(qm.store.spec(n.args[1].target)[0][1], n.meta["ptqc"]["module"])
            plan.append((n, spec))  # every shape is checked before anything changes
        err_sum = 0.0
        schemes = {}
        for n, spec in ctx.progress(plan, desc="rtn", unit="linear"):
            err_sum += quantize_linear(qm, n, spec)
            schemes[spec.describe()] = schemes.get(spec.describe(), 0) + 1
        return PassResult(changed=bool(plan), summary={
            "linears": len(plan), "schemes": schemes,
            "mean_rel_weight_error": round(err_sum / max(len(plan), 1), 6)})
