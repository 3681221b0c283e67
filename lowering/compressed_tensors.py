"""Export to the compressed-tensors format (vLLM ``--quantization compressed-tensors``, what
llm-compressor saves), its checker and its loader.

An export is a Hugging Face model directory::

    OUT/config.json          the source config + "quantization_config" (below)
    OUT/model.safetensors    every tensor, under the Hugging Face names
    OUT/tokenizer files ...  copied

``quantization_config`` (compressed-tensors 0.19 field names)::

    {"quant_method": "compressed-tensors", "quantization_status": "compressed",
     "format": "int-quantized" | "pack-quantized" | "mixed-precision",
     "config_groups": {"group_0": {"targets": ["Linear"], "format": ...,
                                   "weights": QuantizationArgs, "input_activations": QuantizationArgs | null,
                                   "output_activations": null}},
     "ignore": ["lm_head", <every other linear left in float>], "kv_cache_scheme": null, ...}
    QuantizationArgs = {"num_bits", "type": "int", "symmetric", "strategy", "group_size",
                        "dynamic", "observer", "zp_dtype" ("torch.int8" when asymmetric), ...}

One config group per distinct scheme; when linears differ (recipes, precision plans) each group
targets its linears by name. A module is quantized by the first group whose targets match it
(exact name, ``re:`` regex, or class name such as ``Linear``) unless ``ignore`` matches it.

Scheme of a ptqc linear -> QuantizationArgs::

    weights      group 0 -> strategy "channel", g > 0 -> "group" (group_size g), -1 -> "tensor"
    activations  dynamic per token (ptqc group 0) -> "token", dynamic=true; dynamic group g ->
                 "group"; dynamic per tensor -> "tensor"; static per tensor -> "tensor",
                 dynamic=false, observer "minmax"

Tensors of a quantized linear ``<m>`` (``out`` x ``in``, ``G`` scale columns: 1 for channel,
``in / g`` for group; a tensor-strategy scale is ``[1]``)::

    int-quantized (weights + activations; as llm-compressor picks it for W8A8, W4A8):
        <m>.weight              int8  [out, in]        the codes
    pack-quantized (weight-only: W8A16, W4A16, ...):
        <m>.weight_packed       int32 [out, ceil(in * b / 32)]  codes + 2^(b-1) as a dense
                                bit stream, element i at bits [i*b, (i+1)*b), 32-bit words
                                little-endian (8 int4 codes a word, low nibble first)
        <m>.weight_shape        int64 [2]              [out, in]
    both:
        <m>.weight_scale        float [out, G] (the model dtype)
        <m>.weight_zero_point   asymmetric only: int8 [out, G] (int-quantized); int32
                                [ceil(out * b / 32), G] packed the same way along the output
                                dimension (pack-quantized, channel/group strategy)
        <m>.input_scale         static activations: float [1] (the model dtype)
        <m>.input_zero_point    static asymmetric activations: int8 [1]
        <m>.bias                float, unchanged

Scales are stored in the model dtype, as llm-compressor writes them and as transformers
(compressed-tensors) holds them: exact for a float32 artifact; the float32 scales of a bfloat16 /
float16 artifact are rounded (the export then computes slightly other numbers than the artifact,
and :func:`load` reads those).

Numbers are ptqc's (:mod:`ptqc.quant`): ``w = (q - zero_point) * scale`` and static activations
``clamp(round(x / scale) + zero_point)`` are what compressed-tensors computes too, so a
float32 weight-only or static export reproduces the artifact (bit for bit in transformers, see
tools/check_compressed_tensors.py). One known difference: compressed-tensors' dynamic int scale
is ``amax / ((qmax - qmin) / 2)`` (``amax / 127.5`` for int8) where ptqc uses ``amax / qmax``
(Ascend's npu_dynamic_quant rule), so transformers' fake-quant forward of a dynamic export differs
slightly from ptqc's; what an int8 serving kernel does is its own choice.

KV cache: static per-tensor symmetric K and V quantizers (``kv:k=tensor,v=tensor``) export as
``kv_cache_scheme`` (QuantizationArgs, strategy "tensor") with ``<attn>.k_scale`` / ``.v_scale``
float [1] per attention module (compressed-tensors quantizes K after RoPE, where ptqc does).

Not expressible (a one-line PtqcError): other KV quantizers (per-channel K, dynamic per-token V,
asymmetric), online transforms (rotate's online Hadamard, flatquant), clipped dynamic
activations, per-channel static activations, lowered graphs.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ptqc import ops, quant
from ptqc.artifact import AtomicDir
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, is_op
from ptqc.model import hf_names, other_files, tensor_specs, write_safetensors

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
QUANT_METHOD = "compressed-tensors"
FORMATS = ("int-quantized", "pack-quantized", "naive-quantized")
VERSION = "0.19.0"  # the compressed-tensors version whose layout this follows
FLOAT_DTYPES = ("F32", "BF16", "F16")


# ---- packing -------------------------------------------------------------------------------------
def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``bits``-bit codes (int8 [rows, cols]) as a dense little-endian bit stream in int32
    words along ``dim`` (1: [rows, ceil(cols*b/32)]; 0: [ceil(rows*b/32), cols])."""
    if codes.numel() and (codes.min() < -(1 << (bits - 1)) or codes.max() > (1 << (bits - 1)) - 1):
        raise PtqcError(f"codes outside the signed {bits}-bit range cannot be packed")
    v = codes.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        v = v.T
    rows, cols = v.shape
    words = -(-cols * bits // 32)
    out = torch.empty(rows, words, dtype=torch.int64)
    step = max(1, (1 << 22) // max(cols * bits, 1))  # bounded memory: a few MB per chunk
    for r in range(0, rows, step):
        c = v[r:r + step]
        stream = ((c.unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(c.shape[0], cols * bits)
        stream = torch.nn.functional.pad(stream, (0, words * 32 - cols * bits))
        out[r:r + step] = (stream.reshape(c.shape[0], words, 32) << torch.arange(32)).sum(-1)
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)
    return out.T.contiguous() if dim == 0 else out


def unpack_int32(words: torch.Tensor, bits: int, shape, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int8 codes of ``shape`` ([rows, cols] of the unpacked tensor)."""
    w = words.T if dim == 0 else words
    rows, n = w.shape
    cols = int(shape[dim])
    out = torch.empty(rows, cols, dtype=torch.int8)
    step = max(1, (1 << 22) // max(n * 32, 1))
    for r in range(0, rows, step):
        u = w[r:r + step].to(torch.int64) & 0xFFFFFFFF
        stream = ((u.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(u.shape[0], n * 32)[:, :cols * bits]
        v = (stream.reshape(u.shape[0], cols, bits) << torch.arange(bits)).sum(-1) - (1 << (bits - 1))
        out[r:r + step] = v.to(torch.int8)
    return out.T.contiguous() if dim == 0 else out


# ---- export --------------------------------------------------------------------------------------
def _args(bits: int, group: int, sym: bool, *, dynamic: bool, activation: bool) -> dict:
    """QuantizationArgs (as compressed-tensors serializes them) of a ptqc quantizer."""
    if group > 0:
        strategy = "group"
    elif group == -1:
        strategy = "tensor"
    else:
        strategy = "token" if activation else "channel"
    return {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": group if group > 0 else None,
            "strategy": strategy, "block_structure": None, "dynamic": dynamic, "actorder": None,
            "scale_dtype": None, "zp_dtype": None if sym else "torch.int8",
            "observer": None if dynamic else ("memoryless_minmax" if not activation else "minmax"),
            "observer_kwargs": {}}


def _codes(qm: QModel, dq) -> torch.Tensor:
    c = dq.args[0]
    return quant.unpack_int4(qm.store[c.args[0].target]) if is_op(c, ops.UNPACK_INT4) else qm.store[c.target]


def _kv_scheme(qm: QModel) -> tuple[dict | None, dict, set]:
    """(kv_cache_scheme, its tensors, the store names they replace) of the graph's KV quantizers."""
    nodes = [n for n in qm.nodes(ops.QUANTIZE_ACT) if str(info(n).get("role", "")).endswith("_cache_quant")]
    if not nodes:
        return None, {}, set()
    attn = {n for a in qm.nodes(ops.ATTENTION) for n in a.args[1:3] if is_op(n, ops.QUANTIZE_ACT)}
    specs, tensors, handled = set(), {}, set()
    for n in nodes:
        _, s, z, bits, _, sym, _ = (list(n.args) + [1.0])[:7]
        if s is None or z is not None or not sym or qm.store.spec(s.target)[0] not in ((1,), ()) or n not in attn:
            raise PtqcError(f"{info(n).get('module')}: only static per-tensor symmetric KV-cache quantizers "
                            "have a compressed-tensors form (kv_cache_scheme); compile with kv:k=tensor,v=tensor")
        specs.add(bits)
        tensors[s.target] = qm.store[s.target].float().reshape(1).to(qm.dtype)
        handled.add(s.target)
    if len(specs) > 1:
        raise PtqcError(f"KV-cache quantizers use several bit widths {sorted(specs)}; kv_cache_scheme has one")
    return _args(specs.pop(), -1, True, dynamic=False, activation=True), tensors, handled


def _refuse_unexpressible(qm: QModel) -> None:
    linear_inputs = {lin.args[0] for lin in qm.linears()}
    for n in qm.graph.nodes:
        if n.op != "call_function":
            continue
        if str(n.target).startswith("ptqc_npu."):
            raise PtqcError("export the fake-quant artifact, not a lowered one (compile without the ascend pass)")
        if is_op(n, ops.TRANSFORM):
            raise PtqcError(f"{info(n).get('module', n.name)}: online transforms (rotate's online Hadamard, "
                            "flatquant) have no compressed-tensors form; compile without them "
                            "(rotate:online_down=false,qk=false)")
        if is_op(n, ops.QUANTIZE_ACT) and n not in linear_inputs and \
                not str(info(n).get("role", "")).endswith("_cache_quant"):  # KV: see _kv_scheme
            raise PtqcError(f"{info(n).get('module', n.name)}: activation quantizers outside linear inputs are "
                            "not exported to compressed-tensors; compile without them or use --format onnx")


def _input_args(qm: QModel, lin) -> tuple[dict | None, dict]:
    """(input QuantizationArgs or None, the static input tensors of this linear)."""
    a = lin.args[0]
    if not is_op(a, ops.QUANTIZE_ACT):
        return None, {}
    _, s, z, bits, group, sym, clip = (list(a.args) + [1.0])[:7]
    module = info(lin)["module"]
    if s is None:
        if clip != 1.0:
            raise PtqcError(f"{module}: dynamic activations clipped to {clip} of their range have no "
                            "compressed-tensors form; compile without the clip ratio")
        return _args(bits, group, sym, dynamic=True, activation=True), {}
    scale = qm.store[s.target].float()
    if scale.numel() != 1:
        raise PtqcError(f"{module}: per-channel static activation scales have no compressed-tensors form "
                        "(it has per-tensor static or dynamic); use int8:static=true or dynamic activations")
    t = {"input_scale": scale.reshape(1)}
    if z is not None:
        t["input_zero_point"] = qm.store[z.target].to(torch.int8).reshape(1)
    return _args(bits, -1, z is None, dynamic=False, activation=True), t


def export(qm: QModel, out, *, force: bool = False) -> dict:
    """Write ``qm`` (a fake-quant ptqc graph) as a compressed-tensors model directory; returns a
    summary (format, config groups, tensor count)."""
    _refuse_unexpressible(qm)
    kv_scheme, tensors, handled = _kv_scheme(qm)
    schemes: dict[str, dict] = {}  # json key -> {"weights", "input_activations", "format", "modules"}
    ignore: list[str] = []
    for lin in qm.linears():
        dq = lin.args[1]
        base = info(lin)["module"]
        if not is_op(dq, ops.DEQUANTIZE_WEIGHT):
            if is_op(lin.args[0], ops.QUANTIZE_ACT):
                raise PtqcError(f"{base}: quantized activations with float weights have no compressed-tensors "
                                "export; quantize its weights too or exclude it from activation quantization")
            ignore.append(base)
            continue
        wq = info(lin).get("quant", {}).get("weight", {})
        codes = _codes(qm, dq).to(torch.int8)
        bits = wq.get("bits") or 8
        group = dq.args[3]
        sym = dq.args[2] is None
        scale = qm.store[dq.args[1].target].float()
        zp = qm.store[dq.args[2].target].to(torch.int8) if not sym else None
        handled |= {n.target for n in dq.all_input_nodes if n.op == "get_attr"}
        handled |= {n.target for n in getattr(dq.args[0], "all_input_nodes", []) if n.op == "get_attr"}
        w_args = _args(bits, group, sym, dynamic=False, activation=False)
        a_args, a_t = _input_args(qm, lin)
        if a_t:
            handled |= {n.target for n in lin.args[0].all_input_nodes if n.op == "get_attr"}
        fmt = "int-quantized" if a_args is not None else "pack-quantized"  # llm-compressor's choice
        key = json.dumps([w_args, a_args, fmt], sort_keys=True)
        schemes.setdefault(key, {"weights": w_args, "input_activations": a_args, "format": fmt,
                                 "modules": []})["modules"].append(base)
        out_f, in_f = codes.shape
        if group == -1:
            scale = scale.reshape(1)
            zp = zp.reshape(1) if zp is not None else None
        t = {}
        if fmt == "int-quantized":
            t["weight"] = codes
            if zp is not None:
                t["weight_zero_point"] = zp.reshape(scale.shape)
        else:
            t["weight_packed"] = pack_int32(codes, bits)
            t["weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
            if zp is not None:
                t["weight_zero_point"] = pack_int32(zp, bits, dim=0) if group != -1 else zp
        t["weight_scale"] = scale.to(qm.dtype)  # consumers keep scales in the model dtype
        t.update({k: v.to(qm.dtype) if k == "input_scale" else v for k, v in a_t.items()})
        for suffix, v in t.items():
            tensors[f"{base}.{suffix}"] = v.contiguous()
    if not schemes:
        raise PtqcError("the model has no quantized linear; compile it with a weight quantization pass first")
    groups = {}
    many = len(schemes) > 1
    for i, s in enumerate(schemes.values()):
        groups[f"group_{i}"] = {"targets": sorted(s["modules"]) if many else ["Linear"], "format": s["format"],
                                "weights": s["weights"], "input_activations": s["input_activations"],
                                "output_activations": None}
    formats = {g["format"] for g in groups.values()}
    qcfg = {"quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": groups, "ignore": sorted(ignore),
            "kv_cache_scheme": kv_scheme, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}, "version": VERSION}

    floats = [n for n in qm.weight_names() if n not in handled and n not in tensors]
    aliases = {n: qm.store.aliases[n] for n in floats if n in qm.store.aliases}
    floats = sorted(set(floats) - set(aliases) | set(aliases.values()))
    params, buffers = hf_names(qm.config)
    floats = [n for n in floats if n not in buffers]  # rotary inv_freq...: transformers recomputes them
    extra = [n for n in floats if n not in params]
    if extra:
        raise PtqcError(f"tensor {extra[0]} of the graph is no parameter of the Hugging Face model; "
                        "the pass that added it has no compressed-tensors form")
    names = sorted(set(floats) | set(tensors))

    def spec(n):
        if n in tensors:
            return tuple(tensors[n].shape), tensors[n].dtype
        return qm.store.spec(n)

    def get(n):
        if n in tensors:
            return tensors[n]
        return qm.store[n].to(qm.dtype) if qm.store[n].is_floating_point() else qm.store[n]

    src = Path(qm.source) if qm.source else None
    if src is not None and (src / CONFIG).is_file():
        config = json.loads((src / CONFIG).read_text())
    else:
        config = qm.config.to_dict()
    config["quantization_config"] = qcfg
    with AtomicDir(out, force) as tmp:
        if src is not None and src.is_dir():
            for f in other_files(src):
                if f.name not in ("ptqc.json", "graph.json"):
                    shutil.copy2(f, tmp / f.name)
        write_safetensors(tmp / WEIGHTS, names, spec, get, metadata={"format": "pt", "producer": "ptqc"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return {"format": qcfg["format"], "config_groups": len(groups),
            "quantized_linears": sum(len(s["modules"]) for s in schemes.values()), "ignored": len(ignore),
            "tensors": len(names)}


def _without_quant(config):
    """A copy of a transformers config without quantization_config (only the structure is read)."""
    import copy

    c = copy.deepcopy(config)
    if getattr(c, "quantization_config", None) is not None:
        c.quantization_config = None
    return c


# ---- reading a config ----------------------------------------------------------------------------
def read_quant_config(path) -> dict:
    """The ``quantization_config`` of a compressed-tensors export (PtqcError if there is none)."""
    f = Path(path) / CONFIG
    try:
        q = json.loads(f.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError) as e:
        raise PtqcError(f"cannot read {f}: {e}") from None
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise PtqcError(f"{f} has no quantization_config with quant_method {QUANT_METHOD!r}")
    return q


def is_export(path) -> bool:
    try:
        read_quant_config(path)
        return True
    except PtqcError:
        return False


def _match(name: str, classes: tuple[str, ...], targets) -> bool:
    for t in targets or ():
        if t.startswith("re:"):
            if re.match(t[3:], name):
                return True
        elif t == name or t in classes:
            return True
    return False


def scheme_of(name: str, classes: tuple[str, ...], qcfg: dict) -> dict | None:
    """The config group quantizing module ``name`` (None: float)."""
    if _match(name, classes, qcfg.get("ignore")):
        return None
    for g in (qcfg.get("config_groups") or {}).values():
        if _match(name, classes, g.get("targets")):
            return g
    return None


def _group_problems(gname: str, g, top_format) -> list[str]:
    if not isinstance(g, dict):
        return [f"config group {gname} is not an object"]
    p = []
    if not isinstance(g.get("targets"), list) or not g["targets"]:
        p.append(f"config group {gname} has no targets list")
    fmt = g.get("format") or top_format
    if fmt not in FORMATS:
        p.append(f"config group {gname}: format {fmt!r} is not checked by ptqc (supported: {', '.join(FORMATS)})")
    for role in ("weights", "input_activations"):
        a = g.get(role)
        if a is None:
            if role == "weights":
                p.append(f"config group {gname} has no weights arguments")
            continue
        if not isinstance(a, dict):
            p.append(f"config group {gname}: {role} is not an object")
            continue
        bits, strategy, gs = a.get("num_bits"), a.get("strategy"), a.get("group_size")
        if a.get("type", "int") != "int":
            p.append(f"config group {gname}: {role} type {a.get('type')!r} is not supported (ptqc reads int)")
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            p.append(f"config group {gname}: {role} num_bits {bits!r} is outside 1..8")
        allowed = ("channel", "group", "tensor") if role == "weights" else ("token", "group", "tensor")
        if strategy not in allowed:
            p.append(f"config group {gname}: {role} strategy {strategy!r} is not one of {', '.join(allowed)}")
        if strategy == "group" and (not isinstance(gs, int) or gs <= 0):
            p.append(f"config group {gname}: {role} strategy group needs a positive group_size, found {gs!r}")
        if role == "weights" and a.get("dynamic"):
            p.append(f"config group {gname}: weights cannot be dynamic")
        if strategy == "token" and not a.get("dynamic"):
            p.append(f"config group {gname}: input_activations strategy token must be dynamic")
    return p


def _modules(path: Path):
    """(module name -> (class names, in, out, has bias) of every Linear, parameter name -> shape)
    from the meta model of ``path``'s config."""
    from ptqc.model import build_meta_model, load_config

    model = build_meta_model(_without_quant(load_config(path)), torch.float32)
    linears = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            linears[name] = (tuple(c.__name__ for c in type(m).__mro__), m.in_features, m.out_features,
                             m.bias is not None)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return linears, params


# ---- checker -------------------------------------------------------------------------------------
def check(path) -> list[str]:
    """Problems of a compressed-tensors export directory (empty list: valid). Each is one line."""
    from ptqc.model import weight_files

    path = Path(path)
    if not (path / CONFIG).is_file():
        return [f"{CONFIG} is missing"]
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        return [f"{CONFIG} is not valid JSON: {e}"]
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return [f"{CONFIG} has no quantization_config"]
    if q.get("quant_method") != QUANT_METHOD:
        return [f"quantization_config.quant_method is {q.get('quant_method')!r}, expected {QUANT_METHOD!r}"]
    problems: list[str] = []
    if q.get("quantization_status", "compressed") != "compressed":
        problems.append(f"quantization_status is {q.get('quantization_status')!r}; ptqc checks compressed "
                        "exports (saved with save_compressed=True)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return problems + ["quantization_config has no config_groups"]
    for gname, g in groups.items():
        problems += _group_problems(gname, g, q.get("format"))
    if problems:
        return problems
    try:
        files = weight_files(path)
    except PtqcError as e:
        return [str(e)]
    meta = tensor_specs(sorted(set(files.values())))
    for n in sorted(set(files) - set(meta)):
        problems.append(f"{n} is in the index but in no weight file")
    try:
        linears, params = _modules(path)
    except PtqcError as e:
        return problems + [f"cannot build the model of {CONFIG}: {e}"]
    expected: dict[str, str] = {}  # tensor name -> why it is expected
    quantized = 0

    def want(name, dtypes, shape, why):
        expected[name] = why
        if name not in meta:
            problems.append(f"{name}: {why} needs it, but it is in no weight file")
            return None
        s, dt = meta[name]
        if dt not in dtypes or (shape is not None and s not in shape):
            exp = " or ".join(str(list(x)) for x in shape) if shape is not None else "any shape"
            problems.append(f"{name}: expected {'/'.join(dtypes)} {exp}, found {dt} {list(s)}")
        return s

    for name, (classes, k, n_out, bias) in linears.items():
        g = scheme_of(name, classes, q)
        if g is None:
            continue
        quantized += 1
        fmt = g.get("format") or q.get("format")
        w, a = g["weights"], g.get("input_activations")
        bits, strategy, sym = w["num_bits"], w["strategy"], w.get("symmetric", True)
        why = f"{fmt} {strategy} W{bits}"
        cols = 1 if strategy == "channel" else -(-k // w["group_size"]) if strategy == "group" else None
        sshape = ((n_out, cols),) if cols else ((1,), ())
        if fmt == "pack-quantized":
            want(f"{name}.weight_packed", ("I32",), ((n_out, -(-k * bits // 32)),), why)
            want(f"{name}.weight_shape", ("I64", "I32"), ((2,),), why)
            if f"{name}.weight" in meta:
                problems.append(f"{name}.weight: a pack-quantized linear stores weight_packed, not weight")
                expected[f"{name}.weight"] = why
        else:
            want(f"{name}.weight", ("I8",), ((n_out, k),), why)
        want(f"{name}.weight_scale", FLOAT_DTYPES, sshape, why)
        zp = f"{name}.weight_zero_point"
        if not sym:
            if fmt == "pack-quantized" and cols:
                want(zp, ("I32",), ((-(-n_out * bits // 32), cols),), why + " asymmetric")
            else:
                want(zp, ("I8",), sshape, why + " asymmetric")
        if bias:
            want(f"{name}.bias", FLOAT_DTYPES, ((n_out,),), "the linear's bias")
        if a is not None and not a.get("dynamic"):
            want(f"{name}.input_scale", FLOAT_DTYPES, ((1,), ()), "static input_activations")
            if not a.get("symmetric", True):
                want(f"{name}.input_zero_point", ("I8",), ((1,), ()), "static asymmetric input_activations")
    if quantized == 0:
        problems.append("no Linear module of the model matches the targets of any config group")
    for pname, shape in params.items():
        if pname in expected:
            continue
        mod, _, leaf = pname.rpartition(".")
        if leaf in ("weight", "bias") and mod in linears and scheme_of(mod, linears[mod][0], q) is not None:
            continue
        want(pname, FLOAT_DTYPES, (shape,), "the model")
    kv = q.get("kv_cache_scheme")
    if kv and (not isinstance(kv, dict) or kv.get("strategy") != "tensor" or kv.get("type", "int") != "int"
               or not kv.get("symmetric", True) or kv.get("dynamic")):
        problems.append(f"kv_cache_scheme {kv!r} is not checked by ptqc (it reads static per-tensor symmetric int)")
    elif kv:
        attn = sorted({n.rpartition(".")[0] for n in params if n.endswith(("k_proj.weight", "k_proj.bias"))})
        for m in attn:
            for s in ("k_scale", "v_scale"):
                want(f"{m.rpartition('.')[0]}.{s}", FLOAT_DTYPES, ((1,), ()), "kv_cache_scheme")
    tied = config.get("tie_word_embeddings", False)
    for n in sorted(set(meta) - set(expected)):
        if tied and n == "lm_head.weight":
            continue
        problems.append(f"{n} is in the weight files but no module or scheme of {CONFIG} uses it")
    return problems


# ---- loader --------------------------------------------------------------------------------------
def _spec_of(args: dict) -> quant.QuantSpec:
    group = {"group": args.get("group_size") or 0, "tensor": -1}.get(args["strategy"], 0)
    return quant.QuantSpec(args["num_bits"], group, bool(args.get("symmetric", True)))


def load(path, dtype: str = "float32") -> QModel:
    """Read a compressed-tensors export (ours or llm-compressor's) into a ptqc fake-quant graph:
    the weight codes, scales and zero points as stored, activation quantizers as configured."""
    from ptqc import frontend
    from ptqc.ir import propagate
    from ptqc.model import WeightStore, load_config, parse_dtype, weight_files
    from ptqc.passes.act_quant import insert_quantizer
    from ptqc.weights import set_quantized_weight

    path = Path(path)
    problems = check(path)
    if problems:
        raise PtqcError(f"{path} is not a valid compressed-tensors export: {problems[0]} (run ptqc check-export)")
    q = read_quant_config(path)
    config = _without_quant(load_config(path))
    dt = parse_dtype(dtype)
    files = weight_files(path)
    g, buffers, tied = frontend.trace(path, config, dt, False)
    store = WeightStore(files, dt)
    store.cast = False
    for name, b in buffers.items():
        if name not in files:
            store.overlay[name] = b
    qm = QModel(graph=g, store=store, config=config, dtype=dt, source=str(path.resolve()), properties={"canonical"})
    linears = {info(n)["module"]: n for n in qm.linears()}
    acts: dict = {}
    for base, lin in linears.items():
        grp = scheme_of(base, ("Linear", "Module"), q)
        if grp is None:
            continue
        w = grp["weights"]
        spec = _spec_of(w)
        fmt = grp.get("format") or q.get("format")
        scale = store[f"{base}.weight_scale"].float()
        zp = store[f"{base}.weight_zero_point"] if not spec.symmetric else None
        if fmt == "pack-quantized":
            shape = [int(x) for x in store[f"{base}.weight_shape"]]
            codes = unpack_int32(store[f"{base}.weight_packed"], spec.bits, shape)
            if zp is not None and spec.group_size != -1:
                zp = unpack_int32(zp, spec.bits, (shape[0], scale.shape[-1]), dim=0)
        else:
            codes = store[f"{base}.weight"]
        rows = 1 if spec.group_size == -1 else codes.shape[0]  # ptqc's per-tensor scale is [1, 1]
        scale = scale.reshape(rows, -1)
        zp = zp.to(torch.int8).reshape(rows, -1) if zp is not None else None
        set_quantized_weight(qm, lin, spec, codes, scale, zp, "compressed-tensors")
        a = grp.get("input_activations")
        if a is None:
            continue
        if a.get("dynamic"):
            key = (lin.args[0], "dynamic", json.dumps(a, sort_keys=True))
        else:
            s = store[f"{base}.input_scale"].float().reshape(1)
            z = store[f"{base}.input_zero_point"].to(torch.int8).reshape(1) \
                if not a.get("symmetric", True) else None
            key = (lin.args[0], "static", json.dumps(a, sort_keys=True), float(s), None if z is None else int(z))
        acts.setdefault(key, (a, []))[1].append(lin)
    for key, (a, lins) in acts.items():
        src = key[0]
        if a.get("dynamic"):
            insert_quantizer(qm, src, lins, _spec_of(a))
            continue
        base = info(lins[0])["module"]
        s = store[f"{base}.input_scale"].float().reshape(1)
        z = store[f"{base}.input_zero_point"].to(torch.int8).reshape(1) if not a.get("symmetric", True) else None
        insert_quantizer(qm, src, lins, quant.QuantSpec(a["num_bits"], -1, z is None), scale=s, zero_point=z,
                         method="static-export")
    kv = q.get("kv_cache_scheme")
    if kv:
        from ptqc.passes.kv import KV

        for attn in list(qm.nodes(ops.ATTENTION)):
            m = info(attn)["module"]
            for which, arg in (("k", 1), ("v", 2)):
                s = store[f"{m}.{which}_scale"].float().reshape(1)
                KV._insert(qm, attn, arg, quant.QuantSpec(kv["num_bits"], 0, True), s, None, which)
    frontend.resolve_tied(g, store, tied, files, path)
    qm.properties |= {"weight_quant"} | ({"act_quant"} if acts else set()) | ({"kv_quant"} if kv else set())
    propagate(qm.graph, qm.store)
    return qm
