"""rotate: QuaRot-style orthogonal rotations (Ashkboos et al., 2024), exact in float.

Multiplying an activation by an orthogonal Q spreads outlier channels over all of them, and the
inverse folds into the weights, so the float model is unchanged. Run it before any quantization:

a. Norm fusion: each RMSNorm's ``offset + w`` into the columns of the linears it feeds (the final
   norm into lm_head), its weight set to ``1 - offset``; ``x / rms(x)`` commutes with Q.
   LayerNorm models (QuaRot's trick): the stream is centered first (embedding rows, writers' output
   rows and biases minus their mean), so each LayerNorm equals an RMSNorm plus its bias; the norm
   becomes ``ptqc.rms_norm`` and its bias ``b`` moves into the readers' biases (``c + W b``).
b. Residual rotation (``residual=hadamard``: randomized Hadamard from ``seed``; ``orthogonal``:
   a random QR, for sizes without a Hadamard factorization): embeddings and readers (q, k, v, fused
   qkv / gate_up, gate, up, MLA's q_a / kv_a, MoE routers and shared-expert gates, lm_head)
   ``W <- W Q``; writers (o_proj, down_proj) ``W <- Q^T W``, ``b <- b Q``. An MoE expert op reads
   (gate/up stacks [E, I, H] ``W <- W Q``) and writes (down stacks ``W <- Q^T W``).
   lm_head is untied from the embedding (both are saved).
c. ``online_down``: ``ptqc.transform`` by the intermediate-size Hadamard on down_proj's input,
   folded into its weight.
d. ``qk``: the head_dim Hadamard online on attention's q and k after RoPE (scores unchanged, the
   K cache the ``kv`` pass quantizes has no outlier channels).
e. ``v``: a per-head Hadamard folded into the value rows (and bias) and o_proj's columns (exact
   with grouped-query attention too): v_proj's, or the rows of a fused qkv / MLA kv_b that make
   each value head (:mod:`ptqc.passes.rotate_heads`).

Everything is checked before any weight changes: the residual stream is followed from the
embedding through adds, scalar (or per-token) multiplies and shape ops, and any other reader (a norm
feeding a non-linear, Gemma-2's post-norms...) is refused with the node named, as is a size
without a Hadamard factorization (naming the option that avoids it). Weights are edited in
float64 and written once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.fx as fx

from ptqc import hadamard, ops
from ptqc.errors import PtqcError
from ptqc.ir import info, is_op
from ptqc.norms import is_norm
from ptqc.passes import rotate_heads
from ptqc.patterns import TRANSPARENT
from ptqc.pipeline import Pass, PassResult, _short, register

aten = torch.ops.aten

READERS = ("q", "k", "v", "qkv", "gate", "up", "gate_up", "lm_head", "q_a", "kv_a",  # reading the residual
           "router", "shared_expert_gate")  # stream (W <- W Q); MoE expert stacks: gate/up read, down writes
WRITERS = ("o", "down")  # linears adding to it (W <- Q^T W)
# shape ops that may keep each row of the last dimension intact (checked on the recorded shapes)
ROW_OPS = TRANSPARENT


# ---- which nodes carry the residual stream ----------------------------------------------------
@dataclass
class ResidualPlan:
    hidden: int
    embeds: list[fx.Node] = field(default_factory=list)  # aten.embedding (weight [vocab, hidden])
    norms: dict = field(default_factory=dict)  # rms_norm / layer_norm on the stream -> linears it feeds
    readers: list[fx.Node] = field(default_factory=list)
    direct: list[fx.Node] = field(default_factory=list)  # readers of the stream itself (no norm between)
    writers: list[fx.Node] = field(default_factory=list)


_where = rotate_heads.where


def _keeps_rows(n: fx.Node, hidden: int) -> bool:
    """A shape op whose output rows (last dim, size ``hidden``) are its input's rows."""
    if n.target not in ROW_OPS or n.kwargs.keys() - {"dtype", "memory_format"}:
        return False
    src = n.args[0]
    s_in, s_out = src.meta.get("shape"), n.meta.get("shape")
    if not s_in or not s_out or s_in[-1] != hidden or s_out[-1] != hidden:
        return False
    if n.target == aten.transpose.int:
        return all(d % len(s_in) != len(s_in) - 1 for d in n.args[1:3])
    if n.target == aten.permute.default:
        return n.args[1][-1] % len(s_in) == len(s_in) - 1
    return True


def _is_scalar(a) -> bool:
    """A number, or a tensor constant along the hidden dimension (a scale per token, Qwen2-MoE's shared
    expert gate): multiplying a row by it commutes with rotating the row."""
    if isinstance(a, (int, float)):
        return True
    shape = a.meta.get("shape") if isinstance(a, fx.Node) else None
    return shape is not None and (len(shape) == 0 or shape[-1] == 1)


def stream_weights(n: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(weights reading the stream W [.., out, hidden], weights writing it W [.., hidden, in]) of a linear
    or an MoE expert op, by what it does; the bias goes with a writer."""
    if is_op(n, ops.MOE_EXPERTS):
        return [n.args[3], n.args[4]], [n.args[5]]
    return ([], [n.args[1]]) if info(n).get("role") in WRITERS else ([n.args[1]], [])


def _add_experts(n: fx.Node, ins: list[fx.Node], kind: dict, plan: ResidualPlan) -> None:
    """An MoE expert op reads the stream (gate/up stacks) and writes to it (down stacks)."""
    if ins != [n.args[0]]:
        raise PtqcError(f"rotate: {_where(n)} reads the residual stream other than as its input")
    plan.readers.append(n)
    plan.writers.append(n)
    kind[n] = "res"
    if isinstance(kind[ins[0]], fx.Node):
        plan.norms[kind[ins[0]]].append(n)
    else:
        plan.direct.append(n)


def _add_linear(n: fx.Node, ins: list[fx.Node], kind: dict, plan: ResidualPlan) -> None:
    """A linear writes to the stream (o, down) or reads it (READERS), nothing else."""
    role = info(n).get("role")
    if role in WRITERS:
        if ins:
            raise PtqcError(f"rotate: {_where(n)} ({role}) reads the residual stream; expected it to write to it")
        kind[n] = "res"
        plan.writers.append(n)
    elif ins:
        if role not in READERS or ins != [n.args[0]]:
            raise PtqcError(f"rotate: {_where(n)} (role {role}) reads the residual stream; only "
                            f"{', '.join(READERS)} linears may")
        plan.readers.append(n)
        if isinstance(kind[ins[0]], fx.Node):  # the norm behind its input
            plan.norms[kind[ins[0]]].append(n)
        else:
            plan.direct.append(n)


def _stream_kind(n: fx.Node, ins: list[fx.Node], kind: dict, plan: ResidualPlan):
    """What a non-linear node reading the stream carries: "res", or the rms_norm it normalizes."""
    normed = [kind[a] for a in ins if isinstance(kind[a], fx.Node)]  # the norm(s) behind n's inputs
    if normed:  # a normalized value may only reach linears, through shape ops
        if len(ins) == 1 and _keeps_rows(n, plan.hidden):
            return normed[0]
        raise PtqcError(f"rotate: {_where(normed[0])} feeds {_where(n)}, not only linears: its weight cannot "
                        "be folded into the next linears, so this architecture cannot be rotated")
    if is_norm(n) and ins == [n.args[0]]:
        plan.norms[n] = []
        return n
    if (n.target == aten.add.Tensor and not n.kwargs and len(ins) == 2 and list(n.args) == ins
            or n.target == aten.mul.Tensor and len(ins) == 1 and _is_scalar(n.args[1 - n.args.index(ins[0])])
            or len(ins) == 1 and _keeps_rows(n, plan.hidden)):  # the mul: Gemma's embedding scale commutes with Q
        return "res"
    raise PtqcError(f"rotate: {_where(n)} reads the residual stream; only adds, scalar multiplies, "
                    "norms and the q/k/v/gate/up/lm_head linears may (a rotation would change its result)")


def residual_plan(qm) -> ResidualPlan:
    """Follow the residual stream from the token embedding through the graph and list the
    embeddings, norms, readers and writers to rotate. Raises PtqcError naming the first node
    that reads the stream in a way a rotation would change."""
    kind: dict[fx.Node, object] = {}  # node -> "res" (rotated residual) or the rms_norm it normalizes
    plan: ResidualPlan | None = None
    for n in qm.graph.nodes:
        if n.op == "output" and any(a in kind for a in n.all_input_nodes):
            raise PtqcError("rotate: the graph returns the residual stream itself, not logits from lm_head")
        if n.op != "call_function":
            continue
        if n.target == aten.embedding.default and info(n).get("role") == "embed":
            w = n.args[0]
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                raise PtqcError(f"rotate: {_where(n)} does not read a plain embedding table")
            hidden = qm.store.spec(w.target)[0][1]
            if plan is None:
                plan = ResidualPlan(hidden)
            elif hidden != plan.hidden:
                raise PtqcError(f"rotate: embeddings of widths {plan.hidden} and {hidden}")
            plan.embeds.append(n)
            kind[n] = "res"
            continue
        ins = [a for a in n.all_input_nodes if a in kind]
        if plan is None and (ins or is_op(n, ops.LINEAR)):
            raise PtqcError(f"rotate: {_where(n)} comes before the token embedding; cannot follow the residual stream")
        if is_op(n, ops.LINEAR):
            _add_linear(n, ins, kind, plan)
        elif is_op(n, ops.MOE_EXPERTS) and ins:
            _add_experts(n, ins, kind, plan)
        elif ins:
            kind[n] = _stream_kind(n, ins, kind, plan)
    if plan is None:
        raise PtqcError("rotate: no token embedding (role embed) found; nothing to rotate")
    if not plan.readers or not plan.writers:
        raise PtqcError("rotate: found no linears reading or writing the residual stream")
    for norm, lins in plan.norms.items():
        if not lins:
            raise PtqcError(f"rotate: {_where(norm)} feeds no linear; its weight cannot be folded")
    _check_centering(plan)
    for n in dict.fromkeys(plan.readers + plan.writers):
        reads, writes = stream_weights(n)
        for w, dim in [(w, -1) for w in reads] + [(w, -2) for w in writes]:
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                raise PtqcError(f"rotate: {_where(n)} has a transformed/quantized weight; run rotate before quantization")
            shape = qm.store.spec(w.target)[0]
            if shape[dim] != plan.hidden:
                raise PtqcError(f"rotate: {_where(n)} has weight {list(shape)}, not matching hidden size {plan.hidden}")
    return plan


def _check_centering(plan: ResidualPlan) -> None:
    """LayerNorms become RMSNorms on a centered stream: only if every norm on it is a LayerNorm with a
    weight and nothing reads the stream without a norm (centering would change what it reads)."""
    lns = [n for n in plan.norms if is_op(n, ops.LAYER_NORM)]
    if not lns:
        return
    rms = [n for n in plan.norms if not is_op(n, ops.LAYER_NORM)]
    if rms:
        raise PtqcError(f"rotate: {_where(lns[0])} is a LayerNorm and {_where(rms[0])} an RMSNorm on the same "
                        "residual stream; centering the stream for the LayerNorms would change the RMSNorm")
    if plan.direct:
        raise PtqcError(f"rotate: {_where(plan.direct[0])} reads the residual stream without a norm; centering "
                        "the stream for its LayerNorms would change what it reads")
    for n in lns:
        if n.args[1] is None:
            raise PtqcError(f"rotate: {_where(n)} is a LayerNorm without a weight")


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _factor(n: int, what: str, fix: str) -> tuple[int, int]:
    try:
        return hadamard.factor(n, what, fix)
    except PtqcError as e:
        raise PtqcError(f"rotate: {e}") from None


def _online_hadamard(qm, before: fx.Node, xs, base: str, n: int) -> tuple[torch.Tensor, list[fx.Node]]:
    """Store ``base_a``/``base_b`` (float32 factors of hadamard(n)), insert ``ptqc.transform(x, a, b)`` before
    ``before`` for each of ``xs``; return the exact float64 ``a kron b`` (for a fold) and the transforms."""
    a, b = (t.float().contiguous() for t in hadamard.kron_factors(n))
    qm.store[f"{base}_a"], qm.store[f"{base}_b"] = a, b
    g, meta, ts = qm.graph, info(before), []
    with g.inserting_before(before):
        for x in xs:
            ts.append(g.call_function(ops.TRANSFORM, (x, g.get_attr(f"{base}_a"), g.get_attr(f"{base}_b"))))
            info(ts[-1]).update({"module": meta["module"], "layer": meta.get("layer"), "role": "online_hadamard"})
    return torch.kron(a.double(), b.double()), ts


def _rows_op(w: torch.Tensor, rows: torch.Tensor, fn) -> torch.Tensor:
    """``w`` with its ``rows`` [heads, d] replaced by ``fn`` of them (as [heads, d, in])."""
    out = w.clone()
    out[rows.flatten()] = fn(w[rows.flatten()].reshape(*rows.shape, w.shape[-1])).reshape(-1, w.shape[-1])
    return out


@dataclass
class _Rewrite:
    """A model's weight edits per tensor name (applied in order in float64, written once) and summary per layer."""
    qm: object
    fns: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = field(default_factory=dict)
    layers: dict = field(default_factory=dict)

    def edit(self, name: str, fn) -> None:
        self.fns.setdefault(name, []).append(fn)

    def layer(self, n: fx.Node) -> dict:
        return self.layers.setdefault(info(n).get("layer"), {})

    def center(self, plan: ResidualPlan) -> None:
        """a. (LayerNorm models) Subtract the mean over the hidden channels from everything written to the
        stream: embedding rows, writers' weight columns and biases; each LayerNorm then reads it unchanged."""
        for e in plan.embeds:
            self.edit(e.args[0].target, lambda w: w - w.mean(-1, keepdim=True))
        for n in plan.writers:
            for w in stream_weights(n)[1]:
                self.edit(w.target, lambda w: w - w.mean(-2, keepdim=True))
            b = _arg(n, 2, "b") if is_op(n, ops.LINEAR) else None
            if b is not None:
                self.edit(b.target, lambda v: v - v.mean())
        self.layers.setdefault(None, {})["centered"] = len(plan.embeds) + len(plan.writers)

    def fuse_norms(self, plan: ResidualPlan) -> None:
        """a. Each norm's ``offset + w`` into the columns of the linears it feeds; its weight to ``1 - offset``.
        A LayerNorm's bias ``b`` goes into its readers' biases (``c + W b``), the norm becomes an RMSNorm."""
        for norm, lins in plan.norms.items():
            offset = float(_arg(norm, 3, "offset", 0.0)) if is_op(norm, ops.RMS_NORM) else 0.0
            w_name = norm.args[1].target
            scale = self.qm.store[w_name].double() + offset
            for lin in lins:
                for w in stream_weights(lin)[0]:
                    self.edit(w.target, lambda w, s=scale: w * s)
            self.edit(w_name, lambda w, v=1.0 - offset: torch.full_like(w, v))
            if is_op(norm, ops.LAYER_NORM):
                self._layer_norm_to_rms(norm, lins)
            roles = "/".join(str(info(n)["role"]) for n in lins)
            self.layer(norm).setdefault("fused", []).append(f"{info(norm).get('role')} -> {roles}")

    def _layer_norm_to_rms(self, norm: fx.Node, lins: list[fx.Node]) -> None:
        """The bias of ``norm`` into its readers' biases (a zero bias made where a reader has none),
        then ``ptqc.rms_norm(x, w, eps)`` in its place (exact on the centered stream)."""
        x, w, b, eps = norm.args
        g, store = self.qm.graph, self.qm.store
        for lin in lins if b is not None else ():
            if not is_op(lin, ops.LINEAR):
                raise PtqcError(f"rotate: {_where(norm)} has a bias and feeds {_where(lin)}, which has none to take it")
            shift = store[lin.args[1].target].double() @ store[b.target].double()
            c = _arg(lin, 2, "b")
            if c is None:
                name = f"{info(lin)['module']}.bias"
                store[name] = torch.zeros(shift.shape, dtype=self.qm.dtype)
                with g.inserting_before(lin):
                    c = g.get_attr(name)
                lin.args = (lin.args[0], lin.args[1], c, *lin.args[3:])
            self.edit(c.target, lambda v, s=shift: v + s)
        with g.inserting_before(norm):
            rms = g.call_function(ops.RMS_NORM, (x, w, float(eps)))
        rms.meta.update(norm.meta)
        norm.replace_all_uses_with(rms)
        g.erase_node(norm)
        if b is not None and not b.users:
            g.erase_node(b)

    def rotate_residual(self, plan: ResidualPlan, Q: torch.Tensor) -> None:
        """b. Embeddings and readers ``W <- W Q``; writers ``W <- Q^T W``, ``b <- b Q``."""
        for e in plan.embeds:
            self.edit(e.args[0].target, lambda w: w @ Q)
        for n in plan.readers:
            for w in stream_weights(n)[0]:
                self.edit(w.target, lambda w: w @ Q)
            self.layer(n).setdefault("readers", []).append(info(n)["role"])
        for n in plan.writers:
            for w in stream_weights(n)[1]:
                self.edit(w.target, lambda w: Q.t() @ w)
            b = _arg(n, 2, "b") if is_op(n, ops.LINEAR) else None
            if b is not None:
                self.edit(b.target, lambda v: v @ Q)
            self.layer(n).setdefault("writers", []).append(info(n)["role"])

    def online_hadamards(self, downs: list[fx.Node], qk_dims: dict[fx.Node, int]) -> None:
        """c. Online Hadamards on down_proj's input (folded into its weight); d. on q and k, after RoPE."""
        for n in downs:
            H, (t,) = _online_hadamard(self.qm, n, [n.args[0]], f"{info(n)['module']}.hadamard",
                                       self.qm.store.spec(n.args[1].target)[0][1])
            n.args = (t, *n.args[1:])
            self.edit(n.args[1].target, lambda w, H=H: w @ H)
            self.layer(n)["online_down"] = H.shape[0]
        for attn, d in qk_dims.items():
            _, (q, k) = _online_hadamard(self.qm, attn, attn.args[:2], f"{info(attn)['module']}.qk_hadamard", d)
            attn.args = (q, k, *attn.args[2:])
            self.layer(attn)["qk"] = d

    def fold_v(self, v_folds: dict) -> None:
        """e. A per-head Hadamard folded into the value rows of their linear (and bias; the rows of each
        head as :func:`rotate_heads.v_rows` found them) and o_proj's columns."""
        for attn, (v_lin, rows, o_lin) in v_folds.items():
            d = rows.shape[1]
            Hd = hadamard.hadamard(d)
            self.edit(v_lin.args[1].target, lambda w, H=Hd, r=rows: _rows_op(w, r, lambda x: H.t() @ x))
            b = _arg(v_lin, 2, "b")
            if b is not None:
                self.edit(b.target, lambda v, H=Hd, r=rows: _rows_op(v[:, None], r, lambda x: H.t() @ x)[:, 0])
            self.edit(o_lin.args[1].target, lambda w, H=Hd, d=d: (w.reshape(w.shape[0], -1, d) @ H).reshape(w.shape))
            self.layer(attn)["v"] = d

    def apply(self) -> list[str]:
        """Untie aliases of edited tensors, then write every edited tensor; returns the untied aliases."""
        store, untied = self.qm.store, []
        for alias, target in list(store.aliases.items()):
            if alias in self.fns or target in self.fns:  # e.g. lm_head.weight -> model.embed_tokens.weight
                store[alias] = store[alias]  # materialize: the two now get different edits
                untied.append(alias)
        for name, fns in self.fns.items():
            t = store[name]
            dtype, t = t.dtype, t.double()  # written back as read: float32 routers of bf16 models stay so
            for fn in fns:
                t = fn(t)
            store[name] = t.to(dtype).contiguous()
            store.release([name])
        return untied


@register
class Rotate(Pass):
    """QuaRot rotations: residual Hadamard (norms fused), online Hadamard on down_proj and Q/K, per-head V.

    Exact in float; spreads activation outliers before W4A4 / KV-cache quantization, so run it
    first (`rotate,w4a4`, `rotate,gptq`, `rotate,kv`). residual=orthogonal for hidden sizes with
    no Hadamard factorization k*2^m; online_down, qk and v switch the online/per-head parts off.
    """

    name = "rotate"
    requires = frozenset({"canonical"})
    provides = frozenset({"rotated"})
    forbids = frozenset({"weight_quant", "act_quant", "smoothed", "kv_quant"})

    @dataclass
    class Options:
        seed: int = 0
        residual: Literal["hadamard", "orthogonal"] = "hadamard"
        online_down: bool = True  # online Hadamard on down_proj's input (folded into its weight)
        qk: bool = True  # online head_dim Hadamard on attention's q and k (after RoPE)
        v: bool = True  # per-head Hadamard folded into v_proj rows and o_proj columns

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        if "rotated" in qm.properties:
            raise PtqcError("rotate: the model is already rotated")
        plan = residual_plan(qm)  # plan and check everything before changing anything
        if o.residual == "hadamard":
            k, p2 = _factor(plan.hidden, "hidden size", "use rotate:residual=orthogonal")
            how = f"random hadamard {plan.hidden} = {k}*{p2} (seed {o.seed})"
        else:
            how = f"random orthogonal {plan.hidden} (seed {o.seed})"
        downs = [n for n in plan.writers if info(n)["role"] == "down"] if o.online_down else []
        inter = {str(s): "%d*%d" % _factor(s, "intermediate size", "use rotate:online_down=false")
                 for s in sorted({qm.store.spec(n.args[1].target)[0][1] for n in downs})}
        qk_dims = {}  # attention -> head_dim of q and k
        for attn in (qm.nodes(ops.ATTENTION) if o.qk else []):
            shapes = [a.meta.get("shape") if isinstance(a, fx.Node) else None for a in attn.args[:2]]
            if any(s is None or len(s) != 4 for s in shapes) or shapes[0][3] != shapes[1][3]:
                raise PtqcError(f"rotate: cannot read the q/k head layout of {_where(attn)}; use rotate:qk=false")
            qk_dims[attn] = shapes[0][3]
        v_folds = {attn: rotate_heads.v_fold(qm, attn) for attn in qm.nodes(ops.ATTENTION)} if o.v else {}
        heads = {str(d): "%d*%d" % _factor(d, "head_dim", "use rotate:qk=false,v=false")
                 for d in sorted(set(qk_dims.values()) | {r.shape[1] for _, r, _ in v_folds.values()})}
        Q = (hadamard.random_hadamard if o.residual == "hadamard" else hadamard.random_orthogonal)(plan.hidden, o.seed)
        rw = _Rewrite(qm)
        if any(is_op(n, ops.LAYER_NORM) for n in plan.norms):
            rw.center(plan)
        rw.fuse_norms(plan)
        rw.rotate_residual(plan, Q)
        rw.online_hadamards(downs, qk_dims)
        rw.fold_v(v_folds)
        untied = rw.apply()
        layers = [{"layer": i, **rw.layers[i]} for i in sorted(rw.layers, key=lambda i: (i is None, i or 0))]
        return PassResult(changed=True, summary={
            "residual": how, "hidden": plan.hidden, "norms_fused": len(plan.norms),
            "embeddings": [e.args[0].target for e in plan.embeds], "untied": untied,
            "online_down": inter, "head_dim": heads,
            "transforms_inserted": len(downs) + 2 * len(qk_dims),
            "v_folded": len(v_folds), "layers": layers})
