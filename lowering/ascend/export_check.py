"""``ptqc check-export`` for Ascend export directories: every quantized linear has the tensors
of its type (:mod:`layout`) with their dtypes and shapes, the description matches the files, C8
has both K and V vectors. Each problem is one line."""
from __future__ import annotations

import json
from pathlib import Path

from ptqc.lowering.ascend.layout import (C8_MODEL_TYPES, C8_SUFFIXES, DESCRIPTION, EXPERT, FA_SUFFIXES, META_KEYS, MOE_LOADABLE, MOE_ONLY,
                                         MOE_W4A16_GROUP, OPTIONAL, REQUIRED, ROUTERS, SCALE_BIAS_CHUNKS, SUFFIX_RULES, TYPES,
                                         W4A8_GROUP, row_parallel)
from ptqc.lowering.ascend import export_types
from ptqc.model import tensor_specs


def _w4a16(base: str, shape, meta: dict, desc: dict) -> tuple[dict, list[str]]:
    """W4A16 as msModelSlim writes it: weight_scale [out, in / group_size] (or [out, 1]); weight int8 [out, in]
    (one code per byte) before version 1.0.0, then two codes per byte: along the input dimension for one
    scale column, along the output dimension for more (its ``_w4a16_pack_int4``)."""
    scale = meta.get(f"{base}.weight_scale")
    cols = scale[0][1] if scale is not None and len(scale[0]) == 2 else 1
    if desc.get("version") != "1.0.0":
        (out, k), want = shape, tuple(shape)
    elif cols == 1:
        out, k = shape[0], shape[1] * 2
        want = (out, k // 2)
    else:
        out, k = scale[0][0], shape[1]
        want = (out // 2, k)
    group = desc.get("group_size", 0) or 0
    bad = [f"{base}.weight: input dimension {k} is not a multiple of group_size {group}"] if group and k % group else []
    if tuple(shape) != want:
        bad.append(f"{base}.weight: W4A16 {desc.get('version')} with {cols} scale column(s): expected int8 "
                   f"{list(want)}, found {list(shape)}")
    return {"out": out, "cols": k // group if group else 1}, bad


def _geometry(kind: str, base: str, shape, meta: dict, desc: dict, serving: bool = True) -> tuple[dict, list[str]]:
    """(out, cols, groups, bias_cols of a linear from its int8 weight's shape, problems of that shape);
    ``serving=False``: per-channel dense W4A8 (group_size 0) is read, not refused."""
    if kind == "W4A16":
        return _w4a16(base, shape, meta, desc)
    if kind != "W4A8_DYNAMIC":
        return {"out": shape[0], "cols": 1}, []
    # vllm-ascend: group_size from the description (default 256), version "1.0.0" packs along out
    group = desc.get("group_size", W4A8_GROUP)
    packed = desc.get("version") == "1.0.0"
    k = shape[1]
    out = meta[f"{base}.weight_scale"][0][0] if f"{base}.weight_scale" in meta else shape[0] * (2 if packed else 1)
    g = {"out": out, "cols": 1, "groups": k // group if group else 0,
         "bias_cols": SCALE_BIAS_CHUNKS if row_parallel(base) else 1}
    bad = []
    if not group and (EXPERT.match(f"{base}.weight") or not serving):  # group_size 0: per channel (vllm-ascend: MoE)
        group = k
    if tuple(shape) != ((out // 2, k) if packed else (out, k)):
        bad.append(f"{base}.weight: W4A8_DYNAMIC " + ("version 1.0.0 packs two int4 per byte along the output "
                   f"dimension: expected int8 [{out // 2}, {k}]" if packed else f"expected int8 [{out}, {k}]")
                   + f", found {list(shape)}")
    if not group:
        bad.append(f"{base}.weight: a dense W4A8_DYNAMIC linear needs the description's group_size > 0 (vllm-ascend "
                   "divides by it; group_size 0 is the per-channel layout of MoE experts only)")
    elif k % group:
        bad.append(f"{base}.weight: W4A8_DYNAMIC input dimension {k} is not a multiple of group_size {group}")
    return g, bad


def _rules(kind: str, desc: dict, serving: str | None) -> tuple[dict, tuple]:
    """(suffix -> rule of every tensor a linear of an older type needs or may have, the optional suffixes)."""
    required = REQUIRED[kind]
    if kind == "W4A8_DYNAMIC" and desc.get("version") != "1.0.0":
        required = required[:-1]  # scale_bias: version 1.0.0 only
    if kind == "W4A8_DYNAMIC" and desc.get("group_size", W4A8_GROUP) == 0:
        required = tuple(r for r in required if not r.endswith("_second"))  # per-channel MoE experts
    optional = OPTIONAL.get(kind, ())
    return {s: SUFFIX_RULES.get(f"{s}@{serving}", SUFFIX_RULES[s]) for s in required + optional}, optional


def _tensor_problems(kind: str, base: str, rules: dict, g: dict, types: dict, meta: dict,
                     optional=()) -> list[str]:
    """Each tensor ``base.suffix`` a rule names: present (unless optional), typed ``kind``, of its dtype and shape."""
    out = []
    for suffix, (dtypes, shapes, expected) in rules.items():
        name = f"{base}.{suffix}"
        if name not in meta:
            if suffix not in optional:
                out.append(f"{base}: {kind} needs {name}, which is missing")
            continue
        if types.get(name) != kind:
            out.append(f"{name}: described as {types.get(name)}, but its linear is {kind}")
        s, dt = meta[name]
        if dt not in dtypes or tuple(s) not in shapes(g):
            out.append(f"{name}: expected {expected.format(**g)}, found {dt} {list(s)}")
    return out


def _linear_problems(types: dict, meta: dict, desc: dict, serving: str | None, moe_only=MOE_ONLY) -> list[str]:
    """Every quantized linear has the tensors of its type, with their dtypes and shapes, and a scheme that
    vllm-ascend builds for a linear of its kind (dense or MoE expert)."""
    problems = []
    new = export_types.RULES
    for w in sorted(n for n, t in types.items() if (t in REQUIRED or t in new) and n.endswith(".weight")):
        kind, base = types[w], w.removesuffix(".weight")
        if w not in meta:
            continue
        shape, dtype = meta[w]
        if kind in moe_only and not EXPERT.match(w):
            problems.append(f"{w}: vllm-ascend 0.23 has no dense {kind} linear scheme (building the layer raises "
                            f"NotImplementedError; its {kind} is for MoE experts only)")
        if kind in new:
            g, bad = export_types.geometry(kind, w, shape)
            problems += bad + _tensor_problems(kind, base, new[kind], g, types, meta)
            continue
        if dtype != "I8":
            problems.append(f"{w}: {kind} weight must be int8, found {dtype}")
            continue
        g, bad = _geometry(kind, base, shape, meta, desc, bool(moe_only))
        rules, optional = _rules(kind, desc, serving)
        problems += bad + _tensor_problems(kind, base, rules, g, types, meta, optional)
    return problems


def _packed_expert_problems(types: dict, meta: dict, desc: dict) -> list[str]:
    """MoE W4A16 experts (llm-compressor's layout, what vllm-ascend's MoE W4A16 loads): weight_packed int32
    [out, in / 8], weight_shape int [2], weight_scale float [out, in / group_size] in the model dtype, and
    weight_offset like the scale where present (vllm-ascend's scheme makes it zero; ptqc writes the zeros)."""
    problems, group = [], desc.get("group_size") or MOE_W4A16_GROUP
    for w in sorted(n for n, t in types.items() if n.endswith(".weight_packed") and n in meta):
        base, (shape, dtype) = w.removesuffix(".weight_packed"), meta[w]
        if types[w] != "W4A16" or not EXPERT.match(w):
            problems.append(f"{w}: packed int32 weights are read for MoE W4A16 experts only, found {types[w]}")
            continue
        if dtype != "I32" or len(shape) != 2:
            problems.append(f"{w}: expected I32 [out, in / 8], found {dtype} {list(shape)}")
            continue
        want = {"weight_shape": (("I32", "I64"), [(2,)]), "weight_scale": (("F16", "BF16", "F32"),
                                                                          [(shape[0], shape[1] * 8 // group)])}
        if shape[1] * 8 % group:
            problems.append(f"{w}: {shape[1] * 8} inputs are not a multiple of group_size {group}")
        want["weight_offset"] = want["weight_scale"]
        for suffix, (dtypes, shapes) in want.items():
            got = meta.get(f"{base}.{suffix}")
            if got is None and suffix == "weight_offset":
                continue
            if got is None:
                problems.append(f"{base}: MoE W4A16 needs {base}.{suffix}, which is missing")
            elif got[1] not in dtypes or tuple(got[0]) not in shapes:
                problems.append(f"{base}.{suffix}: expected {'/'.join(dtypes)} {list(shapes[0])}, found "
                                f"{got[1]} {list(got[0])}")
    return problems


def _c8_problems(desc: dict, types: dict, meta: dict, model_type: str | None) -> list[str]:
    """C8: kv_cache_type says so, the model class loads it, and both k_proj and v_proj of every attention
    have their vectors."""
    problems = []
    c8 = sorted(n for n, t in types.items() if t == "C8")
    if c8 and desc.get("kv_cache_type") != "C8":
        problems.append(f"{c8[0]} is C8 but {DESCRIPTION} has no kv_cache_type \"C8\"")
    if desc.get("kv_cache_type") == "C8" and model_type and model_type not in C8_MODEL_TYPES:
        problems.append(f"C8 does not load for model_type {model_type!r} in vllm-ascend 0.23 (its C8 weights load "
                        f"only for {', '.join(C8_MODEL_TYPES)}: a KeyError on qkv_proj.kv_cache_offset)")
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


def _fa_problems(desc: dict, types: dict, meta: dict, cfg: dict) -> list[str]:
    """FAKQuant: fa_quant_type says so, the model is MLA (kv_lora_rank), and every attention with an
    ``fa_k.scale`` has the four [1, 1] tensors (float scales, int8 offsets)."""
    fa = sorted(n for n, t in types.items() if t == "FAQuant")
    if not fa and desc.get("fa_quant_type") != "FAKQuant":
        return []
    problems = []
    if fa and desc.get("fa_quant_type") != "FAKQuant":
        problems.append(f"{fa[0]} is FAQuant but {DESCRIPTION} has no fa_quant_type \"FAKQuant\"")
    if not fa:
        problems.append('fa_quant_type is "FAKQuant" but no tensor is typed FAQuant (vllm-ascend quantizes the '
                        "layers that have an fa_k.scale)")
    if cfg and not cfg.get("kv_lora_rank"):
        problems.append(f"FAKQuant is MLA attention quantization, but config.json has no kv_lora_rank "
                        f"(model_type {cfg.get('model_type')!r})")
    for base in sorted({n.rsplit(".", 2)[0] for n in fa}):
        for suffix in FA_SUFFIXES:
            name = f"{base}.{suffix}"
            got = meta.get(name)
            want = ("I8",) if suffix.endswith("offset") else ("F32", "F16", "BF16")
            if got is None:
                problems.append(f"{base}: FAKQuant needs {name}, which is missing")
            elif tuple(got[0]) != (1, 1) or got[1] not in want:
                problems.append(f"{name}: expected {'int8' if want == ('I8',) else 'float'} [1, 1], found "
                                f"{got[1]} {list(got[0])}")
    return problems


def _moe_problems(types: dict) -> list[str]:
    """Routers FLOAT; per MoE block (``X.experts``, read by vllm-ascend from expert 0's type or from
    the block's own ``X.experts.weight`` entry) every expert with its projections, all of one
    fused-MoE type, which the block's entry repeats."""
    problems = [f"{n}: MoE routers load float in vllm-ascend (FLOAT in {DESCRIPTION}), found {t}"
                for n, t in sorted(types.items()) if n.endswith(ROUTERS) and t != "FLOAT"]
    blocks: dict = {}
    for n, t in types.items():
        m = EXPERT.match(n)
        if m:
            blocks.setdefault(m[1], {})[int(m[2]), m[3]] = t
    for prefix, got in sorted(blocks.items()):
        kinds = sorted(set(got.values()))
        if len(kinds) > 1:
            problems.append(f"{prefix}: the experts of a block share one type (vllm-ascend reads expert 0's), "
                            f"found {', '.join(kinds)}")
        own = types.get(f"{prefix}.weight")
        if own is not None and [own] != kinds:
            problems.append(f"{prefix}.weight: the block's own entry says {own}, its experts are {', '.join(kinds)}")
        bad = [k for k in kinds if k not in MOE_LOADABLE]
        if bad:
            problems.append(f"{prefix}: {bad[0]} experts have no fused-MoE scheme in vllm-ascend 0.23 "
                            f"(MoE types: {', '.join(MOE_LOADABLE)})")
        projs = sorted({p for _, p in got})
        for e in range(max(i for i, _ in got) + 1):
            missing = [p for p in projs if (e, p) not in got]
            if missing:
                problems.append(f"{prefix}.{e}: expert {e} has no {', '.join(missing)} weight")
    return problems


def check(path, serving: bool = True) -> list[str]:
    """Problems of an Ascend export directory (empty list: valid). Each is one line. ``serving=False``
    (ptqc's own reader) leaves out what only vllm-ascend cannot load: dense W4A16, C8 for other classes."""
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
    cfg = _config(path)
    blocks = {m[1] for n in meta if (m := EXPERT.match(n))}  # X.experts.weight: the block's own entry
    problems += [f"{n} is in {DESCRIPTION} but in no weight file" for n in sorted(set(types) - set(meta))
                 if n.removesuffix(".weight") not in blocks]
    problems += [f"{n} is in the weight files but not in {DESCRIPTION}" for n in sorted(set(meta) - set(types))]
    linears = _linear_problems(types, meta, desc, cfg.get("torch_dtype") or cfg.get("dtype"), MOE_ONLY if serving else ())
    return problems + linears + _packed_expert_problems(types, meta, desc) + \
        _c8_problems(desc, types, meta, cfg.get("model_type") if serving else None) + \
        _fa_problems(desc, types, meta, cfg) + _moe_problems(types)


def _config(path: Path) -> dict:
    """config.json (the model dtype and class vllm-ascend builds), or {} when it cannot be read."""
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
