"""smooth: SmoothQuant scale migration (Xiao et al., 2023), folded so the float model is unchanged.

Each input channel j of an activation is divided by ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``
(max over the linears sharing X) and the matching weight columns multiplied by it. ``1/s`` is
folded into the producer (:func:`ptqc.weights.fold_input_scale`): the input norm (q, k, v), the
post-attention norm (gate, up), v_proj for o_proj (query heads sharing a KV head share one scale
under GQA) and up_proj for down_proj. With ``fold=false`` ``1/s`` stays an explicit multiply in
front of the linears (role ``smooth_scale``), which the ascend lowering passes to its dynamic
quantization kernels as ``smooth_scales``. ``max|X_j|`` is observed layer by layer on the float
model; ``alpha`` can be set per layer by recipe overrides; ``o=false`` / ``down=false`` skip folds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqc.calib import calibrate
from ptqc.errors import PtqcError
from ptqc.ir import info
from ptqc.norms import is_norm
from ptqc.observers import AbsMax
from ptqc.patterns import activation_input, producer_linear
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

        def validate(self):
            if not 0.0 <= self.alpha <= 1.0:
                raise PtqcError(f"alpha={self.alpha} must be in [0, 1]")

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        readers: dict = {}
        for n in qm.linears():
            readers.setdefault(activation_input(n), []).append(n)
        plan: dict[int, list] = {}  # layer -> [(producer, linears, options)]
        skipped = []
        for src, lins in readers.items():
            m = info(lins[0])
            if m.get("layer") is None or not all(selected(n, o.include, o.exclude) for n in lins):
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

        records = []

        def observe(i):
            return {lins[0]: {"amax": AbsMax()} for _, lins, _ in plan.get(i, [])}

        def apply(i, stats):
            for prev, lins, mo in plan.get(i, []):
                x_max = stats[lins[0]]["amax"].result()
                w_max = torch.stack([weight_of(qm, n).float().abs().amax(0) for n in lins]).amax(0)
                role = info(lins[0]).get("role")
                if role == "o" and mo.fold and not is_norm(prev):  # v -> o: one scale per KV channel
                    x_max, w_max = gqa_tie(qm, x_max), gqa_tie(qm, w_max)
                s = smooth_scale(x_max, w_max, mo.alpha)
                if mo.fold:
                    fold_input_scale(qm, prev, lins, s)
                else:
                    insert_input_scale(qm, lins, s)
                records.append({"layer": i, "into": info(prev).get("module") if mo.fold else "smooth_scale",
                                "linears": [info(n)["role"] for n in lins],
                                "alpha": mo.alpha, "act_max_before": round(float(x_max.max()), 4),
                                "act_max_after": round(float((x_max / s).max()), 4)})

        summary = calibrate(qm, ctx, observe, apply, propagate="float", layers=sorted(plan), desc="smooth")
        return PassResult(changed=bool(records), summary={**summary, "folds": len(records), "scales": records,
                                                          "skipped": skipped})


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
