"""pack: store weight codes of 4 bits or fewer two per byte (real weight-only storage).

Quantization passes store one code per int8 byte (easy to read and to rewrite). This pass
replaces the codes of every weight quantized with at most 4 bits by the packed form the Ascend
W4A16 format uses: two signed 4-bit codes per int8 byte along the input dimension, low nibble
first (``ptqc.quant.pack_int4``), saved under the same ``<module>.weight`` name; the graph
unpacks them in front of the dequantize node::

    w_p = get_attr  model.layers.0.mlp.down_proj.weight     (int8 [out, in/2], packed)
    w_q = ptqc.unpack_int4(w_p)                              (int8 [out, in])
    w   = ptqc.dequantize_weight(w_q, scale, zero_point, group, dtype)

W3 and W2 codes are packed as int4 as well (NPUs have no 2/3-bit matmul; their codes fit in
a nibble). W5..W8 stay one code per byte. ``ptqc compile`` appends this pass after weight
quantization unless ``--no-pack`` is given. The model computes exactly the same values.
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
            lin = next(iter(dq.users))
            bits = info(lin).get("quant", {}).get("weight", {}).get("bits", 8)
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
