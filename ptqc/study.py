"""``ptqc study``: models x pipelines x calibration seeds x evaluations, cached cell by cell.

:func:`run` reads the study (:mod:`ptqc.study_spec`), expands its cells and their content keys
(:mod:`ptqc.study_cells`), computes the cells not already in ``DIR/cells/KEY.json`` (serially, in
processes or on Ray: :mod:`ptqc.study_exec`; each result is saved as it arrives, so a killed
study resumes), then writes ``results.json`` (protocol, cells, summary), ``results.csv``,
``results.md`` and the plots. A failed cell is recorded with its error and computed again on
the next run; finished cells are never recomputed unless their key changes.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ptqc import study_cells, study_exec, study_plots, study_spec, study_table
from ptqc.errors import PtqcError

FORMAT = "ptqc-study"
VERSION = 1

NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def to_json(obj):
    """Strict JSON: a non-finite float (an overflowing PPL, a mean over one) becomes "inf", "-inf" or "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


def from_json(obj):
    """:func:`to_json` undone: "inf", "-inf" and "nan" strings are floats again."""
    if isinstance(obj, str):
        return NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(to_json(obj), indent=1, allow_nan=False, default=str))
    os.replace(tmp, path)


class CellStore:
    """``DIR/cells/KEY.json``: the cell's labels and key ingredients, and its result."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, key: str) -> dict | None:
        try:
            rec = json.loads((self.root / f"{key}.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return from_json(rec.get("result"))

    def put(self, cell: dict, result: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        labels = {k: cell[k] for k in ("model", "pipeline", "method", "bits", "seed")}
        _write_json(self.root / f"{cell['key']}.json",
                    {"key": cell["key"], "cell": labels, "ingredients": cell["ingredients"], "result": result})


def check_dir(out: Path) -> None:
    """DIR is new, empty, or a study directory (never clobber something else)."""
    if out.exists() and not out.is_dir():
        raise PtqcError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "cells").is_dir() and not (out / "results.json").exists():
        raise PtqcError(f"{out} exists and is not a study directory (no cells/ or results.json); choose another -o")


def _row(cell: dict, result: dict | None, cached: bool) -> dict:
    keep = ("key", "model", "pipeline", "method", "bits", "seed", "passes", "recipe", "pipeline_repr")
    res = result or {"status": "missing", "error": "not computed (interrupted)"}
    return {**{k: cell[k] for k in keep}, "cached": cached, **res}


def results(study, cells: list[dict], store: CellStore, cached: set) -> dict:
    rows = [_row(c, store.get(c["key"]), c["key"] in cached) for c in cells]
    return {"format": FORMAT, "version": VERSION, "study": study.name, "spec": str(study.path),
            "protocol": study_cells.protocol(study, cells), "cells": rows, "summary": study_table.summarize(rows)}


def write_outputs(res: dict, out: Path) -> list[Path]:
    _write_json(out / "results.json", res)
    study_table.write_csv(res["cells"], out / "results.csv")
    (out / "results.md").write_text(f"## {res['study']}\n\n" + study_table.markdown(res["summary"]))
    return [out / "results.json", out / "results.csv", out / "results.md", *study_plots.write(res["summary"], out)]


def _describe(cell: dict, res: dict) -> str:
    seed = "" if cell["seed"] is None else f" seed {cell['seed']}"
    what = f"{cell['model']} / {cell['pipeline']}{seed}"
    if res.get("status") != "ok":
        return f"{what}: FAILED {res.get('error')}"
    ppl = ", ".join(f"{k} {study_table.fmt(v)}" for k, v in (res.get("ppl") or {}).items())
    flags = [x for x in ("nonfinite", "collapsed") if res.get(x)]
    return f"{what}: {ppl or 'ok'}{' [' + ', '.join(flags) + ']' if flags else ''} ({res.get('seconds', 0):.1f}s)"


def cell_name(cell: dict) -> str:
    return f"{cell['model']}/{cell['pipeline']}/{'-' if cell['seed'] is None else cell['seed']}"


def selected(cells: list[dict], patterns) -> list[dict]:
    """The cells whose ``MODEL/PIPELINE/SEED`` (seed ``-`` for the float model) matches a pattern."""
    import fnmatch

    if not patterns:
        return cells
    out = [c for c in cells if any(fnmatch.fnmatchcase(cell_name(c), p) for p in patterns)]
    if not out:
        raise PtqcError(f"--select {' '.join(patterns)} matches no cell; cells are named MODEL/PIPELINE/SEED, "
                        f"e.g. {cell_name(cells[-1])}")
    return out


def plan(spec, out: Path, select=None):
    """The study, its (selected) cells, the cell store and the keys already computed."""
    study = study_spec.load(spec)
    if study.evaluation["tasks"]:
        from ptqc import lm_eval_adapter

        lm_eval_adapter.require()  # before anything runs
    check_dir(out)
    dig = study_cells.Digests(out / "digests.json" if out.is_dir() else None)
    cells = selected(study_cells.cells(study, dig), select)
    out.mkdir(parents=True, exist_ok=True)
    dig.path = out / "digests.json"
    dig.save()
    store = CellStore(out / "cells")
    done = {c["key"] for c in cells if (store.get(c["key"]) or {}).get("status") == "ok"}
    return study, cells, store, done


def run(spec, out, *, jobs: int = 1, ray: str | None = None, select=None, log=lambda msg: None) -> dict:
    """Compute the study's missing cells (those matching ``select``, default all) and write its
    outputs; returns results.json's content plus ``computed`` / ``cached`` counts."""
    out = Path(out)
    if jobs < 1:
        raise PtqcError(f"--jobs {jobs} must be at least 1")
    if ray:
        study_exec.require_ray()  # before anything is written
    study, cells, store, done = plan(spec, out, select)
    todo = list({c["key"]: c for c in cells if c["key"] not in done}.values())
    log(f"{study.name}: {len(cells)} cells, {len(set(c['key'] for c in cells) & done)} cached, "
        f"{len(todo)} to compute" + (f" (ray {ray})" if ray else f" ({jobs} jobs)" if jobs > 1 else ""))
    t0, n = time.perf_counter(), [0]

    def on_result(cell, res):
        store.put(cell, res)
        n[0] += 1
        log(f"[{n[0]}/{len(todo)}] {_describe(cell, res)}")

    try:
        study_exec.execute(todo, on_result, jobs=jobs, ray=ray)
    finally:
        res = results(study, cells, store, done)
        files = write_outputs(res, out)
        log(f"wrote {', '.join(f.name for f in files)} in {out} ({time.perf_counter() - t0:.1f}s)")
    return {**res, "computed": n[0], "cached": len(done)}
