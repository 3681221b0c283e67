"""Sensitive layers and linears of a ``ptqc diagnose`` report (a robust outlier rule).

Every layer gets a score from its *local* metric (default ``rel_error`` of the layer output;
``mse`` works the same way; for ``sqnr_db`` the score is ``-sqnr_db`` since lower SQNR is worse,
an exact match counting as 200 dB). With ``med`` the median of the scores over layers and
``MAD`` the median absolute deviation from it, a layer is sensitive if::

    score > med + k * max(1.4826 * MAD, 0.05 * |med| + 1e-12)         (k = 3 by default)

(1.4826 makes the MAD estimate a standard deviation for normal data; the floor keeps a tiny MAD
- e.g. all q_proj errors within 1 % of each other, or most layers exact - from flagging noise:
with k = 3 a score must be at least 15 % above the median, or 6 dB below it in SQNR at 40 dB). Non-finite scores are always
sensitive. The same rule over all matched linears of all layers (score: the linear's local
metric) gives the sensitive linears, applied **per role**: a linear is compared with the
linears of the same role (q, k, v, o, gate, up, down) in the other layers, since roles differ
systematically (o_proj and down_proj see heavier-tailed inputs). The report also keeps the top-N
ranking of layers and of all linears by score, sensitive or not (with few layers, e.g. 2, the
rule cannot flag anything: look at the ranking).
"""
from __future__ import annotations

import math
import statistics

from ptqc.diagnose_metrics import METRICS
from ptqc.errors import PtqcError

MAD_SCALE = 1.4826
REL_FLOOR = 0.05  # the spread is at least this fraction of |median|
SQNR_CAP = 200.0  # dB: the score an exact match gets when ranking by SQNR


def _score(m: dict, metric: str) -> float:
    """Higher is worse. Exact: 0 (or -SQNR_CAP); not finite: +inf."""
    if m.get("exact"):
        return -SQNR_CAP if metric == "sqnr_db" else 0.0
    v = m.get(metric)
    if v is None:
        return math.inf
    return -v if metric == "sqnr_db" else v


def outliers(scores: dict, k: float = 3.0) -> tuple[list, dict]:
    """Keys whose score exceeds median + k * 1.4826 * MAD (worst first), and the statistics."""
    finite = [s for s in scores.values() if math.isfinite(s)]
    if finite:
        med = statistics.median(finite)
        mad = statistics.median(abs(s - med) for s in finite)
        spread = max(MAD_SCALE * mad, REL_FLOOR * abs(med) + 1e-12)
        thr = med + k * spread
    else:
        med = mad = thr = None
    flagged = [key for key, s in scores.items() if not math.isfinite(s) or (thr is not None and s > thr)]
    flagged.sort(key=lambda key: -scores[key])
    return flagged, {"median": med, "mad": mad, "threshold": thr}


def add_sensitivity(report: dict, k: float = 3.0, metric: str = "rel_error", top: int = 5) -> dict:
    """(Re)compute ``sensitive_layers``, ``sensitive_linears`` and ``sensitivity`` (rule, k,
    statistics, top-N rankings) of a report from its local metrics (see the module doc)."""
    if metric not in METRICS:
        raise PtqcError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if not k > 0:
        raise PtqcError(f"k={k} must be positive")
    lay_scores = {e["layer"]: _score(e["output"]["local"], metric) for e in report["layers"]}
    lin_scores, lin_info = {}, {}
    for e in report["layers"]:
        for mod, rec in e["linears"].items():
            lin_scores[mod] = _score(rec["local"], metric)
            lin_info[mod] = (e["layer"], rec.get("role"))
    sl, lstats = outliers(lay_scores, k)
    sn, by_role = [], {}
    for role in sorted({str(r) for _, r in lin_info.values()}):
        flagged, st = outliers({m: s for m, s in lin_scores.items() if str(lin_info[m][1]) == role}, k)
        sn += flagged
        by_role[role] = st
    sn.sort(key=lambda m: -lin_scores[m])
    sign = -1.0 if metric == "sqnr_db" else 1.0  # report thresholds in the metric's own units

    def unit(st):
        out = dict(st)
        if out["threshold"] is not None:
            out["threshold"] = sign * out["threshold"]
            out["median"] = sign * out["median"]
        return out

    def ranking(scores, info=None):
        order = sorted(scores, key=lambda key: -scores[key])[:top]
        rows = []
        for key in order:
            v = sign * scores[key] if math.isfinite(scores[key]) else None
            row = {"layer": key} if info is None else {"module": key, "layer": info[key][0], "role": info[key][1]}
            rows.append({**row, metric: v})
        return rows

    report["sensitive_layers"] = sl
    report["sensitive_linears"] = sn
    report["sensitivity"] = {
        "rule": f"score > median + k * max({MAD_SCALE} * MAD, {REL_FLOOR} * |median| + 1e-12) over the local "
                f"{metric} ({'-sqnr_db: lower SQNR is worse' if metric == 'sqnr_db' else 'higher is worse'}); "
                "non-finite scores always count; linears are compared within their role",
        "metric": metric, "mode": "local", "k": k, "mad_scale": MAD_SCALE, "top": top,
        "layers": {**unit(lstats), "ranking": ranking(lay_scores)},
        "linears": {"by_role": {r: unit(st) for r, st in by_role.items()},
                    "ranking": ranking(lin_scores, lin_info)},
    }
    return report

