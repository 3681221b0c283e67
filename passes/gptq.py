"""gptq: weight quantization with inverse-Hessian error feedback (Frantar et al., 2022).

For a linear y = W x, GPTQ minimizes ||W X - Q(W) X||^2 over the calibration inputs X. It
quantizes W column by column; after each column the rounding error is spread over the
columns not yet quantized, weighted by the inverse of the proxy Hessian H = 2/n X X^T (the
``Hessian`` observer). Columns go in blocks of ``block`` (lazy batch updates), H^-1 is used
through its upper Cholesky factor, and H is dampened by ``damp`` x mean(diag H); if the
Cholesky factorization fails the dampening grows 10x (up to ``retries`` times) and the
manifest says so.

Groups: without ``act_order`` a group's scale and zero point are computed when its first
column is reached, from the already error-corrected weights (the original GPTQ). With
``act_order`` columns go in order of decreasing diag(H) and the group parameters are computed
up front from the original weights ("static groups"), so codes and scales keep the ordinary
contiguous group layout every backend reads, with no permutation index.

Linears that read the same activation (q/k/v, gate/up) share one Hessian and are quantized
together as one stacked matrix (GPTQ is row-independent for a fixed H). Propagation:

    sequential (default)  inside each layer q/k/v are quantized first, then o_proj's Hessian
                          is taken with them quantized, then gate/up, then down (GPTQ's
                          "true sequential"); each node runs once per calibration batch, so
                          calibration costs one forward per layer. Keeps every batch's live
                          activations of one layer between stages (a few [tokens, hidden]
                          tensors; use ``quantized`` if that does not fit).
    quantized             the whole layer is observed with float weights (inputs from the
                          quantized previous layers), quantized, then re-run to get its
                          outputs: two forwards per layer (llm-compressor's sequential pipeline).
    float                 inputs from the float model throughout.

Per linear the manifest records the dampening used and the relative output error
tr(dW H dW^T) / tr(W H W^T) of GPTQ and of plain RTN with the same scheme (``err_gptq`` vs
``err_rtn``), so the gain is visible layer by layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ptqc import quant
from ptqc.calib import calibrate
from ptqc.errors import PtqcError
from ptqc.observers import Hessian
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import grouped_targets, set_quantized_weight, weight_of


class SingularHessian(PtqcError):
    pass


def inverse_cholesky(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, growing damp on failure."""
    mean_diag = torch.diag(h).mean().item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(retries + 1):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0:
                return upper, damp
        damp *= 10
    raise SingularHessian(f"Hessian is not positive definite even with damp={damp / 10:g}")


def drop_dead_inputs(w: torch.Tensor, h: torch.Tensor):
    """Float32 copies of ``w`` [out, in] and ``h`` [in, in] with inputs that were always zero
    (diag(H) == 0) made harmless: H_jj = 1 and W[:, j] = 0 (their weights don't matter).
    Returns (W, H, dead mask). Shared by gptq, billm and slim."""
    W = w.float().clone()
    H = h.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H, dead


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: quant.QuantSpec, *, block: int = 128,
                  damp: float = 0.01, act_order: bool = False, retries: int = 4,
                  dxxt: torch.Tensor | None = None, alpha: float = 0.25):
    """GPTQ one weight matrix [out, in] with Hessian [in, in].

    With ``dxxt`` = 2/n (X_fp - X_q) X_q^T this is GPTAQ (see passes/gptaq.py): the update
    also pulls the weights towards the float model's outputs, through
    P = alpha * triu_1(dXXT U^T) U with U the upper Cholesky factor of H^-1.

    Returns (codes int8 [out, in], scale [out, groups], zero_point or None, damp used)."""
    W, H, dead = drop_dead_inputs(w, h)
    rows, n = W.shape
    if dxxt is not None:
        dxxt = dxxt.float().clone()
        dxxt[:, dead] = 0
    g = spec.group_size if spec.group_size > 0 else n
    static = act_order or spec.group_size == 0
    col = quant.QuantSpec(spec.bits, 0, spec.symmetric)  # one column's codes with its group's params
    if static:
        scale, zp = quant.compute_qparams(W, spec)
    else:
        scale = torch.ones(rows, n // g, device=W.device)
        zp = None if spec.symmetric else torch.zeros(rows, n // g, dtype=torch.int8, device=W.device)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, used = inverse_cholesky(H, damp, retries)
    P = alpha * (dxxt[perm][:, perm] @ Hinv.t()).triu_(1) @ Hinv if dxxt is not None else None
    codes = torch.empty(rows, n, dtype=torch.int8, device=W.device)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        H1 = Hinv[i1:i2, i1:i2]
        P1 = P[i1:i2, i1:i2] if P is not None else None
        for i in range(i2 - i1):
            c = i1 + i
            gi = int(perm[c]) // g
            if not static and c % g == 0:  # group parameters from the error-corrected weights
                s, z = quant.compute_qparams(torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :g], col)
                scale[:, gi] = s[:, 0]
                if zp is not None:
                    zp[:, gi] = z[:, 0]
            s = scale[:, gi:gi + 1]
            z = zp[:, gi:gi + 1] if zp is not None else None
            wc = W1[:, i:i + 1]
            q = quant.quantize(wc, s, z, col)
            codes[:, c] = q[:, 0]
            err = (wc - quant.dequantize(q, s, z, 0))[:, 0] / H1[i, i]
            upd = err[:, None] * H1[i, i:][None, :]
            if P1 is not None:  # GPTAQ: w (before this column's update) times P
                upd = upd - wc * P1[i, i:][None, :]
            W1[:, i:] -= upd
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:] if P is None else E1 @ Hinv[i1:i2, i2:] - W1 @ P[i1:i2, i2:]
    return codes[:, torch.argsort(perm)], scale, zp, used


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """Relative output error on the calibration data: tr(dW H dW^T) / tr(W H W^T)."""
    d = wq - w
    return ((d @ h) * d).sum().item() / max(((w @ h) * w).sum().item(), 1e-30)


@register
class GPTQ(Pass):
    """GPTQ weight quantization: column-wise rounding with inverse-Hessian error feedback.

    Calibrated (uses --calib), layer by layer with quantized-input propagation. `act_order`
    quantizes columns by decreasing Hessian diagonal with static groups (contiguous layout).
    `fallback=rtn` quantizes a linear whose Hessian stays singular with RTN instead of failing.
    """

    name = "gptq"
    requires = frozenset({"canonical"})
    provides = frozenset({"weight_quant"})

    @dataclass
    class Options:
        bits: int = 4
        group: int = 128  # 0 = per output channel
        sym: bool = False
        damp: float = 0.01  # x mean(diag H)
        block: int = 128
        act_order: bool = True
        retries: int = 4  # damp x10 per retry when Cholesky fails
        fallback: str = "error"  # error | rtn
        propagate: str = "sequential"  # sequential | quantized | float
        include: list[str] = field(default_factory=lambda: ["*"])
        exclude: list[str] = field(default_factory=lambda: ["lm_head"])

        def validate(self):
            if not 2 <= self.bits <= 8:
                raise PtqcError(f"bits={self.bits} is outside 2..8")
            if self.group < 0:
                raise PtqcError(f"group={self.group} must be 0 (per channel) or a positive group size")
            if not 0 < self.damp < 10 or self.block < 1 or self.retries < 0:
                raise PtqcError("damp must be in (0, 10), block >= 1, retries >= 0")
            if self.fallback not in ("error", "rtn") or self.propagate not in ("quantized", "float", "sequential"):
                raise PtqcError("fallback is error|rtn and propagate is quantized|float|sequential")

    def targets(self, qm) -> tuple[dict, dict[int, list[list]]]:
        """Per-linear options and, per layer, the linears grouped by shared input."""
        return grouped_targets(qm, self, lambda mo: quant.QuantSpec(mo.bits, mo.group, mo.sym))

    def quantize_group(self, qm, lins, opts, h, errs, dxxt=None) -> None:
        """Quantize linears sharing Hessian ``h``, stacking those that share options too."""
        by_opts: dict = {}
        for n in lins:
            by_opts.setdefault(repr(opts[n.name]), []).append(n)
        for same in by_opts.values():
            self._quantize(qm, same, opts[same[0].name], h, errs, dxxt)

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        opts, groups = self.targets(qm)
        errs = {"gptq": [], "rtn": []}

        def observe(i):
            return {lins[0]: {"h": Hessian()} for lins in groups.get(i, [])}

        def apply(i, stats):
            for lins in groups.get(i, []):
                if lins[0] in stats:  # sequential: only this stage's inputs are observed yet
                    self.quantize_group(qm, lins, opts, stats[lins[0]]["h"].result(), errs)

        summary = calibrate(qm, ctx, observe, apply, propagate=o.propagate, layers=sorted(groups), desc="gptq")
        k = max(len(errs["gptq"]), 1)
        return PassResult(changed=bool(opts), summary={
            **summary, "linears": len(opts),
            "mean_err_gptq": round(sum(errs["gptq"]) / k, 6), "mean_err_rtn": round(sum(errs["rtn"]) / k, 6)})

    def _quantize(self, qm, lins, mo, h, errs, dxxt=None) -> None:
        spec = quant.QuantSpec(mo.bits, mo.group, mo.sym)
        ws = [weight_of(qm, n).float() for n in lins]
        W = torch.cat(ws).to(h.device)
        try:
            codes, scale, zp, used = gptq_quantize(W, h, spec, block=mo.block, damp=mo.damp,
                                                   act_order=mo.act_order, retries=mo.retries, dxxt=dxxt,
                                                   alpha=getattr(mo, "alpha", 0.25))
            method = self.name
        except SingularHessian as e:
            where = ", ".join(n.meta["ptqc"]["module"] for n in lins)
            if mo.fallback != "rtn":
                raise PtqcError(f"{where}: {e}; raise damp, give more calibration data, or allow "
                                "fallback=rtn for such linears") from None
            scale, zp = quant.compute_qparams(W, spec)
            codes, used, method = quant.quantize(W, scale, zp, spec), None, "rtn-fallback"
        hf = h.float()
        row = 0
        for n, w in zip(lins, ws):
            r = slice(row, row + w.shape[0])
            row += w.shape[0]
            c, s, z = codes[r].cpu(), scale[r].cpu(), zp[r].cpu() if zp is not None else None
            wq = quant.dequantize(c, s, z, spec.group_size)
            rs, rz = quant.compute_qparams(w, spec)
            e_gptq = output_error(w, wq, hf.cpu())
            e_rtn = output_error(w, quant.dequantize(quant.quantize(w, rs, rz, spec), rs, rz, spec.group_size),
                                 hf.cpu())
            errs["gptq"].append(e_gptq)
            errs["rtn"].append(e_rtn)
            set_quantized_weight(qm, n, spec, c, s, z, method, {
                "damp": used, "act_order": mo.act_order, "err_gptq": round(e_gptq, 8), "err_rtn": round(e_rtn, 8)})
