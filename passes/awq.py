"""awq: activation-aware weight quantization (Lin et al., 2023).

A few input channels carry much larger activations than the rest; their weights matter more.
AWQ multiplies those weight columns by a per-input-channel scale ``s`` before quantizing (so
they get finer effective steps) and divides the activation by ``s``, folding ``1/s`` into the
op that produces the activation, so the float model is unchanged:

    input_norm  -> q, k, v      norm weight / s         q, k, v columns * s
    post_norm   -> gate, up     norm weight / s         gate, up columns * s
    v_proj      -> o_proj       v rows (and bias) / s   o columns * s     (only when v and o
                                                                            have the same width;
                                                                            with GQA it is skipped,
                                                                            as in AutoAWQ)
    up_proj     -> down_proj    up rows / s             down columns * s

Gemma-style norms ``x * (1 + w)`` are folded as ``(1 + w) / s - 1``.

Scale search, per group of linears sharing an input, on calibration samples of that input
(float inputs, layer by layer): ``s = mean|x|^a / mean|w|^(1-a)`` (``mean|w|`` of the
group-normalized weights), normalized by ``sqrt(max(s) min(s))``, for ``a`` in ``k/grid``,
k = 0..grid-1; the candidate (or no scaling) with the lowest output MSE
``||Q(W s)(x/s) - W x||^2`` wins.

Clip search (``clip=true``, AutoAWQ's): for every linear except q/k (attention logits are
sensitive), scaled or not (o_proj under GQA), per output row and group, weights are clamped to
``[-r m, r m]`` (``m``: the group's max |w|; the other end of an asymmetric group keeps its
range) with the r in 1, 0.95, ... 0.55 giving the lowest error of the group's partial outputs
on 512 of the samples.

Then (``quantize=true``, default) the weights are quantized round-to-nearest with the shared
quantizer. With ``quantize=false`` only scales and clipping are applied, for pipelines such as
``awq:quantize=false,gptq``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqc import ops, quant
from ptqc.calib import calibrate
from ptqc.errors import PtqcError
from ptqc.ir import is_op
from ptqc.observers import MeanAbs, Samples
from ptqc.options import WeightOptions
from ptqc.patterns import activation_input, producer_linear
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import fold_input_scale, plan, select_linears, set_quantized_weight, weight_of


def search_scale(x: torch.Tensor, x_mean: torch.Tensor, ws: list[torch.Tensor], spec: quant.QuantSpec,
                 grid: int) -> tuple[torch.Tensor, dict]:
    """Best per-input-channel scale for linears ``ws`` (each [out, in]) reading ``x`` [n, in]."""
    W = torch.cat(ws)
    y = x @ W.t()
    g = spec.group_size if spec.group_size > 0 else W.shape[1]
    wg = W.abs().reshape(W.shape[0], -1, g)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp_min(1e-12)).reshape(W.shape).mean(0)

    def loss(s):
        return ((x / s) @ quant.fake_quantize(W * s, spec).t() - y).pow(2).mean().item()

    best_s, best_a = torch.ones_like(x_mean), None
    base = best = loss(best_s)
    for k in range(grid):
        a = k / grid
        s = (x_mean.pow(a) / w_mean.pow(1 - a).clamp_min(1e-4)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        cur = loss(s)
        if cur < best:
            best, best_s, best_a = cur, s, a
    return best_s, {"alpha": best_a, "loss_before": base, "loss_after": best}


def search_clip(x: torch.Tensor, w: torch.Tensor, spec: quant.QuantSpec, grid: int = 20, max_shrink: float = 0.5,
                tokens: int = 512, rows_per_batch: int = 256) -> torch.Tensor:
    """Clamp ``w`` per (row, group) to ``[-r m, r m]``, m the group's max |w|, with the r in 1, 1 - 1/grid,
    ... > 1 - max_shrink minimizing the group's output error on ``tokens`` rows of ``x`` (AutoAWQ)."""
    g = spec.group_size if spec.group_size > 0 else w.shape[1]
    x = x[::max(1, x.shape[0] // tokens)]
    xg = x.reshape(x.shape[0], -1, g)  # [n, groups, g]
    out = []
    for r0 in range(0, w.shape[0], rows_per_batch):
        wb = w[r0:r0 + rows_per_batch]
        wg = wb.reshape(wb.shape[0], -1, g)  # [rows, groups, g]
        ref = torch.einsum("ngc,rgc->nrg", xg, wg)
        m = wg.abs().amax(-1, keepdim=True)
        best_err = torch.full(wg.shape[:2], float("inf"))
        best = wg
        for i in range(int(grid * max_shrink)):
            cw = torch.maximum(torch.minimum(wg, m * (1 - i / grid)), -m * (1 - i / grid))
            q = quant.fake_quantize(cw.reshape(wb.shape), spec).reshape(wg.shape)
            err = (torch.einsum("ngc,rgc->nrg", xg, q) - ref).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], cw, best)
        out.append(best.reshape(wb.shape))
    return torch.cat(out)


@register
class AWQ(Pass):
    """AWQ: activation-aware per-channel scales folded into the previous norm/linear, clip search, RTN.

    Scales are searched on calibration samples (grid over the exponent a of mean|x|^a) and folded
    exactly into the preceding RMSNorm (q/k/v, gate/up) or linear (v -> o, up -> down); weights are
    then clipped and quantized (`quantize=false`: fold and clip only, e.g. before gptq).
    """

    name = "awq"
    requires = frozenset({"canonical"})
    provides = frozenset({"weight_quant", "awq_scaled"})

    @dataclass
    class Options(WeightOptions):
        grid: int = 20
        clip: bool = True
        quantize: bool = True
        samples: int = 512  # token rows per input used by the searches

        def validate(self):
            super().validate()
            if self.grid < 1 or self.samples < 1:
                raise PtqcError("grid and samples must be >= 1")

    def __init__(self, **options):
        super().__init__(**options)
        if not self.options.quantize:  # fold and clip only: the weights stay float (checked after the pass)
            self.provides = frozenset({"awq_scaled"})

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        todo = plan(qm, self)
        spec_of = {n.name: spec for n, _, spec in todo}
        # scaling groups per layer: (producer node, all linears reading its output)
        readers: dict = {}
        for n in qm.linears():
            readers.setdefault(activation_input(n), []).append(n)
        folds: dict[int, list] = {}
        for src, lins in readers.items():
            layer = lins[0].meta["ptqc"].get("layer")
            if layer is None or not any(n.name in spec_of for n in lins):
                continue
            prev = src if is_op(src, ops.RMS_NORM) else producer_linear(qm, lins[0])
            if prev is None or not self._foldable(qm, prev, lins):
                continue
            folds.setdefault(layer, []).append((prev, lins))
        records: list[dict] = []

        def observe(i):  # each scaling group's input, and the input of unscaled linears to clip (GQA o_proj)
            grouped = {n for _, lins in folds.get(i, []) for n in lins}
            obs = {n: {"x": Samples(max_tokens=o.samples)} for n in qm.linears(layer=i) if o.clip and
                   n.name in spec_of and n not in grouped and n.meta["ptqc"]["role"] not in ("q", "k")}
            return obs | {lins[0]: {"x": Samples(max_tokens=o.samples), "mean": MeanAbs()}
                          for _, lins in folds.get(i, [])}

        def apply(i, stats):
            xs = {}
            for prev, lins in folds.get(i, []):
                x, x_mean = stats[lins[0]]["x"].result().float(), stats[lins[0]]["mean"].result()
                spec = spec_of.get(lins[0].name) or next(spec_of[n.name] for n in lins if n.name in spec_of)
                s, rec = search_scale(x, x_mean, [weight_of(qm, n).float() for n in lins if n.name in spec_of],
                                      spec, o.grid)
                fold_input_scale(qm, prev, lins, s)
                for n in lins:
                    xs[n.name] = x / s
                records.append({"layer": i, "into": prev.meta["ptqc"].get("module"),
                                "linears": [n.meta["ptqc"]["role"] for n in lins],
                                **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in rec.items()}})
            for n in qm.linears(layer=i):
                if n.name in spec_of:
                    x = xs[n.name] if n.name in xs else stats[n]["x"].result().float() if n in stats else None
                    self._clip_quantize(qm, n, spec_of[n.name], x, n.name in xs)

        summary = calibrate(qm, ctx, observe, apply, propagate="float", layers=sorted(folds), desc="awq")
        if o.quantize:  # linears outside the calibrated layers (e.g. an included lm_head) still get quantized
            for n in select_linears(qm, o.include, o.exclude):
                if n.name in spec_of:
                    self._clip_quantize(qm, n, spec_of[n.name], None, False)
        gain = [r["loss_after"] / r["loss_before"] for r in records if r["loss_before"] > 0]
        return PassResult(changed=bool(spec_of), summary={
            **summary, "groups_scaled": len(records), "linears": len(spec_of),
            "mean_loss_ratio": round(sum(gain) / max(len(gain), 1), 4), "scales": records})

    def _clip_quantize(self, qm, n, spec: quant.QuantSpec, x: torch.Tensor | None, scaled: bool) -> None:
        """Clip search on the sampled input ``x`` (as AutoAWQ: every linear but q/k, scaled or not),
        then quantize (``quantize=true``)."""
        w = weight_of(qm, n).float()
        clip = self.options.clip and x is not None and n.meta["ptqc"]["role"] not in ("q", "k")
        if clip:
            w = search_clip(x, w, spec)
            qm.store[n.args[1].target] = w.to(qm.dtype)
        if self.options.quantize:
            scale, zp = quant.compute_qparams(w, spec)
            set_quantized_weight(qm, n, spec, quant.quantize(w, scale, zp, spec), scale, zp, "awq",
                                 {"scaled": scaled, "clipped": clip})

    @staticmethod
    def _foldable(qm, prev, lins) -> bool:
        """The fold is exact only if ``prev``'s output reaches nothing but these linears."""
        if is_op(prev, ops.RMS_NORM):
            return all(activation_input(u) is prev for u in prev.users if is_op(u, ops.LINEAR)) and \
                len([u for u in prev.users if is_op(u, ops.LINEAR)]) == len(prev.users)
        out_ch = qm.store.spec(prev.args[1].target)[0][0]
        in_ch = qm.store.spec(lins[0].args[1].target)[0][1]
        return out_ch == in_ch and len(lins) == 1  # v -> o without GQA, up -> down
