"""The cells of a study (model x pipeline x seed) and their content keys.

A cell's key is the SHA-256 of what its numbers depend on: the model directory's files, the
pipeline (every pass with all its options, as ``repr``; plugin files), the seed, the calibration
data and settings, the evaluation texts and settings, the dtype, and the ptqc version with a digest
of its code (the ``ptqc`` and ``ptqc.passes`` sources: an edited checkout recomputes). Labels
(model and pipeline names, method, bits) are not part of it: renaming reuses the cached cell.
File contents are hashed once and remembered by (path, size, mtime) in ``DIR/digests.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ptqc.errors import PtqcError
from ptqc.study_spec import Pipeline, Study

KEY_FORMAT = "ptqc-study-cell-v1"


class Digests:
    """SHA-256 of files and directories, remembered by (path, size, mtime_ns)."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.memo: dict = {}
        if path is not None and path.is_file():
            try:
                self.memo = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                self.memo = {}

    def file(self, p: Path) -> str:
        st = p.stat()
        k = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if k not in self.memo:
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            self.memo[k] = h.hexdigest()
        return self.memo[k]

    def tree(self, d: Path) -> str:
        """A file, or every non-hidden file under a directory (relative names and contents)."""
        d = Path(d)
        if d.is_file():
            return self.file(d)
        h = hashlib.sha256()
        for f in sorted(x for x in d.rglob("*") if x.is_file()
                        and not any(part.startswith(".") for part in x.relative_to(d).parts)):
            h.update(f"{f.relative_to(d)}\0{self.file(f)}\0".encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.memo, indent=0, sort_keys=True))
            os.replace(tmp, self.path)


# modules that only present results or drive commands: editing them does not change a cell's numbers
PRESENTATION = ("cli*.py", "explorer*.py", "inspect.py", "diff_report.py", "diagnose_report.py", "study.py",
                "study_exec.py", "study_table.py", "study_plots.py", "study_compare.py", "progress.py")


def code_digest(dig: Digests) -> str:
    """SHA-256 (16 hex) of the ``.py`` sources of ``ptqc`` and ``ptqc.passes`` as installed, but for
    :data:`PRESENTATION` (a new module counts until it is listed there)."""
    import fnmatch

    import ptqc
    import ptqc.passes

    h = hashlib.sha256()
    for pkg in (ptqc, ptqc.passes):
        root = Path(pkg.__file__).parent
        for f in sorted(root.glob("*.py")):
            if pkg is ptqc and any(fnmatch.fnmatch(f.name, p) for p in PRESENTATION):
                continue
            h.update(f"{pkg.__name__}/{f.name}\0{dig.file(f)}\0".encode())
    return h.hexdigest()[:16]


def pipeline_repr(p: Pipeline) -> list[str]:
    """Every pass of the pipeline with all its options (what the key hashes); [] for the float model."""
    from ptqc import pipeline

    if p.is_float:
        return []
    passes = pipeline.load_recipe(p.recipe)[0] if p.recipe else pipeline.parse_pipeline(p.passes)
    passes = pipeline.complete(passes, pack=False)
    pipeline.check_order(passes, {"canonical"})
    return [repr(x) for x in passes]


def _checked_repr(study: Study, p: Pipeline) -> list[str]:
    try:
        return pipeline_repr(p)
    except PtqcError as e:
        raise PtqcError(f"study {study.path}: pipeline {p.name!r}: {e}") from None


def model_files(study: Study, model_dir: Path) -> tuple[str, list[str]]:
    """The calibration data path and the evaluation texts of one model under the study's protocol."""
    from ptqc import data, evaluate

    calib = study.calibration["path"] or str(data.default_calib(model_dir))
    ppl = study.evaluation["ppl"]
    texts = (ppl["texts"] if ppl and ppl["texts"] else [str(evaluate.default_text(model_dir))])
    return calib, texts


def _eval_key(evaluation: dict, texts: list[str], dig: Digests, is_float: bool) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in evaluation.items()}
    out["texts"] = [dig.file(Path(t)) for t in texts]
    if out["ppl"]:
        out["ppl"].pop("texts", None)
    if out["tasks"] and out["tasks"]["include_path"]:
        out["tasks"]["include_path"] = dig.tree(Path(out["tasks"]["include_path"]))
    if is_float:
        out["diagnose"] = None
    return out


def cell_key(ingredients: dict) -> str:
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cell(study, name, model_dir, p, seed, reprs, files, dig, code: dict) -> dict:
    """``code``: the ptqc version, its code digest and the plugin files' digests."""
    calib, texts = files
    calibration = None if p.is_float else {**study.calibration, "path": calib}
    ingredients = {"format": KEY_FORMAT, **code, "model": dig.tree(model_dir),
                   "dtype": study.dtype, "pipeline": reprs, "seed": seed,
                   "calibration": None if calibration is None else {**calibration, "path": dig.tree(Path(calib))},
                   "evaluation": _eval_key(study.evaluation, texts, dig, p.is_float)}
    return {"key": cell_key(ingredients), "model": name, "model_path": str(model_dir), "pipeline": p.name,
            "method": p.method, "bits": p.bits, "passes": p.passes, "recipe": p.recipe, "pipeline_repr": reprs,
            "seed": seed, "dtype": study.dtype, "plugins": [str(x) for x in study.plugins],
            "calibration": calibration, "texts": texts,
            "evaluation": {**study.evaluation, "diagnose": None if p.is_float else study.evaluation["diagnose"]},
            "ingredients": ingredients}


def cells(study: Study, dig: Digests) -> list[dict]:
    """Every cell of the study in table order (model, pipeline, seed); the float model once per model."""
    import ptqc
    from ptqc.cli_common import load_plugins

    load_plugins(study.plugins)
    reprs = {p.name: _checked_repr(study, p) for p in study.pipelines}
    code = {"ptqc": ptqc.__version__, "code": code_digest(dig), "plugins": [dig.file(x) for x in study.plugins]}
    out = []
    for name, model_dir in study.models.items():
        files = model_files(study, model_dir)
        for p in study.pipelines:
            for seed in ([None] if p.is_float else study.seeds):
                out.append(_cell(study, name, model_dir, p, seed, reprs[p.name], files, dig, code))
    return out


def protocol(study: Study, all_cells: list[dict]) -> dict:
    """The one protocol of every cell, as written into results.json."""
    import torch

    import ptqc

    per_model = {}
    for c in all_cells:
        per_model.setdefault(c["model"], {"path": c["model_path"], "texts": c["texts"],
                                          "calibration_data": None})
        if c["calibration"]:
            per_model[c["model"]]["calibration_data"] = c["calibration"]["path"]
    return {"ptqc": ptqc.__version__, "code": all_cells[0]["ingredients"]["code"] if all_cells else None,
            "torch": torch.__version__, "dtype": study.dtype, "seeds": study.seeds,
            "calibration": {k: v for k, v in study.calibration.items() if k != "path"},
            "evaluation": study.evaluation, "models": per_model,
            "notes": ["a seed draws the same calibration windows for every pipeline of a model "
                      "(ptqc.data.calibration_batches); recipes' own calib settings are not used",
                      "every cell of a model is evaluated on the same windows (first max_windows "
                      "non-overlapping windows of seqlen tokens of each text)",
                      "the float model (no passes) is measured once per model",
                      "no pack pass (exact: the numbers equal the packed artifact's)"]}
