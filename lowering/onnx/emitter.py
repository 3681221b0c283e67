"""The FX -> ONNX emitter: a :class:`Lowering` holds one export's nodes, initializers and FX node
-> ONNX value names and emits ``TABLE[node.target]`` for each FX node (the translations are in
:mod:`.aten` and :mod:`.dialect`; naming rules in :mod:`ptqc.lowering.onnx.export`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper

from ptqc.errors import PtqcError
from ptqc.ir import QModel

OPSET = 21  # DequantizeLinear block_size and int4 types
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10
MODES = ("fake", "integer")
INT_KERNELS = ("s8s8", "u8s8", "u8u8")  # MatMulInteger operand types in mode="integer"

DTYPES = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
    torch.int16: TensorProto.INT16, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
    torch.bool: TensorProto.BOOL, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,  # MX weight elements
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
        produced = next((k for k in range(len(self.nodes) - 1, start - 1, -1) if out in self.nodes[k].output), None)
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
