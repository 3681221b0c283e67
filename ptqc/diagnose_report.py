"""A ``ptqc diagnose`` report for people: ``diagnostics.json`` and one PNG per metric, and the table
the CLI prints.

Each PNG: the layer outputs' local and accumulated values over the layer index (log scale for
mse and rel_error) and a heatmap of the local metric of each linear (layer x role), sensitive
layers and linears marked in red.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ptqc.diagnose_metrics import METRICS, MODES
from ptqc.ir import ROLES_LINEAR


def _role_order(report: dict) -> list[str]:
    roles = {rec.get("role") or "?" for e in report["layers"] for rec in e["linears"].values()}
    known = [r for r in ROLES_LINEAR if r in roles]
    return known + sorted(roles - set(known))


def _value(m: dict, metric: str):
    if m.get("exact") and metric == "sqnr_db":
        return math.nan  # infinite: not drawn
    v = m.get(metric)
    return math.nan if v is None else v


def _plot_layers(ax, report: dict, metric: str) -> None:
    """The layer outputs' local and accumulated metric over the layer index."""
    layers = [e["layer"] for e in report["layers"]]
    for mode, style in (("local", "o-"), ("accumulated", "s--")):
        ys = [_value(e["output"][mode], metric) for e in report["layers"]]
        ax.plot(layers, ys, style, label=f"layer output, {mode}", markersize=4)
    for i in set(report.get("sensitive_layers", [])):
        ax.axvspan(i - 0.4, i + 0.4, color="red", alpha=0.15, lw=0)
        v = _value(report["layers"][i]["output"]["local"], metric)
        if math.isfinite(v):
            ax.plot([i], [v], "o", color="red", markersize=9, fillstyle="none")
    positive = [v for e in report["layers"] for mo in MODES
                for v in [_value(e["output"][mo], metric)] if math.isfinite(v) and v > 0]
    if metric in ("mse", "rel_error") and positive:
        ax.set_yscale("log")
    lg = report.get("logits", {})

    def fmt(m):
        return "exact" if m.get("exact") else ("nan" if m.get(metric) is None else f"{m[metric]:.3g}")
    ax.set_title(f"{metric} per decoder layer (logits: local {fmt(lg.get('local', {}))}, "
                 f"accumulated {fmt(lg.get('accumulated', {}))})", fontsize=9)
    ax.set_xlabel("layer (red: sensitive)")
    ax.set_ylabel(metric + (" (dB, higher is better)" if metric == "sqnr_db" else " (lower is better)"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _linear_grid(report: dict, metric: str, roles: list[str]):
    """layer x role of the local metric (the worst linear when a role repeats in a layer), and
    the cells holding a sensitive linear."""
    import numpy as np

    sens_lin = set(report.get("sensitive_linears", []))
    grid = np.full((len(report["layers"]), len(roles)), np.nan)
    flagged = set()
    for r, e in enumerate(report["layers"]):
        for mod, rec in e["linears"].items():
            c = roles.index(rec.get("role") or "?")
            v = _value(rec["local"], metric)
            if math.isfinite(v):
                old = grid[r, c]
                worse = (v < old) if metric == "sqnr_db" else (v > old)
                grid[r, c] = v if np.isnan(old) or worse else old
            if mod in sens_lin:
                flagged.add((r, c))
    return grid, flagged


def _plot_linears(fig, hx, report: dict, metric: str) -> None:
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    layers = [e["layer"] for e in report["layers"]]
    sens = set(report.get("sensitive_layers", []))
    roles = _role_order(report)
    grid, flagged = _linear_grid(report, metric, roles)
    pos = grid[np.isfinite(grid) & (grid > 0)]
    logscale = metric in ("mse", "rel_error") and pos.size and pos.min() < pos.max()
    norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if logscale else None
    cmap = "viridis_r" if metric == "sqnr_db" else "viridis"
    im = hx.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(im, ax=hx, label=f"local {metric}")
    hx.set_xticks(range(len(roles)), roles)
    hx.set_yticks(range(len(layers)), [f"{i}*" if i in sens else str(i) for i in layers])
    for t, i in zip(hx.get_yticklabels(), layers):
        if i in sens:
            t.set_color("red")
    for r, c in flagged:
        hx.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    hx.set_title(f"local {metric} per linear (red: sensitive)", fontsize=9)
    hx.set_xlabel("role")
    hx.set_ylabel("layer")


def _plot(report: dict, metric: str, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas on save

    fig = Figure(figsize=(13, max(4.0, 0.25 * len(report["layers"]) + 2)), layout="constrained")
    ax, hx = fig.subplots(1, 2, width_ratios=[3, 2])
    _plot_layers(ax, report, metric)
    _plot_linears(fig, hx, report, metric)
    fig.savefig(path, dpi=100)


def write_report(report: dict, out_dir, force: bool = False) -> list[Path]:
    """Write ``diagnostics.json`` and ``<metric>.png`` for each metric into ``out_dir``
    (atomically: a temporary sibling renamed into place; an existing ``out_dir`` needs
    ``force``). Returns the written paths."""
    from ptqc.artifact import AtomicDir

    out = Path(out_dir)
    with AtomicDir(out, force) as tmp:
        (tmp / "diagnostics.json").write_text(json.dumps(report, indent=1, allow_nan=False))
        for metric in METRICS:
            _plot(report, metric, tmp / f"{metric}.png")
    return [out / "diagnostics.json", *(out / f"{m}.png" for m in METRICS)]


def format_table(report: dict) -> str:
    """The compact text table the CLI prints."""
    sens = set(report.get("sensitive_layers", []))

    def rel(m):
        return "exact" if m.get("exact") else ("nan" if m.get("rel_error") is None else f"{m['rel_error']:.3e}")

    def sq(m):
        return "inf" if m.get("exact") else ("nan" if m.get("sqnr_db") is None else f"{m['sqnr_db']:.2f}")

    lines = [f"{'layer':>6} {'rel local':>10} {'rel accum':>10} {'SQNR local':>11} {'SQNR accum':>11}  sensitive"]
    for e in report["layers"]:
        o = e["output"]
        lines.append(f"{e['layer']:>6} {rel(o['local']):>10} {rel(o['accumulated']):>10} "
                     f"{sq(o['local']):>11} {sq(o['accumulated']):>11}  {'*' if e['layer'] in sens else ''}")
    lg = report["logits"]
    lines.append(f"{'logits':>6} {rel(lg['local']):>10} {rel(lg['accumulated']):>10} "
                 f"{sq(lg['local']):>11} {sq(lg['accumulated']):>11}")
    s = report["sensitivity"]
    thr = s["layers"]["threshold"]
    lines.append(f"sensitive layers ({s['metric']} local, median + {s['k']:g} x MAD rule"
                 f"{'' if thr is None else f', threshold {thr:.3g}'}): "
                 f"{', '.join(map(str, report['sensitive_layers'])) or 'none'}")
    lines.append(f"sensitive linears: {', '.join(report['sensitive_linears']) or 'none'}")
    top = s["linears"]["ranking"][:3]
    if top:
        m = s["metric"]
        lines.append("worst linears: " + ", ".join(
            f"{r['module']} ({'nan' if r[m] is None else format(r[m], '.3g')})" for r in top))
    lines.append(f"({report['samples']} windows x {report['seqlen']} tokens, {report['seconds']:.1f}s)")
    return "\n".join(lines)
