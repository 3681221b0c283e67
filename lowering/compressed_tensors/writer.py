"""Writing a ptqc fake-quant graph as a compressed-tensors model directory (the layout:
:mod:`ptqc.lowering.compressed_tensors`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ptqc import families, moe, ops
from ptqc.artifact import AtomicDir
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, is_cache_quantizer, is_op
from ptqc.lowering import checkpoint
from ptqc.lowering.compressed_tensors.config import CONFIG, QUANT_METHOD, VERSION, WEIGHTS, quant_args
from ptqc.lowering.compressed_tensors.packing import pack_int32


def _kv_scheme(qm: QModel) -> tuple[dict | None, dict, set]:
    """(kv_cache_scheme, its tensors, the store names they replace) of the graph's KV quantizers."""
    nodes = [n for n in qm.nodes(ops.QUANTIZE_ACT) if is_cache_quantizer(n)]
    if not nodes:
        return None, {}, set()
    attn = {n for a in qm.nodes(ops.ATTENTION) for n in a.args[1:3] if is_op(n, ops.QUANTIZE_ACT)}
    specs, tensors, handled = set(), {}, set()
    for n in nodes:
        if info(n).get("role") in ("latent_cache_quant", "rope_key_cache_quant"):
            raise PtqcError(f"{info(n).get('module')}: MLA's cache quantizers (latent, rope key) have no "
                            "compressed-tensors form (kv_cache_scheme scales K and V); export --format ascend (FAKQuant, from "
                            "kv:k=tensor,rope_key=false) or compile without kv")
        _, s, z, bits, _, sym, _ = (list(n.args) + [1.0])[:7]
        if s is None or z is not None or not sym or qm.store.spec(s.target)[0] not in ((1,), ()) or n not in attn:
            raise PtqcError(f"{info(n).get('module')}: only static per-tensor symmetric KV-cache quantizers "
                            "have a compressed-tensors form (kv_cache_scheme); compile with kv:k=tensor,v=tensor")
        specs.add(bits)
        tensors[s.target] = qm.store[s.target].float().reshape(1).to(qm.dtype)
        handled.add(s.target)
    if len(specs) > 1:
        raise PtqcError(f"KV-cache quantizers use several bit widths {sorted(specs)}; kv_cache_scheme has one")
    return quant_args(specs.pop(), -1, True, dynamic=False, activation=True), tensors, handled


def _refuse_unexpressible(qm: QModel) -> None:
    linear_inputs = {lin.args[0] for lin in qm.linears()} | {n.args[0] for n in qm.nodes(ops.MOE_EXPERTS)}
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
        return quant_args(bits, group, sym, dynamic=True, activation=True), {}
    scale = qm.store[s.target].float()
    if scale.numel() != 1:
        raise PtqcError(f"{module}: per-channel static activation scales have no compressed-tensors form "
                        "(it has per-tensor static or dynamic); use int8:static=true or dynamic activations")
    t = {"input_scale": scale.reshape(1).to(qm.dtype)}
    if z is not None:
        t["input_zero_point"] = qm.store[z.target].to(torch.int8).reshape(1)
    return quant_args(bits, -1, z is None, dynamic=False, activation=True), t


def _weight_tensors(qm: QModel, dq, bits: int, packed: bool, expert: int | None = None) -> dict:
    """The weight tensors of a linear (or of one expert of a stack) by suffix: its codes (int-quantized)
    or packed codes and their shape (pack-quantized), scale, zero point."""
    pick = (lambda t: t) if expert is None else (lambda t: t[expert])
    codes = pick(checkpoint.weight_codes(qm, dq)).to(torch.int8)
    group = dq.args[3]
    scale = pick(qm.store[dq.args[1].target]).float()
    zp = pick(qm.store[dq.args[2].target]).to(torch.int8) if dq.args[2] is not None else None
    if group == -1:
        scale = scale.reshape(1)
        zp = zp.reshape(1) if zp is not None else None
    t = {}
    if not packed:
        t["weight"] = codes
        if zp is not None:
            t["weight_zero_point"] = zp.reshape(scale.shape)
    else:
        t["weight_packed"] = pack_int32(codes, bits)
        t["weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        if zp is not None:
            t["weight_zero_point"] = pack_int32(zp, bits, dim=0) if group != -1 else zp
    t["weight_scale"] = scale.to(qm.dtype)  # consumers keep scales in the model dtype
    return t


def _linear(qm: QModel, lin) -> tuple[dict, dict, set]:
    """(scheme, tensors by suffix, the store names they replace) of a linear with quantized weights."""
    dq = lin.args[1]
    bits = info(lin).get("quant", {}).get("weight", {}).get("bits") or 8
    a_args, a_t = _input_args(qm, lin)
    handled = checkpoint.store_inputs(dq, dq.args[0])
    if a_t:  # the static scale (and zero point): input_scale (input_zero_point)
        handled |= checkpoint.store_inputs(lin.args[0])
    fmt = "int-quantized" if a_args is not None else "pack-quantized"  # llm-compressor's choice
    scheme = {"weights": quant_args(bits, dq.args[3], dq.args[2] is None, dynamic=False, activation=False),
              "input_activations": a_args, "format": fmt}
    return scheme, {**_weight_tensors(qm, dq, bits, fmt == "pack-quantized"), **a_t}, handled


def _stack_name(node, i: int) -> str:
    a = node.args[3 + i]
    if is_op(a, ops.DEQUANTIZE_WEIGHT):
        a = a.args[0].args[0] if is_op(a.args[0], ops.UNPACK_INT4) else a.args[0]
    return a.target


def _expert_input_args(node) -> dict | None:
    """The input QuantizationArgs of a block's experts: dynamic per token (gate/up's and down's inputs alike)."""
    a = node.args[0]
    if not is_op(a, ops.QUANTIZE_ACT):
        return None
    _, s, _, bits, group, sym, clip = (list(a.args) + [1.0])[:7]
    if s is not None or clip != 1.0 or node.kwargs.get("down_act_bits", 0) != bits:
        raise PtqcError(f"{info(node).get('module', node.name)}: expert inputs need one dynamic unclipped quantizer "
                        "for gate/up and down to have a compressed-tensors form")
    return quant_args(bits, group, sym, dynamic=True, activation=True)


def _experts(qm: QModel) -> tuple[list, dict, set]:
    """([(per-expert module, scheme, tensors by suffix)] of the quantized expert stacks, the float
    experts' tensors, the store names both replace), named as llm-compressor writes Qwen3-MoE
    (``X.experts.e.gate_proj``)."""
    out, floats, handled = [], {}, set()
    for node in qm.nodes(ops.MOE_EXPERTS):
        a_args = _expert_input_args(node)
        for i in range(3):
            dq, stack = node.args[3 + i], _stack_name(node, i)
            handled.add(stack)
            if not is_op(dq, ops.DEQUANTIZE_WEIGHT):
                t = qm.store[stack]
                floats |= {moe.expert_name(stack, e): t[e].contiguous() for e in range(t.shape[0])}
                continue
            handled |= checkpoint.store_inputs(dq, dq.args[0])
            bits = info(dq).get("quant", {}).get("weight", {}).get("bits") or 8
            fmt = "int-quantized" if a_args is not None else "pack-quantized"
            scheme = {"weights": quant_args(bits, dq.args[3], dq.args[2] is None, dynamic=False, activation=False),
                      "input_activations": a_args, "format": fmt}
            for e in range(qm.store.spec(dq.args[1].target)[0][0]):
                out.append((moe.expert_name(stack, e).removesuffix(".weight"), scheme,
                            _weight_tensors(qm, dq, bits, fmt == "pack-quantized", e)))
    return out, floats, handled


def _both_names(qm: QModel, modules: list[str]) -> list[str]:
    """Module names as the checkpoint names them and, where transformers renames them on loading
    (GPT-NeoX's ``embed_out`` -> ``lm_head``, Mixtral's ``block_sparse_moe`` -> ``mlp``), as the model
    does too: vLLM matches ``ignore`` / ``targets`` against the former, transformers the latter."""
    keys = [f"{m}.weight" for m in modules]
    to_model = families.model_names(keys, qm.config)
    return sorted(set(modules) | {to_model[k].removesuffix(".weight") for k in keys if k in to_model})


def _quant_config(qm: QModel, schemes: list[dict], ignore: list[str], kv_scheme: dict | None) -> dict:
    """One config group per scheme (targeting its modules by name when there are several)."""
    many = len(schemes) > 1
    groups = {f"group_{i}": {"targets": _both_names(qm, s["modules"]) if many else ["Linear"], "format": s["format"],
                             "weights": s["weights"], "input_activations": s["input_activations"],
                             "output_activations": None} for i, s in enumerate(schemes)}
    formats = {g["format"] for g in groups.values()}
    return {"quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": groups, "ignore": _both_names(qm, ignore),
            "kv_cache_scheme": kv_scheme, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}, "version": VERSION}


def _names(qm: QModel, handled: set, tensors: dict) -> list[str]:
    """Every tensor of the export: the quantized ones and the graph's others (those of the Hugging Face
    model's state dict only, under their checkpoint names)."""
    floats, params = checkpoint.unchanged(qm, handled | set(tensors))
    to_model = families.model_names(floats, qm.config)
    extra = [n for n in floats if to_model.get(n, n) not in params]
    if extra:
        raise PtqcError(f"tensor {extra[0]} of the graph is no parameter of the Hugging Face model; "
                        "the pass that added it has no compressed-tensors form")
    return sorted(set(floats) | set(tensors))


def export(qm: QModel, out, *, force: bool = False) -> dict:
    """Write ``qm`` (a fake-quant ptqc graph) as a compressed-tensors model directory; returns a
    summary (format, config groups, tensor count)."""
    _refuse_unexpressible(qm)
    kv_scheme, tensors, handled = _kv_scheme(qm)
    schemes: dict[str, dict] = {}  # json key -> {"weights", "input_activations", "format", "modules"}
    ignore: list[str] = []
    for lin in qm.linears():
        base = info(lin)["module"]
        if not is_op(lin.args[1], ops.DEQUANTIZE_WEIGHT):
            if is_op(lin.args[0], ops.QUANTIZE_ACT):
                raise PtqcError(f"{base}: quantized activations with float weights have no compressed-tensors "
                                "export; quantize its weights too or exclude it from activation quantization")
            ignore.append(base)
            continue
        scheme, t, done = _linear(qm, lin)
        schemes.setdefault(json.dumps(scheme, sort_keys=True), {**scheme, "modules": []})["modules"].append(base)
        tensors |= {f"{base}.{suffix}": v.contiguous() for suffix, v in t.items()}
        handled |= done
    experts, floats, done = _experts(qm)
    for base, scheme, t in experts:
        schemes.setdefault(json.dumps(scheme, sort_keys=True), {**scheme, "modules": []})["modules"].append(base)
        tensors |= {f"{base}.{suffix}": v.contiguous() for suffix, v in t.items()}
    tensors |= floats
    handled |= done
    if not schemes:
        raise PtqcError("the model has no quantized linear; compile it with a weight quantization pass first")
    qcfg = _quant_config(qm, list(schemes.values()), ignore, kv_scheme)
    names = _names(qm, handled, tensors)
    src = Path(qm.source) if qm.source else None
    config = json.loads((src / CONFIG).read_text()) if src is not None and (src / CONFIG).is_file() \
        else qm.config.to_dict()
    config["quantization_config"] = qcfg
    config["torch_dtype"] = str(qm.dtype).removeprefix("torch.")  # the dtype of its float tensors and scales
    if "dtype" in config:  # transformers 5 writes "dtype"
        config["dtype"] = config["torch_dtype"]
    with AtomicDir(out, force) as tmp:
        checkpoint.copy_source_files(qm, tmp)
        checkpoint.save(qm, tmp / WEIGHTS, names, tensors)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return {"format": qcfg["format"], "config_groups": len(schemes),
            "quantized_linears": sum(len(s["modules"]) for s in schemes.values()) - len(experts),
            "quantized_experts": len(experts), "ignored": len(ignore),
            "tensors": len(names)}
