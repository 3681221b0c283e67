"""smooth: SmoothQuant scale migration (Xiao et al., 2023), folded so the float model is unchanged.

Each input channel j of an activation is divided by ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``
(max over the linears sharing X) and the matching weight columns multiplied by it. ``1/s`` is
folded into the producer (:func:`ptqc.weights.fold_input_scale`): the input norm (q, k, v), the
post-attention norm (gate, up), v_proj for o_proj (query heads sharing a KV head share one scale
under GQA) and up_proj for down_proj. With ``fold=false`` ``1/s`` stays an explicit multiply in
front of the linears (role ``smooth_scale``), which the ascend lowering passes to its dynamic
quantization kernels as ``smooth_scales``. ``max|X_j|`` is observed layer by layer on the float
model; ``alpha`` can be set per layer by recipe overrides; ``o=false`` / ``down=false`` skip folds.

MoE blocks: one scale for the block input x, shared by every expert's gate/up (max |W| over all
of them and the shared expert's gate/up), folded into the post-attention norm; the linears that
stay float (router, shared-expert gate) read the same x and are compensated exactly (columns *
s), so router logits and routing are unchanged. ``max|X_j|`` is over every token reaching the
block. Each expert's down_proj input gets its own scale from the tokens routed to it, folded into
that expert's up_proj rows; an expert routed fewer than ``min_tokens`` tokens uses all-token
statistics (``few_tokens=all``) or keeps scale 1 (``skip``), recorded per expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ptqc import experts, ops
from ptqc.calib import calibrate
from ptqc.errors import PtqcError
from ptqc.experts import ExpertSite
from ptqc.ir import info, is_op
from ptqc.moe_calib import ExpertActs, source
from ptqc.norms import is_norm
from ptqc.observers import AbsMax
from ptqc.patterns import activation_input, producer_linear, skip_transparent
from ptqc.options import Selection
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import fold_input_scale, gqa_tie, selected, weight_of


def smooth_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


@register
class Smooth(Pass):
    """SmoothQuant: migrate activation outliers into weights with per-channel scales (alpha=0.5).

    Scales are folded into the input/post-attention RMSNorm (q/k/v, gate/up), into v_proj for
    o_proj (GQA-aware) and into up_proj for down_proj, so the float model is unchanged. Run it
    before int8/w4a4/gptq...; per-layer alpha through recipe overrides. `fold=false` keeps 1/s
    as an explicit multiply instead, which the ascend lowering passes to the dynamic
    quantization kernels as their smooth_scales.
    """

    name = "smooth"
    requires = frozenset({"canonical"})
    provides = frozenset({"smoothed"})
    forbids = frozenset({"weight_quant", "act_quant", "rotated"})

    @dataclass
    class Options(Selection):
        alpha: float = 0.5
        o: bool = True  # fold v_proj -> o_proj
        down: bool = True  # fold up_proj -> down_proj
        fold: bool = True  # false: keep 1/s as an explicit multiply (Ascend smooth_scales) instead of folding
        min_tokens: int = 16  # MoE: experts routed fewer tokens take `few_tokens` for their down_proj scale
        few_tokens: Literal["skip", "all"] = "skip"  # scale 1, or the all-token statistics

        def validate(self):
            if not 0.0 <= self.alpha <= 1.0:
                raise PtqcError(f"alpha={self.alpha} must be in [0, 1]")
            if self.min_tokens < 0:
                raise PtqcError(f"min_tokens={self.min_tokens} must be >= 0")

    def run(self, qm, ctx) -> PassResult:
        plan, skipped = self._dense_plan(qm)
        moe = self._moe_plan(qm, skipped)
        records = []

        def observe(i):
            obs = {lins[0]: {"amax": AbsMax()} for _, lins, _ in plan.get(i, [])}
            return obs | {node: self._moe_observers(qm, node, mo) for node, mo in moe.get(i, [])}

        def apply(i, stats):
            for prev, lins, mo in plan.get(i, []):
                records.append(self._fold(qm, i, prev, lins, mo, stats[lins[0]]["amax"].result()))
            for node, mo in moe.get(i, []):
                records.extend(self._fold_moe(qm, i, node, mo, stats[node]))

        layers = sorted({*plan, *moe})
        summary = calibrate(qm, ctx, observe, apply, propagate="float", layers=layers, desc="smooth")
        return PassResult(changed=bool(records), summary={**summary, "folds": len(records), "scales": records,
                                                          "skipped": skipped})

    def _dense_plan(self, qm) -> tuple[dict, list]:
        """layer -> [(producer, linears sharing an input, options)] outside MoE block inputs; skips."""
        o = self.options
        moe_inputs = {skip_transparent(n.args[0]) for n in qm.nodes(ops.MOE_EXPERTS)}
        readers: dict = {}
        for n in qm.linears():
            readers.setdefault(activation_input(n), []).append(n)
        plan: dict[int, list] = {}
        skipped = []
        for src, lins in readers.items():
            m = info(lins[0])
            if src in moe_inputs or m.get("layer") is None or \
                    not all(selected(n, o.include, o.exclude) for n in lins):
                continue
            mo = self.options_for(qm, lins[0])  # the group's options: its first linear's
            if mo is None:
                continue
            role = m.get("role")
            if is_norm(src):
                prev = src
                if len(src.users) != len(lins):
                    skipped.append((m["module"], "the norm output feeds more than these linears"))
                    continue
            elif (role == "o" and mo.o or role == "down" and mo.down) and not mo.fold:
                prev = None  # an explicit multiply needs no producer to fold into
            elif role == "o" and mo.o or role == "down" and mo.down:
                prev = producer_linear(qm, lins[0])
                if prev is None or len(prev.users) != 1 and role == "down":
                    skipped.append((m["module"], "no single producing linear"))
                    continue
            else:
                continue
            plan.setdefault(m["layer"], []).append((prev, lins, mo))
        return plan, skipped

    def _fold(self, qm, i, prev, lins, mo, x_max) -> dict:
        """Smooth one group of linears sharing an input; its record."""
        w_max = torch.stack([weight_of(qm, n).float().abs().amax(0) for n in lins]).amax(0)
        role = info(lins[0]).get("role")
        if role == "o" and mo.fold and not is_norm(prev):  # v -> o: one scale per KV channel
            x_max, w_max = gqa_tie(qm, x_max), gqa_tie(qm, w_max)
        s = smooth_scale(x_max, w_max, mo.alpha)
        if mo.fold:
            fold_input_scale(qm, prev, lins, s)
        else:
            insert_input_scale(qm, lins, s)
        return {"layer": i, "into": info(prev).get("module") if mo.fold else "smooth_scale",
                "linears": [info(n)["role"] for n in lins],
                "alpha": mo.alpha, "act_max_before": round(float(x_max.max()), 4),
                "act_max_after": round(float((x_max / s).max()), 4)}

    def _moe_plan(self, qm, skipped: list) -> dict:
        """layer -> [(experts node, options)] of the MoE blocks whose experts' gate/up are selected;
        a block that cannot be smoothed goes to ``skipped`` with the reason."""
        o = self.options
        out: dict = {}
        for node in qm.nodes(ops.MOE_EXPERTS):
            site = ExpertSite(node, "gate")
            if not selected(site, o.include, o.exclude):
                continue
            mo = self.options_for(qm, site)
            if mo is None:
                continue
            why = experts.block_input(qm, node)[2] if mo.fold else \
                "fold=false (an explicit smooth multiply) is not supported on MoE block inputs"
            if why:
                skipped.append((info(node)["module"], why))
                continue
            out.setdefault(info(node)["layer"], []).append((node, mo))
        return out

    def _moe_observers(self, qm, node, mo) -> dict:
        e = qm.store.spec(node.args[3].target)[0][0]
        return {"x": AbsMax(), "down": ExpertActs(e, node.kwargs.get("act", "silu"), node.kwargs.get("down_act_bits", 0),
                                                  all_tokens=mo.down and mo.few_tokens == "all")}

    def _fold_moe(self, qm, i, node, mo, stats) -> list[dict]:
        """One scale for the MoE block input (experts' gate/up, shared expert, compensated router),
        then (``down``) one per expert for its down_proj input, folded into its up_proj rows."""
        o = self.options
        src, lins, _ = experts.block_input(qm, node)
        stacks = [ExpertSite(node, "gate"), ExpertSite(node, "up")]
        quantized = [n for n in lins if selected(n, o.include, o.exclude)]
        w_max = torch.stack([weight_of(qm, n).float().abs().amax(tuple(range(weight_of(qm, n).dim() - 1)))
                             for n in [*stacks, *quantized]]).amax(0)
        x_max = stats["x"].result()
        s = smooth_scale(x_max, w_max, mo.alpha)
        fold_input_scale(qm, src, [*stacks, *lins], s)
        recs = [{"layer": i, "into": info(src).get("module"), "linears": ["experts.gate", "experts.up",
                                                                          *(info(n)["role"] for n in quantized)],
                 "compensated": [info(n)["role"] for n in lins if n not in quantized], "alpha": mo.alpha,
                 "act_max_before": round(float(x_max.max()), 4), "act_max_after": round(float((x_max / s).max()), 4)}]
        if mo.down and selected(ExpertSite(node, "down"), o.include, o.exclude):
            recs.append(self._fold_moe_down(qm, i, node, mo, stats["down"]))
        return recs

    def _fold_moe_down(self, qm, i, node, mo, acts: ExpertActs) -> dict:
        down = weight_of(qm, ExpertSite(node, "down")).float()
        scales, fallback, before, after = [], [], 0.0, 0.0
        for e in range(down.shape[0]):
            use = source(int(acts.counts[e]), False, mo.min_tokens, mo.few_tokens)
            h_max = acts.down_max(e, all_tokens=use == "all") if use != "skip" else None
            if use != "routed":
                fallback.append(e)
            if h_max is None:
                scales.append(torch.ones(down.shape[2]))
                continue
            scales.append(smooth_scale(h_max, down[e].abs().amax(0), mo.alpha))
            before, after = max(before, float(h_max.max())), max(after, float((h_max / scales[-1]).max()))
        experts.fold_down_scale(qm, node, torch.stack(scales))
        return {"layer": i, "into": f"{info(node)['module']}.up_proj", "linears": ["experts.down"], "alpha": mo.alpha,
                "act_max_before": round(before, 4), "act_max_after": round(after, 4),
                "tokens": acts.counts.tolist(), "fallback": fallback, "min_tokens": mo.min_tokens,
                "few_tokens": mo.few_tokens}


def insert_input_scale(qm, lins: list, s: torch.Tensor) -> None:
    """Scale the input channels of ``lins`` by ``s`` and undo it with an explicit multiply by
    ``1/s`` on their shared input (``fold=false``): the float model is unchanged up to rounding."""
    s = s.float()
    for n in lins:
        name = n.args[1].target
        qm.store[name] = (qm.store[name].float() * s).to(qm.dtype)
    m = info(lins[0])
    const = f"{m['module'].rsplit('.', 1)[0]}.{m.get('role')}_smooth_scale"
    qm.store[const] = (1.0 / s).to(qm.dtype)
    g = qm.graph
    for x in dict.fromkeys(n.args[0] for n in lins):
        with g.inserting_after(x):
            c = g.get_attr(const)
        with g.inserting_after(c):
            mul = g.call_function(torch.ops.aten.mul.Tensor, (x, c))
        info(mul).update({"module": m["module"].rsplit(".", 1)[0], "layer": m.get("layer"), "role": "smooth_scale"})
        for n in lins:
            if n.args[0] is x:
                n.args = (mul, *n.args[1:])
