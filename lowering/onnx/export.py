"""FX -> ONNX: lower a ptqc graph node by node with one translation table.

Not ``torch.onnx.export(dynamo=True)``: it re-traces the graph and renames every node, so ONNX
nodes could not be matched to the ptqc graph (diagnostics, ``ptqc inspect``, ``ptqc diff``) by
name. Here each FX node is lowered by ``TABLE[node.target]``; the ONNX node computing an FX node's
value and its output are named **exactly** like the FX node, helper nodes ``<fx name>/<OpType>[_k]``
(e.g. ``linear_default/acc``); weights are initializers under their Hugging Face names;
``input_ids`` is ``int64 [batch, seq]`` (symbolic) and ``logits`` the output; any FX node or
helper value can be added as an extra output.

Modes: ``fake`` (default) is a faithful reference of the graph: float ops, ``quantize_act`` as
the explicit quantizer of :mod:`ptqc.quant` (``Div``, never a reciprocal multiply, half-to-even
``Round``, ``Clip`` before ``Cast``), ``dequantize_weight`` as ``DequantizeLinear`` (opset-21
``block_size`` per group; packed int4 codes as a true ``INT4`` initializer). ``integer`` runs
quantized linears in integer kernels (:mod:`.integer`); ``int_kernel`` picks MatMulInteger's
operands: ``s8s8`` (default, exact everywhere), ``u8u8`` (codes + 128 with zero points 128: the
same int32 sums, faster) or ``u8s8`` (fastest, exact with AVX512-VNNI/AVX-VNNI, may saturate
int16 pair sums on AVX2-only CPUs).

An FX op with no entry in :data:`TABLE` raises a one-line PtqcError naming the op and the node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from onnx import helper

from ptqc import ops
from ptqc.errors import PtqcError
from ptqc.ir import QModel, is_op, propagate
from ptqc.lowering.onnx import aten, dialect, integer, writer  # aten, dialect: their translations fill TABLE
from ptqc.lowering.onnx.emitter import I64, Lowering, _torch_dtype, onnx_dtype


def _dims(shape) -> list:
    """ONNX dims of a ptqc shape: symbolic ``B``/``S`` are ``batch``/``seq``, unknown (``?``) None."""
    return [None if d == "?" else {"B": "batch", "S": "seq"}.get(d, d) if isinstance(d, str) else d for d in shape]


def _value_info(L, name: str, fxnode: fx.Node | None):
    if fxnode is not None and "dtype" in fxnode.meta:
        return helper.make_tensor_value_info(name, onnx_dtype(_torch_dtype(fxnode.meta["dtype"])),
                                             _dims(fxnode.meta.get("shape", [])))
    if name in L.vtype and L.vtype[name][1] is not None:
        dtype, shape = L.vtype[name]
        return helper.make_tensor_value_info(name, dtype, _dims(shape))
    raise PtqcError(f"cannot expose {name} as an output: its type and rank are unknown (not an FX node value)")


def _record_meta(qm: QModel, examples: dict) -> None:
    """dtype and (concrete) shape of every node from one run on example inputs (op-level tests)."""
    from ptqc.ir import execute

    def hook(n, val):
        if isinstance(val, torch.Tensor):
            n.meta["shape"] = list(val.shape)
            n.meta["dtype"] = str(val.dtype).removeprefix("torch.")
    for n in qm.graph.nodes:
        if n.op == "placeholder":
            hook(n, examples[n.target])
    execute(qm.graph, qm.store, examples, hook=hook)


def _plan(L: Lowering) -> None:
    """The nodes read by their users directly (not emitted): dequantize_weight read only by linears,
    packed int4 codes (INT4 initializers), and what the integer kernels read."""
    for n in L.qm.nodes(ops.DEQUANTIZE_WEIGHT):
        if all(is_op(u, ops.LINEAR) and u.args[1] is n and n not in u.args[2:] for u in n.users):
            L.skip.add(n.name)  # lowered by its linears as DequantizeLinear(Transpose(codes))
        c = n.args[0]
        if L.int4 and dialect._packed_codes(L, c) is not None:
            L.skip.add(c.name)  # packed int4 codes read directly as an INT4 initializer
    if L.mode == "integer":
        integer.plan(L)


def _input(L: Lowering, n: fx.Node, examples: dict | None):
    L.env[n.name] = n.name
    L._names.add(n.name)
    if examples is not None:
        return helper.make_tensor_value_info(n.name, onnx_dtype(examples[n.target].dtype),
                                             list(examples[n.target].shape))
    if n.meta.get("shape") is not None and len(n.meta["shape"]) != 2:
        raise PtqcError(f"graph input {n.name} is not [batch, seq]")
    return helper.make_tensor_value_info(n.name, I64, ["batch", "seq"])


def _outputs(L: Lowering, outs, extra) -> None:
    """The graph's outputs (``logits``, or ``output_<i>``), then the ``extra`` values exposed by name."""
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    L.prefix = "output"
    for i, o in enumerate(outs):
        name = "logits" if len(outs) == 1 else f"output_{i}"
        L.nodes.append(helper.make_node("Identity", [L.v(o)], [name], name=name))
        L.graph_outputs.append(helper.make_tensor_value_info(name, onnx_dtype(_torch_dtype(o.meta["dtype"])),
                                                             _dims(o.meta["shape"])))
    by_name = {n.name: n for n in L.qm.graph.nodes}
    for name in extra:
        if name in by_name and by_name[name].op == "get_attr":
            raise PtqcError(f"{name} is a weight, not a computed value")
        if name not in L._names or (name in by_name and name not in L.env):
            raise PtqcError(f"cannot expose {name!r}: no such value in the ONNX graph (FX nodes fused away: "
                            f"{', '.join(L.fused) or 'none'})")
        L.graph_outputs.append(_value_info(L, name, by_name.get(name)))


def build(qm: QModel, mode: str = "fake", outputs=(), int4: bool = True, examples: dict | None = None,
          int_kernel: str = "s8s8") -> Lowering:
    """Lower every node of ``qm.graph`` (no initializer data is read yet). ``examples`` (graph
    input name -> tensor) replaces the ``input_ids [batch, seq]`` convention: static shapes from
    one run on them (to lower single ops or subgraphs)."""
    if examples is None:
        propagate(qm.graph, qm.store)  # dtype and shape of every node (meta device, cheap)
    else:
        _record_meta(qm, examples)
    L = Lowering(qm, mode, int4, int_kernel)
    _plan(L)
    outs = None
    for n in qm.graph.nodes:
        if n.op == "placeholder":
            L.graph_inputs.append(_input(L, n, examples))
        elif n.op == "call_function":
            L.lower_node(n)
        elif n.op == "output":
            outs = n.args[0]
        elif n.op != "get_attr":
            raise PtqcError(f"unsupported node kind {n.op} ({n.name})")
    if outs is None:
        raise PtqcError("graph has no output node")
    _outputs(L, outs, outputs)
    return L


@dataclass
class ExportResult:
    path: Path
    data_path: Path | None
    mode: str
    nodes: int
    initializers: int
    weight_bytes: int
    outputs: list[str]
    fused: list[str] = field(default_factory=list)  # FX nodes with no ONNX value of their own
    integer_linears: list[str] = field(default_factory=list)
    nbits_linears: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"path": str(self.path), "data": str(self.data_path) if self.data_path else None, "mode": self.mode,
                "nodes": self.nodes, "initializers": self.initializers, "weight_bytes": self.weight_bytes,
                "outputs": self.outputs, "integer_linears": len(self.integer_linears),
                "nbits_linears": len(self.nbits_linears)}


def export(qm: QModel, path, mode: str = "fake", *, outputs=(), external_data: bool | None = None,
           int4: bool = True, examples: dict | None = None, int_kernel: str = "s8s8") -> ExportResult:
    """Write ``qm`` as an ONNX model at ``path`` (``.onnx``).

    ``outputs``: extra graph outputs (FX node names, or helper values such as
    ``<linear>/acc``). ``external_data``: weights in ``<path>.data`` next to the model (forced when
    the weights exceed 2 GB; None = only then). ``int4``: packed int4 codes as INT4 initializers.
    The file is written to a temporary name and renamed, then checked with ``onnx.checker``."""
    path = Path(path)
    L = build(qm, mode, outputs, int4, examples, int_kernel)
    total = sum(i.nbytes for i in L.inits.values())
    data_path = writer.write(L, path, writer.external(total, external_data))
    writer.check(path)
    return ExportResult(path=path, data_path=data_path, mode=mode, nodes=len(L.nodes), initializers=len(L.inits),
                        weight_bytes=total, outputs=[o.name for o in L.graph_outputs], fused=list(L.fused),
                        integer_linears=list(L.integer_linears), nbits_linears=list(L.nbits_linears))


def export_graph(graph: fx.Graph, weights: dict, examples: dict, path, mode: str = "fake", **kw) -> ExportResult:
    """Export a bare FX graph (any placeholders, weights by get_attr target) with static shapes
    taken from ``examples``: lowers single ops or subgraphs, e.g. to test a translation."""
    from ptqc.model import WeightStore

    store = WeightStore()
    for k, t in weights.items():
        store[k] = t
    return export(QModel(graph=graph, store=store, config=None), path, mode, examples=examples, **kw)
