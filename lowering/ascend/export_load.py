"""Read an Ascend export back into a ptqc fake-quant graph (:func:`load`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ptqc import ops, quant
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, is_op
from ptqc.lowering.ascend import export_types
from ptqc.lowering.ascend.export_check import check
from ptqc.lowering.ascend.layout import DESCRIPTION, EXPERT, kv_shape
from ptqc.lowering.ascend.ops_quant import deq_scale_value
from ptqc.lowering.compressed_tensors.packing import unpack_int32


def load(path, dtype: str = "float32", trust_remote_code: bool = False) -> QModel:
    """Read an Ascend export back into a ptqc fake-quant graph (codes, scales and activation
    quantizers as the artifact had them), so it can be evaluated, diffed and re-exported. Like an
    artifact, it is read in the dtype it was written in (config.json's), ``dtype`` only where none is given."""
    from ptqc import frontend
    from ptqc.ir import propagate
    from ptqc.passes.act_quant import insert_quantizer
    from ptqc.weights import set_quantized_weight

    path = Path(path)
    problems = check(path, serving=False)
    if problems:
        raise PtqcError(f"{path} is not a valid Ascend export: {problems[0]} (run ptqc check-export)")
    desc = json.loads((path / DESCRIPTION).read_text())
    experts = sorted(n for n, t in desc.items() if EXPERT.match(n) and t not in ("FLOAT", *EXPERTS_READ))
    if experts:
        raise PtqcError(f"{path}: reading {desc[experts[0]]} MoE experts back from an Ascend export is not supported "
                        f"yet ({experts[0]}; {', '.join(EXPERTS_READ)} experts are); evaluate the artifact instead")
    dt = _written_dtype(path) or dtype
    qm = frontend.load(path, dt, trust_remote_code, shapes=False, supply=_packed_stand_ins(path, desc, dt))
    qm.store.cast = False
    for n in qm.store.keep_dtype:  # float32 routers, written in the serving dtype as vllm-ascend loads them
        qm.store.overlay[n] = qm.store[n].float()
    acts: dict = {}
    for lin in qm.linears():
        w = lin.args[1].target
        kind = desc.get(w, "FLOAT")
        if kind == "FLOAT":
            continue
        new = export_types.read(qm, w.removesuffix(".weight"), kind)
        if new is not None:
            set_quantized_weight(qm, lin, *new[:4], "ascend-export")
            acts.setdefault((lin.args[0], new[4]), []).append(lin)
            continue
        set_quantized_weight(qm, lin, *_weight(qm, w.removesuffix(".weight"), kind, desc), "ascend-export")
        if kind in ("W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC"):
            acts.setdefault((lin.args[0], "W8A8" if kind == "W8A8" else "dynamic"), []).append(lin)
    for (src, kind), lins in acts.items():
        if export_types.insert_act(qm, src, lins, kind):
            continue
        if kind == "dynamic":
            insert_quantizer(qm, src, lins, quant.QuantSpec(8, 0, True))
            continue
        base = info(lins[0])["module"]
        s = qm.store[f"{base}.input_scale"].float().reshape(1)
        off = qm.store[f"{base}.input_offset"].float().reshape(1)
        zp = torch.round(off).to(torch.int8) if off.any() else None
        insert_quantizer(qm, src, lins, quant.QuantSpec(8, -1, zp is None), scale=s, zero_point=zp,
                         method="static-export")
    _load_experts(qm, desc)
    if desc.get("kv_cache_type") == "C8":
        _load_c8(qm)
    qm.properties |= {"weight_quant"} | ({"act_quant"} if acts else set())
    propagate(qm.graph, qm.store)
    if desc.get("fa_quant_type") == "FAKQuant":  # MLA's cache points are found by their shapes
        _load_fa(qm)
        propagate(qm.graph, qm.store)
    return qm


EXPERTS_READ = ("W8A8_DYNAMIC", "W4A8_DYNAMIC", "W4A16")  # expert types read back


def _packed_stand_ins(path: Path, desc: dict, dtype: str) -> dict:
    """W4A16 experts store no ``.weight`` (llm-compressor's ``weight_packed`` instead): a zero stand-in
    of the weight's shape per expert (one element, expanded), so the graph traces; :func:`_load_experts`
    replaces the stacks by the unpacked codes before anything reads them."""
    from safetensors import safe_open

    from ptqc.model import parse_dtype, weight_files

    names = [n.removesuffix("_packed") for n, t in desc.items() if t == "W4A16" and EXPERT.match(n)
             and n.endswith(".weight_packed")]
    if not names:
        return {}
    files, zero = weight_files(path), torch.zeros((), dtype=parse_dtype(dtype))
    by_file: dict = {}
    for n in names:  # each shard opened once: a 671B MoE has ~44k expert projections
        by_file.setdefault(files[f"{n}_shape"], []).append(n)
    out = {}
    for f, ns in by_file.items():
        with safe_open(str(f), "pt") as sf:
            out |= {n: zero.expand(*[int(x) for x in sf.get_tensor(f"{n}_shape")]) for n in ns}
    return out


def _written_dtype(path: Path) -> str | None:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    d = cfg.get("dtype") or cfg.get("torch_dtype")
    return d if d in ("float16", "bfloat16", "float32") else None


def _weight(qm: QModel, base: str, kind: str, desc: dict) -> tuple:
    """(QuantSpec, int codes [out, in], scale, zero point or None) of one exported linear."""
    codes = qm.store[f"{base}.weight"]
    if f"{base}.weight_scale" not in qm.store and kind in ("W8A8", "W8A8_MIX"):  # msModelSlim's iter_smooth
        deq = qm.store[f"{base}.deq_scale"]  # int64 float32 bits (float16 serving) or float32 (bfloat16)
        deq = deq_scale_value(deq) if deq.dtype == torch.int64 else deq.float()
        return quant.QuantSpec(8, 0, True), codes, (deq / qm.store[f"{base}.input_scale"].float()).reshape(-1, 1), None
    scale = qm.store[f"{base}.weight_scale"].float()
    offset = qm.store[f"{base}.weight_offset"].float()
    zp = None if not offset.any() else torch.round(-offset).to(torch.int8)
    group = desc.get("group_size", 0) or 0
    if kind == "W4A8_DYNAMIC":  # scale x scale_second; version 1.0.0 packs along the output dimension
        if desc.get("version") == "1.0.0":
            codes = quant.unpack_int4(codes.t().contiguous()).t().contiguous()
        second_name = f"{base}.weight_scale_second"  # absent in the per-channel layout (group_size 0)
        second = qm.store[second_name].float() if second_name in qm.store else torch.ones(1)
        per_channel = bool((second == 1).all())
        return quant.QuantSpec(4, 0 if per_channel else group, True), codes, scale if per_channel else scale * second, None
    if kind == "W4A16" and f"{base}.weight_packed" in qm.store:  # MoE experts: llm-compressor's packed int32
        shape = [int(x) for x in qm.store[f"{base}.weight_shape"]]
        return quant.QuantSpec(4, group, True), unpack_int32(qm.store[f"{base}.weight_packed"], 4, shape), scale, None
    if kind == "W4A16":  # msModelSlim 1.0.0: along the output dimension per group, along the input per channel
        along_out = desc.get("version") == "1.0.0" and scale.shape[1] > 1
        codes = quant.unpack_int4(codes.t().contiguous()).t().contiguous() if along_out else quant.unpack_int4(codes)
    group = group if kind == "W4A16" and scale.shape[1] > 1 else 0
    return quant.QuantSpec(4 if kind == "W4A16" else 8, group, zp is None), codes, scale, zp


def _load_c8(qm: QModel) -> None:
    """Static int8 K/V quantizers on every attention from the export's kv_cache_scale/offset."""
    from ptqc.passes.kv import KV

    hkv, d = kv_shape(qm)
    for a in [n for n in qm.graph.nodes if is_op(n, ops.ATTENTION)]:
        base = info(a)["module"]
        for which, arg in (("k", 1), ("v", 2)):
            proj = f"{base}.{which}_proj"
            scale = qm.store[f"{proj}.kv_cache_scale"].float().reshape(hkv, 1, d)
            off = qm.store[f"{proj}.kv_cache_offset"].float().reshape(hkv, 1, d)
            zp = torch.round(off).to(torch.int8) if off.any() else None
            KV._insert(qm, a, arg, quant.QuantSpec(8, 0, zp is None), scale, zp, which)


def _load_fa(qm: QModel) -> None:
    """FAKQuant: a static per-tensor int8 quantizer on the latent of every MLA attention with an fa_k.scale."""
    from ptqc import mla
    from ptqc.passes.kv import quantize_after

    for a in [n for n in qm.graph.nodes if is_op(n, ops.ATTENTION)]:
        name, pts = f"{info(a)['module']}.fa_k.scale", mla.cache_points(a)
        if pts is not None and name in qm.store:
            quantize_after(qm, a, pts[0], quant.QuantSpec(8, 0, True), qm.store[name].float().reshape(1), None,
                           "latent")


def _load_experts(qm: QModel, desc: dict) -> None:
    """W8A8_DYNAMIC / W4A8_DYNAMIC / W4A16 expert blocks: each expert read as a linear of its type is
    (:func:`_weight`), stacked [E, out, in] with its scales, and (but for W4A16) the dynamic per-token
    int8 inputs of gate/up and down."""
    from ptqc import experts as ex
    from ptqc import moe
    from ptqc.weights import set_quantized_weight, weight_node

    for node in list(qm.nodes(ops.MOE_EXPERTS)):
        sites = [ex.ExpertSite(node, p) for p in ex.PROJS]
        stacks = [weight_node(s).target for s in sites]
        first = moe.expert_name(stacks[0], 0)
        kind = desc.get(first, desc.get(f"{first}_packed", "FLOAT"))
        if kind not in EXPERTS_READ:
            continue
        for site, stack in zip(sites, stacks):
            n = len(qm.store.stacks[stack]) if stack in qm.store.stacks else qm.store.spec(stack)[0][0]
            parts = [_weight(qm, moe.expert_name(stack, e).removesuffix(".weight"), kind, desc) for e in range(n)]
            codes, scale = torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts])
            set_quantized_weight(qm, site, parts[0][0], codes, scale, None, "ascend-export")
        if kind != "W4A16":
            ex.quantize_inputs(qm, node, quant.QuantSpec(8, 0, True))
