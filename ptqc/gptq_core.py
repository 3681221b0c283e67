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

import functools
from typing import Callable

import torch

from ptqc import quant
from ptqc.errors import PtqcError


class SingularHessian(PtqcError):
    pass


def visiting_order(h: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Column order: by decreasing diag(H) (dead inputs counted as 1) with ``act_order``, else as is."""
    d = torch.diag(h).float().clone()
    d[d == 0] = 1
    return torch.argsort(d, descending=True) if act_order else torch.arange(d.numel(), device=h.device)


def damped(h: torch.Tensor, damp: float, perm: torch.Tensor) -> torch.Tensor:
    """A new float32 H[perm][:, perm] (filled in row blocks: no second [n, n] temporary) with
    inputs that were always zero made harmless (H_jj = 1) and damp x mean(diag H) added to the
    diagonal."""
    n = h.shape[0]
    H = torch.empty(n, n, dtype=torch.float32, device=h.device)
    for r in range(0, n, 1024):
        H[r:r + 1024] = h[perm[r:r + 1024]][:, perm]
    d = H.diagonal()
    d[d == 0] = 1
    d.add_(damp * torch.diag(H).mean().item())  # the mean of a contiguous copy: the same sum order as before
    return H


def inverse_cholesky(h: torch.Tensor, damp: float, retries: int,
                     perm: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """U, the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 with H = h[perm][:, perm]
    (:func:`damped`), growing damp 10x per failed factorization; and the damp used.

    The three factorizations run in place in one [n, n] buffer (at 70B widths one is 3.3 GB):
    LAPACK works on column-major matrices, so the buffer is used through its transpose and U is
    returned as a column-major view."""
    perm = torch.arange(h.shape[0], device=h.device) if perm is None else perm
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for _ in range(retries + 1):
        A = damped(h, damp, perm).mT  # symmetric: the same matrix, column-major
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info.item() == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if info.item() == 0:
                return A, damp
        damp *= 10
    raise SingularHessian(f"Hessian is not positive definite even with damp={damp / 10:g}")


def dead_inputs(h: torch.Tensor) -> torch.Tensor:
    """Inputs that were always zero (diag(H) == 0): their weights don't matter and are set to 0."""
    return torch.diag(h) == 0


def ordered_weight(w: torch.Tensor, h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """A new float32 W[:, perm] with the dead inputs' columns zeroed."""
    W = w[:, perm].float()
    W[:, dead_inputs(h)[perm]] = 0
    return W


ERROR_ROWS = 256


def sample_rows(w: torch.Tensor, max_rows: int = ERROR_ROWS) -> torch.Tensor:
    """Every k-th row of w, k the smallest that leaves at most ``max_rows``."""
    return w[::-(-w.shape[0] // max_rows)]


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor, max_rows: int | None = ERROR_ROWS) -> float:
    """Relative output error on the calibration data: tr(dW H dW^T) / tr(W H W^T).

    Exact costs 2 rows n^2 flops, as much as GPTQ's own error feedback (at 70B's down_proj, 8192 x
    28672, 13 TFLOP for one call): beyond ``max_rows`` rows it is estimated on every k-th row (the
    rows of a linear are alike; a diagnostic, not a decision: pass None to compare candidates)."""
    if max_rows is not None:
        w, wq = sample_rows(w, max_rows), sample_rows(wq, max_rows)
    d = wq - w
    return ((d @ h) * d).sum().item() / max(((w @ h) * w).sum().item(), 1e-30)


Column = Callable[[int, torch.Tensor, Callable[[int], torch.Tensor]], torch.Tensor]


INNER = 16  # columns per rank-1 sub-block inside a block


def error_feedback(W: torch.Tensor, U: torch.Tensor, column: Column, *, block: int = 128,
                   P: torch.Tensor | None = None,
                   start: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Quantize W [rows, n] column by column (columns and U already in visiting order),
    updating W in place. ``column(c, w, ahead)`` returns column c rounded [rows, 1] from its
    error-corrected weights w [rows, 1]; ``ahead(k)`` gives the error-corrected columns c..c+k-1
    of the block, then the columns after it (a group's grid fitted when its first column is
    reached). ``start(c, block)`` sees each block's error-corrected columns before any is rounded.
    With P (GPTAQ) every update also subtracts w P[c, c:]. Returns W, overwritten column by column
    with the rounded weights (a column is not read once its block is copied out, so no second
    [rows, n] buffer is needed).

    Updates are lazy at two levels: a column's error reaches the columns of its ``INNER`` sub-block
    at once (rank 1), the rest of the block after the sub-block and the columns after the block
    after the block (matrix products in place): the same sums as column by column, in another
    order, with 8x less memory traffic than rank-1 updates over the whole block."""
    n = W.shape[1]
    Q = W
    inner = INNER if P is None else block  # GPTAQ's w P term stays column by column
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        P1 = P[i1:i2, i1:i2] if P is not None else None
        if start is not None:
            start(i1, W1)
        for j1 in range(0, i2 - i1, inner):
            j2 = min(j1 + inner, i2 - i1)
            for i in range(j1, j2):
                wc = W1[:, i:i + 1]

                def ahead(k, i=i, j1=j1, j2=j2):
                    later = W1[:, j2:] - E1[:, j1:i] @ U1[j1:i, j2:]  # the sub-block's pending updates
                    return torch.cat([W1[:, i:j2], later, W[:, i2:i2 + k]], 1)[:, :k]
                q = column(i1 + i, wc, ahead)
                Q[:, i1 + i] = q[:, 0]
                err = (wc - q)[:, 0] / U1[i, i]
                if P1 is not None:  # GPTAQ: w (before this column's update) times P
                    W1[:, i:].sub_(err[:, None] * U1[i, i:][None, :] - wc * P1[i, i:][None, :])
                else:
                    W1[:, i:j2].addr_(err, U1[i, i:j2], alpha=-1)
                E1[:, i] = err
            if P1 is None and j2 < i2 - i1:
                W1[:, j2:].addmm_(E1[:, j1:j2], U1[j1:j2, j2:], alpha=-1)
        if P is None:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)
        else:
            W[:, i2:] -= E1 @ U[i1:i2, i2:] - W1 @ P[i1:i2, i2:]
    return Q


@functools.lru_cache(maxsize=None)
def _spec(bits: int, sym: bool) -> quant.QuantSpec:
    return quant.QuantSpec(bits, 0, sym)  # made once: the column loop asks for it n times


def uniform_qparams(x: torch.Tensor, bits: int, sym: bool):
    """Scale and zero point [rows, 1] of columns x on ``ptqc.quant``'s ``bits`` grid."""
    return quant.compute_qparams(x, _spec(bits, sym))


def uniform_codes(x: torch.Tensor, scale, zp, bits: int, sym: bool) -> torch.Tensor:
    return quant.quantize(x, scale, zp, _spec(bits, sym))


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
    rows, n = w.shape
    g = group or n
    dead = dead_inputs(h)
    scale = torch.ones(rows, n // g, device=w.device)
    zp = None if sym else torch.zeros(rows, n // g, dtype=torch.int8, device=w.device)

    def fit(gi, x):
        s, z = qparams(x, group_bits[gi], sym)
        scale[:, gi] = s[:, 0]
        if zp is not None:
            zp[:, gi] = z[:, 0]

    if act_order:
        for gi in range(n // g):
            cols = slice(gi * g, (gi + 1) * g)
            fit(gi, w[:, cols].float().masked_fill(dead[cols], 0))
    perm = visiting_order(h, act_order)
    U, used = inverse_cholesky(h, damp, retries, perm)
    W = ordered_weight(w, h, perm)
    P = None
    if dxxt is not None:
        dxxt = dxxt.float().clone()
        dxxt[:, dead] = 0
        P = alpha * (dxxt[perm][:, perm] @ U.t()).triu_(1) @ U
    codes = torch.empty(rows, n, dtype=torch.int8, device=W.device)
    group_of = (perm // g).tolist()

    def column(c, wc, ahead):
        gi = group_of[c]
        if not act_order and c % g == 0:
            fit(gi, ahead(g))
        s = scale[:, gi:gi + 1]
        z = zp[:, gi:gi + 1] if zp is not None else None
        q = codes_of(wc, s, z, group_bits[gi], sym)
        codes[:, c] = q[:, 0]
        return quant.dequantize(q, s, z, 0)

    Q = error_feedback(W, U, column, block=block, P=P)
    del U, P, W  # before the reordered copy of Q
    inv = torch.argsort(perm)
    return codes[:, inv], scale, zp, Q[:, inv], used
