#!/usr/bin/env python
"""Architecture matrix: which decoder families take which ptqc pipelines, on tiny random models.

    python tools/bench/arch_matrix.py [--families llama,gemma2] [--columns trace,rtn] [--json]

Each family gets a tiny random model (tools/make_tiny_model.py; the remote-code one from
tools/make_remote_code_model.py). A cell is ``pass``, ``refused`` with the one line ptqc prints
(PtqcError), ``fail`` (ran, but the check did not hold) or ``error`` (a traceback: a bug).
Checks: trace = logits equal transformers' to 1e-5; rotate = rotating keeps the logits to 1e-5 of
their range; rtn / gptq / smooth,int8 / flatquant = the pipeline runs and the saved artifact,
loaded back, gives finite logits; exports = the smooth,int8 artifact (int8 if smooth is refused)
exported, and ``check-export`` finds no problem.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

# family -> make_tiny_model arch ("remote-code": tools/make_remote_code_model.py)
FAMILIES = {
    "Llama": "llama", "Qwen2": "qwen2", "Qwen3": "qwen3", "Mistral": "mistral", "Gemma": "gemma",
    "Gemma2": "gemma2", "Gemma3": "gemma3_text", "Phi-3": "phi3", "OLMo2": "olmo2", "GLM-4": "glm4",
    "Granite": "granite", "SmolLM3": "smollm3", "StableLM": "stablelm", "GPT-NeoX": "gpt_neox",
    "DeepSeek-V3": "deepseek_v3", "remote-code": "remote-code", "Mixtral": "mixtral", "Qwen2-MoE": "qwen2_moe",
    "Qwen3-MoE": "qwen3_moe", "GLM4-MoE": "glm4_moe",
}
PIPELINES = {"rtn": "rtn:bits=4,group=8", "gptq": "gptq:bits=4,group=8",  # group 8 divides every tiny width
             "smooth-int8": "smooth,int8", "flatquant": "flatquant:epochs=1"}
COLUMNS = ("trace", "rtn", "gptq", "smooth-int8", "rotate", "flatquant", "ascend", "compressed-tensors")
TITLES = {"trace": "trace exact", "smooth-int8": "smooth,int8", "rotate": "rotate exact", "ascend": "Ascend export",
          "compressed-tensors": "compressed-tensors export"}
TOL = 1e-5


def make(family: str, root: Path) -> Path:
    """The tiny random model of ``family`` under ``root``."""
    arch = FAMILIES[family]
    if arch == "remote-code":
        from make_remote_code_model import make_remote_code_model
        return make_remote_code_model(root / arch)
    from make_tiny_model import make_model
    return make_model(root / arch, arch, layers=2, hidden=64, intermediate=128)


@contextlib.contextmanager
def modules_cache(path: Path):
    """transformers' dynamic-module cache (remote code) in ``path``, not the user's cache."""
    import transformers.dynamic_module_utils as dm

    old, old_env = dm.HF_MODULES_CACHE, os.environ.get("HF_MODULES_CACHE")
    dm.HF_MODULES_CACHE = os.environ["HF_MODULES_CACHE"] = str(path)
    try:
        yield
    finally:
        dm.HF_MODULES_CACHE = old
        if old_env is None:
            os.environ.pop("HF_MODULES_CACHE", None)
        else:
            os.environ["HF_MODULES_CACHE"] = old_env


class Outcome(Exception):
    """A cell's verdict other than pass, raised by its check."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _check(ok: bool, detail: str) -> None:
    if not ok:
        raise Outcome("fail", detail)


class Family:
    """One family's model, its trace and the inputs every cell uses."""

    def __init__(self, name: str, path: Path, work: Path):
        from ptqc import frontend

        self.name, self.path, self.work = name, path, work
        self.remote = FAMILIES[name] == "remote-code"
        self.qm = frontend.load(path, "float32", trust_remote_code=self.remote)
        vocab = self.qm.config.vocab_size
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (2, 21), generator=g)
        self.calib = torch.randint(0, vocab, (4, 32), generator=g)
        self.artifacts: dict[str, Path] = {}

    def compile(self, column: str):
        """Run ``column``'s pipeline, save the artifact, load it back; the loaded model."""
        from ptqc import artifact, pipeline

        qm = self.qm.clone()
        text = PIPELINES.get(column, column)
        pipeline.PassManager(pipeline.complete(pipeline.parse_pipeline(text))).run(
            qm, pipeline.PassContext(quiet=True, calib=self.calib))
        out = artifact.save(qm, self.work / column, force=True)
        self.artifacts[column] = out
        return artifact.load(out, trust_remote_code=self.remote)


def check_trace(fam: Family) -> str:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(fam.path, dtype=torch.float32, trust_remote_code=fam.remote).eval()
    with torch.no_grad():
        want = ref(fam.x).logits
    got = fam.qm(fam.x)
    err = (got - want).abs().max().item()
    _check(torch.allclose(got, want, atol=TOL, rtol=TOL), f"logits differ from transformers by {err:.2e}")
    return f"max |diff| {err:.1e}"


def check_pipeline(fam: Family, column: str) -> str:
    y = fam.compile(column)(fam.x)
    _check(bool(torch.isfinite(y).all()), "the artifact's logits are not finite")
    return "finite logits"


def check_rotate(fam: Family) -> str:
    from ptqc import pipeline

    qm = fam.qm.clone()
    ref = qm(fam.x)
    pipeline.PassManager(pipeline.parse_pipeline("rotate")).run(qm, pipeline.PassContext(quiet=True))
    rel = ((qm(fam.x) - ref).abs().max() / ref.abs().max()).item()
    _check(rel <= TOL, f"rotation changes the logits by {rel:.2e} of their range")
    return f"max |diff| / max |logit| {rel:.1e}"


def check_export(fam: Family, fmt: str) -> str:
    from ptqc import artifact, backends

    src = fam.artifacts.get("smooth-int8")
    if src is None:  # smooth refused or failed: export plain W8A8 instead
        fam.compile("int8")
        src = fam.artifacts["int8"]
    backend = backends.provider("formats", fmt)
    out = fam.work / f"export-{fmt}"
    serving = {"dtype": "bfloat16"} if fmt == "ascend" else {}  # the dtype vllm-ascend serves in
    backend.export(artifact.load(src, trust_remote_code=fam.remote), out, fmt, force=True, **serving)
    problems = backends.export_dir_kind(out).check(out, trust_remote_code=fam.remote)
    _check(not problems, "check-export: " + "; ".join(problems))
    return "check-export passes"


def run_cell(fam: Family, column: str) -> dict:
    """One cell: {status, detail, seconds}."""
    from ptqc.errors import PtqcError

    t0 = time.perf_counter()
    try:
        if column == "trace":
            detail = check_trace(fam)
        elif column == "rotate":
            detail = check_rotate(fam)
        elif column in ("ascend", "compressed-tensors"):
            detail = check_export(fam, column)
        else:
            detail = check_pipeline(fam, column)
        status = "pass"
    except Outcome as e:
        status, detail = e.status, e.detail
    except PtqcError as e:
        status, detail = "refused", str(e)
    except Exception as e:  # a traceback: a bug in ptqc (or in this tool)
        status, detail = "error", f"{type(e).__name__}: {e}".splitlines()[0]
        if os.environ.get("ARCH_MATRIX_TRACEBACK"):
            traceback.print_exc()
    return {"status": status, "detail": detail, "seconds": round(time.perf_counter() - t0, 1)}


def run_family(name: str, columns, root: Path) -> dict:
    """Every cell of one family's row; when tracing is refused, every cell carries its reason."""
    from ptqc.errors import PtqcError

    work = root / FAMILIES[name] / "work"
    path = make(name, root / FAMILIES[name])
    try:
        fam = Family(name, path, work)
    except PtqcError as e:
        return {c: {"status": "refused", "detail": str(e), "seconds": 0.0} for c in columns}
    except Exception as e:
        return {c: {"status": "error", "detail": f"{type(e).__name__}: {e}".splitlines()[0], "seconds": 0.0}
                for c in columns}
    return {c: run_cell(fam, c) for c in columns}


def run(families=tuple(FAMILIES), columns=COLUMNS, root: Path | None = None, log=None) -> dict:
    """The matrix {family: {column: cell}}, models made under ``root`` (a temporary directory)."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="arch-matrix-")))
        stack.enter_context(modules_cache(root / "hf_modules"))
        out = {}
        for name in families:
            out[name] = run_family(name, columns, root)
            if log:
                log(f"{name}: " + ", ".join(f"{c} {v['status']}" for c, v in out[name].items()))
        return out


def markdown(matrix: dict) -> str:
    """The table, then every reason that is not a pass, numbered (one number per distinct reason)."""
    columns = list(next(iter(matrix.values())))
    notes: dict[str, int] = {}
    lines = ["| family | " + " | ".join(TITLES.get(c, c) for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for fam, row in matrix.items():
        cells = []
        for c in columns:
            cell = row[c]
            if cell["status"] == "pass":
                cells.append("pass")
                continue
            n = notes.setdefault(f"{cell['status']}: {cell['detail']}", len(notes) + 1)
            cells.append(f"{cell['status']} [{n}]")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines += [""] + [f"[{n}] {text}" for text, n in notes.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="Comma-separated, from: " + ", ".join(FAMILIES))
    ap.add_argument("--columns", default=",".join(COLUMNS), help="Comma-separated, from: " + ", ".join(COLUMNS))
    ap.add_argument("--json", action="store_true", help="Print the matrix as JSON instead of Markdown.")
    ap.add_argument("--keep", type=Path, default=None, help="Make the models and artifacts here (kept).")
    a = ap.parse_args(argv)
    families, columns = a.families.split(","), a.columns.split(",")
    bad = [f for f in families if f not in FAMILIES] + [c for c in columns if c not in COLUMNS]
    if bad:
        ap.error(f"unknown family or column: {', '.join(bad)}")
    matrix = run(families, columns, a.keep, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(matrix, indent=1) if a.json else markdown(matrix))
    return 1 if any(c["status"] in ("fail", "error") for row in matrix.values() for c in row.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
