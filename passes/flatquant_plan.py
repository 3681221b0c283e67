"""flatquant's plan: per decoder layer, the groups of linears sharing one input and the transform
each group gets (see :mod:`ptqc.passes.flatquant` for where the transforms go)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ptqc import ops
from ptqc.ir import info, is_op
from ptqc.passes.flatquant_model import kron_dims
from ptqc.patterns import TRANSPARENT, producer_linear
from ptqc.weights import in_features


@dataclass
class Group:
    gid: str  # key of its parameters, e.g. "qkv"
    kind: str  # "norm" (qkv, gate/up), "down" (scale folded into the producer linear), "o", "online"
    module: str  # module path of the transform, e.g. model.layers.0.self_attn.qkv_transform
    src: fx.Node  # the value the linears read
    lins: list  # every linear reading src
    selected: dict  # linear name -> options (quantized ones)
    prev: fx.Node | None  # where 1/s folds: the norm, or the producing linear (up_proj); None: no scale
    dims: tuple  # Kronecker factors (o: heads, head_dim)
    a_opts: object = None  # options of the activation quantizer (None: float input)
    v_lin: fx.Node | None = None  # o: the v_proj whose output rows get the per-head transform


@dataclass
class LayerPlan:
    layer: int
    opts: object  # options of the layer's first selected linear (epochs, lr, alpha, clip)
    groups: list
    attn: fx.Node | None = None  # attention node of the K transform
    head_dim: int = 0

    def linears(self) -> list:
        """Every linear whose weights change: the groups', v_proj (o's per-head fold), up_proj (down's scale)."""
        out = [n for g in self.groups for n in g.lins]
        extra = [g.v_lin for g in self.groups] + [g.prev for g in self.groups if is_op(g.prev, ops.LINEAR)]
        return out + [n for n in dict.fromkeys(extra) if n is not None and n not in out]


def _module_parent(m: str) -> str:
    return m.rsplit(".", 1)[0] if "." in m else m


def _only_feeds(node: fx.Node, target: fx.Node, arg: int) -> bool:
    """Does ``node``'s value reach nothing but ``target.args[arg]`` (through shape ops)?"""
    users = list(node.users)
    if len(users) != 1:
        return False
    u = users[0]
    if u is target:
        return target.args[arg] is node and list(target.args).count(node) == 1
    return u.op == "call_function" and u.target in TRANSPARENT and u.args[0] is node and _only_feeds(u, target, arg)


def _skip_to(n):
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in TRANSPARENT:
        n = n.args[0]
    return n


def _heads(cfg) -> tuple[int, int]:
    heads = getattr(cfg, "num_attention_heads", 0)
    return heads, getattr(cfg, "num_key_value_heads", None) or heads


def plan_layers(qm, selected: dict) -> dict[int, LayerPlan]:
    """The plan of every decoder layer with a selected linear (``selected``: linear name -> options)."""
    readers: dict = {}
    for n in qm.linears():
        if info(n).get("layer") is not None:
            readers.setdefault(n.args[0], []).append(n)
    plans: dict[int, LayerPlan] = {}
    for src, lins in readers.items():
        sel = {n.name: selected[n.name] for n in lins if n.name in selected}
        if sel:
            layer = info(lins[0])["layer"]
            plans.setdefault(layer, LayerPlan(layer, None, [])).groups.append(_group(qm, src, lins, sel))
    order = {n.name: i for i, n in enumerate(qm.graph.nodes)}
    for pl in plans.values():
        first = min((n for g in pl.groups for n in g.lins if n.name in selected), key=lambda n: order[n.name])
        pl.opts = selected[first.name]
        if pl.opts.k_transform:
            _k_transform(qm, pl)
    return dict(sorted(plans.items()))


def _group(qm, src: fx.Node, lins: list, sel: dict) -> Group:
    """The group of the linears ``lins`` reading ``src`` (``sel``: the selected ones' options)."""
    layer = info(lins[0])["layer"]
    roles = {info(n).get("role") for n in lins}
    n_in = in_features(qm, lins[0])
    prev, v_lin, dims = None, None, kron_dims(n_in)
    if is_op(src, ops.RMS_NORM) and set(src.users) == set(lins):
        kind, prev = "norm", src
        gid = ("qkv" if roles <= {"q", "k", "v"} else "up_gate" if roles <= {"gate", "up"}
               else "norm_" + src.name)
    elif roles == {"down"} and len(lins) == 1:
        kind, gid = "online", "down"
        up = producer_linear(qm, lins[0])
        if (is_op(src, torch.ops.aten.mul.Tensor) and up is not None and len(src.users) == 1
                and list(up.users) == [src] and info(up).get("layer") == layer):
            kind, prev = "down", up
    elif roles == {"o"} and len(lins) == 1:
        kind, gid = "online", "o"
        v = producer_linear(qm, lins[0])
        attn = _skip_to(src)
        heads, kv_heads = _heads(qm.config)
        d = getattr(qm.config, "head_dim", None) or (n_in // heads if heads else 0)
        if (v is not None and is_op(attn, ops.ATTENTION) and heads and d and heads * d == n_in
                and info(v).get("layer") == layer and _only_feeds(v, attn, 2)
                and qm.store.spec(v.args[1].target)[0][0] == kv_heads * d):
            kind, v_lin, dims = "o", v, (heads, d)
    else:
        kind, gid = "online", f"online_{src.name}"
    a_opts = next(iter(sel.values()))
    gname = {"qkv": "qkv_transform", "up_gate": "up_gate_transform", "down": "down_transform",
             "o": "o_transform"}.get(gid, f"{gid}_transform")
    return Group(gid, kind, f"{_module_parent(info(lins[0])['module'])}.{gname}", src, lins, sel, prev, dims,
                 a_opts if a_opts.a_bits < 16 else None, v_lin)


def _k_transform(qm, pl: LayerPlan) -> None:
    """Give ``pl`` the K-cache transform of its attention node (when it has one, of a known head_dim)."""
    cfg = qm.config
    heads, _ = _heads(cfg)
    attn = list(qm.nodes(ops.ATTENTION, layer=pl.layer))
    d = (attn[0].args[0].meta.get("shape") or [None])[-1] if len(attn) == 1 else None
    d = d if isinstance(d, int) else getattr(cfg, "head_dim", None) or (
        getattr(cfg, "hidden_size", 0) // heads if heads else 0)
    if len(attn) == 1 and d:
        pl.attn, pl.head_dim = attn[0], int(d)
