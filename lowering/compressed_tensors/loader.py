"""Reading a compressed-tensors export (ours or llm-compressor's) back into a ptqc fake-quant graph."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ptqc import ops, quant
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, propagate
from ptqc.lowering.compressed_tensors.checker import _modules, check
from ptqc.lowering.compressed_tensors.config import read_quant_config, scheme_of, spec_of, without_quant
from ptqc.lowering.compressed_tensors.packing import unpack_int32


def _graph(path: Path, dtype: str, trust_remote_code: bool) -> tuple[QModel, dict, dict]:
    """(the float graph of the export's model over its weight files, those files, the tied weights)."""
    from ptqc import frontend
    from ptqc.model import WeightStore, load_config, parse_dtype, weight_files

    config = without_quant(load_config(path, trust_remote_code))
    written = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # read as written, like artifacts
    dt = written if isinstance(written, torch.dtype) and written.is_floating_point else parse_dtype(dtype)
    files = weight_files(path)
    g, buffers, tied = frontend.trace(path, config, dt, trust_remote_code)
    store = WeightStore(files, dt)
    store.cast = False
    for name, b in buffers.items():
        if name not in files:
            store.overlay[name] = b
    qm = QModel(graph=g, store=store, config=config, dtype=dt, source=str(path.resolve()), properties={"canonical"})
    return qm, files, tied


def _load_weight(qm: QModel, lin, base: str, spec: quant.QuantSpec, fmt: str) -> None:
    from ptqc.weights import set_quantized_weight

    store = qm.store
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


def _static_input(qm: QModel, base: str, a: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    s = qm.store[f"{base}.input_scale"].float().reshape(1)
    z = qm.store[f"{base}.input_zero_point"].to(torch.int8).reshape(1) if not a.get("symmetric", True) else None
    return s, z


def _insert_acts(qm: QModel, acts: dict) -> None:
    """One activation quantizer per (input, QuantizationArgs[, static scale]) before its linears."""
    from ptqc.passes.act_quant import insert_quantizer

    for key, (a, lins) in acts.items():
        if a.get("dynamic"):
            insert_quantizer(qm, key[0], lins, spec_of(a))
            continue
        s, z = _static_input(qm, info(lins[0])["module"], a)
        insert_quantizer(qm, key[0], lins, quant.QuantSpec(a["num_bits"], -1, z is None), scale=s, zero_point=z,
                         method="static-export")


def _insert_kv(qm: QModel, kv: dict) -> None:
    from ptqc.passes.kv import KV

    for attn in list(qm.nodes(ops.ATTENTION)):
        m = info(attn)["module"]
        for which, arg in (("k", 1), ("v", 2)):
            s = qm.store[f"{m}.{which}_scale"].float().reshape(1)
            KV._insert(qm, attn, arg, quant.QuantSpec(kv["num_bits"], 0, True), s, None, which)


def load(path, dtype: str = "float32", trust_remote_code: bool = False) -> QModel:
    """Read a compressed-tensors export (ours or llm-compressor's) into a ptqc fake-quant graph:
    the weight codes, scales and zero points as stored, activation quantizers as configured; in
    config.json's dtype (``dtype`` only where it gives none)."""
    from ptqc import frontend

    path = Path(path)
    problems = check(path, trust_remote_code)
    if problems:
        raise PtqcError(f"{path} is not a valid compressed-tensors export: {problems[0]} (run ptqc check-export)")
    q = read_quant_config(path)
    experts = sorted(m for m, spec in _modules(path, trust_remote_code)[0].items() if ".experts." in m and scheme_of(m, spec[0], q))
    if experts:
        raise PtqcError(f"{path}: reading quantized MoE experts back from a compressed-tensors export is not "
                        f"supported yet ({experts[0]} and {len(experts) - 1} more); evaluate the artifact instead")
    qm, files, tied = _graph(path, dtype, trust_remote_code)
    acts: dict = {}  # (input, args[, static scale, zero point]) -> (args, linears)
    for base, lin in {info(n)["module"]: n for n in qm.linears()}.items():
        grp = scheme_of(base, ("Linear", "Module"), q)
        if grp is None:
            continue
        _load_weight(qm, lin, base, spec_of(grp["weights"]), grp.get("format") or q.get("format"))
        a = grp.get("input_activations")
        if a is None:
            continue
        if a.get("dynamic"):
            key = (lin.args[0], "dynamic", json.dumps(a, sort_keys=True))
        else:
            s, z = _static_input(qm, base, a)
            key = (lin.args[0], "static", json.dumps(a, sort_keys=True), float(s), None if z is None else int(z))
        acts.setdefault(key, (a, []))[1].append(lin)
    _insert_acts(qm, acts)
    kv = q.get("kv_cache_scheme")
    if kv:
        _insert_kv(qm, kv)
    frontend.resolve_tied(qm.graph, qm.store, tied, files, path)
    qm.properties |= {"weight_quant"} | ({"act_quant"} if acts else set()) | ({"kv_quant"} if kv else set())
    propagate(qm.graph, qm.store)
    return qm
