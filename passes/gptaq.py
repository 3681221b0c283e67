"""gptaq: GPTQ with asymmetric calibration (Li et al., "GPTQv2", ICML 2025).

GPTQ makes a layer reproduce its own float output on the quantized model's inputs, min ||W X_q -
Q X_q||; GPTAQ targets the float model's, min ||W X_fp - Q X_q||, which adds one term to GPTQ's
update (with dXX^T = 2/n (X_fp - X_q) X_q^T, see ``quantize_groups`` in ptqc/gptq_core.py).
Calibration runs the float and the quantized model in lockstep, one batch at a time, layer by
layer, holding one batch of float activations.

MoE expert stacks: per expert, on the tokens the quantized model routes to it, H and dXX^T of its
gate/up input and of its down input (the float side computed with the float x and weights on the
same tokens, :class:`ptqc.moe_calib.ExpertAsym`); ``min_tokens`` / ``few_tokens`` /
``all_experts`` as in gptq, recorded per stack.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ptqc import experts, ops, quant
from ptqc.calib import LayerRunner, calibration_batches
from ptqc.errors import PtqcError
from ptqc.gptq_core import output_error
from ptqc.ir import info
from ptqc.moe_calib import ExpertAsym, source
from ptqc.pipeline import PassResult, register
from ptqc.weights import grouped_targets, set_quantized_weight, weight_node, weight_of

gptq = importlib.import_module("ptqc.passes.gptq")


@register
class GPTAQ(gptq.GPTQ):
    """GPTAQ: GPTQ that matches the float model's outputs while feeding quantized inputs.

    Same options as gptq plus `alpha` (weight of the asymmetry term, 0.25 as published).
    Calibrates the float and the quantized model side by side, layer by layer.
    """

    name = "gptaq"
    experts = True

    @dataclass
    class Options(gptq.GPTQ.Options):
        alpha: float = 0.25
        propagate: str = "quantized"  # gptaq runs the float and quantized models in lockstep

        def validate(self):
            super().validate()
            if not 0 <= self.alpha <= 1:
                raise PtqcError(f"alpha={self.alpha} must be in [0, 1]")
            if self.propagate != "quantized":
                raise PtqcError("gptaq needs propagate=quantized (its point is the quantized inputs)")

    def run(self, qm, ctx) -> PassResult:
        opts, groups = grouped_targets(qm, self)
        stacks = self._stacks(qm, opts)
        fp = qm.clone()  # the float reference (weights shared until this pass writes them)
        ids = ctx.calibration_ids(qm)
        batches = calibration_batches(ids, ctx.calib_batch_size)
        rf = LayerRunner(fp, batches, device=ctx.device)
        rq = LayerRunner(qm, batches, device=ctx.device)
        rf.run_prefix()
        rq.run_prefix()
        errs = {"gptq": [], "rtn": []}
        recs: dict = {}
        for i in ctx.progress(range(rq.num_layers), desc="gptaq", unit="layer"):
            key = f"layer.{i}"
            reps = {lins[0].name: lins for lins in groups.get(i, [])}
            moe = stacks.pop(i, {})  # this layer's statistics, dropped with it
            acc = {name: [0, 0, 0] for name in reps}  # sum x_q x_q^T, sum dx x_q^T, tokens
            for b in range(len(batches)):
                self._observe_batch(rf, rq, key, b, reps, moe, acc)
            for name, lins in reps.items():
                h, dxxt, n = acc[name]
                self.quantize_group(qm, lins, opts, h * (2.0 / n), errs, dxxt=dxxt * (2.0 / n))
            for sites, st in moe.values():
                recs |= {s.module: self.quantize_stack_asym(qm, s, opts[s.name], st) for s in sites}
            rq.run(key)  # quantized propagation
            qm.store.release()
            fp.store.release()
        k = max(len(errs["gptq"]), 1)
        summary = {"layers": len(groups), "samples": int(ids.shape[0]), "tokens": int(ids.numel()),
                   "linears": len(opts) - len(recs), "alpha": self.options.alpha,
                   "mean_err_gptaq": round(sum(errs["gptq"]) / k, 6), "mean_err_rtn": round(sum(errs["rtn"]) / k, 6)}
        if recs:
            summary["experts"] = {m: {"tokens": r["tokens"], "fallback": r["fallback"]} for m, r in recs.items()}
        return PassResult(changed=bool(opts), summary=summary)

    @staticmethod
    def _observe_batch(rf, rq, key, b, reps: dict, moe: dict, acc: dict) -> None:
        """Run batch ``b`` of layer ``key`` on the float then the quantized model, accumulating
        (sum x_q x_q^T, sum dx x_q^T, tokens) per group and per-expert statistics per experts node."""
        x_fp: dict = {}

        def grab(n, args, y, _b):
            if n.name in reps:
                x_fp[n.name] = args[0].reshape(-1, args[0].shape[-1]).float()
            elif n.name in moe:
                x_fp[n.name] = (args[0].reshape(-1, args[0].shape[-1]), args[3], args[4])

        def accumulate(n, args, y, _b):
            if n.name in reps:
                xq = args[0].reshape(-1, args[0].shape[-1]).float()
                a = acc[n.name]
                a[0] = a[0] + xq.t() @ xq
                a[1] = a[1] + (x_fp.pop(n.name) - xq).t() @ xq
                a[2] += xq.shape[0]
            elif n.name in moe:
                moe[n.name][1].update(x_fp.pop(n.name), args)

        rf.run(key, batches=[b], hook=grab, release=False)
        if reps or moe:
            rq.run(key, batches=[b], hook=accumulate, commit=False, release=False)

    @staticmethod
    def _stacks(qm, opts: dict) -> dict:
        """layer -> {experts node name: (its sites in ``opts``, ExpertAsym)}."""
        out: dict = {}
        for node in qm.nodes(ops.MOE_EXPERTS):
            sites = [s for s in experts.sites(qm) if s.node is node and s.name in opts]
            if sites:
                mos = [opts[s.name] for s in sites]
                st = ExpertAsym(qm.store.spec(weight_node(sites[0]).target)[0][0], node.kwargs.get("act", "silu"),
                                node.kwargs.get("down_act_bits", 0),
                                all_tokens=any(mo.all_experts or mo.few_tokens == "all" for mo in mos))
                out.setdefault(info(node)["layer"], {})[node.name] = (sites, st)
        return out

    def quantize_stack_asym(self, qm, site, mo, st: ExpertAsym) -> dict:
        """GPTAQ an expert stack expert by expert on its (H, dXX^T); few-token experts as gptq's."""
        spec, W = mo.weight_spec(), weight_of(qm, site).float()
        parts, fallback, errs = [], [], {"gptaq": [], "rtn": []}
        for e in range(W.shape[0]):
            use = source(int(st.counts[e]), mo.all_experts, mo.min_tokens, mo.few_tokens)
            stats = st.hessian(site.proj, e, all_tokens=use == "all") if use != "rtn" else None
            if use != "routed" and not mo.all_experts:
                fallback.append(e)
            rtn = quant.rtn(W[e], spec)
            if stats is None:
                parts.append(rtn)
                continue
            c, s, z = gptq.gptq_or_rtn(W[e], stats[0], spec, mo, f"{site.module} expert {e}", dxxt=stats[1])[:3]
            parts.append((c, s, z))
            errs["gptaq"].append(output_error(W[e], quant.dequantize(c, s, z, spec.group_size), stats[0]))
            errs["rtn"].append(output_error(W[e], quant.dequantize(*rtn, spec.group_size), stats[0]))
        zp = torch.stack([p[2] for p in parts]) if parts[0][2] is not None else None
        rec = {"tokens": st.counts.tolist(), "fallback": fallback, "min_tokens": mo.min_tokens,
               "stats": "all" if mo.all_experts else "routed", "few_tokens": mo.few_tokens,
               **{f"err_{k}": round(sum(v) / len(v), 8) for k, v in errs.items() if v}}
        set_quantized_weight(qm, site, spec, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]),
                             zp, self.name, {**rec, "act_order": mo.act_order})
        return rec
