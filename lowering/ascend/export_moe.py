"""MoE experts in the Ascend export (vllm-ascend 0.23.0's fused-MoE schemes, msModelSlim's layout).

vllm-ascend fuses a block's experts into ``w13_weight`` [E, 2I, H] / ``w2_weight`` [E, H, I]
(``AscendFusedMoEMethod``) from per-expert checkpoint tensors, and picks the block's scheme from
``<experts>.0.gate_proj.weight`` in the description. Per expert ``e`` and projection
(``X.experts.e.gate_proj`` ...; Mixtral's ``w1``/``w3``/``w2``):

    W8A8_DYNAMIC   int8 per-channel weights, dynamic per-token int8 inputs (gate/up's and down's):
                   .weight int8 [out, in], .weight_scale / .weight_offset f32 [out, 1]
    W4A8_DYNAMIC   int4 symmetric weights, same inputs; version "1.0.0": .weight int8 [out / 2, in]
                   (two int4 per byte along the output dimension, even row in the low nibble),
                   .weight_scale / .weight_offset f32 [out, 1], .scale_bias f32 = 8 x sum_k W x scale,
                   [out, 1] for gate/up and [out, 16] for down (its input in 16 chunks); with the
                   description's group_size > 0 (needed when dense linears are W4A8 too) also
                   .weight_scale_second / .weight_offset_second f32 [out, in / group_size]
    W4A16          int4 symmetric per-group weights, float inputs, in llm-compressor's packed layout (what
                   vllm-ascend's MoE W4A16 reads): .weight_packed int32 [out, in / 8] (code + 8 in bits
                   [4j, 4j + 4) of word j / 8), .weight_scale model dtype [out, in / group_size],
                   .weight_offset zeros like the scale, .weight_shape int32 [out, in]; the description's
                   group_size (default 32) is the group
    FLOAT          float experts: each expert's float weights

Routers (``mlp.gate``, ``shared_expert_gate``) stay FLOAT: vllm-ascend builds them unquantized
from a FLOAT description entry; a quantized router is refused.
"""
from __future__ import annotations

import torch

from ptqc import moe, ops
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, is_op
from ptqc.lowering import checkpoint
from ptqc.lowering.ascend.layout import MOE_TYPES, SCALE_BIAS_CHUNKS
from ptqc.lowering.compressed_tensors.packing import pack_int32

PROJS = ("gate", "up", "down")


def _weight_quant(node, i: int) -> dict | None:
    dq = node.args[3 + i]
    return info(dq).get("quant", {}).get("weight") if is_op(dq, ops.DEQUANTIZE_WEIGHT) else None


def classify(node) -> str:
    """The export type of one ``moe_experts`` node (all its stacks share it)."""
    mod = info(node).get("module", node.name)
    wqs = [_weight_quant(node, i) for i in range(3)]
    if all(w is None for w in wqs):
        return "FLOAT"
    if any(w is None for w in wqs) or len({(w["bits"], w["group"], w["sym"]) for w in wqs}) > 1:
        raise PtqcError(f"{mod}: vllm-ascend serves a block's gate, up and down experts in one scheme; quantize "
                        "all three alike (found " + ", ".join("float" if w is None else f"W{w['bits']}g{w['group']}"
                                                             for w in wqs) + ")")
    w, a = wqs[0], node.args[0]
    if not is_op(a, ops.QUANTIZE_ACT) and not node.kwargs.get("down_act_bits", 0) and w["bits"] == 4:
        if w["sym"] and w["group"] > 0:
            return "W4A16"
        raise PtqcError(f"{mod}: W4A16 experts need symmetric per-group weights (vllm-ascend builds zero offsets and "
                        "reads one group_size for the model); compile rtn/gptq with sym=true and a group")
    dynamic8 = is_op(a, ops.QUANTIZE_ACT) and a.args[1] is None and a.args[3:6] == (8, 0, True)
    if dynamic8 and node.kwargs.get("down_act_bits", 0) == 8 and w["sym"]:
        if w["bits"] == 8 and w["group"] == 0:
            return "W8A8_DYNAMIC"
        if w["bits"] == 4:
            return "W4A8_DYNAMIC"
    acts = f"A{a.args[3]}" if is_op(a, ops.QUANTIZE_ACT) else "A16"
    raise PtqcError(f"{mod}: W{w['bits']}{'g' + str(w['group']) if w['group'] else ''}{acts} experts{_mixed(w)} have no "
                    f"vllm-ascend MoE scheme ptqc writes ({', '.join(MOE_TYPES)}: symmetric weights, dynamic "
                    "per-token int8 inputs of gate/up and down, or float inputs for grouped int4); compile int8, "
                    "w4a8 or rtn:bits=4,group=G for them, or export --format compressed-tensors")


def _mixed(w: dict) -> str:
    """Why a stack is at its bits when ``sensitive:unit=expert`` kept some experts wider: a block is
    served in one scheme, so the stack is exported at its widest bits (exact: narrower codes fit)."""
    if not w.get("expert_bits"):
        return ""
    kept = ", ".join(f"{e}: int{b}" for e, b in sorted(w["expert_bits"].items(), key=lambda kv: int(kv[0])))
    return f" (the widest of a stack of int{w['base_bits']} experts where sensitive:unit=expert kept {kept})"


def plan(qm: QModel) -> list[tuple]:
    """(moe_experts node, export type) of every MoE block."""
    return [(n, classify(n)) for n in qm.nodes(ops.MOE_EXPERTS)]


def block_key(node) -> str:
    """The block's own description entry (``X.experts.weight``, no tensor): vllm-ascend reads a
    FusedMoE layer's type from it for model types without an ``experts`` packed-modules mapping
    (Mixtral, Qwen2-MoE: KeyError without it); those with one read expert 0's entries."""
    return f"{info(node)['module']}.weight"


def stack_name(node, i: int) -> str:
    """The store name of a block's ``PROJS[i]`` stack (its codes if quantized): the checkpoint's
    per-expert name without the index (``X.experts.gate_proj.weight``)."""
    a = node.args[3 + i]
    if is_op(a, ops.DEQUANTIZE_WEIGHT):
        a = a.args[0].args[0] if is_op(a.args[0], ops.UNPACK_INT4) else a.args[0]
    return a.target


def w4a16_group(moe_plan: list) -> int | None:
    """The one group of every W4A16 expert stack (the description's group_size), None without any."""
    gs = {_weight_quant(node, i)["group"] for node, kind in moe_plan if kind == "W4A16" for i in range(3)}
    if len(gs) > 1:
        raise PtqcError(f"MoE W4A16 experts share the description's one group_size; found groups {sorted(gs)}")
    return gs.pop() if gs else None


def _w4a16(codes: torch.Tensor, scale: torch.Tensor, serving: torch.dtype) -> dict:
    """One expert's W4A16 tensors (llm-compressor's packed layout, plus the zero weight_offset vllm-ascend's
    scheme creates: written, so every parameter of the layer is filled from the checkpoint)."""
    return {"weight_packed": pack_int32(codes.to(torch.int8), 4), "weight_scale": scale.to(serving),
            "weight_offset": torch.zeros(scale.shape, dtype=serving),
            "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int32)}


def groups(qm: QModel, moe_plan: list) -> tuple[list[int], list[int]]:
    """(the groups, the input widths) of the W4A8 expert stacks, for the description's group_size."""
    gs, ins = [], []
    for node, kind in moe_plan:
        if kind == "W4A8_DYNAMIC":
            for i in range(3):
                gs.append(_weight_quant(node, i)["group"])
                packed = is_op(node.args[3 + i].args[0], ops.UNPACK_INT4)  # two int4 codes per stored byte
                ins.append(qm.store.spec(stack_name(node, i))[0][-1] * (2 if packed else 1))
    return gs, ins


def _quantized(qm: QModel, node, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, set]:
    """(codes [E, out, in], scale [E, out, G], weight_offset [E, out, G], store names read) of stack i."""
    dq = node.args[3 + i]
    codes = checkpoint.weight_codes(qm, dq)
    scale = qm.store[dq.args[1].target].float()
    scale = scale.reshape(*scale.shape[:2], -1)
    zp = dq.args[2]
    off = -qm.store[zp.target].float().reshape(scale.shape) if zp is not None else torch.zeros_like(scale)
    return codes, scale, off, checkpoint.store_inputs(dq, dq.args[0])


def tensors(qm: QModel, node, kind: str, group: int, w4a8, serving: torch.dtype) -> tuple[dict, dict, set]:
    """({per-expert tensor name: tensor}, {name: type}, store names replaced) of one block;
    ``w4a8(base, codes, scale, group, chunks)`` writes one expert's W4A8 tensors."""
    out, handled = {}, set()
    for i, proj in enumerate(PROJS):
        stack = stack_name(node, i)
        if kind == "FLOAT":
            t = qm.store[stack]
            out |= {moe.expert_name(stack, e): t[e] for e in range(t.shape[0])}
            handled.add(stack)
            continue
        codes, scale, off, done = _quantized(qm, node, i)
        handled |= done
        for e in range(codes.shape[0]):
            base = moe.expert_name(stack, e).removesuffix(".weight")
            if kind == "W4A8_DYNAMIC":
                t = w4a8(base, codes[e], scale[e], group, SCALE_BIAS_CHUNKS if proj == "down" else 1)
            elif kind == "W4A16":
                t = _w4a16(codes[e], scale[e], serving)
            else:
                t = {"weight": codes[e].to(torch.int8), "weight_scale": scale[e], "weight_offset": off[e]}
            out |= {f"{base}.{s}": v for s, v in t.items()}
    return out, dict.fromkeys(out, kind), handled


def check_routers(qm: QModel) -> None:
    """Routers stay float: vllm-ascend builds ``mlp.gate`` / ``shared_expert_gate`` from FLOAT entries."""
    for lin in qm.linears():
        role, mod = info(lin).get("role"), info(lin).get("module", "")
        if (role == "router" or mod.endswith("shared_expert_gate")) and is_op(lin.args[1], ops.DEQUANTIZE_WEIGHT):
            raise PtqcError(f"{mod}: the MoE router is quantized, but vllm-ascend loads routers float (FLOAT in the "
                            "description); compile with exclude=lm_head|router|shared_expert_gate")
