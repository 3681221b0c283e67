"""The metrics of ``ptqc diagnose`` (see :mod:`ptqc.diagnose`), as running sums over batches.

With ``y_f`` the float value and ``y_q`` the quantized one, summed over all tokens of all windows:

* ``mse``       = sum (y_q - y_f)^2 / numel
* ``rel_error`` = ||y_q - y_f|| / ||y_f||            (Frobenius norms over everything)
* ``sqnr_db``   = 10 log10(sum y_f^2 / sum (y_q - y_f)^2)

Each metric record also has ``exact`` (true iff y_q == y_f everywhere). JSON cannot hold
infinity, so an exact match has ``sqnr_db: null`` (and ``mse: 0``, ``rel_error: 0``);
non-finite values (NaN/Inf outputs, or a float output that is identically zero) are also
written as ``null`` with ``exact: false``.
"""
from __future__ import annotations

import math

import torch

from ptqc.errors import PtqcError

METRICS = ("mse", "rel_error", "sqnr_db")
MODES = ("local", "accumulated")


class Acc:
    """Running sums of y_f^2 and (y_q - y_f)^2 over batches."""

    __slots__ = ("f2", "e2", "n")

    def __init__(self):
        self.f2 = 0.0
        self.e2 = 0.0
        self.n = 0

    def update(self, yf: torch.Tensor, yq: torch.Tensor, what: str) -> None:
        if yf.shape != yq.shape:
            raise PtqcError(f"{what}: float and quantized values have different shapes {tuple(yf.shape)} vs "
                            f"{tuple(yq.shape)}; are these the same model?")
        f = yf.detach().float().reshape(-1)
        d = yq.detach().float().reshape(-1) - f
        self.f2 += float(torch.dot(f, f))  # BLAS dot: blocked float32 accumulation, ~3x faster than
        self.e2 += float(torch.dot(d, d))  # sum(x * x, dtype=float64) and accurate to ~1e-6 here
        self.n += f.numel()

    def metrics(self) -> dict:
        return metrics_from_sums(self.f2, self.e2, self.n)


def metrics_from_sums(f2: float, e2: float, n: int) -> dict:
    """mse / rel_error / sqnr_db (None where not finite, see the module doc) from the sums."""
    if not (math.isfinite(f2) and math.isfinite(e2)):
        return {"mse": None, "rel_error": None, "sqnr_db": None, "exact": False}
    exact = e2 == 0.0
    mse = e2 / n if n else 0.0
    if exact:
        return {"mse": 0.0, "rel_error": 0.0, "sqnr_db": None, "exact": True}
    if f2 == 0.0:
        return {"mse": mse, "rel_error": None, "sqnr_db": None, "exact": False}
    return {"mse": mse, "rel_error": math.sqrt(e2 / f2), "sqnr_db": 10.0 * math.log10(f2 / e2), "exact": False}
