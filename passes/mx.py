"""w8a8_mxfp8 and w4a4_mxfp4: OCP Microscaling weights and activations (Ascend 950's W8A8_MXFP8 /
W4A4_MXFP4), the int8 pass with the ``mx`` kind of :mod:`ptqc.quant`.

Weights: blocks of 32 along the input dimension, one E8M0 power-of-two scale each, FP8 E4M3 (or
FP4 E2M1) elements, round to nearest even with saturation. Activations: the same per block of 32
along the hidden dimension, dynamic (npu_dynamic_mx_quant). MoE experts are left to other passes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ptqc import quant
from ptqc.errors import PtqcError
from ptqc.pipeline import register
from ptqc.passes.int8 import Int8


class _MX(Int8):
    experts = False

    @dataclass
    class Options(Int8.Options):
        def weight_spec(self):
            return quant.QuantSpec(self.w_bits, quant.MX_BLOCK, True, kind="mx")

        def act_spec(self):
            return quant.QuantSpec(self.a_bits, quant.MX_BLOCK, True, kind="mx")

        def validate(self):
            if self.w_bits not in quant.MX_ELEMENTS or self.a_bits not in quant.MX_ELEMENTS:
                raise PtqcError(f"MX bits are 8 (FP8 E4M3) or 4 (FP4 E2M1), got w_bits={self.w_bits}, "
                                f"a_bits={self.a_bits}")
            if self.static:
                raise PtqcError("MX activations are dynamic (one E8M0 scale per block of 32 at run time); "
                                "drop static=true")


def _mx_preset(name: str, bits: int, doc: str):
    opts = dataclass(type("Options", (_MX.Options,), {"__annotations__": {"w_bits": int, "a_bits": int},
                                                      "w_bits": bits, "a_bits": bits}))
    return register(type(name.upper(), (_MX,), {"name": name, "Options": opts, "__doc__": doc,
                                                 "__module__": __name__}))


W8A8_MXFP8 = _mx_preset("w8a8_mxfp8", 8, "W8A8_MXFP8: MXFP8 weights and dynamic activations (FP8 E4M3 "
                        "elements, one E8M0 scale per block of 32; Ascend 950).")
W4A4_MXFP4 = _mx_preset("w4a4_mxfp4", 4, "W4A4_MXFP4: MXFP4 weights and dynamic activations (FP4 E2M1 "
                        "elements, one E8M0 scale per block of 32; Ascend 950).")
