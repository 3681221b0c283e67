"""rotate's per-head V fold (part e of :mod:`ptqc.passes.rotate`): which rows of which linear make
each value head, and the o_proj that reads the attention output.

The value input of an attention op is followed back through shape ops to the linear that makes it.
Between them at most one op may *select* part of a wider output: a slice of the last dimension or one
piece of a split (Phi-3's fused ``qkv_proj`` sliced, GPT-NeoX's ``query_key_value`` viewed per head and
split, MLA's ``kv_b_proj`` split into K and V). The rows of each head are found by running that chain
on the row indices themselves, so any such layout is read exactly; the fold is refused (with the fix)
when another reader of the selected rows exists, since it would see them changed.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ptqc import ops
from ptqc.errors import PtqcError
from ptqc.ir import info, is_op
from ptqc.patterns import TRANSPARENT, activation_input
from ptqc.pipeline import _short

aten = torch.ops.aten
SELECT_OPS = {aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default, aten.narrow.default,
              operator.getitem}
FIX = "use rotate:v=false"


def where(n: fx.Node) -> str:
    """A node as rotate's messages name it: its module (or name) and op."""
    return f"{info(n).get('module') or n.name} ({_short(n.target)})"


def _chain(attn: fx.Node) -> list[fx.Node]:
    """[linear, ..., value input] of ``attn``: shape and select ops only, back to a linear."""
    out, cur = [], attn.args[2]
    while isinstance(cur, fx.Node) and not is_op(cur, ops.LINEAR):
        if cur.op != "call_function" or cur.target not in TRANSPARENT | SELECT_OPS:
            raise PtqcError(f"rotate: the value input of {where(attn)} comes from {where(cur)}, not from a "
                            f"linear through shape ops and one slice or split; {FIX}")
        out.append(cur)
        cur = cur.args[0]
    if not isinstance(cur, fx.Node):
        raise PtqcError(f"rotate: the value input of {where(attn)} does not come from a linear; {FIX}")
    return [cur, *reversed(out)]


def _run(n: fx.Node, env: dict):
    """``n`` on index tensors (batch and sequence sizes taken as 1; casts keep the indices)."""
    if n.target == aten._to_copy.default:
        return env[n.args[0]]

    def arg(a):
        if isinstance(a, fx.Node):
            if a in env:
                return env[a]
            if a.op == "call_function" and "sym_size" in str(a.target):
                return 1
            raise PtqcError(f"rotate: {where(n)} has a shape computed by {where(a)}; {FIX}")
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return a
    return n.target(*arg(n.args), **{k: arg(v) for k, v in n.kwargs.items()})


def v_rows(qm, attn: fx.Node) -> tuple[fx.Node, torch.Tensor]:
    """(the linear making ``attn``'s value input, its row index of each value head [heads_kv, head_dim])."""
    chain = _chain(attn)
    lin = chain[0]
    width = qm.store.spec(lin.args[1].target)[0][0]
    env = {lin: torch.arange(width, dtype=torch.float64).reshape(1, 1, width)}
    selects = 0
    for prev, n in zip(chain, chain[1:]):
        env[n] = _run(n, env)
        selects += n.target in SELECT_OPS and n.target is not operator.getitem
        others = [u for u in prev.users if u is not n]
        if others and not (n.target in SELECT_OPS):
            raise PtqcError(f"rotate: {where(prev)} on the value path of {where(attn)} has other readers; {FIX}")
        for u in others:  # siblings of the selection: they must read other rows only
            if u.target not in SELECT_OPS:
                raise PtqcError(f"rotate: {where(u)} reads the rows of {where(lin)} that make the values of "
                                f"{where(attn)}; {FIX}")
            env[u] = _run(u, env)
    if len(chain[-1].users) != 1:
        raise PtqcError(f"rotate: the value input of {where(attn)} has other readers; {FIX}")
    if selects > 1:
        raise PtqcError(f"rotate: the value input of {where(attn)} selects from {where(lin)} more than once; {FIX}")
    v = env[chain[-1]]
    if v.dim() != 4 or v.shape[0] != 1 or v.shape[2] != 1:
        raise PtqcError(f"rotate: cannot read the value heads of {where(attn)}; {FIX}")
    rows = v[0, :, 0, :].long()
    mine = set(rows.flatten().tolist())
    for u, t in env.items():
        if u not in chain and isinstance(t, torch.Tensor) and mine & set(t.flatten().long().tolist()):
            raise PtqcError(f"rotate: {where(u)} reads rows of {where(lin)} that make the values of "
                            f"{where(attn)}; {FIX}")
    return lin, rows


def v_fold(qm, attn: fx.Node) -> tuple[fx.Node, torch.Tensor, fx.Node]:
    """(value linear, its rows per value head [heads_kv, d], the o_proj reading ``attn``), checked for an
    exact per-head fold: the rows are distinct, the output reaches one o_proj through shape ops only."""
    lin, rows = v_rows(qm, attn)
    if len(set(rows.flatten().tolist())) != rows.numel():
        raise PtqcError(f"rotate: the value heads of {where(attn)} repeat rows of {where(lin)}; {FIX}")
    o_lins = [n for n in qm.linears() if activation_input(n) is attn]
    if len(o_lins) != 1 or not _only_shape_ops(attn, o_lins[0].args[0]):
        raise PtqcError(f"rotate: the output of {where(attn)} does not go to one o_proj through shape ops only; {FIX}")
    heads, d = attn.meta["shape"][1], attn.meta["shape"][3]
    o_in = qm.store.spec(o_lins[0].args[1].target)[0][1]
    if d != rows.shape[1] or o_in != heads * d:
        raise PtqcError(f"rotate: {where(o_lins[0])} input width {o_in} does not match {heads} heads of "
                        f"{rows.shape[1]} values; {FIX}")
    return lin, rows, o_lins[0]


def _only_shape_ops(src: fx.Node, dst: fx.Node) -> bool:
    cur = dst
    while cur is not src:
        if not (isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in TRANSPARENT
                and len(cur.users) == 1):
            return False
        cur = cur.args[0]
    return len(src.users) == 1
