"""The metrics of ``ptqc diff``, as running sums over batches (see :mod:`ptqc.diff`)."""
from __future__ import annotations

import math

import torch

from ptqc.errors import PtqcError


class Acc:
    """Running sums of one probe over batches (float64 scalars; no values are kept)."""

    def __init__(self):
        self.x2 = self.e2 = self.xy = self.y2 = 0.0
        self.max_abs = self.max_rel = 0.0
        self.n = 0
        self.finite = True

    def update(self, x: torch.Tensor, y: torch.Tensor, what: str) -> None:
        if x.shape != y.shape:
            raise PtqcError(f"{what}: shapes differ ({tuple(x.shape)} vs {tuple(y.shape)}); not the same model?")
        x, y = x.float().reshape(-1), y.float().reshape(-1)
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            self.finite = False
            return
        d = y - x
        self.x2 += float(torch.dot(x.double(), x.double()))
        self.e2 += float(torch.dot(d.double(), d.double()))
        self.xy += float(torch.dot(x.double(), y.double()))
        self.y2 += float(torch.dot(y.double(), y.double()))
        ad = d.abs()
        self.max_abs = max(self.max_abs, float(ad.max()) if ad.numel() else 0.0)
        ax = x.abs()
        floor = max(float(ax.max()) * 1e-6, 1e-30) if ax.numel() else 1e-30
        self.max_rel = max(self.max_rel, float((ad / ax.clamp_min(floor)).max()) if ad.numel() else 0.0)
        self.n += x.numel()

    def metrics(self) -> dict:
        if not self.finite:
            return {"max_abs": None, "max_rel": None, "sqnr_db": None, "cosine": None, "exact": False,
                    "finite": False, "numel": self.n}
        exact = self.e2 == 0.0
        sqnr = None if exact or self.x2 == 0.0 else 10.0 * math.log10(self.x2 / self.e2)
        den = math.sqrt(self.x2 * self.y2)
        cos = self.xy / den if den > 0 else (1.0 if exact else None)
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "sqnr_db": sqnr, "cosine": cos, "exact": exact,
                "finite": True, "numel": self.n}


def sqnr_value(m: dict) -> float:
    """SQNR for ranking/thresholds: exact = +inf, non-finite values = -inf."""
    if m.get("exact"):
        return math.inf
    v = m.get("sqnr_db")
    return -math.inf if v is None else v


def fails_under(report: dict, db: float) -> list[str]:
    """Probes whose SQNR is below ``db`` (non-finite values count as below)."""
    return [r["key"] for r in report["rows"] if sqnr_value(r) < db]
