"""Export for vllm-ascend ``--quantization ascend`` (the msModelSlim format); the checker is
:mod:`export_check`, the reader :mod:`export_load`, the layout's data :mod:`layout`.

    OUT/quant_model_description.json     {"model_quant_type", "version", "group_size", ...,
                                          "<tensor name>": "<type>" for every tensor}
    OUT/quant_model_weights-00001-of-00001.safetensors (+ .index.json)
    OUT/config.json, tokenizer files     copied (no quantization_config, as msModelSlim does)

Served in one dtype (float16 / bfloat16, ``dtype``; default the artifact's): float tensors are
written in it, config.json's ``torch_dtype`` says it, W8A8's deq_scale follows it.

Per linear (from the fake-quant graph of an artifact; ``.weight`` int8 [out, in] but for W4A8):

    W8A8_DYNAMIC   int8 per-channel symmetric weights + dynamic per-token int8 activations:
                   .weight, .weight_scale f32 [out, 1], .weight_offset f32 [out, 1]
    W8A8           + static per-tensor activations: .weight, .input_scale f32 [1],
                   .input_offset int8 [1] (codes = round(x / input_scale + input_offset); int8 as
                   vllm-ascend's parameter: msModelSlim writes float32, which it casts),
                   .deq_scale [out] = input_scale * weight_scale (int64 holding the float32 bit
                   pattern, as msModelSlim writes it; float32 for a bf16 model), .quant_bias
                   int32 [out] = round(bias / deq_scale) - sum_k W * offset (both checked
                   bit for bit against a real msModelSlim export in tests/data),
                   .weight_scale, .weight_offset; the float .bias is kept too
    W8A16          int8 weights, float activations: .weight, .weight_scale, .weight_offset
    W4A8_DYNAMIC   int4 symmetric weights (per channel, or per group: one group_size for the model,
                   in the description; per channel is written at gcd(256, every in)) + dynamic
                   per-token int8 activations, vllm-ascend's version "1.0.0" layout: .weight int8
                   [out / 2, in] (two int4 per byte along the OUTPUT dimension, even row in the
                   low nibble), .weight_scale [out, 1] and .weight_scale_second [out, in / group]
                   (their product is the artifact's scale: per channel = (scale, 1), per group =
                   (1, scale)), .weight_offset / .weight_offset_second zeros, .scale_bias f32
                   [out, 1] (row-parallel o_proj / down_proj: [out, 16], the input dimension in
                   16 chunks) = 8 * sum_k W[n, k] * weight_scale[n] * weight_scale_second[n, k / group]
                   (vllm-ascend's formula for the version-0 layout, which it computes itself).
                   vllm-ascend 0.23's dense W4A8_DYNAMIC linear runs npu_weight_quant_batchmatmul
                   on float activations (it quantizes none): served, it is W4 weight-only.
    W8A8_MIX, W4A4_DYNAMIC, W4A4_FLATQUANT_DYNAMIC, W8A8_MXFP8, W4A4_MXFP4: :mod:`export_types`
    FLOAT          everything else (norms, embeddings, lm_head, biases, MoE routers)

MoE experts (``ptqc.moe_experts`` stacks [E, out, in]) are written per expert under the checkpoint's
names as W8A8_DYNAMIC, W4A8_DYNAMIC or FLOAT: :mod:`export_moe`.

Refused (one line, nothing written), where vllm-ascend 0.23.0's loader cannot take the export:
<=4-bit weight-only linears (it has W4A16 for MoE experts only: a dense W4A16 linear raises
NotImplementedError when built), and C8 for a model class whose load_weights has no C8 patch
(only Qwen3, Glm4Moe and MiniMaxM2; Qwen2/Llama fail with a KeyError on ``qkv_proj.kv_cache_offset``).
The checker and :func:`load` still read dense W4A16 written by others (msModelSlim 1.0.0: two codes
per int8 byte, low nibble first, along the output dimension [out / 2, in] when the scales have several
columns [out, in / group_size], along the input dimension [out, in / 2] with one column).
The description has ``version`` "1.0.0" (msModelSlim's) and ``group_size`` only with W4A8_DYNAMIC
(vllm-ascend reads it only for W4A8 / MoE W4A16).

``weight_offset`` is minus ptqc's zero point (Ascend adds it: ``(w + offset) * scale``).
    C8             int8 KV cache (``kv_cache_type: "C8"``), per attention module, named after its
                   k_proj / v_proj as vllm-ascend loads them: ``<k_proj>.kv_cache_scale`` and
                   ``.kv_cache_offset`` [KV_N * D] (float32), same for v_proj. The cache is
                   written as ``npu_quantize(k.view(-1, KV_N * D), kv_cache_scale, kv_cache_offset)``,
                   i.e. codes = round(k / scale + offset): the offset is ptqc's zero point (0 when
                   symmetric); a per-tensor scale is written expanded to every channel. C8 needs
                   static K and V scales (``kv:k=channel,v=channel`` or ``tensor``); an artifact whose
                   KV quantizers are dynamic (per token, ptqc's default V) exports its linears
                   only and says so in ``optional``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ptqc import ops, quant
from ptqc.artifact import AtomicDir
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, is_cache_quantizer, is_op
from ptqc.lowering import checkpoint
from ptqc.lowering.ascend import export_types
from ptqc.lowering.ascend.export_check import check  # noqa: F401  (ptqc.lowering.ascend.export.check)
from ptqc.lowering.ascend.export_load import load  # noqa: F401  (ptqc.lowering.ascend.export.load)
from ptqc.lowering.ascend import export_cache, export_moe
from ptqc.lowering.ascend.layout import (DESCRIPTION, INDEX, SCALE_BIAS_CHUNKS, SERVING_DTYPES,
                                         W4A8_GROUP, WEIGHTS, row_parallel)


def classify(lin, wq: dict | None) -> str:
    """The export type of one linear from its graph node."""
    if wq is None:
        return "FLOAT"
    a, mod = lin.args[0], info(lin)["module"]
    kind = export_types.classify(lin, wq, a)
    if kind:
        return kind
    if is_op(a, ops.QUANTIZE_ACT) and not is_cache_quantizer(a):
        bits, group, sym = a.args[3], a.args[4], a.args[5]
        dynamic = a.args[1] is None and group == 0 and sym
        if bits == 8 and wq["bits"] == 4 and dynamic:
            if not wq["sym"]:
                raise PtqcError(f"{mod}: W4A8_DYNAMIC needs symmetric int4 weights (vllm-ascend 0.23 applies no "
                                "weight offset); compile w4a8 (w_sym=true)")
            return "W4A8_DYNAMIC"
        if bits != 8 or wq["bits"] != 8 or wq["group"] != 0 or not wq["sym"]:
            raise PtqcError(f"{mod}: W{wq['bits']}A{bits} has no Ascend export type; "
                            "export supports W8A8 (static), W8A8_DYNAMIC, W4A8_DYNAMIC and W8A16")
        if a.args[1] is None:
            if not dynamic:
                raise PtqcError(f"{mod}: dynamic activations must be per-token symmetric for W8A8_DYNAMIC")
            return "W8A8_DYNAMIC"
        return "W8A8"
    if wq["bits"] != 8 or wq["group"] != 0:
        raise PtqcError(f"{mod}: W{wq['bits']}A16{'g' + str(wq['group']) if wq['group'] else ''} "
                        "has no dense linear in vllm-ascend 0.23 (its W4A16 is for MoE experts only); compile "
                        "w8a16 (W8A16), w4a8 (W4A8_DYNAMIC) or int8 (W8A8) for --format ascend, or export "
                        "--format compressed-tensors")
    return "W8A16"


def w4a8_group(qm: QModel, lins: list, moe_plan: list = ()) -> int:
    """The model's W4A8 group_size: the artifact's group (one for all), else for per-channel weights
    the largest divisor of 256 that divides every input dimension, or 0 (vllm-ascend's per-channel
    MoE layout) when only experts are W4A8 (a dense W4A8 linear divides by group_size)."""
    expert_groups, expert_ins = export_moe.groups(qm, moe_plan)
    groups = ({info(lin)["quant"]["weight"]["group"] for lin in lins} | set(expert_groups)) - {0}
    if len(groups) > 1:
        raise PtqcError(f"W4A8_DYNAMIC has one group_size per model (the description's); found {sorted(groups)}")
    if groups:
        g = groups.pop()
    elif not lins:
        return 0
    else:
        g = math.gcd(W4A8_GROUP, *(checkpoint.weight_codes(qm, lin.args[1]).shape[1] for lin in lins), *expert_ins)
    if g % 32:
        raise PtqcError(f"W4A8_DYNAMIC group_size {g} is not a multiple of 32 (npu_weight_quant_batchmatmul)")
    return g


def _w4a8_tensors(base: str, codes: torch.Tensor, scale: torch.Tensor, group: int, chunks: int = 0) -> dict:
    """The version-1.0.0 W4A8_DYNAMIC tensors of int4 codes [out, in] with scale [out, 1] or [out, in / group]
    (group 0: per channel, no second-level tensors); scale_bias in ``chunks`` input chunks (0: by the name)."""
    out, k = codes.shape
    chunks = chunks or (SCALE_BIAS_CHUNKS if row_parallel(base) else 1)
    if out % 8 or (group and k % group) or k % chunks:
        raise PtqcError(f"{base}: W4A8_DYNAMIC needs out % 8 == 0 (int4 pairs viewed as int32), in % group_size "
                        f"({group}) == 0{' and in % 16 == 0' if chunks > 1 else ''} (got out={out}, in={k})")
    if not group:
        first, second = scale, None
    elif scale.shape[1] == 1:
        first, second = scale, torch.ones(out, k // group)
    else:
        first, second = torch.ones(out, 1), scale
    w = codes.float() * (first if second is None else (first * second).repeat_interleave(group, 1))
    t = {"weight": quant.pack_int4(codes.t()).t(), "weight_scale": first, "weight_offset": torch.zeros_like(first)}
    if second is not None:
        t |= {"weight_scale_second": second, "weight_offset_second": torch.zeros_like(second)}
    return t | {"scale_bias": 8 * w.reshape(out, chunks, k // chunks).sum(-1)}


def _static_tensors(qm: QModel, lin, codes: torch.Tensor, scale: torch.Tensor, serving: torch.dtype) -> dict:
    """input_scale, input_offset, deq_scale and quant_bias of a static W8A8 linear."""
    q = lin.args[0]
    s_in = qm.store[q.args[1].target].float().reshape(1)
    off = qm.store[q.args[2].target].float().reshape(1) if q.args[2] is not None else torch.zeros(1)
    deq = (s_in * scale.reshape(-1)).float()
    # msModelSlim writes the float32 bit pattern as int64 (no npu_trans_quant_param flag, not
    # truncated: the runtime converts it); float32 for a bf16 model
    deq_store = deq if serving == torch.bfloat16 else deq.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = lin.args[2] if len(lin.args) > 2 else None
    qb = qm.store[b.target].float() / deq if b is not None else torch.zeros_like(deq)
    qb = torch.round(qb) - codes.float().sum(1) * off
    return {"input_scale": s_in, "input_offset": off.to(torch.int8), "deq_scale": deq_store,
            "quant_bias": qb.to(torch.int32)}


def _linear_tensors(qm: QModel, lin, kind: str, serving: torch.dtype, group: int) -> tuple[dict, set]:
    """(the tensors of a quantized linear by suffix, the store names they replace)."""
    dq = lin.args[1]
    codes = checkpoint.weight_codes(qm, dq)
    scale = qm.store[dq.args[1].target].float()
    zp = qm.store[dq.args[2].target].float() if dq.args[2] is not None else torch.zeros_like(scale)
    new = export_types.tensors(qm, lin, kind, serving)
    if new is not None:
        return new
    handled = checkpoint.store_inputs(dq, dq.args[0])
    if kind == "W4A8_DYNAMIC":
        return _w4a8_tensors(info(lin)["module"], codes, scale.reshape(scale.shape[0], -1), group), handled
    t = {"weight": codes.to(torch.int8),
         "weight_scale": scale.reshape(scale.shape[0], -1), "weight_offset": (-zp).reshape(scale.shape[0], -1)}
    if kind in ("W8A8", "W8A8_MIX"):
        t |= _static_tensors(qm, lin, codes, scale, serving)
        handled |= checkpoint.store_inputs(lin.args[0])
    return t, handled


def serving_dtype(qm: QModel, dtype: str | None = None) -> torch.dtype:
    """The dtype vllm-ascend serves the export in: ``dtype``, else the artifact's if float16 / bfloat16."""
    name = dtype or str(qm.dtype).removeprefix("torch.")
    if name in SERVING_DTYPES:
        return getattr(torch, name)
    if dtype:
        raise PtqcError(f"--dtype {dtype}: vllm-ascend serves {' or '.join(SERVING_DTYPES)}")
    raise PtqcError(f"the artifact is {name}: give --dtype float16 or --dtype bfloat16, the dtype vllm-ascend will "
                    "serve it in (W8A8's deq_scale is int64 for float16, float32 for bfloat16, absent for float32)")


def _write_config(qm: QModel, out: Path, serving: torch.dtype) -> None:
    """The source's config.json with its dtype set to the serving one."""
    src = Path(qm.source) / "config.json" if qm.source else None
    if src is None or not src.is_file():
        return
    cfg = json.loads(src.read_text())
    name = str(serving).removeprefix("torch.")
    cfg["torch_dtype"] = name
    if "dtype" in cfg:  # transformers 5 writes "dtype"
        cfg["dtype"] = name
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def description_group(qm: QModel, plan: list, moe_plan: list) -> tuple[int, int | None]:
    """(the W4A8 group, 0 without W4A8; the description's group_size: W4A8's, else the W4A16 experts',
    None without either). One group_size per model: a clash is refused."""
    w4a8 = [lin for lin, kind in plan if kind == "W4A8_DYNAMIC"]
    any_w4a8 = bool(w4a8) or any(k == "W4A8_DYNAMIC" for _, k in moe_plan)
    group = w4a8_group(qm, w4a8, moe_plan) if any_w4a8 else 0
    g16 = export_moe.w4a16_group(moe_plan)
    if g16 is not None and any_w4a8 and g16 != group:
        raise PtqcError(f"the description has one group_size: W4A8 uses {group}, the W4A16 experts {g16}; "
                        "compile them with one group")
    return group, group if any_w4a8 else g16


def export(qm: QModel, out, *, force: bool = False, dtype: str | None = None) -> dict:
    """Write ``qm`` (a fake-quant ptqc graph) in the Ascend deployment format for serving in ``dtype``
    (float16 / bfloat16; default: the artifact's dtype); returns the description."""
    if any(str(n.target).startswith("ptqc_npu.") for n in qm.graph.nodes if n.op == "call_function"):
        raise PtqcError("export the fake-quant artifact, not a lowered one (compile without the ascend pass)")
    serving = serving_dtype(qm, dtype)
    export_types.check_transforms(qm)
    plan = [(lin, classify(lin, info(lin).get("quant", {}).get("weight")
                           if is_op(lin.args[1], ops.DEQUANTIZE_WEIGHT) else None)) for lin in qm.linears()]
    export_moe.check_routers(qm)
    moe_plan = export_moe.plan(qm)
    group, desc_group = description_group(qm, plan, moe_plan)
    tensors, desc, kinds, handled = {}, {}, {}, set()
    experts, blocks = {}, {}
    for node, kind in moe_plan:
        experts[kind] = experts.get(kind, 0) + 1
        t, d, done = export_moe.tensors(qm, node, kind, group, _w4a8_tensors, serving)
        tensors |= {n: (v.to(serving) if kind == "FLOAT" else v).contiguous() for n, v in t.items()}
        desc |= d
        blocks[export_moe.block_key(node)] = kind
        handled |= done
    for lin, kind in plan:
        if kind == "FLOAT":
            continue
        base = info(lin)["module"]
        kinds[kind] = kinds.get(kind, 0) + 1
        t, done = _linear_tensors(qm, lin, kind, serving, group)
        handled |= done
        for suffix, v in t.items():
            tensors[f"{base}.{suffix}"] = v.contiguous()
            desc[f"{base}.{suffix}"] = kind
    cache = export_cache.tensors(qm)
    tensors |= cache["tensors"]
    desc |= cache["desc"]
    handled |= cache["handled"]
    desc |= dict.fromkeys(checkpoint.unchanged(qm, handled | set(tensors))[0], "FLOAT")
    quantized_experts = {k: v for k, v in experts.items() if k != "FLOAT"}
    main = max(quantized_experts, key=quantized_experts.get) if quantized_experts else \
        max(kinds, key=kinds.get) if kinds else "FLOAT"
    head = {"model_quant_type": main, "version": "1.0.0", **({"group_size": desc_group} if desc_group is not None else {}),
            **cache["head"],
            "metadata": {"producer": "ptqc", "linears": kinds, **({"moe_blocks": experts} if experts else {}),
                         "dtype": str(serving).removeprefix("torch.")},
            "optional": {"kv_cache": cache["optional"]}}
    names = sorted(desc)
    with AtomicDir(out, force) as tmp:
        checkpoint.copy_source_files(qm, tmp)
        _write_config(qm, tmp, serving)
        total = checkpoint.save(qm, tmp / WEIGHTS, names, tensors, serving)
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                             "weight_map": {n: WEIGHTS for n in names}}, indent=1))
        desc |= blocks  # description entries without a tensor
        (tmp / DESCRIPTION).write_text(json.dumps({**head, **{n: desc[n] for n in sorted(desc)}}, indent=1))
    return {**head, "tensors": len(names)}


