"""billm: ~1-bit weights by salient-column residual binarization and a bell-shaped split (Huang et al., 2024).

Inside :mod:`ptqc.gptq_core`'s error-feedback loop (blocks of ``block`` columns in natural order,
each column's error fed back through U, the upper Cholesky factor of H^-1), a block is binarized
with parameters fitted when it starts:

1. **Salient columns** (OBS saliency w_ij^2 / U_jj^2 summed per column; the top k, k searched per
   block in 0..``max_salient`` or fixed by ``salient_frac``) get residual binarization, two binary
   bases per row: w ~ m1 + a1*sign(w - m1) + m2 + a2*sign(r - m2).
2. **The rest** is split at a break-point p on |w| (searched over quantiles of |w|) into a
   concentrated and a sparse group, each binarized per row as m + a*sign(w - m).

m is the row mean over a group, a the mean |w - m| (the L2-optimal binary scale); searches score
the block's GPTQ loss sum (w - q)^2 / U_jj^2. Unlike the reference code we score the actual scheme
and feed back column by column inside a block. ``avg_bits`` is the paper's count, 1 + the salient
fraction; ``mask_bits`` (the split flags) and the per-row parameters are not counted there.

**Storage is float (simulated).** A binarized weight is not the uniform integer grid every
backend's ``dequantize_weight`` implements, so the binarized weight is stored in the model dtype
(a plain float linear); the manifest says ``method: billm``, ``bits: 1``, ``storage: float`` and
records per linear the salient columns and ``err_billm`` vs ``err_sign`` (plain a*sign(w) per row).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqc.errors import PtqcError
from ptqc.ir import info
from ptqc.gptq_core import (SingularHessian, error_feedback, inverse_cholesky, ordered_weight, output_error,
                             visiting_order)
from ptqc.options import Selection
from ptqc.passes.gptq import calibrate_hessians
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import grouped_targets, set_weight, weight_of

COARSE_QUANTILES = torch.linspace(0.10, 0.90, 9)  # break-point candidates (quantiles of |w|) while k is searched
FINE_STEP = 0.01  # then +-0.1 around the best coarse quantile in steps of 0.01


# ---- binarization primitives -------------------------------------------------------------------
def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


def _fit(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean m and binary scale a = mean |x - m| over the masked elements.

    ``mask`` may carry leading candidate dimensions ([..., rows, c]); m and a are [..., rows, 1]."""
    mask = mask.float()
    cnt = mask.sum(-1, keepdim=True).clamp_min(1)
    m = (x * mask).sum(-1, keepdim=True) / cnt
    a = ((x - m).abs() * mask).sum(-1, keepdim=True) / cnt
    return m, a


def _bin(x, m, a):
    return m + a * _sign(x - m)


def sign_binarize(w: torch.Tensor) -> torch.Tensor:
    """Plain 1-bit binarization a * sign(w) per row, a = mean |w| (the baseline)."""
    return w.abs().mean(1, keepdim=True) * _sign(w)


@dataclass
class BlockParams:
    """How one block of columns is binarized (fitted when the block starts)."""
    salient: torch.Tensor  # bool [cols]
    res: tuple  # (m1, a1, m2, a2) of the salient columns' residual binarization, [rows, 1] each
    p: float  # break-point on |w| of the non-salient weights
    small: tuple  # (m, a) of |w| < p
    large: tuple  # (m, a) of |w| >= p

    def binarize(self, x: torch.Tensor, salient: torch.Tensor) -> torch.Tensor:
        """Binarize columns x [rows, c] (``salient``: bool [c]) with these parameters."""
        m1, a1, m2, a2 = self.res
        q1 = _bin(x, m1, a1)
        q_sal = q1 + _bin(x - q1, m2, a2)
        q_non = torch.where(x.abs() >= self.p, _bin(x, *self.large), _bin(x, *self.small))
        return torch.where(salient[None, :], q_sal, q_non)


def _residual(x, mask):
    """Residual binarization (two bases) of the masked x: (m1, a1, m2, a2), binarized x."""
    m1, a1 = _fit(x, mask)
    q1 = _bin(x, m1, a1)
    m2, a2 = _fit(x - q1, mask)
    return (m1, a1, m2, a2), q1 + _bin(x - q1, m2, a2)


CHUNK = 1 << 22  # elements per candidate batch: a few large tensor ops instead of many small ones


def _search(w, wt, sal, quantiles) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score candidate salient-column sets ``sal`` [K, c], each with its best break-point among the
    ``quantiles`` of its non-salient |w|. Returns (GPTQ loss [K], break-point [K], its quantile [K])."""
    rows, c = w.shape
    losses, points, levels = [], [], []
    for sk in torch.split(sal, max(1, CHUNK // (len(quantiles) * rows * c))):
        smask = sk[:, None, :].expand(-1, rows, c)  # [k, rows, c]
        _, q_sal = _residual(w, smask)
        loss_sal = (((w - q_sal) ** 2) * wt * smask).sum((1, 2))
        non = ~smask
        mags = torch.where(non, w.abs(), float("nan")).reshape(len(sk), -1)
        ps = torch.nanquantile(mags, quantiles.to(w), dim=1).t()  # [k, S]; nan when nothing is left
        large = non[:, None] & (w.abs() >= ps[:, :, None, None])  # [k, S, rows, c]
        small = non[:, None] & ~large
        q = torch.where(large, _bin(w, *_fit(w, large)), _bin(w, *_fit(w, small)))
        loss_non = (((w - q) ** 2) * wt * non[:, None]).sum((2, 3))  # [k, S]
        best, j = loss_non.min(1)
        losses.append(loss_sal + best)
        points.append(ps.gather(1, j[:, None])[:, 0])
        levels.append(quantiles[j.cpu()])
    return torch.cat(losses), torch.cat(points), torch.cat(levels)


def fit_block(w: torch.Tensor, d: torch.Tensor, salient_frac: float = 0.0, max_salient: int = 48) -> BlockParams:
    """Choose the salient columns and the break-point of one block w [rows, c] (d: U_jj, [c])."""
    rows, c = w.shape
    wt = (1.0 / d ** 2)[None, :]  # the GPTQ loss weight of each column
    rank = torch.empty(c, dtype=torch.long, device=w.device)
    rank[torch.argsort((w ** 2 * wt).sum(0), descending=True)] = torch.arange(c, device=w.device)
    if salient_frac > 0:
        ks = torch.tensor([min(round(salient_frac * c), c)])
    else:
        ks = torch.arange(min(max_salient, c - 1) + 1)
    cands = rank[None, :] < ks.to(w.device)[:, None]  # [K, c]: the k most salient columns
    loss, _, level = _search(w, wt, cands, COARSE_QUANTILES)  # k on coarse break-points, ...
    best = int(torch.argmin(loss))
    cands, q0 = cands[best][None], level[best].item()
    fine = torch.arange(max(0.1, q0 - 0.1), min(0.9, q0 + 0.1) + FINE_STEP / 2, FINE_STEP)
    _, p, _ = _search(w, wt, cands, fine)  # ... then the break-point finely for that k
    p = p[0].item()
    sal = cands[0]
    smask = sal[None, :].expand(rows, c)
    res, _ = _residual(w, smask)
    if p != p:  # nan: every column is salient
        p = float("inf")
    large = ~smask & (w.abs() >= p)
    return BlockParams(sal, res, p, _fit(w, ~smask & ~large), _fit(w, large))


def billm_quantize(w: torch.Tensor, h: torch.Tensor, *, block: int = 128, damp: float = 0.01, retries: int = 4,
                   salient_frac: float = 0.0, max_salient: int = 48):
    """BiLLM one weight matrix [out, in] with Hessian [in, in].

    Returns (binarized float weight [out, in], number of salient columns, damp used)."""
    U, used = inverse_cholesky(h, damp, retries)
    W = ordered_weight(w, h, visiting_order(h, act_order=False))
    blocks: list[tuple[int, BlockParams]] = []  # (first column, parameters) of each block so far

    def start(c, W1):
        d = torch.diag(U[c:c + W1.shape[1], c:c + W1.shape[1]])
        blocks.append((c, fit_block(W1, d, salient_frac, max_salient)))

    def binarize(c, wc, ahead):
        c0, params = blocks[-1]
        return params.binarize(wc, params.salient[c - c0:c - c0 + 1])

    Q = error_feedback(W, U, binarize, block=block, start=start)
    return Q, sum(int(p.salient.sum()) for _, p in blocks), used


@register
class BiLLM(Pass):
    """BiLLM ~1.1-bit weights: salient columns (Hessian saliency) get residual binarization, the
    rest a searched bell-shaped split into two binarized groups, inside GPTQ error feedback.

    Calibrated, layer by layer with quantized-input propagation. Storage is float (simulated): a
    binarized weight is not a uniform integer grid, so the dequantized weight is stored
    (`storage: float` in the manifest). `salient_frac` > 0 fixes the salient fraction per block,
    otherwise k = 0..max_salient is searched per block.
    """

    name = "billm"
    requires = frozenset({"canonical"})
    provides = frozenset({"weight_quant"})

    @dataclass
    class Options(Selection):
        block: int = 128  # columns per block: error-feedback block and binarization group
        salient_frac: float = 0.0  # 0 = search k per block; >0 = this fraction of each block's columns
        max_salient: int = 48  # largest k (salient columns per block) the search tries
        damp: float = 0.01  # x mean(diag H)
        retries: int = 4  # damp x10 per retry when Cholesky fails
        propagate: str = "quantized"  # quantized | float

        def validate(self):
            if self.block < 2:
                raise PtqcError(f"block={self.block} must be >= 2")
            if not 0 <= self.salient_frac <= 1 or self.max_salient < 0:
                raise PtqcError("salient_frac must be in [0, 1] and max_salient >= 0")
            if not 0 < self.damp < 10 or self.retries < 0:
                raise PtqcError("damp must be in (0, 10) and retries >= 0")
            if self.propagate not in ("quantized", "float"):
                raise PtqcError(f"propagate={self.propagate!r}: use quantized or float")

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        opts, groups = grouped_targets(qm, self)
        stats_all = {"err_billm": [], "err_sign": [], "params": 0, "bases": 0.0}

        def quantize(lins, h):
            for n in lins:  # one by one: each linear picks its own salient columns
                self._binarize(qm, n, opts[n.name], h.float(), stats_all)

        summary = calibrate_hessians(qm, ctx, groups, quantize, o.propagate, "billm")
        k = max(len(stats_all["err_billm"]), 1)
        return PassResult(changed=bool(opts), summary={
            **summary, "linears": len(opts), "storage": "float",
            "avg_bits": round(stats_all["bases"] / max(stats_all["params"], 1), 4),
            "mean_err_billm": round(sum(stats_all["err_billm"]) / k, 6),
            "mean_err_sign": round(sum(stats_all["err_sign"]) / k, 6)})

    def _binarize(self, qm, n, mo, h, acc) -> None:
        module = n.meta["ptqc"]["module"]
        w = weight_of(qm, n).float()
        try:
            wq, k, used = billm_quantize(w.to(h.device), h, block=mo.block, damp=mo.damp, retries=mo.retries,
                                         salient_frac=mo.salient_frac, max_salient=mo.max_salient)
        except SingularHessian as e:
            raise PtqcError(f"{module}: {e}; raise damp or give more calibration data") from None
        wq, hc = wq.cpu(), h.cpu()
        rows, cols = w.shape
        bases = rows * cols + k * rows  # one binary base per weight, two in salient columns
        e_billm, e_sign = output_error(w, wq, hc), output_error(w, sign_binarize(w), hc)
        acc["err_billm"].append(e_billm)
        acc["err_sign"].append(e_sign)
        acc["params"] += rows * cols
        acc["bases"] += bases
        set_weight(qm, n, wq)
        q = {"method": "billm", "bits": 1, "group": mo.block, "sym": False}
        info(n).setdefault("quant", {})["weight"] = q
        qm.quant.setdefault(module, {})["weight"] = {
            **q, "storage": "float", "salient_cols": k, "salient_frac": round(k / cols, 4),
            "avg_bits": round(bases / (rows * cols), 4),
            "mask_bits": round(1 - k / cols + 1 / rows, 4),
            "damp": used, "err_billm": round(e_billm, 8), "err_sign": round(e_sign, 8)}
