"""The ``ptqc diff`` report for people: the table the CLI prints and a plot of SQNR along depth."""
from __future__ import annotations

import math

from ptqc.diff_metrics import sqnr_value


def format_table(report: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"A = {report['a']['spec']} ({report['a']['target']})   B = {report['b']['spec']} "
             f"({report['b']['target']})   {report['samples']} windows x {report['seqlen']} tokens",
             f"{'#':>3} {'probe':44s} {'kind':6s} {'max_abs':>10s} {'max_rel':>10s} {'SQNR dB':>8s} {'cosine':>10s}"]
    for i, r in enumerate(report["rows"]):
        sq = "exact" if r["exact"] else ("nan" if not r["finite"] else f(r["sqnr_db"], ".2f"))
        mark = "  <- first below {:g} dB".format(report["threshold_db"]) if r["key"] == report["first_below"] else ""
        lines.append(f"{i:>3} {r['key'][:44]:44s} {r['kind']:6s} {f(r['max_abs'], '10.3e')} {f(r['max_rel'], '10.3e')} "
                     f"{sq:>8s} {f(r['cosine'], '10.7f')}{mark}")
    mn = report["min_sqnr_db"]
    lines.append(f"min SQNR: {'inf (all exact)' if report['exact'] else ('-inf/nan' if mn is None else f'{mn:.2f} dB')}"
                 f" at {report['min_sqnr_key']}; first below {report['threshold_db']:g} dB: "
                 f"{report['first_below'] or 'none'}  ({report['seconds']:.1f}s)")
    for side in ("a", "b"):
        if report[side].get("refused"):
            lines.append(f"{side.upper()}: {len(report[side]['refused'])} linear group(s) not lowered (kept as "
                         f"fake-quant ops), first: {report[side]['refused'][0]}")
    if report["unmatched"]["a_only"] or report["unmatched"]["b_only"]:
        def names(ks):
            return f" ({', '.join(ks[:4])}{', ...' if len(ks) > 4 else ''})" if ks else ""
        ao, bo = report["unmatched"]["a_only"], report["unmatched"]["b_only"]
        lines.append(f"unmatched probes: A only {len(ao)}{names(ao)}, B only {len(bo)}{names(bo)}")
    return "\n".join(lines)


def plot(report: dict, path, cap: float = 160.0) -> None:
    """PNG of SQNR along depth (exact matches drawn at ``cap``), layer outputs as a line, linears
    as points, the threshold dashed and the first probe below it circled."""
    from matplotlib.figure import Figure

    rows = report["rows"]
    fig = Figure(figsize=(max(8.0, 0.08 * len(rows) + 4), 4.5), layout="constrained")
    ax = fig.subplots()

    def val(r):
        v = sqnr_value(r)
        return cap if v == math.inf else (math.nan if v == -math.inf else min(v, cap))
    for kind, style, label in (("linear", ".", "linears"), ("layer", "o-", "decoder layer outputs"),
                               ("embed", "s", "embedding"), ("logits", "D", "logits")):
        xs = [i for i, r in enumerate(rows) if r["kind"] == kind]
        if xs:
            ax.plot(xs, [val(rows[i]) for i in xs], style, label=label, markersize=4 if kind == "linear" else 6)
    ax.axhline(report["threshold_db"], color="red", ls="--", lw=1, label=f"threshold {report['threshold_db']:g} dB")
    if report["first_below"] is not None:
        i = next(i for i, r in enumerate(rows) if r["key"] == report["first_below"])
        ax.plot([i], [val(rows[i])], "o", ms=14, mfc="none", color="red")
        ax.annotate(report["first_below"], (i, val(rows[i])), textcoords="offset points", xytext=(5, -14),
                    fontsize=8, color="red")
    layer_ticks = [(i, r["layer"]) for i, r in enumerate(rows) if r["kind"] == "layer"]
    if layer_ticks and len(layer_ticks) <= 40:
        ax.set_xticks([i for i, _ in layer_ticks], [str(layer) for _, layer in layer_ticks])
    ax.set_xlabel("depth (ticks: decoder layer outputs)")
    ax.set_ylabel(f"SQNR dB (B vs A; exact drawn at {cap:g})")
    ax.set_title(f"{report['b']['spec']} vs {report['a']['spec']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
