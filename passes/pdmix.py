"""w8a8_mix: vllm-ascend's W8A8_MIX (int8 weights per channel; activations dynamic per token at
prefill, static per tensor at decode), the int8 pass with the ``mix`` kind of :mod:`ptqc.quant`.

The static scale is calibrated as ``int8:static=true`` does (``method``); a ``quantize_act`` of
kind ``mix`` quantizes an input of one token per sequence with it and anything longer per token.
"""
from __future__ import annotations

from dataclasses import dataclass

from ptqc import quant
from ptqc.errors import PtqcError
from ptqc.pipeline import register
from ptqc.passes.int8 import Int8


@register
class W8A8Mix(Int8):
    """W8A8_MIX: int8 per-channel weights; int8 activations dynamic per token at prefill, static per
    tensor (calibrated, `method`) at decode."""

    name = "w8a8_mix"
    experts = False

    @dataclass
    class Options(Int8.Options):
        static: bool = True

        def act_spec(self):
            return quant.QuantSpec(8, 0, True, kind="mix")

        def validate(self):
            super().validate()
            if self.w_bits != 8 or self.w_group != 0 or not self.w_sym:
                raise PtqcError("W8A8_MIX takes int8 symmetric per-channel weights (w_bits=8, w_group=0, w_sym=true)")
            if self.a_bits != 8 or not self.a_sym or not self.static:
                raise PtqcError("W8A8_MIX takes int8 symmetric activations with a calibrated decode scale "
                                "(a_bits=8, a_sym=true, static=true)")
