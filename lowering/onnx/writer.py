"""Writing a lowered graph: the ONNX model (initializers inline or in ``<model>.data``), saved
atomically, and its ``onnx.checker`` check."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import helper

from ptqc.errors import PtqcError
from ptqc.lowering.onnx.emitter import IR_VERSION, MS_DOMAIN, OPSET, Lowering, _Init

TWO_GB = 2 << 30
EXTERNAL_MIN_BYTES = 1024  # with external data, tensors at least this large go to the data file


def external(total: int, wanted: bool | None) -> bool:
    """Whether ``total`` bytes of weights go to a data file: as ``wanted``, or (None) when the
    model would exceed the 2 GB protobuf limit."""
    over = total > TWO_GB - (64 << 20)
    if wanted is False and over:
        raise PtqcError(f"the weights take {total / 2**30:.2f} GiB: an ONNX file over 2 GB needs external data "
                        "(drop --no-external-data)")
    return over if wanted is None else wanted


def _tensor_proto(init: _Init, raw: bytes | None, external: tuple[str, int, int] | None) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name = init.name
    t.data_type = init.dtype
    t.dims.extend(init.dims)
    if external is None:
        t.raw_data = raw
    else:
        loc, off, length = external
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", loc), ("offset", str(off)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
    return t


def _initializers(L: Lowering, f, data_name: str) -> list[onnx.TensorProto]:
    """Every initializer, read one at a time: inline, or (``f``, a data file) the large ones
    appended to ``f`` at 64-byte aligned offsets."""
    tensors, off = [], 0
    for init in L.inits.values():
        raw = init.data()
        if f is None or len(raw) < EXTERNAL_MIN_BYTES:
            tensors.append(_tensor_proto(init, raw, None))
            continue
        pad = (-off) % 64
        f.write(b"\0" * pad)
        off += pad
        f.write(raw)
        tensors.append(_tensor_proto(init, None, (data_name, off, len(raw))))
        off += len(raw)
        del raw
        L.qm.store.release()
    L.qm.store.release()
    return tensors


def _model(L: Lowering, tensors: list) -> onnx.ModelProto:
    graph = helper.make_graph(L.nodes, "ptqc", L.graph_inputs, L.graph_outputs, tensors)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if L.uses_ms else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="ptqc")
    helper.set_model_props(model, {"ptqc.mode": L.mode, "ptqc.source": str(L.qm.source),
                                   **({"ptqc.int_kernel": L.int_kernel} if L.mode == "integer" else {})})
    return model


def write(L: Lowering, path: Path, external_data: bool) -> Path | None:
    """Write the model at ``path`` (and its data file, returned) under temporary names, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(f"{path.name}.data")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp_data = path.with_name(f".{data.name}.tmp-{os.getpid()}")
    try:
        if external_data:
            with open(tmp_data, "wb") as f:
                tensors = _initializers(L, f, data.name)
        else:
            tensors = _initializers(L, None, data.name)
        onnx.save_model(_model(L, tensors), str(tmp))
        del tensors
        if external_data:
            os.replace(tmp_data, data)
        os.replace(tmp, path)
    finally:
        for p in (tmp, tmp_data):
            if p.exists():
                p.unlink()
    return data if external_data else None


def check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise PtqcError(f"the exported model does not pass onnx.checker: {str(e).splitlines()[0]}") from None
