"""int8 (W8A8) and its presets w4a4, w4a8, w8a16, w4a16: weight + activation quantization.

Weights of every selected linear that is still float are rounded to nearest
(:func:`ptqc.passes.rtn.quantize_linear`); linears an earlier pass quantized (gptq, awq...) keep
their codes, so ``rotate,gptq:bits=4,group=0,sym=true,w4a4`` gives GPTQ weights with W4A4
activations. Activations (unless ``a_bits`` is 16) get :mod:`ptqc.passes.act_quant` quantizers,
dynamic per token by default or ``static=true``. The presets are the same pass with other
defaults (their docstrings below). MoE expert stacks: weights per expert and channel, inputs
(x, and down's input inside ``moe_experts``) dynamic per token; the router stays float.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ptqc import quant
from ptqc.options import Selection, check_weight_bits
from ptqc.pipeline import Pass, PassResult, register
from ptqc.passes.act_quant import act_spec, check_act_options, expert_inputs, place, placements
from ptqc.passes.rtn import quantize_linear
from ptqc.weights import plan


@register
class Int8(Pass):
    """W8A8: int8 per-channel weights (RTN unless already quantized) + int8 dynamic per-token activations.

    `static=true` uses calibrated per-tensor activation scales (`method` absmax|percentile|mse).
    `a_bits=16` leaves activations float. Presets with other defaults: w4a4, w4a8, w8a16, w4a16.
    """

    name = "int8"
    experts = True
    requires = frozenset({"canonical"})
    provides = frozenset({"weight_quant", "act_quant"})

    @dataclass
    class Options(Selection):
        w_bits: int = 8
        w_group: int = 0  # 0 = per output channel
        w_sym: bool = True
        a_bits: int = 8  # 16 = activations stay float
        a_group: int = 0  # dynamic: 0 per token, g > 0 per group, -1 per tensor
        a_sym: bool = True
        static: bool = False
        method: Literal["absmax", "percentile", "mse"] = "absmax"
        percentile: float = 99.99

        def weight_spec(self):
            return quant.QuantSpec(self.w_bits, self.w_group, self.w_sym)

        def act_spec(self):
            return None if self.a_bits == 16 else act_spec(self.a_bits, self.a_group, self.a_sym, self.static)

        def validate(self):
            check_weight_bits(self.w_bits, self.w_group, "w_")
            if self.a_bits != 16:
                check_act_options(self.a_bits, self.a_group, self.percentile)

    def __init__(self, **options):
        super().__init__(**options)
        if self.options.a_bits == 16:  # weight-only: no activation quantizers
            self.provides = frozenset({"weight_quant"})

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        todo = plan(qm, self)  # float linears only
        groups = placements(qm, self) if o.a_bits != 16 else []
        moe = expert_inputs(qm, self, o.static) if o.a_bits != 16 else {}
        errs = [quantize_linear(qm, n, spec, self.name)
                for n, _, spec in ctx.progress(todo, desc=self.name, unit="linear")]
        summary = {"weights_quantized": len(todo), "mean_rel_weight_error": round(sum(errs) / max(len(errs), 1), 6)}
        if groups:
            summary["activations"] = place(qm, ctx, groups, static=o.static, method=o.method,
                                           percentile=o.percentile, desc=self.name)
        if moe:
            summary["expert_inputs"] = len(moe)
        return PassResult(changed=bool(todo or groups or moe), summary=summary)


def _preset(name: str, doc: str, **defaults):
    opts = dataclass(type("Options", (Int8.Options,), {"__annotations__": {k: type(v) for k, v in defaults.items()},
                                                       **defaults}))
    cls = type(name.upper(), (Int8,), {"name": name, "Options": opts, "__doc__": doc, "__module__": __name__})
    if defaults.get("a_bits") == 16:
        cls.provides = frozenset({"weight_quant"})
    return register(cls)


W4A8 = _preset("w4a8", "W4A8: int4 per-channel sym weights + int8 dynamic per-token activations (int8 pass preset; "
               "MoE experts too: int4 stacks, int8 x and down input).", w_bits=4)
W4A4 = _preset("w4a4", "W4A4: int4 per-channel sym weights + int4 dynamic per-token activations (int8 pass preset; "
               "rotate or flatquant first).", w_bits=4, a_bits=4)
W8A16 = _preset("w8a16", "W8A16: int8 per-channel weights, float activations (int8 pass preset).", a_bits=16)
W4A16 = _preset("w4a16", "W4A16: int4 g128 asymmetric weights, float activations (int8 pass preset).",
                w_bits=4, w_group=128, w_sym=False, a_bits=16)
