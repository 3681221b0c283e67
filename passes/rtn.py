"""rtn: round-to-nearest weight-only quantization.

The baseline every other weight method is measured against. For each selected linear it
computes per-group (or per-channel) scales and zero points from the weight's min/max with the
shared quantizer (:mod:`ptqc.quant`), rounds to the nearest level, and stores integer codes plus
scales; the graph dequantizes them in front of the matmul (fake-quant: compute stays float).
"""
from __future__ import annotations

from dataclasses import dataclass

from ptqc import quant
from ptqc.experts import ExpertSite
from ptqc.options import WeightOptions
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import plan, set_quantized_weight, weight_of


def quantize_linear(qm, n, spec: quant.QuantSpec, method: str = "rtn") -> float:
    """Round-to-nearest one linear's weight (or an expert stack [E, out, in], per expert and row)
    with the shared quantizer; returns the relative weight error ||Q(W) - W|| / ||W||. Other
    passes (int8, w4a4, ...) call this too."""
    w = weight_of(qm, n).float()
    codes, scale, zp = quant.rtn(w, spec)
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
    layers at higher precision. MoE expert stacks are quantized per expert (`exclude=experts`: float).
    """

    name = "rtn"
    experts = True
    requires = frozenset({"canonical"})
    provides = frozenset({"weight_quant"})

    @dataclass
    class Options(WeightOptions):
        clip: float = 1.0  # shrink the min/max range by this ratio before computing scales

        def weight_spec(self):
            return quant.QuantSpec(self.bits, self.group, self.sym, self.clip)

    def run(self, qm, ctx) -> PassResult:
        todo = plan(qm, self)  # per-module options from recipe overrides / the precision plan, shapes checked
        err_sum = 0.0
        schemes = {}
        for n, _, spec in ctx.progress(todo, desc="rtn", unit="linear"):
            err_sum += quantize_linear(qm, n, spec)
            schemes[spec.describe()] = schemes.get(spec.describe(), 0) + 1
        stacks = sum(isinstance(n, ExpertSite) for n, _, _ in todo)
        summary = {"linears": len(todo) - stacks, **({"expert_stacks": stacks} if stacks else {}), "schemes": schemes,
                   "mean_rel_weight_error": round(err_sum / max(len(todo), 1), 6)}
        return PassResult(changed=bool(todo), summary=summary)
