"""``ptqc study --compare A B``: what changed between two studies (e.g. two ptqc versions).

Rows are matched by (model, pipeline); a metric is reported when its mean moved by more than
``tol`` (relative), its flags changed, or the row exists on one side only. Protocol differences
(ptqc and torch versions, calibration and evaluation settings) are listed first.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ptqc.errors import PtqcError
from ptqc.study import from_json
from ptqc.study_table import flags, fmt


def load(path) -> dict:
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    try:
        res = from_json(json.loads(f.read_text()))
    except FileNotFoundError:
        raise PtqcError(f"{f} does not exist (give a study directory or its results.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PtqcError(f"cannot read {f}: {e}") from None
    if not isinstance(res, dict) or res.get("format") != "ptqc-study":
        raise PtqcError(f"{f} is not the results.json of a ptqc study")
    return res


def _protocol_changes(a: dict, b: dict) -> list[str]:
    pa, pb = a.get("protocol", {}), b.get("protocol", {})
    return [f"protocol {k}: {json.dumps(pa.get(k), default=str)} -> {json.dumps(pb.get(k), default=str)}"
            for k in ("ptqc", "code", "torch", "dtype", "seeds", "calibration", "evaluation") if pa.get(k) != pb.get(k)]


def _moved(x, y, tol: float) -> bool:
    if x is None or y is None:
        return (x is None) != (y is None)
    if not (math.isfinite(x) and math.isfinite(y)):
        return x != y
    return abs(y - x) > tol * max(abs(x), abs(y), 1e-12)


def _row_changes(ea: dict, eb: dict, tol: float) -> list[tuple]:
    out = []
    for k in dict.fromkeys([*ea["metrics"], *eb["metrics"]]):
        x = ea["metrics"].get(k, {}).get("mean")
        y = eb["metrics"].get(k, {}).get("mean")
        if _moved(x, y, tol):
            rel = f"{100 * (y / x - 1):+.2f}%" if x and y is not None and math.isfinite(x * y) else ""
            out.append((k, fmt(x, 4), fmt(y, 4), rel))
    if flags(ea) != flags(eb):
        out.append(("flags", flags(ea) or "ok", flags(eb) or "ok", ""))
    return out


def compare(a: dict, b: dict, tol: float = 1e-4) -> list[str]:
    """Lines of text: protocol changes, then a Markdown table of the rows that changed."""
    lines = _protocol_changes(a, b)
    sa = {(e["model"], e["pipeline"]): e for e in a["summary"]}
    sb = {(e["model"], e["pipeline"]): e for e in b["summary"]}
    table = []
    for key in dict.fromkeys([*sa, *sb]):
        if key not in sb or key not in sa:
            table.append((*key, "(row)", "present" if key in sa else "—", "present" if key in sb else "—", ""))
            continue
        table += [(*key, *c) for c in _row_changes(sa[key], sb[key], tol)]
    if not table:
        return lines + [f"no changes ({len(sa)} rows, relative tolerance {tol:g})"]
    head = "| model | pipeline | metric | A | B | change |"
    return lines + ["", head, "|---|---|---|---|---|---|"] + ["| " + " | ".join(map(str, r)) + " |" for r in table]
