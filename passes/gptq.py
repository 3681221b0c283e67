"""gptq: weight quantization with inverse-Hessian error feedback (Frantar et al., 2022).

The column loop, the dampening (``damp``, grown 10x up to ``retries`` times when Cholesky fails)
and ``act_order`` (static groups: the contiguous layout every backend reads) are in
:mod:`ptqc.gptq_core`. Linears reading the same activation (q/k/v, gate/up) share one Hessian and
are quantized as one stacked matrix. ``propagate``: ``sequential`` (default; GPTQ's "true
sequential": q/k/v, then o_proj on their quantized outputs, then gate/up, then down, one forward
per layer), ``quantized`` (the layer observed, quantized, then re-run: llm-compressor's pipeline)
or ``float``. Per linear the manifest records the dampening and the relative output error
tr(dW H dW^T) / tr(W H W^T) of GPTQ and of RTN with the same scheme (``err_gptq``, ``err_rtn``;
estimated on at most 256 evenly spaced rows, see :func:`ptqc.gptq_core.output_error`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from ptqc import distributed, experts, ops, quant
from ptqc.calib import calibrate
from ptqc.errors import PtqcError
from ptqc.gptq_core import SingularHessian, output_error, quantize_groups, sample_rows
from ptqc.ir import info
from ptqc.moe_calib import ExpertHessians
from ptqc.observers import Hessian
from ptqc.options import WeightOptions
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import grouped_targets, set_quantized_weight, weight_node, weight_of


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: quant.QuantSpec, *, block: int = 128,
                  damp: float = 0.01, act_order: bool = False, retries: int = 4,
                  dxxt: torch.Tensor | None = None, alpha: float = 0.25):
    """GPTQ one weight matrix [out, in] with Hessian [in, in] on ``spec``'s grid (GPTAQ with
    ``dxxt``, see :func:`ptqc.gptq_core.quantize_groups`).

    Returns (codes int8 [out, in], scale [out, groups], zero_point or None, damp used)."""
    spec.check_fits(w.shape[1])
    groups = w.shape[1] // spec.group_size if spec.group_size > 0 else 1
    codes, scale, zp, _, used = quantize_groups(
        w, h, [spec.bits] * groups, spec.group_size, sym=spec.symmetric, block=block, damp=damp,
        act_order=act_order, retries=retries, dxxt=dxxt, alpha=alpha)
    return codes, scale, zp, used


def gptq_or_rtn(w: torch.Tensor, h: torch.Tensor, spec: quant.QuantSpec, mo, where: str, dxxt=None,
                stand_in: bool = False):
    """(codes, scale, zp, damp used, method) of ``w`` by GPTQ under pass options ``mo``; a Hessian
    that stays singular is an error naming ``where``, or RTN with ``fallback=rtn``. Under
    ``--nproc`` one rank computes it (:func:`ptqc.distributed.heavy`; ``stand_in``: a dry run
    goes on with RTN's result)."""
    rows, n = w.shape
    return distributed.heavy(_gptq_or_rtn, w, h, spec, mo, where, dxxt, cost=rows * n * n + n ** 3,
                             stand_in=(lambda: (*quant.rtn(w, spec), mo.damp, None)) if stand_in else None)


def _gptq_or_rtn(w, h, spec, mo, where, dxxt):
    try:
        codes, scale, zp, used = gptq_quantize(w, h, spec, block=mo.block, damp=mo.damp, act_order=mo.act_order,
                                               retries=mo.retries, dxxt=dxxt, alpha=getattr(mo, "alpha", 0.25))
        return codes, scale, zp, used, None
    except SingularHessian as e:
        if mo.fallback != "rtn":
            raise PtqcError(f"{where}: {e}; raise damp, give more calibration data, or allow "
                            "fallback=rtn for such linears") from None
        return (*quant.rtn(w, spec), None, "rtn-fallback")


def gptq_stack(site, W: torch.Tensor, stats: ExpertHessians, spec: quant.QuantSpec, mo) -> tuple:
    """GPTQ the expert stack W [E, out, in] of ``site`` expert by expert, each on its own Hessian
    (:class:`ptqc.moe_calib.ExpertHessians`); an expert routed fewer than ``mo.min_tokens`` tokens
    takes the all-token statistics (``few_tokens=all``) or RTN (``rtn``), as does one with no rows.
    Returns (codes, scale, zp, record) with the record's per-expert ``tokens`` and ``fallback`` ids."""
    parts, fallback, errs = [], [], {"gptq": [], "rtn": []}
    for e in range(W.shape[0]):
        w = W[e].float()
        few = not mo.all_experts and int(stats.counts[e]) < mo.min_tokens
        h = stats.hessian(site.proj, e, all_tokens=mo.all_experts or (few and mo.few_tokens == "all"))
        if few or h is None:
            fallback.append(e)
        rtn = quant.rtn(w, spec)
        if h is None or (few and mo.few_tokens == "rtn"):
            parts.append(rtn)
            continue
        c, s, z = gptq_or_rtn(w, h, spec, mo, f"{site.module} expert {e}", stand_in=True)[:3]
        parts.append((c, s, z))
        errs["gptq"].append(output_error(w, quant.dequantize(c, s, z, spec.group_size), h))
        errs["rtn"].append(output_error(w, quant.dequantize(*rtn, spec.group_size), h))
    codes, scale = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    zp = torch.stack([p[2] for p in parts]) if parts[0][2] is not None else None
    rec = {"tokens": stats.counts.tolist(), "fallback": fallback, "min_tokens": mo.min_tokens,
           "stats": "all" if mo.all_experts else "routed", "few_tokens": mo.few_tokens,
           **{f"err_{k}": round(sum(v) / len(v), 8) for k, v in errs.items() if v}}
    return codes, scale, zp, rec


def calibrate_hessians(qm, ctx, groups: dict, quantize, propagate: str, desc: str, stacks: dict | None = None,
                       split: bool = False) -> dict:
    """Calibrate layer by layer with one Hessian per group of linears sharing an input (``groups``:
    layer -> [linears], from ``grouped_targets``); ``quantize(lins, h)`` once a group's is complete.
    ``stacks``: layer -> {experts node: (make() -> ExpertHessians, callback(stats))}, per-expert
    statistics made when their layer is observed, so only that layer's are held at a time.
    ``split``: the heavy calls of ``quantize`` and the callbacks are shared out over the ranks
    (:func:`ptqc.distributed.split`; they must change nothing before their first heavy call)."""
    stacks = stacks or {}

    def observe(i):
        obs = {lins[0]: {"h": Hessian()} for lins in groups.get(i, [])}
        return {**obs, **{node: {"experts": make()} for node, (make, _) in stacks.get(i, {}).items()}}

    def apply(i, stats):  # sequential: only this stage's inputs are observed yet
        items = [lambda lins=lins: quantize(lins, stats[lins[0]]["h"].result())
                 for lins in groups.get(i, []) if lins[0] in stats]
        items += [lambda node=node, done=done: done(stats[node]["experts"])
                  for node, (_, done) in stacks.get(i, {}).items() if node in stats]
        if split:
            distributed.split(items)
        else:
            for f in items:
                f()

    return calibrate(qm, ctx, observe, apply, propagate=propagate, layers=sorted({*groups, *stacks}), desc=desc)


def expert_stacks(qm, opts: dict, quantize) -> dict:
    """layer -> {experts node: (make() -> ExpertHessians, callback)} for the expert sites in ``opts``;
    ``quantize(site, stats)`` per site once its node's statistics are complete."""
    out: dict = {}
    for node in qm.nodes(ops.MOE_EXPERTS):
        chosen = [s for s in experts.sites(qm) if s.node is node and s.name in opts]
        if not chosen:
            continue
        mos = [opts[s.name] for s in chosen]
        make = functools.partial(ExpertHessians, qm.store.spec(weight_node(chosen[0]).target)[0][0],
                                 node.kwargs.get("act", "silu"), node.kwargs.get("down_act_bits", 0),
                                 all_tokens=any(mo.all_experts or mo.few_tokens == "all" for mo in mos))
        out.setdefault(info(node)["layer"], {})[node] = (make, lambda st, chosen=chosen: [quantize(s, st) for s in chosen])
    return out


@register
class GPTQ(Pass):
    """GPTQ weight quantization: column-wise rounding with inverse-Hessian error feedback.

    Calibrated (uses --calib), layer by layer with quantized-input propagation. `act_order`
    quantizes columns by decreasing Hessian diagonal with static groups (contiguous layout).
    `fallback=rtn` quantizes a linear whose Hessian stays singular with RTN instead of failing.
    MoE expert stacks: one Hessian per expert from the tokens routed to it (`all_experts=true`: from
    every token); an expert routed fewer than `min_tokens` tokens uses the all-token statistics
    (`few_tokens=all`) or RTN (`few_tokens=rtn`), recorded per stack in the manifest.
    """

    name = "gptq"
    experts = True
    requires = frozenset({"canonical"})
    provides = frozenset({"weight_quant"})

    @dataclass
    class Options(WeightOptions):
        damp: float = 0.01  # x mean(diag H)
        block: int = 128
        act_order: bool = True
        retries: int = 4  # damp x10 per retry when Cholesky fails
        fallback: str = "error"  # error | rtn
        propagate: str = "sequential"  # sequential | quantized | float
        all_experts: bool = False  # expert Hessians from every token, not only the routed ones
        min_tokens: int = 16  # experts routed fewer tokens take `few_tokens`
        few_tokens: Literal["rtn", "all"] = "rtn"  # RTN, or the all-token statistics

        def validate(self):
            super().validate()
            if not 0 < self.damp < 10 or self.block < 1 or self.retries < 0 or self.min_tokens < 0:
                raise PtqcError("damp must be in (0, 10), block >= 1, retries >= 0, min_tokens >= 0")
            if self.fallback not in ("error", "rtn") or self.propagate not in ("quantized", "float", "sequential"):
                raise PtqcError("fallback is error|rtn and propagate is quantized|float|sequential")

    def quantize_group(self, qm, lins, opts, h, errs, dxxt=None) -> None:
        """Quantize linears sharing Hessian ``h``, stacking those that share options too."""
        by_opts: dict = {}
        for n in lins:
            by_opts.setdefault(repr(opts[n.name]), []).append(n)
        for same in by_opts.values():
            self._quantize(qm, same, opts[same[0].name], h, errs, dxxt)

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        opts, groups = grouped_targets(qm, self)
        errs = {"gptq": [], "rtn": []}
        recs: dict = {}
        stacks = expert_stacks(qm, opts, lambda site, st: recs.update({site.module: self.quantize_stack(
            qm, site, opts[site.name], st)}))
        summary = calibrate_hessians(qm, ctx, groups, lambda lins, h: self.quantize_group(qm, lins, opts, h, errs),
                                     o.propagate, "gptq", stacks, split=True)
        k = max(len(errs["gptq"]), 1)
        summary = {**summary, "linears": len(opts) - len(recs), "mean_err_gptq": round(sum(errs["gptq"]) / k, 6),
                   "mean_err_rtn": round(sum(errs["rtn"]) / k, 6)}
        if recs:
            summary["experts"] = {m: {"tokens": r["tokens"], "fallback": r["fallback"]} for m, r in recs.items()}
        return PassResult(changed=bool(opts), summary=summary)

    def quantize_stack(self, qm, site, mo, stats) -> dict:
        """GPTQ an expert stack expert by expert (:func:`gptq_stack`); its record."""
        spec = mo.weight_spec()
        codes, scale, zp, rec = gptq_stack(site, weight_of(qm, site), stats, spec, mo)
        set_quantized_weight(qm, site, spec, codes, scale, zp, self.name, {**rec, "act_order": mo.act_order})
        return rec

    def _quantize(self, qm, lins, mo, h, errs, dxxt=None) -> None:
        spec = mo.weight_spec()
        parts = [weight_of(qm, n) for n in lins]
        rows = [p.shape[0] for p in parts]
        W = torch.cat(parts).float().to(h.device)  # the only copy: 70B's gate/up stack is 1.9 GB in float32
        del parts
        where = ", ".join(n.meta["ptqc"]["module"] for n in lins)
        codes, scale, zp, used, method = gptq_or_rtn(W, h, spec, mo, where, dxxt)
        method = method or self.name
        hf = h.float().cpu()
        for n, w, c, s, z in zip(lins, W.cpu().split(rows), codes.cpu().split(rows), scale.cpu().split(rows),
                                 zp.cpu().split(rows) if zp is not None else [None] * len(lins)):
            wq = quant.dequantize(c, s, z, spec.group_size)
            e_gptq = output_error(w, wq, hf)
            ws = sample_rows(w)  # RTN is row by row: only the rows output_error reads
            e_rtn = output_error(ws, quant.dequantize(*quant.rtn(ws, spec), spec.group_size), hf)
            errs["gptq"].append(e_gptq)
            errs["rtn"].append(e_rtn)
            set_quantized_weight(qm, n, spec, c, s, z, method, {
                "damp": used, "act_order": mo.act_order, "err_gptq": round(e_gptq, 8), "err_rtn": round(e_rtn, 8)})
