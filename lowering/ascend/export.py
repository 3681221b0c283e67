"""Export for vllm-ascend ``--quantization ascend`` (the msModelSlim format) and its checker.

    OUT/quant_model_description.json     {"model_quant_type", "version", "group_size", ...,
                                          "<tensor name>": "<type>" for every tensor}
    OUT/quant_model_weights-00001-of-00001.safetensors (+ .index.json)
    OUT/config.json, tokenizer files     copied (no quantization_config, as msModelSlim does)

Per linear (from the fake-quant graph of an artifact; ``.weight`` always int8 [out, in]):

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
    FLOAT          everything else (norms, embeddings, lm_head, biases)

Refused (one line, nothing written), where vllm-ascend 0.23.0's loader cannot take the export:
<=4-bit weight-only linears (it has W4A16 for MoE experts only: a dense W4A16 linear raises
NotImplementedError when built), and C8 for a model class whose load_weights has no C8 patch
(only Qwen3, Glm4Moe and MiniMaxM2; Qwen2/Llama fail with a KeyError on ``qkv_proj.kv_cache_offset``).
The checker and :func:`load` still read W4A16 (packed two per int8 byte along the input
dimension, low nibble first [out, in / 2]; scales [out, in / group_size]) written by others.
The description has ``version`` "1.0.0" (msModelSlim's) and no ``group_size`` (no grouped type
is exported; vllm-ascend reads it only for W4A8 / MoE W4A16).

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
import shutil
from pathlib import Path

import torch

from ptqc import ops, quant
from ptqc.artifact import AtomicDir
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, is_op
from ptqc.lowering import checkpoint
from ptqc.model import tensor_specs

DESCRIPTION = "quant_model_description.json"
WEIGHTS = "quant_model_weights-00001-of-00001.safetensors"
INDEX = "quant_model_weights.safetensors.index.json"
TYPES = ("W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16", "C8", "FLOAT")
C8_MODEL_TYPES = ("qwen3", "glm4_moe", "minimax_m2")  # vllm-ascend 0.23.0 patches their load_weights for C8
C8_SUFFIXES = ("kv_cache_scale", "kv_cache_offset")
META_KEYS = ("model_quant_type", "version", "group_size", "kv_cache_type", "kv_quant_type", "metadata", "optional")
REQUIRED = {  # suffixes every linear of a type must have (besides .weight)
    "W8A8": ("input_scale", "input_offset", "deq_scale", "quant_bias", "weight_scale", "weight_offset"),
    "W8A8_DYNAMIC": ("weight_scale", "weight_offset"),
    "W8A16": ("weight_scale", "weight_offset"),
    "W4A16": ("weight_scale", "weight_offset"),
}
SUFFIX_RULES = {  # suffix -> (dtypes, shapes of a linear [out, in] with cols scale columns, what is expected)
    "weight_scale": (("F32",), lambda out, cols: ((out, cols),), "float32 [{out}, {cols}]"),
    "weight_offset": (("F32",), lambda out, cols: ((out, cols),), "float32 [{out}, {cols}]"),
    "input_scale": (("F32",), lambda out, cols: ((1,), ()), "float32 [1]"),
    "input_offset": (("I8", "F32"), lambda out, cols: ((1,), ()), "int8 (or float32) [1]"),
    "deq_scale": (("I64", "F32"), lambda out, cols: ((out,),), "int64 (or float32 for bf16 models) [{out}]"),
    "quant_bias": (("I32",), lambda out, cols: ((out,),), "int32 [{out}]"),
}


def classify(lin, wq: dict | None) -> str:
    """The export type of one linear from its graph node."""
    if wq is None:
        return "FLOAT"
    a = lin.args[0]
    if is_op(a, ops.QUANTIZE_ACT):
        bits, group, sym = a.args[3], a.args[4], a.args[5]
        if bits != 8 or wq["bits"] != 8 or wq["group"] != 0 or not wq["sym"]:
            raise PtqcError(f"{info(lin)['module']}: W{wq['bits']}A{bits} has no Ascend export type; "
                            "export supports W8A8 (static), W8A8_DYNAMIC and W8A16")
        if a.args[1] is None:
            if group != 0 or not sym:
                raise PtqcError(f"{info(lin)['module']}: dynamic activations must be per-token symmetric for W8A8_DYNAMIC")
            return "W8A8_DYNAMIC"
        return "W8A8"
    if wq["bits"] != 8 or wq["group"] != 0:
        raise PtqcError(f"{info(lin)['module']}: W{wq['bits']}A16{'g' + str(wq['group']) if wq['group'] else ''} "
                        "has no dense linear in vllm-ascend 0.23 (its W4A16 is for MoE experts only); compile "
                        "w8a16 (W8A16) or int8 (W8A8) for --format ascend, or export --format compressed-tensors")
    return "W8A16"


def _c8_tensors(qm: QModel) -> tuple[dict, str | None]:
    """C8 tensors of every attention's static int8 K/V quantizers, or ({}, why not)."""
    out: dict = {}
    atts = [n for n in qm.graph.nodes if is_op(n, ops.ATTENTION)]
    quantized = [a for a in atts if any(is_op(x, ops.QUANTIZE_ACT) for x in a.args[1:3])]
    if not quantized:
        return {}, None
    hkv, d = _kv_shape(qm)
    for a in atts:
        base = info(a)["module"]
        for which, arg in (("k", 1), ("v", 2)):
            q = a.args[arg]
            if not is_op(q, ops.QUANTIZE_ACT):
                return {}, f"{base}: {which} is not quantized; C8 quantizes K and V of every layer"
            if q.args[1] is None or q.args[3] != 8:
                return {}, (f"{base}: C8 needs static int8 K and V scales (kv:k=channel,v=channel), "
                            f"found {'dynamic' if q.args[1] is None else str(q.args[3]) + '-bit'} {which}")
            scale = qm.store[q.args[1].target].float().expand(hkv, 1, d).reshape(-1)
            zp = q.args[2]
            off = torch.zeros_like(scale) if zp is None else qm.store[zp.target].float().expand(hkv, 1, d).reshape(-1)
            proj = f"{base}.{which}_proj"
            out[f"{proj}.kv_cache_scale"] = scale.contiguous()
            out[f"{proj}.kv_cache_offset"] = off.contiguous()
    mtype = getattr(qm.config, "model_type", None)
    if mtype not in C8_MODEL_TYPES:
        raise PtqcError(f"C8 (static int8 KV cache) does not load for model_type {mtype!r} in vllm-ascend 0.23 "
                        f"(its C8 weights load only for {', '.join(C8_MODEL_TYPES)}); compile without the kv pass")
    return out, None


def _kv_shape(qm: QModel) -> tuple[int, int]:
    """(KV heads, head_dim) from the model config."""
    cfg = qm.config
    heads = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return hkv, d


def _static_tensors(qm: QModel, lin, codes: torch.Tensor, scale: torch.Tensor) -> dict:
    """input_scale, input_offset, deq_scale and quant_bias of a static W8A8 linear."""
    q = lin.args[0]
    s_in = qm.store[q.args[1].target].float().reshape(1)
    off = qm.store[q.args[2].target].float().reshape(1) if q.args[2] is not None else torch.zeros(1)
    deq = (s_in * scale.reshape(-1)).float()
    # msModelSlim writes the float32 bit pattern as int64 (no npu_trans_quant_param flag, not
    # truncated: the runtime converts it); float32 for a bf16 model
    deq_store = deq if qm.dtype == torch.bfloat16 else deq.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = lin.args[2] if len(lin.args) > 2 else None
    qb = qm.store[b.target].float() / deq if b is not None else torch.zeros_like(deq)
    qb = torch.round(qb) - codes.float().sum(1) * off
    return {"input_scale": s_in, "input_offset": off.to(torch.int8), "deq_scale": deq_store,
            "quant_bias": qb.to(torch.int32)}


def _linear_tensors(qm: QModel, lin, kind: str) -> tuple[dict, set]:
    """(the tensors of a quantized linear by suffix, the store names they replace)."""
    dq = lin.args[1]
    codes = checkpoint.weight_codes(qm, dq)
    scale = qm.store[dq.args[1].target].float()
    zp = qm.store[dq.args[2].target].float() if dq.args[2] is not None else torch.zeros_like(scale)
    handled = checkpoint.store_inputs(dq, dq.args[0])
    t = {"weight": codes.to(torch.int8),
         "weight_scale": scale.reshape(scale.shape[0], -1), "weight_offset": (-zp).reshape(scale.shape[0], -1)}
    if kind == "W8A8":
        t |= _static_tensors(qm, lin, codes, scale)
        handled |= checkpoint.store_inputs(lin.args[0])
    return t, handled


def export(qm: QModel, out, *, force: bool = False) -> dict:
    """Write ``qm`` (a fake-quant ptqc graph) in the Ascend deployment format; returns the description."""
    if any(str(n.target).startswith("ptqc_npu.") for n in qm.graph.nodes if n.op == "call_function"):
        raise PtqcError("export the fake-quant artifact, not a lowered one (compile without the ascend pass)")
    tensors, desc, kinds, handled = {}, {}, {}, set()
    for lin in qm.linears():
        dq, base = lin.args[1], info(lin)["module"]
        kind = classify(lin, info(lin).get("quant", {}).get("weight") if is_op(dq, ops.DEQUANTIZE_WEIGHT) else None)
        if kind == "FLOAT":
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
        t, done = _linear_tensors(qm, lin, kind)
        handled |= done
        for suffix, v in t.items():
            tensors[f"{base}.{suffix}"] = v.contiguous()
            desc[f"{base}.{suffix}"] = kind
    c8, why = _c8_tensors(qm)
    tensors |= c8
    desc |= dict.fromkeys(c8, "C8")
    if c8:  # the K/V quantizers' own scale tensors are replaced by the C8 ones
        handled |= checkpoint.store_inputs(*(q for q in qm.nodes(ops.QUANTIZE_ACT)
                                             if str(info(q).get("role", "")).endswith("_cache_quant")))
    desc |= dict.fromkeys(checkpoint.unchanged(qm, handled | set(tensors))[0], "FLOAT")
    main = max(kinds, key=kinds.get) if kinds else "FLOAT"
    head = {"model_quant_type": main, "version": "1.0.0",
            **({"kv_cache_type": "C8", "kv_quant_type": "C8"} if c8 else {}),  # msModelSlim writes both
            "metadata": {"producer": "ptqc", "linears": kinds},
            "optional": {"kv_cache": "C8" if c8 else f"not exported ({why})" if why else "none"}}
    names = sorted(desc)
    with AtomicDir(out, force) as tmp:
        if qm.source and (Path(qm.source) / "config.json").is_file():
            shutil.copy2(Path(qm.source) / "config.json", tmp / "config.json")
        checkpoint.copy_source_files(qm, tmp)
        total = checkpoint.save(qm, tmp / WEIGHTS, names, tensors)
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                             "weight_map": {n: WEIGHTS for n in names}}, indent=1))
        (tmp / DESCRIPTION).write_text(json.dumps({**head, **{n: desc[n] for n in names}}, indent=1))
    return {**head, "tensors": len(names)}


# ---- checker -----------------------------------------------------------------------------------
def _linear_problems(types: dict, meta: dict, group: int) -> list[str]:
    """Every quantized linear has the tensors of its type, with their dtypes and shapes."""
    problems = []
    for w in sorted(n for n, t in types.items() if t in REQUIRED and n.endswith(".weight")):
        kind, base = types[w], w.removesuffix(".weight")
        if w not in meta:
            continue
        shape, dtype = meta[w]
        if dtype != "I8":
            problems.append(f"{w}: {kind} weight must be int8, found {dtype}")
            continue
        out, k = shape[0], shape[1] * (2 if kind == "W4A16" else 1)
        cols = (k // group) if (kind == "W4A16" and group) else 1
        for suffix in REQUIRED[kind]:
            name = f"{base}.{suffix}"
            if name not in meta:
                problems.append(f"{base}: {kind} needs {name}, which is missing")
                continue
            if types.get(name) != kind:
                problems.append(f"{name}: described as {types.get(name)}, but its linear is {kind}")
            s, dt = meta[name]
            dtypes, shapes, expected = SUFFIX_RULES[suffix]
            if dt not in dtypes or s not in shapes(out, cols):
                problems.append(f"{name}: expected {expected.format(out=out, cols=cols)}, found {dt} {list(s)}")
        if kind == "W4A16" and group and k % group:
            problems.append(f"{w}: input dimension {k} is not a multiple of group_size {group}")
    return problems


def _c8_problems(desc: dict, types: dict, meta: dict) -> list[str]:
    """C8: kv_cache_type says so, and both k_proj and v_proj of every attention have their vectors."""
    problems = []
    c8 = sorted(n for n, t in types.items() if t == "C8")
    if c8 and desc.get("kv_cache_type") != "C8":
        problems.append(f"{c8[0]} is C8 but {DESCRIPTION} has no kv_cache_type \"C8\"")
    if desc.get("kv_cache_type") == "C8":
        projs = sorted({n.rsplit(".", 1)[0] for n in c8})
        if not projs:
            problems.append('kv_cache_type is "C8" but no tensor is typed C8')
        for proj in projs:
            w = meta.get(f"{proj}.weight")
            for suffix in C8_SUFFIXES:
                name = f"{proj}.{suffix}"
                if name not in meta:
                    problems.append(f"{proj}: C8 needs {name}, which is missing")
                    continue
                s, dt = meta[name]
                if dt not in ("F32", "F16", "BF16") or len(s) != 1 or (w is not None and s[0] != w[0][0]):
                    want = f"[{w[0][0]}]" if w is not None else "[KV_N * D]"
                    problems.append(f"{name}: expected a float vector {want} (one value per K/V channel), "
                                    f"found {dt} {list(s)}")
        layers = {p.rsplit(".", 1)[0] for p in projs}
        for att in sorted(layers):
            for which in ("k_proj", "v_proj"):
                if f"{att}.{which}" not in projs:
                    problems.append(f"{att}: C8 needs scales for both k_proj and v_proj, {which} has none")
    return problems


def check(path) -> list[str]:
    """Problems of an Ascend export directory (empty list: valid). Each is one line."""
    path = Path(path)
    dfile = path / DESCRIPTION
    if not dfile.is_file():
        return [f"{DESCRIPTION} is missing"]
    try:
        desc = json.loads(dfile.read_text())
    except json.JSONDecodeError as e:
        return [f"{DESCRIPTION} is not valid JSON: {e}"]
    problems = [] if "model_quant_type" in desc else [f"{DESCRIPTION} has no model_quant_type"]
    types = {k: v for k, v in desc.items() if k not in META_KEYS}
    bad = sorted({v for v in types.values() if v not in TYPES})
    if bad:
        problems.append(f"unknown quantization type {bad[0]!r} in {DESCRIPTION} (known: {', '.join(TYPES)})")
    files = sorted(path.glob("quant_model_weight*.safetensors"))
    if not files:
        return problems + ["no quant_model_weight*.safetensors file"]
    meta = tensor_specs(files)
    problems += [f"{n} is in {DESCRIPTION} but in no weight file" for n in sorted(set(types) - set(meta))]
    problems += [f"{n} is in the weight files but not in {DESCRIPTION}" for n in sorted(set(meta) - set(types))]
    return problems + _linear_problems(types, meta, desc.get("group_size", 0) or 0) + _c8_problems(desc, types, meta)


# ---- loader ------------------------------------------------------------------------------------
def load(path, dtype: str = "float32") -> QModel:
    """Read an Ascend export back into a ptqc fake-quant graph (codes, scales and activation
    quantizers as the artifact had them), so it can be evaluated, diffed and re-exported."""
    from ptqc import frontend
    from ptqc.ir import propagate
    from ptqc.passes.act_quant import insert_quantizer
    from ptqc.weights import set_quantized_weight

    path = Path(path)
    problems = check(path)
    if problems:
        raise PtqcError(f"{path} is not a valid Ascend export: {problems[0]} (run ptqc check-export)")
    desc = json.loads((path / DESCRIPTION).read_text())
    qm = frontend.load(path, dtype, shapes=False)
    qm.store.cast = False
    group_size = desc.get("group_size", 0) or 0
    acts: dict = {}
    for lin in qm.linears():
        w = lin.args[1].target
        kind = desc.get(w, "FLOAT")
        if kind == "FLOAT":
            continue
        base = w.removesuffix(".weight")
        codes = qm.store[w]
        if kind == "W4A16":
            codes = quant.unpack_int4(codes)
        scale = qm.store[f"{base}.weight_scale"].float()
        offset = qm.store[f"{base}.weight_offset"].float()
        zp = None if not offset.any() else torch.round(-offset).to(torch.int8)
        group = group_size if kind == "W4A16" and scale.shape[1] > 1 else 0
        bits = 4 if kind == "W4A16" else 8
        spec = quant.QuantSpec(bits, group, zp is None)
        set_quantized_weight(qm, lin, spec, codes, scale, zp, "ascend-export")
        if kind in ("W8A8", "W8A8_DYNAMIC"):
            acts.setdefault((lin.args[0], kind), []).append(lin)
    for (src, kind), lins in acts.items():
        if kind == "W8A8_DYNAMIC":
            insert_quantizer(qm, src, lins, quant.QuantSpec(8, 0, True))
            continue
        base = info(lins[0])["module"]
        s = qm.store[f"{base}.input_scale"].float().reshape(1)
        off = qm.store[f"{base}.input_offset"].float().reshape(1)
        zp = torch.round(off).to(torch.int8) if off.any() else None
        insert_quantizer(qm, src, lins, quant.QuantSpec(8, -1, zp is None), scale=s, zero_point=zp,
                         method="static-export")
    if desc.get("kv_cache_type") == "C8":
        _load_c8(qm)
    qm.properties |= {"weight_quant"} | ({"act_quant"} if acts else set())
    propagate(qm.graph, qm.store)
    return qm


def _load_c8(qm: QModel) -> None:
    """Static int8 K/V quantizers on every attention from the export's kv_cache_scale/offset."""
    from ptqc.passes.kv import KV

    hkv, d = _kv_shape(qm)
    for a in [n for n in qm.graph.nodes if is_op(n, ops.ATTENTION)]:
        base = info(a)["module"]
        for which, arg in (("k", 1), ("v", 2)):
            proj = f"{base}.{which}_proj"
            scale = qm.store[f"{proj}.kv_cache_scale"].float().reshape(hkv, 1, d)
            off = qm.store[f"{proj}.kv_cache_offset"].float().reshape(hkv, 1, d)
            zp = torch.round(off).to(torch.int8) if off.any() else None
            KV._insert(qm, a, arg, quant.QuantSpec(8, 0, zp is None), scale, zp, which)
