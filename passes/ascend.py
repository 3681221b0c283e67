"""ascend: lower a quantized graph to Ascend kernels (torch_npu ops, CPU-emulated without an NPU).

The rewrite rules, each with the kernels it emits, are the table
:data:`ptqc.lowering.ascend.lower.RULES` (README's Ascend lowering section names the same kernels).
Every op is a ``ptqc_npu`` torch op: it calls torch_npu on NPU tensors and runs the documented
emulation elsewhere, so ``ptqc eval`` of a lowered artifact measures the Ascend numerics on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ptqc.lowering.ascend.lower import lower
from ptqc.pipeline import Pass, PassResult, register


@register
class Ascend(Pass):
    """Lower to Ascend kernels (npu_quant_matmul, npu_dynamic_quant, fused add+RMSNorm+quant...), emulated on CPU.

    `fuse=false` gives the naive lowering (one quantization kernel per linear); `truncate=false`
    keeps float32 deq_scale (no 19-bit npu_trans_quant_param truncation) on the static path;
    `fallback=true` leaves what the kernels cannot take as float fake-quant ops instead of failing;
    `int_bias=false` adds a float bias after dequantization instead of rounding it into quant_bias.
    `attention=fia` (default) runs attention as npu_fused_infer_attention_score, which also reads a
    static int8 KV cache (kv:k=channel,v=channel) through antiquant scales; `attention=softmax` /
    `add_softmax` decompose float attention into matmul + npu_scaled_masked_softmax /
    npu_dropout_with_add_softmax + matmul (their shape limits are checked at run time, or when
    lowering if `seqlen` is given); `attention=keep` leaves float attention alone. W4A4 lowers to
    int4 npu_quant_matmul (rotate/flatquant transforms fused as npu_kronecker_quant /
    npu_rotate_quant), and smooth:fold=false scales become the kernels' smooth_scales.
    """

    name = "ascend"
    requires = frozenset({"canonical"})
    provides = frozenset({"lowered", "lowered_ascend"})
    forbids = frozenset({"lowered"})

    @dataclass
    class Options:
        fuse: bool = True
        truncate: bool = True
        fallback: bool = False
        int_bias: bool = True  # static path: bias folded into the int32 quant_bias (msModelSlim format)
        attention: Literal["fia", "softmax", "add_softmax", "keep"] = "fia"
        seqlen: int = 0  # known prompt length: check the softmax kernels' shape limits when lowering

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        summary = lower(qm, fuse=o.fuse, truncate=o.truncate, fallback=o.fallback, int_bias=o.int_bias,
                        attention=o.attention, seqlen=o.seqlen)
        counts = summary["kernels"]
        per_layer = [c["standalone_quant"] for c in counts.values()]
        return PassResult(changed=True, summary={
            **summary, "max_standalone_quant_per_layer": max(per_layer) if per_layer else 0,
            "kernels": {str(k): v for k, v in counts.items()}})
