"""pack: store weight codes of 4 bits or fewer two per byte (real weight-only storage).

Codes of at most 4 bits (W3 and W2 too: NPUs have no 2/3-bit matmul) become the Ascend W4A16
layout, two signed int4 codes per int8 byte along the input dimension, low nibble first
(``ptqc.quant.pack_int4``), under the same ``<module>.weight`` name; a ``ptqc.unpack_int4`` node
goes in front of the dequantize node, so the model computes exactly the same values. ``ptqc
compile`` appends this pass after weight quantization unless ``--no-pack`` is given.
"""
from __future__ import annotations

from ptqc import ops, quant
from ptqc.ir import info
from ptqc.pipeline import Pass, PassResult, register


@register
class Pack(Pass):
    """Pack weight codes of <= 4 bits two per byte (Ascend W4A16 layout); exact."""

    name = "pack"
    requires = frozenset({"weight_quant"})
    provides = frozenset({"packed"})
    forbids = frozenset({"lowered"})  # pack the fake-quant graph, then lower it

    def run(self, qm, ctx) -> PassResult:
        g = qm.graph
        packed = saved = 0
        for dq in list(qm.nodes(ops.DEQUANTIZE_WEIGHT)):
            codes_node = dq.args[0]
            if codes_node.op != "get_attr":
                continue  # already packed
            user = dq if "quant" in info(dq) else next(iter(dq.users))  # expert stacks: on dq itself
            bits = info(user).get("quant", {}).get("weight", {}).get("bits", 8)
            shape = qm.store.spec(codes_node.target)[0]
            if bits > 4 or shape[-1] % 2:
                continue
            codes = qm.store[codes_node.target]
            qm.store[codes_node.target] = quant.pack_int4(codes)
            with g.inserting_before(dq):
                un = g.call_function(ops.UNPACK_INT4, (codes_node,))
            m = info(dq)
            info(un).update({"module": m.get("module"), "layer": m.get("layer"), "role": "weight_unpack"})
            dq.args = (un, *dq.args[1:])
            module = m.get("module")
            if module in qm.quant and "weight" in qm.quant[module]:
                qm.quant[module]["weight"]["packed"] = "int4x2"
            packed += 1
            saved += codes.numel() // 2
        return PassResult(changed=bool(packed), summary={"packed": packed, "bytes_saved": saved})
