"""What the checkpoint exports (:mod:`ptqc.lowering.ascend.export`,
:mod:`ptqc.lowering.compressed_tensors`) share: the weight codes of a graph, the tensors they keep
as they are, and writing those into the export directory."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ptqc import ops, quant
from ptqc.ir import QModel, is_op
from ptqc.model import hf_names, other_files, write_safetensors


def weight_codes(qm: QModel, dq) -> torch.Tensor:
    """The codes of a dequantize_weight node, one per element (packed int4 codes unpacked)."""
    c = dq.args[0]
    return quant.unpack_int4(qm.store[c.args[0].target]) if is_op(c, ops.UNPACK_INT4) else qm.store[c.target]


def store_inputs(*nodes) -> set[str]:
    """The store names the nodes read directly (their get_attr arguments)."""
    return {a.target for n in nodes for a in getattr(n, "all_input_nodes", ()) if a.op == "get_attr"}


def unchanged(qm: QModel, done: set) -> tuple[list[str], set[str]]:
    """(the graph's tensors not in ``done``, under the name they alias, without the non-persistent
    buffers (rotary ``inv_freq``...: recomputed, not in checkpoints); the model's parameter names)."""
    names = [n for n in qm.weight_names() if n not in done]
    aliases = {n: qm.store.aliases[n] for n in names if n in qm.store.aliases}
    names = sorted(set(names) - set(aliases) | set(aliases.values()))
    params, buffers = hf_names(qm.config)
    return [n for n in names if n not in buffers], params


def save(qm: QModel, path: Path, names: list[str], tensors: dict, dtype: torch.dtype | None = None) -> int:
    """Write ``names`` as one safetensors file: from ``tensors``, else the graph's (floats in
    ``dtype``, default the model dtype). Returns the bytes written."""
    dt = dtype or qm.dtype

    def spec(n):
        if n in tensors:
            return tuple(tensors[n].shape), tensors[n].dtype
        shape, d = qm.store.spec(n)
        return shape, (dt if dtype is not None and d.is_floating_point else d)

    def get(n):
        if n in tensors:
            return tensors[n]
        return qm.store[n].to(dt) if qm.store[n].is_floating_point() else qm.store[n]
    return write_safetensors(path, names, spec, get, metadata={"format": "pt", "producer": "ptqc"})


def copy_source_files(qm: QModel, out: Path) -> None:
    """The source directory's other files (tokenizer, generation config...; not ptqc's own) into ``out``."""
    src = Path(qm.source) if qm.source else None
    if src is not None and src.is_dir():
        for f in other_files(src):
            if f.name not in ("ptqc.json", "graph.json", "run.json"):
                shutil.copy2(f, out / f.name)
