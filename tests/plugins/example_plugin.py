"""A plugin file, as a user would write one: `ptqc compile --plugin example_plugin.py --passes head8,...`.

`head8` is a complete (if small) method in one file: int8 per-channel symmetric quantization of
lm_head only, with the shared quantizer and graph rewrite. The other passes exist to test the
pass manager's requires/provides/forbids checks.
"""
from dataclasses import dataclass

from ptqc import quant
from ptqc.errors import PtqcError
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import select_linears, set_quantized_weight, weight_of


@register
class Head8(Pass):
    """Quantize lm_head to int8 per output channel (symmetric)."""
    name = "head8"
    provides = frozenset({"weight_quant"})

    @dataclass
    class Options:
        bits: int = 8

    def run(self, qm, ctx):
        spec = quant.QuantSpec(self.options.bits, 0, True)
        heads = select_linears(qm, include=["lm_head"], exclude=[])
        for n in heads:
            w = weight_of(qm, n).float()
            s, z = quant.compute_qparams(w, spec)
            set_quantized_weight(qm, n, spec, quant.quantize(w, s, z, spec), s, z, "head8")
        return PassResult(summary={"linears": len(heads)})


@register
class Mark(Pass):
    """Provides the 'marked' property."""
    name = "mark"
    provides = frozenset({"marked"})

    def run(self, qm, ctx):
        return PassResult(changed=False)


@register
class NeedsMark(Pass):
    """Requires 'marked'."""
    name = "needs_mark"
    requires = frozenset({"canonical", "marked"})

    def run(self, qm, ctx):
        return PassResult(changed=False)


@register
class Early(Pass):
    """Must run before any weight quantization."""
    name = "early"
    forbids = frozenset({"weight_quant"})

    def run(self, qm, ctx):
        return PassResult(changed=False)


@register
class Boom(Pass):
    """Fails while running."""
    name = "boom"

    def run(self, qm, ctx):
        raise PtqcError("boom failed on purpose")
