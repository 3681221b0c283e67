"""Replacing a weight's float tensor with quantized codes: the one rewrite every weight pass ends with.

After ``set_quantized_weight`` the graph reads::

    w_q  = get_attr  model.layers.0.mlp.down_proj.weight             (int8 codes)
    w_s  = get_attr  model.layers.0.mlp.down_proj.weight_scale       (float32 [out, groups])
    w_zp = get_attr  model.layers.0.mlp.down_proj.weight_zero_point  (int8, asymmetric only)
    w    = ptqc.dequantize_weight(w_q, w_s, w_zp, group, dtype)
    y    = ptqc.linear(x, w, b)

so ``ptqc inspect`` shows where weights are dequantized, and the artifact keeps the Hugging Face
names (codes under ``.weight``, as in the Ascend export format). A weight site is a linear or an
MoE expert stack (:class:`ptqc.experts.ExpertSite`, the same rewrite on a ``moe_experts`` argument
with codes [E, out, in]); every function here takes either.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ptqc import distributed, experts, ops, quant
from ptqc.errors import PtqcError
from ptqc.experts import ExpertSite
from ptqc.ir import QModel, info, is_op
from ptqc.norms import fold_scale, is_norm
from ptqc.patterns import match_module


def select_linears(qm: QModel, include=("*",), exclude=("lm_head",)) -> list[fx.Node]:
    """Float linears whose module path or role matches ``include`` and not ``exclude``."""
    return [n for n in qm.linears() if selected(n, include, exclude) and not is_quantized(n)]


def selected(node: fx.Node, include, exclude) -> bool:
    m = info(node)
    return match_module(m.get("module", ""), m.get("role"), include) and \
        not match_module(m.get("module", ""), m.get("role"), exclude)


def select_sites(qm: QModel, include=("*",), exclude=("lm_head",)) -> list[ExpertSite]:
    """Float expert stacks whose module path (``...experts.gate_proj``) or role (``experts``) matches."""
    return [s for s in experts.sites(qm) if selected(s, include, exclude) and not is_quantized(s)]


def plan(qm: QModel, p, nodes=None, spec_of=None) -> list[tuple[fx.Node | ExpertSite, Any, quant.QuantSpec | None]]:
    """What pass ``p`` works on: each of ``nodes`` (default: the float linears and, where ``p.experts``,
    the float expert stacks) that its ``include``/``exclude`` select and that neither the precision
    plan nor the recipe's overrides keep float, with its options (``p.options_for``) and the
    QuantSpec they give (``spec_of``, default ``options.weight_spec()``; None: nothing to quantize
    there). Every QuantSpec is checked against the site's input width here, before anything
    changes. A pass without ``experts = True`` whose selection holds an expert stack is refused."""
    o = p.options
    spec_of = spec_of or (lambda mo: mo.weight_spec() if hasattr(mo, "weight_spec") else None)
    out = []
    chosen = [*select_linears(qm, o.include, o.exclude), *select_sites(qm, o.include, o.exclude)] \
        if nodes is None else [n for n in nodes if selected(n, o.include, o.exclude)]
    for n in chosen:
        mo = p.options_for(qm, n)
        if mo is None:
            continue
        spec = spec_of(mo)
        if spec is not None:
            spec.check_fits(in_features(qm, n), info(n)["module"])
        out.append((n, mo, spec))
    if not getattr(p, "experts", False):
        experts.refuse(p, [n for n, _, _ in out if isinstance(n, ExpertSite)])
    return out


def weight_node(site) -> fx.Node:
    """The node a weight site computes with: a linear's weight argument or an expert stack."""
    return site.node.args[site.arg] if isinstance(site, ExpertSite) else site.args[1]


def _replace_weight(site, new: fx.Node) -> None:
    user, i = (site.node, site.arg) if isinstance(site, ExpertSite) else (site, 1)
    user.args = (*user.args[:i], new, *user.args[i + 1:])


def is_quantized(site) -> bool:
    return is_op(weight_node(site), ops.DEQUANTIZE_WEIGHT)


def weight_of(qm: QModel, linear) -> torch.Tensor:
    """The float weight [out, in] of a (not yet quantized) linear ([E, out, in]: an expert stack)."""
    w = weight_node(linear)
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        raise PtqcError(f"{info(linear).get('module')}: weight is not a plain tensor (already transformed?)")
    return qm.store[w.target]


def set_weight(qm: QModel, linear, w: torch.Tensor) -> None:
    """Write a new float weight for a linear (e.g. after folding scales into it)."""
    qm.store[weight_node(linear).target] = w.to(qm.dtype)


def set_quantized_weight(qm: QModel, linear, spec: quant.QuantSpec, codes: torch.Tensor,
                         scale: torch.Tensor, zero_point: torch.Tensor | None, method: str,
                         record: dict | None = None) -> fx.Node:
    """Store codes/scales under the weight's HF names and insert the dequantize node."""
    distributed.commit()
    w_node = weight_node(linear)
    name = w_node.target
    base = name.removesuffix(".weight")
    g = qm.graph
    expert_bits = {}
    if isinstance(linear, ExpertSite):
        codes, scale, zero_point, expert_bits = experts.planned_bits(qm, linear, spec, qm.store[name], codes, scale,
                                                                     zero_point)
    qm.store[name] = (codes if spec.kind == "mx" else codes.to(torch.int8)).contiguous()  # MX: float8 element values
    qm.store[f"{base}.weight_scale"] = scale.float().contiguous()
    if zero_point is not None:
        qm.store[f"{base}.weight_zero_point"] = zero_point.to(torch.int8).contiguous()
    meta = info(linear)
    with g.inserting_before(linear.node if isinstance(linear, ExpertSite) else linear):
        s_node = g.get_attr(f"{base}.weight_scale")
        z_node = g.get_attr(f"{base}.weight_zero_point") if zero_point is not None else None
        dq = g.call_function(ops.DEQUANTIZE_WEIGHT, (w_node, s_node, z_node, spec.group_size, qm.dtype))
    info(dq).update({"module": meta["module"], "layer": meta["layer"], "role": "weight_dequant"})
    _replace_weight(linear, dq)
    q = {"method": method, "bits": max([spec.bits, *expert_bits.values()]), "group": spec.group_size, "sym": spec.symmetric,
         **({"kind": spec.kind} if spec.kind != "int" else {})}
    if expert_bits:  # "bits" is the widest (what pack and exporters must respect), "base_bits" the rest's
        q.update(base_bits=spec.bits, expert_bits={str(e): b for e, b in expert_bits.items()})
    if isinstance(linear, ExpertSite):
        experts.record(qm, linear, dq, q, record)
    else:
        meta.setdefault("quant", {})["weight"] = q
    qm.quant.setdefault(meta["module"], {})["weight"] = {**q, "scale_shape": list(scale.shape), **(record or {})}
    return dq


def dequantized_weight(qm: QModel, linear) -> torch.Tensor:
    """The float weight a linear (or expert stack) computes with, quantized or not."""
    w = weight_node(linear)
    if is_op(w, ops.DEQUANTIZE_WEIGHT):
        c = w.args[0]
        codes = quant.unpack_int4(qm.store[c.args[0].target]) if is_op(c, ops.UNPACK_INT4) else qm.store[c.target]
        s, z = (qm.store[a.target] if isinstance(a, fx.Node) else None for a in w.args[1:3])
        return quant.dequantize(codes, s, z, w.args[3]).to(w.args[4])
    return qm.store[w.target]


def grouped_targets(qm: QModel, p) -> tuple[dict, dict[int, list[list[fx.Node]]]]:
    """What a calibrated weight pass ``p`` works on: per-linear options (:func:`plan`) and, per
    layer, those linears grouped by the activation they share (q/k/v, gate/up: one Hessian each)."""
    from ptqc.patterns import activation_input

    opts = {n.name: mo for n, mo, _ in plan(qm, p)}
    by_input: dict = {}
    for n in qm.linears():
        if n.name in opts:
            by_input.setdefault(activation_input(n), []).append(n)
    groups: dict[int, list[list[fx.Node]]] = {}
    for lins in by_input.values():
        groups.setdefault(info(lins[0])["layer"], []).append(lins)
    return opts, groups


def fold_input_scale(qm: QModel, prev: fx.Node, lins: list[fx.Node], s: torch.Tensor) -> None:
    """Scale the input channels of ``lins`` (linears or expert stacks) by ``s`` and undo it in
    ``prev``, the op producing their input, so the float model is unchanged (SmoothQuant and AWQ's fold)::

        prev = rms_norm      norm weight (w + offset) / s - offset    (Gemma: offset 1)
        prev = layer_norm    weight / s, bias / s
        prev = linear        rows (and bias) / s                       (up -> down)
        prev = v_proj, GQA   rows / s of one query head per KV head    (v -> o: o's channel
                                                                        (h, d) reads v's
                                                                        (h // rep, d))
    With GQA, ``s`` must be equal across the query heads sharing a KV head (checked)."""
    s = s.float()
    for n in lins:
        name = weight_node(n).target
        qm.store[name] = (qm.store[name].float() * s).to(qm.dtype)
    if is_norm(prev):
        fold_scale(qm, prev, s)
        return
    w_name = prev.args[1].target
    w = qm.store[w_name].float()
    sp = s
    if w.shape[0] != s.shape[0]:  # v -> o under grouped-query attention
        cfg = qm.config
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        d = s.shape[0] // heads
        per_q = s.reshape(kv, heads // kv, d)
        if not torch.equal(per_q, per_q[:, :1].expand_as(per_q)):
            raise PtqcError("internal: v -> o scales differ across the query heads of one KV head")
        sp = per_q[:, 0].reshape(-1)
        if w.shape[0] != sp.shape[0]:
            raise PtqcError(f"cannot fold {s.shape[0]} scales into {info(prev).get('module')} "
                            f"with {w.shape[0]} output channels")
    qm.store[w_name] = (w / sp[:, None]).to(qm.dtype)
    b = prev.args[2] if len(prev.args) > 2 else prev.kwargs.get("b")
    if b is not None:
        qm.store[b.target] = (qm.store[b.target].float() / sp).to(qm.dtype)


def gqa_tie(qm: QModel, s: torch.Tensor, reduce=torch.amax) -> torch.Tensor:
    """Make per-channel statistics of o_proj's input equal across the query heads that share a
    KV head (reduce over them), so a v -> o fold stays exact under grouped-query attention."""
    cfg = qm.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads == kv:
        return s
    d = s.shape[0] // heads
    g = s.reshape(kv, heads // kv, d)
    return reduce(g, dim=1, keepdim=True).expand_as(g).reshape(-1)


def in_features(qm: QModel, linear) -> int:
    """Input width of a linear or expert stack, float or quantized (packed int4 codes count twice)."""
    w = weight_node(linear)
    if is_op(w, ops.DEQUANTIZE_WEIGHT):
        c = w.args[0]
        if is_op(c, ops.UNPACK_INT4):
            return 2 * qm.store.spec(c.args[0].target)[0][-1]
        return qm.store.spec(c.target)[0][-1]
    return qm.store.spec(w.target)[0][-1]
