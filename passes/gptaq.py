"""gptaq: GPTQ with asymmetric calibration (Li et al., "GPTQv2", ICML 2025).

GPTQ makes a layer reproduce its own float output on the quantized model's inputs, min ||W X_q -
Q X_q||; GPTAQ targets the float model's, min ||W X_fp - Q X_q||, which adds one term to GPTQ's
update (with dXX^T = 2/n (X_fp - X_q) X_q^T, see ``quantize_groups`` in ptqc/gptq_core.py).
Calibration runs the float and the quantized model in lockstep, one batch at a time, layer by
layer, holding one batch of float activations.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ptqc.calib import LayerRunner, calibration_batches
from ptqc.errors import PtqcError
from ptqc.pipeline import PassResult, register
from ptqc.weights import grouped_targets

gptq = importlib.import_module("ptqc.passes.gptq")


@register
class GPTAQ(gptq.GPTQ):
    """GPTAQ: GPTQ that matches the float model's outputs while feeding quantized inputs.

    Same options as gptq plus `alpha` (weight of the asymmetry term, 0.25 as published).
    Calibrates the float and the quantized model side by side, layer by layer.
    """

    name = "gptaq"
    experts = False  # MoE expert stacks: refused by weights.plan

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
        fp = qm.clone()  # the float reference (weights shared until this pass writes them)
        ids = ctx.calibration_ids(qm)
        batches = calibration_batches(ids, ctx.calib_batch_size)
        rf = LayerRunner(fp, batches, device=ctx.device)
        rq = LayerRunner(qm, batches, device=ctx.device)
        rf.run_prefix()
        rq.run_prefix()
        errs = {"gptq": [], "rtn": []}
        for i in ctx.progress(range(rq.num_layers), desc="gptaq", unit="layer"):
            key = f"layer.{i}"
            reps = {lins[0].name: lins for lins in groups.get(i, [])}
            acc = {name: [0, 0, 0] for name in reps}  # sum x_q x_q^T, sum dx x_q^T, tokens
            for b in range(len(batches)):
                x_fp: dict[str, torch.Tensor] = {}

                def grab(n, args, y, _b):
                    if n.name in reps:
                        x_fp[n.name] = args[0].reshape(-1, args[0].shape[-1]).float()

                def accumulate(n, args, y, _b):
                    if n.name in reps:
                        xq = args[0].reshape(-1, args[0].shape[-1]).float()
                        a = acc[n.name]
                        a[0] = a[0] + xq.t() @ xq
                        a[1] = a[1] + (x_fp.pop(n.name) - xq).t() @ xq
                        a[2] += xq.shape[0]

                rf.run(key, batches=[b], hook=grab, release=False)
                if reps:
                    rq.run(key, batches=[b], hook=accumulate, commit=False, release=False)
            for name, lins in reps.items():
                h, dxxt, n = acc[name]
                self.quantize_group(qm, lins, opts, h * (2.0 / n), errs, dxxt=dxxt * (2.0 / n))
            rq.run(key)  # quantized propagation
            qm.store.release()
            fp.store.release()
        k = max(len(errs["gptq"]), 1)
        return PassResult(changed=bool(opts), summary={
            "layers": len(groups), "samples": int(ids.shape[0]), "tokens": int(ids.numel()), "linears": len(opts),
            "alpha": self.options.alpha,
            "mean_err_gptaq": round(sum(errs["gptq"]) / k, 6), "mean_err_rtn": round(sum(errs["rtn"]) / k, 6)})
