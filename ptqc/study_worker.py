"""One cell of a study, computed: trace, calibrate on the seed's windows, run the passes, measure.

:func:`run_cell` takes the cell as :func:`ptqc.study_cells.cells` makes it (plain data, so a
process pool or a Ray task can carry it) and returns its measurements. It never raises for a
failing cell: the error is returned as ``status: failed`` with one line, and the study goes on.
Non-finite logits are a measurement, not a failure (``nonfinite``, the first bad node named).
"""
from __future__ import annotations

import hashlib
import time
import traceback

from ptqc.errors import CollapseError, PtqcError


def ids_digest(t) -> str:
    """SHA-256 (16 hex) of a token tensor: equal digests, equal windows."""
    import torch

    return hashlib.sha256(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


_TRACES: dict = {}


def traced(model_path: str, dtype: str):
    """The canonical model (no weights read), traced once per process and model files: a clone."""
    from pathlib import Path

    from ptqc import frontend

    files = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(model_path).iterdir()
                         if f.is_file()))
    key = (str(model_path), dtype, files)
    if key not in _TRACES:
        _TRACES[key] = frontend.load(model_path, dtype, isolate="auto")
    return _TRACES[key].clone()


def _compile(cell: dict, tok):
    from ptqc import data, pipeline
    from ptqc.cli_common import load_plugins

    load_plugins(cell["plugins"])
    qm = traced(cell["model_path"], cell["dtype"])
    out = {"calibration_windows": None}
    if cell["calibration"] is None:
        return qm, None, out
    c = cell["calibration"]
    ids = data.calibration_batches(tok, c["path"], c["samples"], c["seqlen"], seed=cell["seed"],
                                   text_field=c["field"])
    out["calibration_windows"] = ids_digest(ids)
    passes = pipeline.load_recipe(cell["recipe"])[0] if cell["recipe"] else pipeline.parse_pipeline(cell["passes"])
    passes = pipeline.complete(passes, pack=False)
    cfg = pipeline.calib_config(None, path=c["path"], samples=c["samples"], seqlen=c["seqlen"], seed=cell["seed"],
                                field=c["field"], batch_size=c["batch_size"])
    ctx = pipeline.PassContext(quiet=True, calib=cfg, _ids=ids)  # the windows drawn above, batched as cfg says
    t = time.perf_counter()
    pipeline.PassManager(passes).run(qm, ctx)
    out["compile_s"] = round(time.perf_counter() - t, 3)
    return qm, ids, out


def _ppl(qm, tok, cell: dict, out: dict) -> None:
    from ptqc import evaluate

    e = cell["evaluation"]["ppl"]
    out["ppl"], out["eval_windows"], out["unigram_ppl"] = {}, {}, {}
    for text in cell["texts"]:
        label = metric_label(text, cell["texts"])
        ids = evaluate.tokenize(tok, evaluate.read_text(text))
        w = evaluate.windows(ids, e["seqlen"])[: e["max_windows"] or None]
        out["eval_windows"][label] = ids_digest(w)
        out["unigram_ppl"][label] = evaluate.unigram_perplexity(w)
        try:
            r = evaluate.perplexity(qm, w.reshape(-1), e["seqlen"], batch_size=e["batch_size"])
            out["ppl"][label] = r["ppl"]
        except CollapseError as err:
            out["ppl"][label] = None
            out["nonfinite"] = str(err)


def metric_label(text: str, texts: list[str]) -> str:
    from pathlib import Path

    return "ppl" if len(texts) == 1 else f"ppl:{Path(text).stem}"


def _collapse(qm, tok, cell: dict, out: dict) -> None:
    from ptqc import generate

    s = generate.default_check(qm, tok, cell["model_path"], cell["texts"][0],
                               cell["evaluation"]["collapse"]["max_new_tokens"])
    out["collapse"] = {k: s.get(k) for k in ("collapsed", "reasons", "eos_rate", "looping", "degenerate",
                                             "distinct_2", "known_words", "finite")}
    out["collapsed"] = s["collapsed"]
    if not s["finite"]:
        out.setdefault("nonfinite", "non-finite logits during generation")


def _tasks(qm, tok, cell: dict, out: dict) -> None:
    from ptqc import lm_eval_adapter

    t = cell["evaluation"]["tasks"]
    try:
        out["tasks"] = lm_eval_adapter.run_tasks(
            qm, tok, t["names"], t["limit"], batch_size=t["batch_size"], model_dir=cell["model_path"],
            include_path=[t["include_path"]] if t["include_path"] else None, num_fewshot=t["num_fewshot"])
    except CollapseError as err:
        out["tasks"] = None
        out["nonfinite"] = str(err)


def _diagnose(qm, ids, cell: dict, out: dict) -> None:
    from ptqc import diagnose

    fp = traced(cell["model_path"], cell["dtype"])
    rep = diagnose.compare(fp, qm, ids[: cell["evaluation"]["diagnose"]["samples"]],
                           batch_size=cell["calibration"]["batch_size"])
    out["diagnose"] = {"sensitive_layers": rep["sensitive_layers"], "logits": rep["logits"],
                       "layer_output": [lay["output"] for lay in rep["layers"]]}


def measure(cell: dict) -> dict:
    """The cell's measurements (raises on failure; :func:`run_cell` catches)."""
    from ptqc import evaluate

    t0 = time.perf_counter()
    tok = evaluate.load_tokenizer(cell["model_path"])
    qm, ids, out = _compile(cell, tok)
    out.update(status="ok", nonfinite=None, collapsed=None)
    ev = cell["evaluation"]
    if ev["ppl"]:
        _ppl(qm, tok, cell, out)
    if ev["collapse"]:
        _collapse(qm, tok, cell, out)
    if ev["tasks"]:
        _tasks(qm, tok, cell, out)
    if ev["diagnose"] and ids is not None:
        _diagnose(qm, ids, cell, out)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def run_cell(cell: dict) -> dict:
    """:func:`measure`, with a failure returned as ``{"status": "failed", "error": one line}``."""
    t0 = time.perf_counter()
    try:
        return measure(cell)
    except (KeyboardInterrupt, SystemExit):
        raise
    except PtqcError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - a cell's bug must not end the study
        err = f"{type(e).__name__}: {e}"
        tb = traceback.extract_tb(e.__traceback__)[-1]
        err += f" (at {tb.filename}:{tb.lineno})"
    return {"status": "failed", "error": " ".join(err.split())[:500], "seconds": round(time.perf_counter() - t0, 3)}
