"""ONNX translations of aten and Python (symbolic size) ops, registered in :data:`TABLE`."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ptqc.errors import PtqcError
from ptqc.lowering.onnx.emitter import I64, TABLE, _op_name, lowers, onnx_dtype

aten = torch.ops.aten


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


@lowers(aten.silu.default)
def _silu(L, n, x):
    h = L.v(x)  # x / (1 + exp(-x)), the formula of torch's CPU kernel
    one = L.const(1, onnx_dtype(L.dt(x)))
    return L.op("Div", h, L.op("Add", one, L.op("Exp", L.op("Neg", h))))


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


@lowers(aten.transpose.int)
def _transpose(L, n, x, a, b):
    r = L.rank(x)
    perm = list(range(r))
    a, b = a % r, b % r
    perm[a], perm[b] = perm[b], perm[a]
    return L.op("Transpose", L.v(x), perm=perm)


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


TABLE.update({  # one-line translations
    aten.embedding.default: lambda L, n, w, ids, *a, **k: L.op("Gather", L.v(w), L.v(ids), axis=0),
    aten.rsqrt.default: lambda L, n, x: L.op("Reciprocal", L.op("Sqrt", L.operand(x, L.dt(n)))),
    aten.gelu.default: lambda L, n, x, approximate="none": L.op("Gelu", L.v(x), approximate=approximate),
    aten.permute.default: lambda L, n, x, dims: L.op("Transpose", L.v(x), perm=[d % L.rank(x) for d in dims]),
    aten.t.default: lambda L, n, x: L.op("Transpose", L.v(x), perm=[1, 0]),
    aten.unsqueeze.default: lambda L, n, x, dim: L.op("Unsqueeze", L.v(x), L.ints([dim])),
    aten.select.int: lambda L, n, x, dim, index: L.op("Gather", L.v(x), L.const(index, I64), axis=dim),
    aten.index_select.default: lambda L, n, x, dim, index: L.op("Gather", L.v(x), L.v(index), axis=dim),
    aten.cat.default: lambda L, n, tensors, dim=0: L.op("Concat", *(L.operand(t, L.dt(n)) for t in tensors), axis=dim),
    aten.where.self: lambda L, n, c, a, b: L.op("Where", L.v(c), L.operand(a, L.dt(n)), L.operand(b, L.dt(n))),
    aten.full.default: lambda L, n, size, value, **k: L.op("Expand", L.const(value, onnx_dtype(L.dt(n))),
                                                           L.shape_of(list(size))),
    **dict.fromkeys((aten.view.default, aten.reshape.default, aten._unsafe_view.default),
                    lambda L, n, x, shape: L.op("Reshape", L.v(x), L.shape_of(list(shape)))),
    **dict.fromkeys((aten.squeeze.dim, aten.squeeze.dims), lambda L, n, x, dims: L.op(
        "Squeeze", L.v(x), L.ints([dims] if isinstance(dims, int) else list(dims)))),
    **dict.fromkeys((aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
                     aten.contiguous.default), lambda L, n, x, *a, **k: L.v(x)),
    **dict.fromkeys((aten._to_copy.default, aten.to.dtype, aten.type_as.default),
                    lambda L, n, x, *a, **k: L.cast(L.v(x), L.dt(x), L.dt(n))),
    **dict.fromkeys((aten._softmax.default, aten.softmax.int),
                    lambda L, n, x, dim, *a, **k: L.op("Softmax", L.operand(x, L.dt(n)), axis=dim)),
    **dict.fromkeys((aten.matmul.default, aten.bmm.default, aten.mm.default),
                    lambda L, n, a, b: L.op("MatMul", L.v(a), L.v(b))),
})
