"""FX -> ONNX: lower a ptqc graph node by node with one translation table.

Why a direct emitter and not ``torch.onnx.export(dynamo=True, custom_translation_table=...)``:
the dynamo exporter re-traces the GraphModule with ``torch.export``, which renames every node
after its op (``linear_default_3`` becomes ``node_linear_3``, the nodes inside a translation
become ``node_Mul_16``), so ONNX nodes could not be matched to the ptqc graph (and its
diagnostics, ``ptqc inspect``, ``ptqc diff``) by name. Here each FX node is lowered by
``TABLE[node.target]`` and

* the ONNX node computing an FX node's value is named **exactly** like the FX node and so is its
  output value; helper nodes are named ``<fx name>/<OpType>[_k]`` (e.g. ``linear_default/acc``);
* weights are initializers named by their Hugging Face tensor names (the ``get_attr`` targets);
* ``input_ids`` is ``int64 [batch, seq]`` with symbolic ``batch``/``seq``; the logits are the
  ``logits`` output; any FX node (or helper value) can be added as an extra graph output.

Modes (``mode=``):

``fake`` (default)
    a faithful reference of the graph: float ops, ``quantize_act`` as the explicit quantizer of
    :mod:`ptqc.quant` (``ReduceMax(Abs(x)) / qmax`` dynamic scales computed in the graph, ``Div``
    never a reciprocal multiply, half-to-even ``Round``, ``Clip`` before ``Cast(int8)``, then
    dequantized), ``dequantize_weight`` as ``DequantizeLinear`` (per channel ``axis=0``, per
    group opset-21 ``block_size``, per tensor scalar; packed int4 codes become a true ``INT4``
    initializer holding the same bytes).
``integer``
    W8A8 linears (dynamic per-token or static per-tensor symmetric int activations, per-channel
    symmetric int weights) run in integers: activation codes as above, ``MatMulInteger(int8,
    int8) -> Cast(float) -> Mul(token scale) -> Mul(weight scale) (+ bias)``; weight-only
    linears use ``com.microsoft.MatMulNBits`` (bits 4 or 8 after offsetting the signed codes,
    block size a power of two >= 16; a per-channel scale is repeated over blocks), else
    ``DequantizeLinear``. Everything else as in ``fake``. ``int_kernel``: ``s8s8`` (default, the
    brief's reference: exact on every CPU, but onnxruntime has no fast int8 x int8 kernel),
    ``u8u8`` (codes + 128 on both sides with zero points 128: the same int32 sums, exact on every
    CPU, faster) or ``u8s8`` (activations + 128: fastest, exact with AVX512-VNNI/AVX-VNNI, may
    saturate int16 pair sums on AVX2-only CPUs).

An FX op with no entry in :data:`TABLE` raises a one-line PtqcError naming the op and the node.
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper

from ptqc import ops
from ptqc.errors import PtqcError
from ptqc.ir import QModel, is_op, propagate

aten = torch.ops.aten
OPSET = 21  # DequantizeLinear block_size and int4 types
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10
MODES = ("fake", "integer")
INT_KERNELS = ("s8s8", "u8s8", "u8u8")  # MatMulInteger operand types in mode="integer"
TWO_GB = 2 << 30
EXTERNAL_MIN_BYTES = 1024  # with external data, tensors at least this large go to the data file

DTYPES = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
    torch.int16: TensorProto.INT16, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
    torch.bool: TensorProto.BOOL,
}
F32 = TensorProto.FLOAT
I64 = TensorProto.INT64
I32 = TensorProto.INT32
I8 = TensorProto.INT8


def onnx_dtype(dt: torch.dtype) -> int:
    try:
        return DTYPES[dt]
    except KeyError:
        raise PtqcError(f"dtype {dt} has no ONNX equivalent") from None


def _torch_dtype(s) -> torch.dtype:
    return s if isinstance(s, torch.dtype) else getattr(torch, str(s))


# ---- the translation table ------------------------------------------------------------------------
Translation = Callable[..., "str | None"]
TABLE: dict[object, Translation] = {}


def lowers(*targets):
    """Register a translation ``fn(L, node, *node.args, **node.kwargs) -> ONNX value name`` for
    FX targets. It returns the value computing the node; the lowering renames it (and the node
    producing it) to the FX node's name."""
    def deco(fn):
        for t in targets:
            TABLE[t] = fn
        return fn
    return deco


# ---- initializers -------------------------------------------------------------------------------
@dataclass
class _Init:
    name: str
    dtype: int
    dims: list[int]
    data: Callable[[], bytes]  # read lazily, one tensor at a time when the model is written
    nbytes: int


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def pack_nibbles(codes: torch.Tensor) -> bytes:
    """ONNX INT4/UINT4 layout: the flattened tensor, two per byte, first element in the low nibble
    (a trailing odd element is padded). Same layout as :func:`ptqc.quant.pack_int4` row by row."""
    c = codes.reshape(-1).to(torch.int16)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    c = c.reshape(-1, 2)
    b = (c[:, 0] & 0xF) | ((c[:, 1] & 0xF) << 4)
    return b.to(torch.uint8).numpy().tobytes()


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


# ---- the lowering ------------------------------------------------------------------------------
class Lowering:
    """State of one export: emitted nodes, initializers, FX node -> ONNX value names."""

    def __init__(self, qm: QModel, mode: str = "fake", int4: bool = True, int_kernel: str = "s8s8"):
        if mode not in MODES:
            raise PtqcError(f"unknown ONNX lowering mode {mode!r}; use one of {', '.join(MODES)}")
        if int_kernel not in INT_KERNELS:
            raise PtqcError(f"unknown integer kernel {int_kernel!r}; use one of {', '.join(INT_KERNELS)}")
        self.int_kernel = int_kernel
        self.qm = qm
        self.mode = mode
        self.int4 = int4
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, _Init] = {}
        self.env: dict[str, str] = {}  # fx node name -> ONNX value name
        self.sym: set[str] = set()  # ONNX values holding symbolic sizes (int64 [1])
        self.vtype: dict[str, tuple] = {}  # value -> (element type, shape or None) when known
        self.prefix = ""
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self.uses_ms = False
        self.fused: list[str] = []
        self.integer_linears: list[str] = []
        self.nbits_linears: list[str] = []
        self._act_cache: dict[str, tuple[str, str]] = {}
        self._wt_cache: dict[str, str] = {}
        self.skip: set[str] = set()
        self.int_plan: dict[str, str] = {}
        self.graph_inputs: list = []
        self.graph_outputs: list = []

    # -- names ------------------------------------------------------------------------------
    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            name = f"{base}_{k}"
            k += 1
        self._names.add(name)
        return name

    def op(self, op_type: str, *inputs, name: str | None = None, domain: str = "", dtype: int | None = None,
           shape: list | None = None, **attrs) -> str:
        """Emit one node with one output; returns the output value name (= the node name)."""
        nm = self._unique(f"{self.prefix}/{name or op_type}")
        self.nodes.append(helper.make_node(op_type, ["" if i is None else i for i in inputs], [nm], name=nm,
                                           domain=domain or None, **attrs))
        if domain == MS_DOMAIN:
            self.uses_ms = True
        if dtype is not None:
            self.vtype[nm] = (dtype, shape)
        return nm

    # -- constants and weights -----------------------------------------------------------------
    def const(self, value, dtype: int = F32, shape=None) -> str:
        """A small constant initializer (deduplicated)."""
        arr = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(dtype))
        if shape is not None:
            arr = arr.reshape(shape)
        key = (dtype, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self._unique(f"const/{len(self._consts)}")
            raw = arr.tobytes()
            self.inits[name] = _Init(name, dtype, list(arr.shape), lambda raw=raw: raw, len(raw))
            self._consts[key] = name
            self.vtype[name] = (dtype, list(arr.shape))
        return self._consts[key]

    def ints(self, values) -> str:
        return self.const(list(values), I64)

    def add_init(self, name: str, dtype: int, dims, data: Callable[[], bytes], nbytes: int) -> str:
        if name not in self.inits:
            self.inits[name] = _Init(name, dtype, list(dims), data, nbytes)
            self._names.add(name)
            self.vtype[name] = (dtype, list(dims))
        return name

    def weight_name(self, node: fx.Node) -> str:
        return self.qm.store.aliases.get(node.target, node.target) if node.target not in self.qm.store.overlay \
            else node.target

    def weight(self, node: fx.Node) -> str:
        """The initializer of a get_attr node (its HF name; tied weights share one)."""
        name = self.weight_name(node)
        shape, dt = self.qm.store.spec(node.target)
        n = math.prod(shape) * dt.itemsize
        return self.add_init(name, onnx_dtype(dt), shape, lambda t=node.target: _bytes(self.qm.store[t]), n)

    # -- FX values -----------------------------------------------------------------------------
    def v(self, a) -> str:
        """ONNX value of an FX argument (an fx.Node)."""
        if not isinstance(a, fx.Node):
            raise PtqcError(f"internal: expected a graph value, got {a!r} at node {self.prefix}")
        if a.op == "get_attr":
            return self.weight(a)
        if a.name not in self.env:
            raise PtqcError(f"node {self.prefix} reads {a.name}, which has no ONNX value "
                            f"(it was fused away: {', '.join(self.fused) or '-'})")
        return self.env[a.name]

    def dt(self, a) -> torch.dtype:
        if isinstance(a, fx.Node):
            if a.op == "get_attr":
                return self.qm.store.spec(a.target)[1]
            if "dtype" in a.meta:
                return _torch_dtype(a.meta["dtype"])
            return torch.int64  # symbolic sizes
        if isinstance(a, bool):
            return torch.bool
        if isinstance(a, int):
            return torch.int64
        return torch.float32

    def shape(self, a) -> list:
        if a.op == "get_attr":
            return list(self.qm.store.spec(a.target)[0])
        if "shape" not in a.meta:
            raise PtqcError(f"internal: no shape recorded for {a.name}")
        return list(a.meta["shape"])

    def rank(self, a) -> int:
        return len(self.shape(a))

    def is_sym(self, a) -> bool:
        return isinstance(a, fx.Node) and a.name in self.env and self.env[a.name] in self.sym

    def operand(self, a, dt: torch.dtype) -> str:
        """An FX argument (node or Python number) as an ONNX value of dtype ``dt``."""
        if isinstance(a, fx.Node):
            x = self.v(a)
            return x if self.dt(a) == dt else self.op("Cast", x, to=onnx_dtype(dt))
        if isinstance(a, (bool, int, float)):
            return self.const(a, onnx_dtype(dt))
        raise PtqcError(f"node {self.prefix}: unsupported operand {a!r}")

    def cast(self, x: str, src: torch.dtype, dst: torch.dtype) -> str:
        return x if src == dst else self.op("Cast", x, to=onnx_dtype(dst))

    def scalar(self, a, dt: torch.dtype = torch.int64) -> str:
        """A 0-d value (for Range): ints become constants, symbolic sizes are squeezed."""
        if isinstance(a, fx.Node):
            x = self.v(a)
            if x in self.sym:
                x = self.op("Squeeze", x, self.ints([0]))
                return self.cast(x, torch.int64, dt)
            return self.cast(x, self.dt(a), dt)
        return self.const(a, onnx_dtype(dt))

    def shape_of(self, items) -> str:
        """A 1-D int64 shape from a list of ints and symbolic sizes."""
        if all(isinstance(i, int) for i in items):
            return self.ints(items)
        parts = []
        for i in items:
            if isinstance(i, fx.Node):
                x = self.v(i)
                parts.append(x if x in self.sym else self.op("Reshape", self.cast(x, self.dt(i), torch.int64),
                                                             self.ints([1])))
            else:
                parts.append(self.ints([i]))
        return self.op("Concat", *parts, axis=0)

    # -- driving ----------------------------------------------------------------------------
    def lower_node(self, n: fx.Node) -> None:
        fn = TABLE.get(n.target)
        if fn is None:
            m = n.meta.get("ptqc", {})
            where = f" ({m['module']})" if m.get("module") else ""
            raise PtqcError(f"no ONNX translation for op {_op_name(n.target)} at node {n.name}{where}")
        self.prefix = n.name
        start = len(self.nodes)
        out = fn(self, n, *n.args, **n.kwargs)
        if out is None:  # fused into its users
            self.fused.append(n.name)
            return
        self._bind(n, out, start)

    def _bind(self, n: fx.Node, out: str, start: int) -> None:
        is_sym = out in self.sym
        produced = None
        for k in range(len(self.nodes) - 1, start - 1, -1):
            if out in self.nodes[k].output:
                produced = k
                break
        if produced is None or n.name in self._names:
            # an existing value (identity-like op): a named Identity keeps the node in the graph
            if n.name in self._names:
                raise PtqcError(f"internal: ONNX name {n.name} used twice")
            self._names.add(n.name)
            self.nodes.append(helper.make_node("Identity", [out], [n.name], name=n.name))
        else:
            self._names.discard(out)
            self._names.add(n.name)
            node = self.nodes[produced]
            node.output[list(node.output).index(out)] = n.name
            node.name = n.name
            for later in self.nodes[produced + 1:]:
                for i, x in enumerate(later.input):
                    if x == out:
                        later.input[i] = n.name
            if out in self.vtype:
                self.vtype[n.name] = self.vtype.pop(out)
        self.env[n.name] = n.name
        if is_sym:
            self.sym.add(n.name)


def _op_name(t) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return str(t._schema.name).replace("::", ".") + ("." + t._overloadname if t._overloadname else "")
    return getattr(t, "__qualname__", None) or repr(t)


# ---- aten and Python ops ------------------------------------------------------------------------
@lowers(aten.sym_size.int)
def _sym_size(L, n, x, dim):
    r = L.op("Shape", L.v(x), start=dim, end=None if dim == -1 else dim + 1)
    L.sym.add(r)
    return r


def _sym_binop(onnx_op):
    def fn(L, n, a, b):
        r = L.op(onnx_op, *(L.v(x) if isinstance(x, fx.Node) else L.ints([x]) for x in (a, b)))
        L.sym.add(r)
        return r
    return fn


for _pyop, _oop in ((operator.add, "Add"), (operator.sub, "Sub"), (operator.mul, "Mul"),
                    (operator.floordiv, "Div")):
    lowers(_pyop)(_sym_binop(_oop))


@lowers(aten.embedding.default)
def _embedding(L, n, w, ids, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return L.op("Gather", L.v(w), L.v(ids), axis=0)


@lowers(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(L, n, *args, dtype=None, layout=None, device=None, pin_memory=None):
    dt = L.dt(n)
    if n.target == aten.arange.default:
        start, end, step = 0, args[0], 1
    elif n.target == aten.arange.start:
        start, end, step = args[0], args[1], 1
    else:
        start, end, step = args
    return L.op("Range", L.scalar(start, dt), L.scalar(end, dt), L.scalar(step, dt))


def _binary(onnx_op):
    def fn(L, n, a, b, alpha=1, rounding_mode=None):
        if rounding_mode is not None:
            raise PtqcError(f"no ONNX translation for {_op_name(n.target)} with rounding_mode={rounding_mode!r} "
                            f"at node {n.name}")
        dt = L.dt(n)
        xa, xb = L.operand(a, dt), L.operand(b, dt)
        if alpha != 1:
            xb = L.op("Mul", xb, L.const(alpha, onnx_dtype(dt)))
        return L.op(onnx_op, xa, xb)
    return fn


for _t, _o in ((aten.add.Tensor, "Add"), (aten.add.Scalar, "Add"), (aten.sub.Tensor, "Sub"),
               (aten.sub.Scalar, "Sub"), (aten.mul.Tensor, "Mul"), (aten.mul.Scalar, "Mul"),
               (aten.div.Tensor, "Div"), (aten.div.Scalar, "Div"), (aten.div.Tensor_mode, "Div"),
               (aten.maximum.default, "Max"), (aten.minimum.default, "Min")):
    lowers(_t)(_binary(_o))


def _compare(onnx_op, negate=False):
    def fn(L, n, a, b):
        dt = torch.promote_types(L.dt(a), L.dt(b)) if isinstance(b, fx.Node) else L.dt(a)
        r = L.op(onnx_op, L.operand(a, dt), L.operand(b, dt))
        return L.op("Not", r) if negate else r
    return fn


for _t, _o, _neg in ((aten.lt.Tensor, "Less", False), (aten.lt.Scalar, "Less", False),
                     (aten.le.Tensor, "LessOrEqual", False), (aten.le.Scalar, "LessOrEqual", False),
                     (aten.gt.Tensor, "Greater", False), (aten.gt.Scalar, "Greater", False),
                     (aten.ge.Tensor, "GreaterOrEqual", False), (aten.ge.Scalar, "GreaterOrEqual", False),
                     (aten.eq.Tensor, "Equal", False), (aten.eq.Scalar, "Equal", False),
                     (aten.ne.Tensor, "Equal", True), (aten.ne.Scalar, "Equal", True)):
    lowers(_t)(_compare(_o, _neg))


def _unary(onnx_op):
    def fn(L, n, x):
        return L.op(onnx_op, L.operand(x, L.dt(n)))
    return fn


for _t, _o in ((aten.neg.default, "Neg"), (aten.exp.default, "Exp"), (aten.cos.default, "Cos"),
               (aten.sin.default, "Sin"), (aten.tanh.default, "Tanh"), (aten.sigmoid.default, "Sigmoid"),
               (aten.sqrt.default, "Sqrt"), (aten.relu.default, "Relu"), (aten.abs.default, "Abs"),
               (aten.reciprocal.default, "Reciprocal"), (aten.log.default, "Log"), (aten.erf.default, "Erf")):
    lowers(_t)(_unary(_o))


@lowers(aten.rsqrt.default)
def _rsqrt(L, n, x):
    return L.op("Reciprocal", L.op("Sqrt", L.operand(x, L.dt(n))))


@lowers(aten.silu.default)
def _silu(L, n, x):
    h = L.v(x)  # x / (1 + exp(-x)), the formula of torch's CPU kernel
    one = L.const(1, onnx_dtype(L.dt(x)))
    return L.op("Div", h, L.op("Add", one, L.op("Exp", L.op("Neg", h))))


@lowers(aten.gelu.default)
def _gelu(L, n, x, approximate="none"):
    return L.op("Gelu", L.v(x), approximate=approximate)


@lowers(aten.pow.Tensor_Scalar)
def _pow(L, n, x, e):
    h = L.operand(x, L.dt(n))
    if e == 2:
        return L.op("Mul", h, h)
    return L.op("Pow", h, L.const(e, onnx_dtype(L.dt(n))))


def _reduce(onnx_op):
    def fn(L, n, x, dims=None, keepdim=False, dtype=None):
        h = L.operand(x, L.dt(n))
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            return L.op(onnx_op, h, keepdims=int(keepdim))
        dims = [dims] if isinstance(dims, int) else list(dims)
        return L.op(onnx_op, h, L.ints(dims), keepdims=int(keepdim))
    return fn


for _t, _o in ((aten.mean.dim, "ReduceMean"), (aten.sum.dim_IntList, "ReduceSum"), (aten.amax.default, "ReduceMax"),
               (aten.amin.default, "ReduceMin")):
    lowers(_t)(_reduce(_o))


@lowers(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _view(L, n, x, shape):
    return L.op("Reshape", L.v(x), L.shape_of(list(shape)))


@lowers(aten.transpose.int)
def _transpose(L, n, x, a, b):
    r = L.rank(x)
    perm = list(range(r))
    a, b = a % r, b % r
    perm[a], perm[b] = perm[b], perm[a]
    return L.op("Transpose", L.v(x), perm=perm)


@lowers(aten.permute.default)
def _permute(L, n, x, dims):
    r = L.rank(x)
    return L.op("Transpose", L.v(x), perm=[d % r for d in dims])


@lowers(aten.t.default)
def _t(L, n, x):
    return L.op("Transpose", L.v(x), perm=[1, 0])


@lowers(aten.unsqueeze.default)
def _unsqueeze(L, n, x, dim):
    return L.op("Unsqueeze", L.v(x), L.ints([dim]))


@lowers(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(L, n, x, dims):
    return L.op("Squeeze", L.v(x), L.ints([dims] if isinstance(dims, int) else list(dims)))


@lowers(aten.expand.default)
def _expand(L, n, x, sizes, implicit=False):
    sizes = list(sizes)
    r = L.rank(x)
    if any(isinstance(s, int) and s == -1 for s in sizes):  # -1: keep the input's size (aligned right)
        xs = L.op("Shape", L.v(x))
        off = len(sizes) - r
        parts = []
        for i, s in enumerate(sizes):
            if isinstance(s, int) and s == -1:
                d = L.op("Slice", xs, L.ints([i - off]), L.ints([i - off + 1]))
                L.sym.add(d)
                parts.append(d)
            else:
                parts.append(L.v(s) if isinstance(s, fx.Node) else L.ints([s]))
        shape = L.op("Concat", *parts, axis=0)
    else:
        shape = L.shape_of(sizes)
    return L.op("Expand", L.v(x), shape)


@lowers(aten.slice.Tensor)
def _slice(L, n, x, dim=0, start=None, end=None, step=1):
    def one(v, default):
        v = default if v is None else v
        if isinstance(v, fx.Node):
            return L.v(v) if L.v(v) in L.sym else L.op("Reshape", L.v(v), L.ints([1]))
        return L.ints([min(v, 2 ** 63 - 1)])
    return L.op("Slice", L.v(x), one(start, 0), one(end, 2 ** 63 - 1), L.ints([dim]), L.ints([step]))


@lowers(aten.select.int)
def _select(L, n, x, dim, index):
    return L.op("Gather", L.v(x), L.const(index, I64), axis=dim)


@lowers(aten.index_select.default)
def _index_select(L, n, x, dim, index):
    return L.op("Gather", L.v(x), L.v(index), axis=dim)


@lowers(aten.cat.default)
def _cat(L, n, tensors, dim=0):
    dt = L.dt(n)
    return L.op("Concat", *(L.operand(t, dt) for t in tensors), axis=dim)


@lowers(aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
        aten.contiguous.default)
def _identity(L, n, x, *a, **k):
    return L.v(x)


@lowers(aten._to_copy.default, aten.to.dtype, aten.type_as.default)
def _to(L, n, x, *a, **k):
    return L.cast(L.v(x), L.dt(x), L.dt(n))


@lowers(aten._softmax.default, aten.softmax.int)
def _softmax(L, n, x, dim, *a, **k):
    return L.op("Softmax", L.operand(x, L.dt(n)), axis=dim)


@lowers(aten.matmul.default, aten.bmm.default, aten.mm.default)
def _matmul(L, n, a, b):
    return L.op("MatMul", L.v(a), L.v(b))


@lowers(aten.where.self)
def _where(L, n, c, a, b):
    dt = L.dt(n)
    return L.op("Where", L.v(c), L.operand(a, dt), L.operand(b, dt))


@lowers(aten.full.default)
def _full(L, n, size, value, dtype=None, layout=None, device=None, pin_memory=None):
    return L.op("Expand", L.const(value, onnx_dtype(L.dt(n))), L.shape_of(list(size)))


@lowers(aten.linear.default)
def _aten_linear(L, n, x, w, b=None):
    return _linear(L, n, x, w, b)


# ---- the ptqc dialect -----------------------------------------------------------------------------
@lowers(ops.LINEAR)
def _linear(L, n, x, w, b=None):
    if L.mode == "integer":
        from ptqc.lowering.onnx import integer

        out = integer.linear(L, n, x, w, b)
        if out is not None:
            return out
    if is_op(w, ops.DEQUANTIZE_WEIGHT) and w.name in L.skip:
        wt = weight_t(L, w)  # DequantizeLinear of the transposed codes: W^T [in, out]
    else:
        wt = L.op("Transpose", L.v(w), perm=[1, 0], name="w_t")
    y = L.op("MatMul", L.v(x), wt)
    if b is not None:
        y = L.op("Add", y, L.v(b))
    return y


def weight_t(L, dq: fx.Node) -> str:
    """W^T [in, out] of a dequantize_weight node read only by linears, as
    ``DequantizeLinear(Transpose(codes))`` (emitted once, named ``<dq>/T``). Transposing the float
    output instead would be ``Transpose(DequantizeLinear(int8))``, a pattern onnxruntime's
    transpose optimizer rewrites into an invalid graph (the model then fails to load)."""
    if dq.name in L._wt_cache:
        return L._wt_cache[dq.name]
    codes, scale, zero_point, group_size, dtype = dq.args
    saved, L.prefix = L.prefix, dq.name
    try:
        packed = _packed_codes(L, codes) if L.int4 else None
        cv = int4_weight(L, packed) if packed is not None else L.v(codes)
        n_in = L.shape(codes)[-1]
        if zero_point is not None:
            y = L.op("Transpose", explicit_dequantize(L, cv, scale, zero_point, group_size, n_in), perm=[1, 0],
                     name="T")
        else:
            ct = L.op("Transpose", cv, perm=[1, 0], name="codes_t")
            y = dequantize_linear(L, ct, scale, group_size, n_in, transposed=True, name="T")
        y = L.cast(y, torch.float32, _torch_dtype(dtype))
    finally:
        L.prefix = saved
    L._wt_cache[dq.name] = y
    return y


@lowers(ops.RMS_NORM)
def _rms_norm(L, n, x, w, eps, offset=0.0):
    dt = L.dt(x)
    h = L.cast(L.v(x), dt, torch.float32)
    ms = L.op("ReduceMean", L.op("Mul", h, h), L.ints([-1]), keepdims=1)
    h = L.op("Mul", h, L.op("Reciprocal", L.op("Sqrt", L.op("Add", ms, L.const(eps)))))
    if offset == 0.0:  # w * normed.to(input dtype), in the promoted dtype
        out_dt = L.dt(n)
        return L.op("Mul", L.cast(L.v(w), L.dt(w), out_dt), L.cast(h, torch.float32, out_dt))
    wf = L.cast(L.v(w), L.dt(w), torch.float32)
    return L.cast(L.op("Mul", h, L.op("Add", L.const(offset), wf)), torch.float32, dt)


@lowers(ops.ATTENTION)
def _attention(L, n, q, k, v, scale, causal=True, window=-1):
    """softmax(q k^T * scale + causal/window mask) v; GQA by viewing q as [B, Hkv, rep, S, D]."""
    H, Hkv, D = L.shape(q)[1], L.shape(k)[1], L.shape(q)[3]
    Dv = L.shape(v)[3]
    if not all(isinstance(d, int) for d in (H, Hkv, D, Dv)):
        raise PtqcError(f"node {n.name}: attention needs static head counts and head sizes")
    rep = H // Hkv
    qv, kv, vv = L.v(q), L.v(k), L.v(v)
    if rep > 1:
        qv = L.op("Reshape", qv, L.ints([0, Hkv, rep, -1, D]))
        kv = L.op("Unsqueeze", kv, L.ints([2]))
        vv = L.op("Unsqueeze", vv, L.ints([2]))
    r = 5 if rep > 1 else 4
    kt = L.op("Transpose", kv, perm=[*range(r - 2), r - 1, r - 2])
    s = L.op("Mul", L.op("MatMul", qv, kt), L.const(scale, onnx_dtype(L.dt(q))))
    if causal:
        sq = L.op("Squeeze", L.op("Shape", L.v(q), start=2, end=3), L.ints([0]))
        sk = L.op("Squeeze", L.op("Shape", L.v(k), start=2, end=3), L.ints([0]))
        zero, one = L.const(0, I64), L.const(1, I64)
        i = L.op("Add", L.op("Range", zero, sq, one), L.op("Sub", sk, sq))
        j = L.op("Range", zero, sk, one)
        i2 = L.op("Unsqueeze", i, L.ints([1]))
        j2 = L.op("Unsqueeze", j, L.ints([0]))
        mask = L.op("LessOrEqual", j2, i2)
        if window > 0:
            mask = L.op("And", mask, L.op("Greater", j2, L.op("Sub", i2, L.const(window, I64))))
        s = L.op("Where", mask, s, L.const(-math.inf, onnx_dtype(L.dt(q))))
    # softmax as torch's CPU flash kernel computes it: exp(s - max), weights @ v, then / sum
    e = L.op("Exp", L.op("Sub", s, L.op("ReduceMax", s, L.ints([-1]), keepdims=1)))
    o = L.op("Div", L.op("MatMul", e, vv), L.op("ReduceSum", e, L.ints([-1]), keepdims=1))
    if rep > 1:
        o = L.op("Reshape", o, L.ints([0, H, -1, Dv]))
    return o


def _packed_codes(L, codes) -> fx.Node | None:
    """The get_attr of packed int4 codes when ``codes`` is unpack_int4(get_attr) used only here."""
    if is_op(codes, ops.UNPACK_INT4) and isinstance(codes.args[0], fx.Node) and codes.args[0].op == "get_attr" \
            and len(codes.users) == 1:
        return codes.args[0]
    return None


def int4_weight(L, packed: fx.Node) -> str:
    """A packed int4 weight [out, in/2] (int8 bytes) as an ONNX INT4 initializer [out, in] (same bytes)."""
    shape, _ = L.qm.store.spec(packed.target)
    dims = [*shape[:-1], shape[-1] * 2]
    name = L.weight_name(packed)
    return L.add_init(name, TensorProto.INT4, dims, lambda t=packed.target: _bytes(L.qm.store[t]),
                      math.prod(shape))


@lowers(ops.UNPACK_INT4)
def _unpack_int4(L, n, packed):
    """int8 bytes -> two sign-extended int4 codes each (low nibble first), in integer ops."""
    if n.name in L.skip:
        return None
    r = L.rank(packed)
    x = L.op("Cast", L.v(packed), to=I32)
    u = L.op("BitwiseAnd", x, L.const(255, I32))

    def sext(v):
        return L.op("Where", L.op("GreaterOrEqual", v, L.const(8, I32)), L.op("Sub", v, L.const(16, I32)), v)
    lo = sext(L.op("BitwiseAnd", u, L.const(15, I32)))
    hi = sext(L.op("Div", u, L.const(16, I32)))
    both = L.op("Concat", L.op("Unsqueeze", lo, L.ints([-1])), L.op("Unsqueeze", hi, L.ints([-1])), axis=-1)
    return L.op("Cast", L.op("Reshape", both, L.ints([0] * (r - 1) + [-1])), to=I8)


def dequantize_linear(L, codes: str, scale: fx.Node, group: int, n_in: int, transposed: bool = False,
                      name: str | None = None) -> str:
    """DequantizeLinear of symmetric weight codes [out, in] (``transposed``: [in, out]) with ptqc
    scales [out, groups]: per channel (``axis`` = the output dim), per tensor (a scalar) or per
    group along the input dim (opset 21 ``block_size``). Int8 or INT4 codes."""
    n_out = L.qm.store.spec(scale.target)[0][0]
    if group in (0, n_in):
        dims, attrs = [n_out], {"axis": 1 if transposed else 0}
    elif group == -1:
        dims, attrs = [], {}
    else:
        dims, attrs = None, {"axis": 0 if transposed else 1, "block_size": group}
    s = L.v(scale)
    if dims is not None:
        s = L.op("Reshape", s, L.ints(dims))
    elif transposed:
        s = L.op("Transpose", s, perm=[1, 0])
    return L.op("DequantizeLinear", codes, s, None, name=name, **attrs)


def explicit_dequantize(L, codes: str, scale: fx.Node, zp: fx.Node, group: int, n_in: int) -> str:
    """``(Cast(q) - Cast(zp)) * scale`` on codes [out, in], exactly :func:`ptqc.quant.dequantize`.

    Used for asymmetric weights instead of DequantizeLinear with a zero point: onnxruntime 1.32's
    DequantizeLinear -> MatMul fusion (QDQSelectorActionTransformer, on by default) computes wrong
    results with signed int8/int4 zero points (errors of order 1 on unit-scale weights), so an
    exported model with them would be wrong in a default session."""
    q = L.op("Cast", codes, to=F32)
    z = L.op("Cast", L.v(zp), to=F32)
    s = L.v(scale)
    if group in (0, -1, n_in):  # scale and zero point [out, 1] / [1, 1] broadcast
        return L.op("Mul", L.op("Sub", q, z), s)
    qg = L.op("Reshape", q, L.ints([0, n_in // group, group]))
    yg = L.op("Mul", L.op("Sub", qg, L.op("Unsqueeze", z, L.ints([-1]))), L.op("Unsqueeze", s, L.ints([-1])))
    return L.op("Reshape", yg, L.ints([0, n_in]))


@lowers(ops.DEQUANTIZE_WEIGHT)
def _dequantize_weight(L, n, codes, scale, zero_point, group_size, dtype):
    if n.name in L.skip:  # fused into its readers: linears read W^T (weight_t), integer kernels the codes
        return None
    if L.rank(codes) != 2:
        raise PtqcError(f"node {n.name}: dequantize_weight of a {L.rank(codes)}-d tensor is not supported")
    packed = _packed_codes(L, codes) if L.int4 else None
    cv = int4_weight(L, packed) if packed is not None else L.v(codes)
    n_in = L.shape(codes)[-1]
    y = (explicit_dequantize(L, cv, scale, zero_point, group_size, n_in) if zero_point is not None
         else dequantize_linear(L, cv, scale, group_size, n_in))
    return L.cast(y, torch.float32, _torch_dtype(dtype))


def _grouped(L, h: str, rank: int, n_last: int, group: int) -> str:
    if group > 0 and group != n_last:
        return L.op("Reshape", h, L.ints([0] * (rank - 1) + [n_last // group, group]))
    return h


def _ungrouped(L, h: str, rank: int, n_last: int, group: int) -> str:
    if group > 0 and group != n_last:
        return L.op("Reshape", h, L.ints([0] * (rank - 1) + [n_last]))
    return h


def act_qparams(L, hg: str, bits: int, group: int, sym: bool, clip: float) -> tuple[str, str | None]:
    """Dynamic scale (and float zero point) of the grouped float32 activation ``hg``, exactly as
    :func:`ptqc.quant.compute_qparams` (symmetric: ``ReduceMax(Abs(x)) [* clip] / qmax``)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    axes = [] if group == -1 else [L.ints([-1])]
    if sym:
        amax = L.op("ReduceMax", L.op("Abs", hg), *axes, keepdims=1)
        if clip != 1.0:
            amax = L.op("Mul", amax, L.const(clip))
        s = L.op("Div", amax, L.const(float(qmax)))
        s = L.op("Where", L.op("Greater", s, L.const(0.0)), s, L.const(1.0), name="scale", dtype=F32)
        return s, None
    lo = L.op("ReduceMin", hg, *axes, keepdims=1)
    hi = L.op("ReduceMax", hg, *axes, keepdims=1)
    if clip != 1.0:
        lo, hi = L.op("Mul", lo, L.const(clip)), L.op("Mul", hi, L.const(clip))
    lo, hi = L.op("Min", lo, L.const(0.0)), L.op("Max", hi, L.const(0.0))
    s = L.op("Div", L.op("Sub", hi, lo), L.const(float((1 << bits) - 1)))
    s = L.op("Where", L.op("Greater", s, L.const(0.0)), s, L.const(1.0), name="scale", dtype=F32)
    z = L.op("Clip", L.op("Sub", L.const(float(qmin)), L.op("Round", L.op("Div", lo, s))),
             L.const(float(qmin)), L.const(float(qmax)))
    z = L.op("Cast", L.op("Cast", z, to=I8, name="zero_point", dtype=I8), to=F32)
    return s, z


def act_codes(L, hg: str, s: str, z: str | None, bits: int, offset: int = 0) -> str:
    """int8 codes: Div (never a reciprocal multiply) -> Round (half to even) [+ zp] -> Clip -> Cast.
    ``offset=128``: the codes + 128 as uint8 (``codes_u8``, for u8 MatMulInteger kernels)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = L.op("Round", L.op("Div", hg, s))
    if z is not None:
        q = L.op("Add", q, z)
    q = L.op("Clip", q, L.const(float(qmin)), L.const(float(qmax)))
    if offset:
        return L.op("Cast", L.op("Add", q, L.const(float(offset))), to=TensorProto.UINT8, name="codes_u8",
                    dtype=TensorProto.UINT8)
    return L.op("Cast", q, to=I8, name="codes", dtype=I8)


@lowers(ops.QUANTIZE_ACT)
def _quantize_act(L, n, x, scale, zero_point, bits, group, sym, clip=1.0):
    if n.name in L.skip:  # integer mode: every reader uses the codes directly
        return None
    dt = L.dt(x)
    h = L.cast(L.v(x), dt, torch.float32)
    if scale is None:  # dynamic
        r, last = L.rank(x), L.shape(x)[-1]
        hg = _grouped(L, h, r, last, group)
        s, z = act_qparams(L, hg, bits, group, sym, clip)
        q = L.op("Cast", act_codes(L, hg, s, z, bits), to=F32)
        if z is not None:
            q = L.op("Sub", q, z)
        y = _ungrouped(L, L.op("Mul", q, s), r, last, group)
    else:  # static: calibrated scale broadcast against x
        s = L.cast(L.v(scale), L.dt(scale), torch.float32)
        z = None if zero_point is None else L.op("Cast", L.v(zero_point), to=F32)
        q = L.op("Cast", act_codes(L, h, s, z, bits), to=F32)
        if z is not None:
            q = L.op("Sub", q, z)
        y = L.op("Mul", q, s)
    return L.cast(y, torch.float32, dt)


@lowers(ops.TRANSFORM)
def _transform(L, n, x, a, b=None):
    dt = L.dt(x)
    h = L.cast(L.v(x), dt, torch.float32)
    av = L.cast(L.v(a), L.dt(a), torch.float32)
    if b is None:
        return L.cast(L.op("MatMul", h, av), torch.float32, dt)
    bv = L.cast(L.v(b), L.dt(b), torch.float32)
    r = L.rank(x)
    n1, n2 = L.shape(a)[0], L.shape(b)[0]
    m1, m2 = L.shape(a)[1], L.shape(b)[1]
    hr = L.op("Reshape", h, L.ints([0] * (r - 1) + [n1, n2]))
    t = L.op("MatMul", L.op("MatMul", L.op("Transpose", av, perm=[1, 0]), hr), bv)  # (A^T X) B
    return L.cast(L.op("Reshape", t, L.ints([0] * (r - 1) + [m1 * m2])), torch.float32, dt)


# ---- the model ------------------------------------------------------------------------------------
def _dim(d):
    return {"B": "batch", "S": "seq"}.get(d, d) if isinstance(d, str) else d


def _value_info(L, name: str, fxnode: fx.Node | None):
    if fxnode is not None and "dtype" in fxnode.meta:
        shape = [(_dim(d) if d != "?" else None) for d in fxnode.meta.get("shape", [])]
        return helper.make_tensor_value_info(name, onnx_dtype(_torch_dtype(fxnode.meta["dtype"])), shape)
    if name in L.vtype and L.vtype[name][1] is not None:
        dtype, shape = L.vtype[name]
        return helper.make_tensor_value_info(name, dtype, [(_dim(d) if d != "?" else None) for d in shape])
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
    for n in qm.nodes(ops.DEQUANTIZE_WEIGHT):
        if all(is_op(u, ops.LINEAR) and u.args[1] is n and n not in u.args[2:] for u in n.users):
            L.skip.add(n.name)  # lowered by its linears as DequantizeLinear(Transpose(codes))
        c = n.args[0]
        if int4 and _packed_codes(L, c) is not None:
            L.skip.add(c.name)  # packed int4 codes read directly as an INT4 initializer
    if mode == "integer":
        from ptqc.lowering.onnx import integer

        integer.plan(L)
    inputs, outs = [], None
    for n in qm.graph.nodes:
        if n.op == "placeholder":
            if examples is not None:
                inputs.append(helper.make_tensor_value_info(n.name, onnx_dtype(examples[n.target].dtype),
                                                            list(examples[n.target].shape)))
            else:
                if n.meta.get("shape") is not None and len(n.meta["shape"]) != 2:
                    raise PtqcError(f"graph input {n.name} is not [batch, seq]")
                inputs.append(helper.make_tensor_value_info(n.name, I64, ["batch", "seq"]))
            L.env[n.name] = n.name
            L._names.add(n.name)
        elif n.op == "get_attr":
            continue
        elif n.op == "call_function":
            L.lower_node(n)
        elif n.op == "output":
            outs = n.args[0]
        else:
            raise PtqcError(f"unsupported node kind {n.op} ({n.name})")
    if outs is None:
        raise PtqcError("graph has no output node")
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    L.prefix = "output"
    for i, o in enumerate(outs):
        name = "logits" if len(outs) == 1 else f"output_{i}"
        L.nodes.append(helper.make_node("Identity", [L.v(o)], [name], name=name))
        L.graph_outputs.append(helper.make_tensor_value_info(
            name, onnx_dtype(_torch_dtype(o.meta["dtype"])), [_dim(d) if d != "?" else None for d in o.meta["shape"]]))
    by_name = {n.name: n for n in qm.graph.nodes}
    for name in outputs:
        if name in by_name and by_name[name].op == "get_attr":
            raise PtqcError(f"{name} is a weight, not a computed value")
        if name not in L._names or (name in by_name and name not in L.env):
            raise PtqcError(f"cannot expose {name!r}: no such value in the ONNX graph (FX nodes fused away: "
                            f"{', '.join(L.fused) or 'none'})")
        L.graph_outputs.append(_value_info(L, name, by_name.get(name)))
    L.graph_inputs = inputs
    return L


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


def export(qm: QModel, path, mode: str = "fake", *, outputs=(), external_data: bool | None = None,
           int4: bool = True, check: bool = True, examples: dict | None = None,
           int_kernel: str = "s8s8") -> ExportResult:
    """Write ``qm`` as an ONNX model at ``path`` (``.onnx``).

    ``outputs``: extra graph outputs (FX node names, or helper values such as
    ``<linear>/acc``). ``external_data``: weights in ``<path>.data`` next to the model (forced when
    the weights exceed 2 GB; None = only then). ``int4``: packed int4 codes as INT4 initializers.
    The file is written to a temporary name and renamed, then checked with ``onnx.checker``."""
    path = Path(path)
    L = build(qm, mode, outputs, int4, examples, int_kernel)
    total = sum(i.nbytes for i in L.inits.values())
    if external_data is None:
        external_data = total > TWO_GB - (64 << 20)
    elif not external_data and total > TWO_GB - (64 << 20):
        raise PtqcError(f"the weights take {total / 2**30:.2f} GiB: an ONNX file over 2 GB needs external data "
                        "(drop --no-external-data)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data_name = f"{path.name}.data"
    tmp_data = path.with_name(f".{data_name}.tmp-{os.getpid()}")
    tensors = []
    try:
        if external_data:
            with open(tmp_data, "wb") as f:
                off = 0
                for init in L.inits.values():
                    raw = init.data()
                    if len(raw) < EXTERNAL_MIN_BYTES:
                        tensors.append(_tensor_proto(init, raw, None))
                        continue
                    pad = (-off) % 64
                    f.write(b"\0" * pad)
                    off += pad
                    f.write(raw)
                    tensors.append(_tensor_proto(init, None, (data_name, off, len(raw))))
                    off += len(raw)
                    del raw
                    qm.store.release()
        else:
            for init in L.inits.values():
                tensors.append(_tensor_proto(init, init.data(), None))
            qm.store.release()
        graph = helper.make_graph(L.nodes, "ptqc", L.graph_inputs, L.graph_outputs, tensors)
        opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if L.uses_ms else [])
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="ptqc")
        helper.set_model_props(model, {"ptqc.mode": mode, "ptqc.source": str(qm.source),
                                       **({"ptqc.int_kernel": int_kernel} if mode == "integer" else {})})
        onnx.save_model(model, str(tmp))
        del model, graph, tensors
        if external_data:
            os.replace(tmp_data, path.with_name(data_name))
        os.replace(tmp, path)
    finally:
        for p in (tmp, tmp_data):
            if p.exists():
                p.unlink()
    if check:
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as e:
            raise PtqcError(f"the exported model does not pass onnx.checker: {str(e).splitlines()[0]}") from None
    return ExportResult(path=path, data_path=path.with_name(data_name) if external_data else None, mode=mode,
                        nodes=len(L.nodes), initializers=len(L.inits), weight_bytes=total,
                        outputs=[o.name for o in L.graph_outputs], fused=list(L.fused),
                        integer_linears=list(L.integer_linears), nbits_linears=list(L.nbits_linears))


__all__ = ["INT_KERNELS", "export", "export_graph", "build", "TABLE", "lowers", "Lowering", "ExportResult", "MODES", "OPSET"]


def export_graph(graph: fx.Graph, weights: dict, examples: dict, path, mode: str = "fake", **kw) -> ExportResult:
    """Export a bare FX graph (any placeholders, weights by get_attr target) with static shapes
    taken from ``examples``: lowers single ops or subgraphs, e.g. to test a translation."""
    from ptqc.model import WeightStore

    store = WeightStore()
    for k, t in weights.items():
        store[k] = t
    return export(QModel(graph=graph, store=store, config=None), path, mode, examples=examples, **kw)
