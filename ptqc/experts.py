"""MoE expert stacks as weight sites: what weight passes quantize besides ``ptqc.linear``.

A ``ptqc.moe_experts`` node reads three stacks, ``gate`` / ``up`` [E, I, H] and ``down`` [E, H, I]
(its arguments 3, 4, 5). An :class:`ExpertSite` names one of them; :mod:`ptqc.weights` reads,
replaces and dequantizes it as it does a linear's weight, so ``weights.plan`` hands passes
linears and expert sites alike. A site's module path is the experts' path plus the projection
(``model.layers.1.mlp.experts.down_proj``) and its role is ``experts``, so ``include``/``exclude``
patterns such as ``experts``, ``experts.down_proj`` or ``layers.1.*`` select it.

Quantized, a stack is ``ptqc.dequantize_weight(codes [E, out, in], scale [E, out, G], zp, group,
dtype)``: :mod:`ptqc.quant` groups the last dimension, so the stack quantized as it is equals each
expert's [out, in] quantized on its own. A pass declares it handles sites with ``experts = True``; ``plan`` refuses the
others when their selection holds a site (never a silent skip).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ptqc import ops, quant
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, is_op
from ptqc.patterns import activation_input, is_transparent, skip_transparent

PROJS = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertSite:
    """The ``proj`` stack (gate, up or down) of the ``ptqc.moe_experts`` node ``node``."""
    node: fx.Node
    proj: str

    @property
    def arg(self) -> int:
        return 3 + PROJS.index(self.proj)

    @property
    def name(self) -> str:
        return f"{self.node.name}.{self.proj}"

    @property
    def module(self) -> str:
        return f"{info(self.node).get('module', '')}.{self.proj}_proj"

    @property
    def meta(self) -> dict:
        """What passes read of a node's ``meta["ptqc"]`` (a fresh dict: writes go nowhere)."""
        return {"ptqc": {"module": self.module, "layer": info(self.node).get("layer"), "role": "experts"}}


def sites(qm: QModel) -> list[ExpertSite]:
    """Every expert stack of the graph, in graph order (gate, up, down per experts node)."""
    return [ExpertSite(n, p) for n in qm.nodes(ops.MOE_EXPERTS) for p in PROJS]


def block_input(qm: QModel, node: fx.Node) -> tuple[fx.Node, list[fx.Node], str | None]:
    """The MoE block input of experts node ``node``: (the op producing x, through shape ops; the
    linears reading x: router, shared expert gate/up, shared-expert gate; why a per-channel scale
    of x cannot be folded into that op, or None). Foldable when x comes from an RMSNorm whose
    output reaches only these linears and the experts (through shape ops)."""
    src = skip_transparent(node.args[0])
    lins = [n for n in qm.linears() if activation_input(n) is src]
    if not is_op(src, ops.RMS_NORM):
        return src, lins, "the MoE block input is not an RMSNorm output"
    todo, seen = list(src.users), set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        if is_transparent(u):
            todo.extend(u.users)
        elif u not in lins and u is not node:
            return src, lins, f"the norm output also feeds {u.name}"
    return src, lins, None


def fold_down_scale(qm: QModel, node: fx.Node, s: torch.Tensor) -> None:
    """Scale each expert's down_proj input channels by ``s`` [E, I] and undo it in the rows of that
    expert's up_proj (``act(g x) * (u x / s)``, then ``down * s``): the experts' output is unchanged."""
    up, down = (node.args[3 + PROJS.index(p)].target for p in ("up", "down"))
    s = s.float()
    qm.store[up] = (qm.store[up].float() / s[:, :, None]).to(qm.dtype)
    qm.store[down] = (qm.store[down].float() * s[:, None, :]).to(qm.dtype)


def planned_bits(qm: QModel, site: ExpertSite, spec: quant.QuantSpec, w: torch.Tensor, codes: torch.Tensor,
                 scale: torch.Tensor, zp: torch.Tensor | None) -> tuple:
    """Experts the precision plan keeps at other bits (``qm.plan["<experts module>.<e>"] = {"bits": b}``,
    from ``sensitive:unit=expert``) re-quantized RTN from the float stack ``w`` at ``b`` bits on the same
    grid layout: (codes, scale, zp, {expert: bits})."""
    base, plan = info(site.node).get("module"), getattr(qm, "plan", None) or {}
    bits = {e: int(plan[f"{base}.{e}"]["bits"]) for e in range(codes.shape[0]) if plan.get(f"{base}.{e}", {}).get("bits")}
    if not bits:
        return codes, scale, zp, {}
    codes, scale, zp = codes.clone(), scale.clone(), None if zp is None else zp.clone()
    for e, b in bits.items():
        c, s, z = quant.rtn(w[e].float(), quant.QuantSpec(b, spec.group_size, spec.symmetric))
        codes[e], scale[e] = c, s
        if zp is not None:
            zp[e] = z
    return codes, scale, zp, bits


def refuse(p, chosen: list[ExpertSite]) -> None:
    """Stop pass ``p``, which cannot quantize expert stacks, if its selection holds some."""
    if chosen:
        raise PtqcError(f"pass {p.name} cannot quantize MoE expert stacks ({chosen[0].module} and "
                        f"{len(chosen) - 1} more); exclude them (exclude=experts|lm_head|router|shared_expert_gate) "
                        "or use rtn, gptq or int8 for them")


PER_EXPERT = ("tokens", "fallback", "few_tokens", "stats")  # what a pass records per expert


def record(qm: QModel, site: ExpertSite, dq: fx.Node, q: dict, extra: dict | None = None) -> None:
    """Note a stack's weight quantization on the experts node (``quant[<proj>_proj]``, with the
    per-expert fields of ``extra``: routed tokens, fallback experts and what they used) and on its
    dequantize node (``quant["weight"]``, what ``pack`` reads)."""
    per_expert = {k: extra[k] for k in PER_EXPERT if k in (extra or {})}
    info(site.node).setdefault("quant", {})[f"{site.proj}_proj"] = {**q, **per_expert}
    info(dq)["quant"] = {"weight": q}


def check_act(spec: quant.QuantSpec | None, site: ExpertSite) -> None:
    """Expert inputs take dynamic per-token symmetric activation quantizers only."""
    if spec is not None and (spec.group_size != 0 or not spec.symmetric):
        raise PtqcError(f"{site.module}: MoE expert inputs take dynamic per-token symmetric activation "
                        f"quantization only (got {spec.describe()}); use a_group=0, a_sym=true, static=false "
                        "or exclude=experts")


def quantize_inputs(qm: QModel, node: fx.Node, spec: quant.QuantSpec) -> dict:
    """Dynamic per-token ``spec.bits`` quantizers on an experts node's inputs: a ``quantize_act``
    on x (gate/up read it; the router keeps the float x) and ``down_act_bits`` on the node."""
    g = qm.graph
    m = info(node)
    with g.inserting_before(node):
        q = g.call_function(ops.QUANTIZE_ACT, (node.args[0], None, None, spec.bits, 0, True, spec.clip_ratio))
    rec = {"bits": spec.bits, "group": 0, "sym": True, "method": "dynamic"}
    info(q).update({"module": m.get("module"), "layer": m.get("layer"), "role": "act_quant",
                    "quant": {"input": rec}, "shared_by": [f"{m.get('module')}.{p}_proj" for p in ("gate", "up")]})
    node.args = (q, *node.args[1:])
    node.kwargs = {**node.kwargs, "down_act_bits": spec.bits}
    m.setdefault("quant", {}).update({"input": rec, "down_input": rec})
    for p in PROJS:
        qm.quant.setdefault(f"{m.get('module')}.{p}_proj", {})["input"] = rec
    return rec
