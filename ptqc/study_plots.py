"""A study's PNG plots (matplotlib Figures, drawn with Agg without touching pyplot's backend): bits vs PPL per method, and a heatmap of the PPL delta.

``ppl_vs_bits.png``: one panel per model, one line per method over its pipelines' numeric bits
(mean with std error bars, log scale), the float model as a dashed line; a seed set that was
non-finite, collapsed or near random is marked with a red x. ``delta_heatmap.png``: rows model / method,
columns bits, the PPL delta vs the float model in percent (log-scaled colour), non-finite
cells shown as "inf". Only the first PPL text is plotted.
"""
from __future__ import annotations

import math
from pathlib import Path


def _figure(**kw):
    """A matplotlib Figure drawn with Agg (no pyplot: the process's backend is left alone)."""
    from matplotlib.figure import Figure

    return Figure(**kw)


MARKERS = "os^D"


def _style(i: int) -> dict:
    """Method i's line: tab10's colours, then the same colours with the next marker and dashes."""
    from matplotlib import colormaps

    return {"color": colormaps["tab10"].colors[i % 10], "marker": MARKERS[i // 10 % len(MARKERS)],
            "ls": "-" if i < 10 else "--"}


def _log_axis(ax) -> None:
    """Log y axis labelled in plain numbers; under ~1.5 decades the 2, 3 and 5 ticks are labelled too."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
    ax.yaxis.set_minor_formatter(plain if math.log10(hi / lo) < 1.5 else NullFormatter())


def _ppl_name(summary: list[dict]) -> str | None:
    return next((k for e in summary for k in e["metrics"] if k.startswith("ppl")), None)


def _numeric(b) -> bool:
    return isinstance(b, (int, float)) and not isinstance(b, bool)


def _panel(ax, model: str, es: list[dict], name: str) -> None:
    fp = next((e for e in es if e["float"]), None)
    if fp and fp["metrics"].get(name, {}).get("mean"):
        ax.axhline(fp["metrics"][name]["mean"], ls="--", color="gray", label="FP")
    methods = dict.fromkeys(e["method"] for e in es if not e["float"] and _numeric(e["bits"]))
    for i, method in enumerate(methods):
        pts = sorted((e for e in es if e["method"] == method and _numeric(e["bits"])), key=lambda e: e["bits"])
        ok = [e for e in pts if e["metrics"].get(name, {}).get("mean") is not None]
        if ok:
            ax.errorbar([e["bits"] for e in ok], [e["metrics"][name]["mean"] for e in ok],
                        yerr=[e["metrics"][name]["std"] or 0 for e in ok], capsize=3, label=method, **_style(i))
        bad = [e for e in ok if e["nonfinite"] or e["collapsed"] or e.get("near_random")]
        if bad:
            ax.scatter([e["bits"] for e in bad], [e["metrics"][name]["mean"] for e in bad], marker="x", s=80,
                       color="red", zorder=5)
    _log_axis(ax)
    ax.set_xticks(sorted({e["bits"] for e in es if _numeric(e["bits"])}))
    ax.set_xlabel("weight bits")
    ax.set_ylabel(name)
    ax.set_title(model)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def ppl_vs_bits(summary: list[dict], path: Path) -> Path | None:
    name = _ppl_name(summary)
    if name is None:
        return None
    models = list(dict.fromkeys(e["model"] for e in summary))
    fig = _figure(figsize=(5.5 * len(models), 4.2))
    axes = fig.subplots(1, len(models), squeeze=False)
    for ax, m in zip(axes[0], models):
        _panel(ax, m, [e for e in summary if e["model"] == m], name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _grid(summary: list[dict], name: str):
    rows = list(dict.fromkeys((e["model"], e["method"]) for e in summary if not e["float"]))
    bits = list(dict.fromkeys(e["bits"] for e in summary if not e["float"]))
    bits.sort(key=lambda b: (not _numeric(b), -(b if _numeric(b) else 0), str(b)))
    grid = [[None] * len(bits) for _ in rows]
    for e in summary:
        if e["float"]:
            continue
        d = e["delta"].get(name)
        if d is None and e["nonfinite"]:
            d = math.inf
        grid[rows.index((e["model"], e["method"]))][bits.index(e["bits"])] = d
    return rows, bits, grid


def delta_heatmap(summary: list[dict], path: Path) -> Path | None:
    import numpy as np

    name = _ppl_name(summary)
    if name is None or all(e["float"] for e in summary):
        return None
    rows, bits, grid = _grid(summary, name)
    vals = np.array([[np.nan if v is None else min(max(v, 0.0), 1e4) for v in r] for r in grid], dtype=float)
    fig = _figure(figsize=(1.2 * len(bits) + 3, 0.4 * len(rows) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(np.log10(1 + vals), cmap="magma_r", aspect="auto", vmin=0, vmax=4)
    ax.set_xticks(range(len(bits)), [str(b) for b in bits])
    ax.set_yticks(range(len(rows)), [f"{m} / {meth}" for m, meth in rows], fontsize=7)
    for i, r in enumerate(grid):
        for j, v in enumerate(r):
            if v is not None:
                txt = "inf" if not math.isfinite(v) else f"{v:+.1f}%"
                ax.text(j, i, txt, ha="center", va="center", fontsize=6,
                        color="white" if vals[i, j] > 100 else "black")
    ax.set_xlabel("bits")
    ax.set_title(f"{name}: delta vs FP (%)")
    fig.colorbar(im, ax=ax, label="log10(1 + delta %)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write(summary: list[dict], out: Path) -> list[Path]:
    return [p for p in (ppl_vs_bits(summary, out / "ppl_vs_bits.png"),
                        delta_heatmap(summary, out / "delta_heatmap.png")) if p is not None]
