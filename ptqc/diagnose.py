"""Where does a quantized model lose accuracy? Layer-by-layer comparison against its float model.

:func:`compare` runs two :class:`~ptqc.calib.LayerRunner` s (the float model and the quantized
one) in lockstep over the same calibration windows, one decoder layer and one batch at a time,
and measures the quantized values against the float ones:

* for every decoder layer, every linear in it (matched between the two graphs by module path,
  ``meta["ptqc"]["module"]``) and the layer's output (the residual-stream value leaving the
  layer's segment, i.e. what the next layer reads);
* for the final logits;

in two **modes**:

``local``
    the quantized layer run on the *float* model's inputs to that layer: the error this layer
    adds by itself. (The quantized segment is run with ``commit=False`` on a copy of the float
    runner's state; the state is keyed by node names, which both graphs share unless a pass
    renamed the residual stream, in which case :func:`compare` raises naming the missing values.)
``accumulated``
    the quantized layer on the quantized model's own inputs: the error seen at this point of
    the quantized model, including everything upstream. For layer 0 both modes coincide (unless
    the prefix, e.g. the embedding, is quantized).

Metrics, with ``y_f`` the float value and ``y_q`` the quantized one, summed over all tokens of
all windows (running sums per node, never all outputs at once):

* ``mse``       = sum (y_q - y_f)^2 / numel
* ``rel_error`` = ||y_q - y_f|| / ||y_f||            (Frobenius norms over everything)
* ``sqnr_db``   = 10 log10(sum y_f^2 / sum (y_q - y_f)^2)

Each metric record also has ``exact`` (true iff y_q == y_f everywhere). JSON cannot hold
infinity, so an exact match has ``sqnr_db: null`` (and ``mse: 0``, ``rel_error: 0``);
non-finite values (NaN/Inf outputs, or a float output that is identically zero) are also
written as ``null`` with ``exact: false``.

**Sensitive layers** (a robust outlier rule). Every layer gets a score from its *local* metric
(default ``rel_error`` of the layer output; ``mse`` works the same way; for ``sqnr_db`` the
score is ``-sqnr_db`` since lower SQNR is worse, an exact match counting as 200 dB). With
``med`` the median of the scores over layers and ``MAD`` the median absolute deviation from it,
a layer is sensitive if::

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

A linear's *local* metric is its output when the quantized layer runs on the float layer
inputs, so it includes the error of the quantized linears before it in the same layer (gate/up
see the quantized attention output); the *accumulated* one includes everything upstream.

:func:`write_report` writes ``diagnostics.json`` (this module's report dict) and one PNG per
metric: the layer outputs' local and accumulated values over the layer index (log scale for
mse and rel_error) and a heatmap of the local metric of each linear (layer x role), sensitive
layers and linears marked in red.

Memory: one decoder layer of weights per model plus the calibration activations of both
models, and for the batch being processed the float outputs of the layer's linears (or the
float logits in the suffix: batch x seqlen x vocab floats, so keep the batch small for large
vocabularies).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

from ptqc import ops
from ptqc.calib import LayerRunner, Segment, calibration_batches
from ptqc.errors import PtqcError
from ptqc.ir import ROLES_LINEAR, QModel

METRICS = ("mse", "rel_error", "sqnr_db")
MODES = ("local", "accumulated")
MAD_SCALE = 1.4826
REL_FLOOR = 0.05  # the spread is at least this fraction of |median|
SQNR_CAP = 200.0  # dB: the score an exact match gets when ranking by SQNR
FORMAT = "ptqc-diagnostics"
VERSION = 1


# ---- running sums -------------------------------------------------------------------------------
class _Acc:
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


def _finite(x: float):
    return x if math.isfinite(x) else None


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


# ---- segment helpers ----------------------------------------------------------------------------
def _layer_output(seg: Segment) -> str:
    """The value leaving a layer segment that later segments read (the residual stream)."""
    outs = [n.name for n in seg.nodes if n.name in seg.keep]
    if not outs:
        raise PtqcError(f"segment {seg.key} produces no value read by later segments")
    return outs[-1]


def _linears(seg: Segment) -> dict[str, tuple[str, str | None]]:
    """node name -> (key, role) for the linears of a segment; key = module path (#j if repeated)."""
    out, seen = {}, {}
    for n in seg.nodes:
        if n.op == "call_function" and n.target == ops.LINEAR:
            m = n.meta.get("ptqc", {})
            mod = m.get("module") or n.name
            j = seen.get(mod, 0)
            seen[mod] = j + 1
            out[n.name] = (mod if j == 0 else f"{mod}#{j}", m.get("role"))
    return out


def _reads(seg: Segment) -> set[str]:
    """Names a segment reads from the runner state (computed in earlier segments)."""
    own = {n.name for n in seg.nodes}
    return {a.name for n in seg.nodes for a in n.all_input_nodes
            if a.op != "get_attr" and a.name not in own and a.name not in seg.consts}


def _preload(qm: QModel, seg: Segment, device) -> dict:
    """The segment's weights, read once for all batches (passed to run() as overrides)."""
    return {w: (qm.store[w].to(device) if device is not None else qm.store[w]) for w in seg.weights}


# ---- the comparison -------------------------------------------------------------------------------
@torch.no_grad()
def compare(fp: QModel, q: QModel, ids: torch.Tensor, batch_size: int = 8, device=None, progress=None, *,
            k: float = 3.0, metric: str = "rel_error", top: int = 5) -> dict:
    """Compare ``q`` against its float model ``fp`` on token windows ``ids`` [n, seqlen].

    Returns the report dict (JSON-ready; the schema is in the module doc and :func:`write_report`).
    ``progress(iterable, desc=..., unit=...)`` wraps the layer loop (e.g. a tqdm factory)."""
    if metric not in METRICS:
        raise PtqcError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    t0 = time.perf_counter()
    ids = ids if ids.ndim == 2 else ids[None]
    batches = calibration_batches(ids, batch_size)
    dev = torch.device(device) if device is not None and str(device) != "cpu" else None
    rf = LayerRunner(fp, batches, device=dev, check_finite=False)
    rq = LayerRunner(q, batches, device=dev, check_finite=False)
    fsegs, qsegs = rf.freeze(), rq.freeze()  # the graphs do not change during compare
    nf, nq = len(fsegs) - 2, len(qsegs) - 2
    if nf != nq:
        raise PtqcError(f"the float model has {nf} decoder layers and the quantized model {nq}; "
                        "compare a quantized model with the float model it was compiled from")
    rf.run("prefix")
    rq.run("prefix")
    from ptqc.basis import Rotation

    rot = Rotation.of(q)  # a rotated model: its values back to the float basis, float inputs into its basis
    nb = len(batches)
    layers: list[dict] = []
    fp_only: list[str] = []
    q_only: list[str] = []
    it = range(nf) if progress is None else progress(range(nf), desc="diagnose", unit="layer")
    for i in it:
        key = f"layer.{i}"
        fseg, qseg = fsegs[key], qsegs[key]
        flin, qlin = _linears(fseg), _linears(qseg)
        fkeys = {kk for kk, _ in flin.values()}
        qkeys = {kk: role for kk, role in qlin.values()}
        fp_only += sorted(fkeys - set(qkeys))
        q_only += sorted(set(qkeys) - fkeys)
        matched = [kk for kk, _ in qlin.values() if kk in fkeys]
        missing = _reads(qseg) - set(rf.state[0])
        if missing:
            raise PtqcError(f"local mode: layer {i} of the quantized model reads {', '.join(sorted(missing))}, "
                            "which the float model's state does not have (a pass renamed the residual stream "
                            "or the layer inputs?)")
        fout, qout = _layer_output(fseg), _layer_output(qseg)
        acc = {mode: {"output": _Acc(), **{kk: _Acc() for kk in matched}} for mode in MODES}
        fw, qw = _preload(fp, fseg, dev), _preload(q, qseg, dev)
        cur: dict[str, torch.Tensor] = {}  # float values of the batch being processed

        def fhook(n, args, y, b):
            if n.name in flin:
                cur[flin[n.name][0]] = y
            elif n.name == fout:
                cur["output"] = y

        def qhook_for(mode):
            a = acc[mode]

            def hook(n, args, y, b):
                if n.name in qlin:
                    kk = qlin[n.name][0]
                    if kk in cur and kk in a:
                        y = y if rot is None else rot.to_float("linear", qlin[n.name][1], y)
                        a[kk].update(cur[kk], y, f"layer {i} {kk}")
                elif n.name == qout:
                    y = y if rot is None else rot.to_float("layer", None, y)
                    a["output"].update(cur["output"], y, f"layer {i} output")
            return hook

        qhook = {mode: qhook_for(mode) for mode in MODES}
        for b in range(nb):
            fin = dict(rf.state[b])  # the float inputs of this layer (values are never modified in place)
            if rot is not None:  # the residual stream (hidden-sized floats) into the rotated basis
                fin = {kk: rot.to_rotated(v) if isinstance(v, torch.Tensor) and v.is_floating_point()
                       and v.dim() and v.shape[-1] == rot.hidden else v for kk, v in fin.items()}
            rf.run(key, batches=[b], hook=fhook, overrides=fw)
            saved = rq.state[b]
            rq.state[b] = fin
            try:
                rq.run(key, commit=False, batches=[b], hook=qhook["local"], overrides=qw)
            finally:
                rq.state[b] = saved
            rq.run(key, batches=[b], hook=qhook["accumulated"], overrides=qw)
            cur.clear()
        del fw, qw
        fp.store.release(fseg.weights)
        q.store.release(qseg.weights)
        layers.append({
            "layer": i,
            "output": {mode: acc[mode]["output"].metrics() for mode in MODES},
            "linears": {kk: {"role": qkeys[kk], **{mode: acc[mode][kk].metrics() for mode in MODES}}
                        for kk in matched},
        })
    logits = _compare_suffix(rf, rq, fsegs["suffix"], qsegs["suffix"], fp, q, nb, dev)
    report = {
        "format": FORMAT, "version": VERSION,
        "fp_model": str(fp.source), "quantized_model": str(q.source),
        "samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "tokens": int(ids.numel()),
        "batch_size": batch_size, "num_layers": nf,
        "layers": layers, "logits": logits,
        "unmatched_linears": {"fp_only": fp_only, "quantized_only": q_only},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return add_sensitivity(report, k=k, metric=metric, top=top)


def _compare_suffix(rf, rq, fseg, qseg, fp, q, nb, dev) -> dict:
    missing = _reads(qseg) - set(rf.state[0])
    if missing:
        raise PtqcError(f"local mode: the quantized model's final segment reads {', '.join(sorted(missing))}, "
                        "which the float model's state does not have")
    acc = {mode: _Acc() for mode in MODES}
    fw, qw = _preload(fp, fseg, dev), _preload(q, qseg, dev)
    cur = {}
    for b in range(nb):
        fin = dict(rf.state[b])
        rf.run("suffix", batches=[b], overrides=fw, on_output=lambda _b, y: cur.__setitem__("y", y))
        saved = rq.state[b]
        rq.state[b] = fin
        try:
            rq.run("suffix", commit=False, batches=[b], overrides=qw,
                   on_output=lambda _b, y: acc["local"].update(cur["y"], y, "logits"))
        finally:
            rq.state[b] = saved
        rq.run("suffix", batches=[b], overrides=qw,
               on_output=lambda _b, y: acc["accumulated"].update(cur["y"], y, "logits"))
        cur.clear()
    fp.store.release(fseg.weights)
    q.store.release(qseg.weights)
    return {mode: acc[mode].metrics() for mode in MODES}


# ---- sensitivity -----------------------------------------------------------------------------------
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


def _json_score(s: float):
    return s if math.isfinite(s) else None


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


# ---- the report ------------------------------------------------------------------------------------
def _role_order(report: dict) -> list[str]:
    roles = {rec.get("role") or "?" for e in report["layers"] for rec in e["linears"].values()}
    known = [r for r in ROLES_LINEAR if r in roles]
    return known + sorted(roles - set(known))


def _value(m: dict, metric: str):
    if m.get("exact") and metric == "sqnr_db":
        return math.nan  # infinite: not drawn
    v = m.get(metric)
    return math.nan if v is None else v


def _plot(report: dict, metric: str, path: Path) -> None:
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas on save
    from matplotlib.patches import Rectangle

    layers = [e["layer"] for e in report["layers"]]
    sens = set(report.get("sensitive_layers", []))
    sens_lin = set(report.get("sensitive_linears", []))
    roles = _role_order(report)
    fig = Figure(figsize=(13, max(4.0, 0.25 * len(layers) + 2)), layout="constrained")
    ax, hx = fig.subplots(1, 2, width_ratios=[3, 2])
    logscale = metric in ("mse", "rel_error")
    for mode, style in (("local", "o-"), ("accumulated", "s--")):
        ys = [_value(e["output"][mode], metric) for e in report["layers"]]
        ax.plot(layers, ys, style, label=f"layer output, {mode}", markersize=4)
    for i in sens:
        ax.axvspan(i - 0.4, i + 0.4, color="red", alpha=0.15, lw=0)
        v = _value(report["layers"][i]["output"]["local"], metric)
        if math.isfinite(v):
            ax.plot([i], [v], "o", color="red", markersize=9, fillstyle="none")
    positive = [v for e in report["layers"] for mo in MODES
                for v in [_value(e["output"][mo], metric)] if math.isfinite(v) and v > 0]
    if logscale and positive:
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
    # heatmap: layer x role of the local metric (the worst linear when a role repeats in a layer)
    grid = np.full((len(layers), len(roles)), np.nan)
    flagged_cells = set()
    for r, e in enumerate(report["layers"]):
        for mod, rec in e["linears"].items():
            c = roles.index(rec.get("role") or "?")
            v = _value(rec["local"], metric)
            if math.isfinite(v):
                old = grid[r, c]
                worse = (v < old) if metric == "sqnr_db" else (v > old)
                grid[r, c] = v if np.isnan(old) or worse else old
            if mod in sens_lin:
                flagged_cells.add((r, c))
    pos = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if logscale and pos.size and pos.min() < pos.max() else None
    cmap = "viridis_r" if metric == "sqnr_db" else "viridis"
    im = hx.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(im, ax=hx, label=f"local {metric}")
    hx.set_xticks(range(len(roles)), roles)
    hx.set_yticks(range(len(layers)), [f"{i}*" if i in sens else str(i) for i in layers])
    for t, i in zip(hx.get_yticklabels(), layers):
        if i in sens:
            t.set_color("red")
    for r, c in flagged_cells:
        hx.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    hx.set_title(f"local {metric} per linear (red: sensitive)", fontsize=9)
    hx.set_xlabel("role")
    hx.set_ylabel("layer")
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


__all__ = ["compare", "add_sensitivity", "outliers", "write_report", "format_table", "metrics_from_sums",
           "METRICS", "MODES"]
