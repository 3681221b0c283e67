"""A study's numbers summarized: mean +- std over calibration seeds, delta vs the float model, flags.

:func:`summarize` groups the cells by (model, pipeline). Means and standard deviations (sample
std, n-1; none for one seed) are taken over the seeds whose value is finite; a seed with
non-finite logits, a collapsed generation, a near-random PPL or a failure is counted in the row's
flags (``non-finite 1/3``). Near random: the seed's PPL keeps less than :data:`NEAR_RANDOM_KEEP` of
the float model's gain over the context-free (unigram) PPL of the same windows, in log PPL (nats per
token), i.e. the model has fallen most of the way to knowing only token frequencies. Deltas: PPL in
percent of the float model's, task metrics in points (mean - float mean). :func:`markdown` and
:func:`write_csv` render them.
"""
from __future__ import annotations

import csv
import math
import statistics

LABELS = ("model", "pipeline", "method", "bits")
NEAR_RANDOM_KEEP = 0.2
CSV_HEAD = ("model", "pipeline", "method", "bits", "seed", "status", "error", "nonfinite", "collapsed",
            "seconds", "cached", "key")


def metrics(row: dict) -> dict:
    """A cell's scalar metrics: ``ppl`` (or ``ppl:TEXT``) and lm-eval ``task/metric`` (no stderr)."""
    out = dict(row.get("ppl") or {})
    for k, v in (row.get("tasks") or {}).items():
        if "stderr" not in k:
            out[k] = v
    return out


def _stats(values: list) -> dict:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return {"mean": statistics.fmean(finite) if finite else None,
            "std": statistics.stdev(finite) if len(finite) > 1 else None,
            "n": len(finite), "values": values}


def _group(rows: list[dict]) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["pipeline"]), []).append(r)
    return groups


def _entry(rs: list[dict]) -> dict:
    ok = [r for r in rs if r.get("status") == "ok"]
    names = list(dict.fromkeys(k for r in ok for k in metrics(r)))
    return {**{k: rs[0][k] for k in LABELS}, "float": rs[0].get("pipeline_repr") == [],
            "seeds": [r["seed"] for r in rs], "ok": len(ok), "failed": len(rs) - len(ok),
            "errors": sorted({r["error"] for r in rs if r.get("status") != "ok" and r.get("error")}),
            "nonfinite": sum(bool(r.get("nonfinite")) for r in ok),
            "collapsed": sum(bool(r.get("collapsed")) for r in ok),
            "metrics": {k: _stats([metrics(r).get(k) for r in ok]) for k in names}}


def _delta(name: str, mean, ref):
    if mean is None or ref is None:
        return None
    if name.startswith("ppl"):
        return 100.0 * (mean / ref - 1.0) if ref else None
    return mean - ref


def kept_gain(ppl, unigram, fp) -> float | None:
    """The share of the float model's log-PPL gain over the unigram PPL that ``ppl`` keeps (1: as
    good as float, 0: no better than token frequencies); None where it is undefined."""
    if None in (ppl, unigram, fp) or not (math.isfinite(ppl) and unigram > fp > 0):
        return None
    return (math.log(unigram) - math.log(ppl)) / (math.log(unigram) - math.log(fp))


def _near_random(r: dict, fp: dict) -> bool:
    uni = r.get("unigram_ppl") or {}
    keeps = [kept_gain(v, uni.get(k), fp["metrics"].get(k, {}).get("mean")) for k, v in (r.get("ppl") or {}).items()]
    return any(k is not None and k < NEAR_RANDOM_KEEP for k in keeps)


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (model, pipeline) in table order, with ``delta`` against the model's float row
    and ``near_random``, the seeds whose PPL is near random (:func:`kept_gain`)."""
    groups = _group(rows)
    out = [_entry(rs) for rs in groups.values()]
    ref = {e["model"]: e for e in out if e["float"]}
    for e, rs in zip(out, groups.values()):
        fp = ref.get(e["model"])
        e["delta"] = {k: (None if fp is None or e is fp else
                          _delta(k, s["mean"], fp["metrics"].get(k, {}).get("mean")))
                      for k, s in e["metrics"].items()}
        e["near_random"] = 0 if fp is None or e is fp else sum(
            _near_random(r, fp) for r in rs if r.get("status") == "ok")
    return out


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"


def _value(name: str, s: dict | None) -> str:
    if s is None or s["mean"] is None:
        return "—"
    d = 3 if name.startswith("ppl") else 4
    return fmt(s["mean"], d) + (f" ± {fmt(s['std'], d)}" if s["std"] is not None else "")


def _dval(name: str, d) -> str:
    if d is None:
        return ""
    return f" ({d:+.1f}%)" if name.startswith("ppl") else f" ({d:+.4f})"


def flags(e: dict) -> str:
    n = len(e["seeds"])
    out = [f"{what} {e[key]}/{n}" for what, key in (("non-finite", "nonfinite"), ("collapsed", "collapsed"),
                                                     ("near random", "near_random"), ("failed", "failed"))
           if e.get(key)]
    out += [x[:120] for x in e["errors"][:1]]
    return "; ".join(out)


def markdown(summary: list[dict]) -> str:
    """One table per model: a row per pipeline; metric cells ``mean ± std (delta vs FP)``."""
    parts = []
    for model in dict.fromkeys(e["model"] for e in summary):
        es = [e for e in summary if e["model"] == model]
        names = list(dict.fromkeys(k for e in es for k in e["metrics"]))
        head = ["pipeline", "bits", "seeds", *names, "flags"]
        lines = [f"### {model}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in es:
            vals = [_value(k, e["metrics"].get(k)) + _dval(k, e["delta"].get(k)) for k in names]
            cells = [e["pipeline"], "" if e["bits"] is None else str(e["bits"]), str(len(e["seeds"])), *vals,
                     flags(e)]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_csv(rows: list[dict], path) -> None:
    """One line per cell (seed), metrics as columns."""
    names = list(dict.fromkeys(k for r in rows for k in metrics(r)))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*CSV_HEAD, *names])
        for r in rows:
            m = metrics(r)
            w.writerow([*("" if r.get(k) is None else r.get(k) for k in CSV_HEAD),
                        *("" if m.get(k) is None else m[k] for k in names)])
