"""GPTQ's error-feedback core (Frantar et al., 2022), shared by gptq, gptaq, slim and billm.

For a linear y = W x, GPTQ minimizes ||W X - Q X||^2 over the calibration inputs X. It
quantizes W column by column; after each column the rounding error is spread over the columns
not yet quantized, weighted by the inverse of the proxy Hessian H = 2/n X X^T (the ``Hessian``
observer), used through U, the upper Cholesky factor of H^-1 (:func:`inverse_cholesky`: H is
dampened by ``damp`` x mean(diag H), 10x more per failed factorization). Columns go in blocks
(lazy batch updates, :func:`error_feedback`). Methods differ in how one column is rounded, a
callback: a uniform grid per group (:func:`quantize_groups`: gptq, gptaq, and slim with one
bit width per group) or binarization with per-block parameters (billm).
"""
from __future__ import annotations

from typing import Callable

import torch

from ptqc import quant
from ptqc.errors import PtqcError


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
    Returns (W, H, dead mask)."""
    W = w.float().clone()
    H = h.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H, dead


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """Relative output error on the calibration data: tr(dW H dW^T) / tr(W H W^T)."""
    d = wq - w
    return ((d @ h) * d).sum().item() / max(((w @ h) * w).sum().item(), 1e-30)


Column = Callable[[int, torch.Tensor, Callable[[int], torch.Tensor]], torch.Tensor]


def error_feedback(W: torch.Tensor, U: torch.Tensor, column: Column, *, block: int = 128,
                   P: torch.Tensor | None = None,
                   start: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Quantize W [rows, n] column by column (columns and U already in visiting order),
    updating W in place. ``column(c, w, ahead)`` returns column c rounded [rows, 1] from its
    error-corrected weights w [rows, 1]; ``ahead(k)`` gives the error-corrected columns c..c+k-1
    (a group's grid fitted when its first column is reached). ``start(c, block)`` sees each
    block's error-corrected columns before any is rounded. With P (GPTAQ) every update also
    subtracts w P[c, c:]. Returns the rounded W."""
    n = W.shape[1]
    Q = torch.empty_like(W)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        P1 = P[i1:i2, i1:i2] if P is not None else None
        if start is not None:
            start(i1, W1)
        for i in range(i2 - i1):
            wc = W1[:, i:i + 1]
            q = column(i1 + i, wc, lambda k: torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :k])
            Q[:, i1 + i] = q[:, 0]
            err = (wc - q)[:, 0] / U1[i, i]
            upd = err[:, None] * U1[i, i:][None, :]
            if P1 is not None:  # GPTAQ: w (before this column's update) times P
                upd = upd - wc * P1[i, i:][None, :]
            W1[:, i:] -= upd
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:] if P is None else E1 @ U[i1:i2, i2:] - W1 @ P[i1:i2, i2:]
    return Q


def uniform_qparams(x: torch.Tensor, bits: int, sym: bool):
    """Scale and zero point [rows, 1] of columns x on ``ptqc.quant``'s ``bits`` grid."""
    return quant.compute_qparams(x, quant.QuantSpec(bits, 0, sym))


def uniform_codes(x: torch.Tensor, scale, zp, bits: int, sym: bool) -> torch.Tensor:
    return quant.quantize(x, scale, zp, quant.QuantSpec(bits, 0, sym))


def quantize_groups(w: torch.Tensor, h: torch.Tensor, group_bits: list[int], group: int, *, sym: bool = False,
                    block: int = 128, damp: float = 0.01, act_order: bool = False, retries: int = 4,
                    dxxt: torch.Tensor | None = None, alpha: float = 0.25,
                    qparams=uniform_qparams, codes_of=uniform_codes):
    """GPTQ one weight [out, in] (Hessian [in, in]) where each group of ``group`` columns (0: one
    group) is rounded on its own grid with ``group_bits[gi]`` bits (``qparams``/``codes_of``).

    Without ``act_order`` a group's scale and zero point are computed when its first column is
    reached, from the error-corrected weights (the original GPTQ). With ``act_order`` columns go
    in order of decreasing diag(H) and the group parameters are computed up front from the
    original weights ("static groups"), keeping the contiguous group layout.

    With ``dxxt`` = 2/n (X_fp - X_q) X_q^T this is GPTAQ (see passes/gptaq.py): the update also
    pulls the weights towards the float model's outputs, through P = alpha * triu_1(dXXT U^T) U.

    Returns (codes int8 [out, in], scale [out, groups], zero_point or None, the dequantized
    weight, damp used)."""
    W, H, dead = drop_dead_inputs(w, h)
    rows, n = W.shape
    g = group or n
    scale = torch.ones(rows, n // g, device=W.device)
    zp = None if sym else torch.zeros(rows, n // g, dtype=torch.int8, device=W.device)

    def fit(gi, x):
        s, z = qparams(x, group_bits[gi], sym)
        scale[:, gi] = s[:, 0]
        if zp is not None:
            zp[:, gi] = z[:, 0]

    if act_order:
        for gi in range(n // g):
            fit(gi, W[:, gi * g:(gi + 1) * g])
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U, used = inverse_cholesky(H, damp, retries)
    P = None
    if dxxt is not None:
        dxxt = dxxt.float().clone()
        dxxt[:, dead] = 0
        P = alpha * (dxxt[perm][:, perm] @ U.t()).triu_(1) @ U
    codes = torch.empty(rows, n, dtype=torch.int8, device=W.device)

    def column(c, wc, ahead):
        gi = int(perm[c]) // g
        if not act_order and c % g == 0:
            fit(gi, ahead(g))
        s = scale[:, gi:gi + 1]
        z = zp[:, gi:gi + 1] if zp is not None else None
        q = codes_of(wc, s, z, group_bits[gi], sym)
        codes[:, c] = q[:, 0]
        return quant.dequantize(q, s, z, 0)

    Q = error_feedback(W, U, column, block=block, P=P)
    inv = torch.argsort(perm)
    return codes[:, inv], scale, zp, Q[:, inv], used
