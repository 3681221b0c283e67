#!/usr/bin/env python
"""Weight-only passes against llm-compressor: PPL, layer SQNR, calibration time, peak RSS.

Prints one Markdown table per model (rows: FP, then for every weight configuration RTN, GPTQ,
GPTAQ, AWQ side by side, then BiLLM and SliM-LLM; columns: ptqc and llm-compressor next to each
other), then a GPTQ summary (PPL gap to llm-compressor, gain over RTN, time ratio).

    python tools/bench/weight_only.py [--models examples/tiny-qwen2,examples/tiny-qwen2-outliers]
        [--methods rtn,gptq,gptaq,awq,billm,slim] [--configs w8g128,w4g128,w3g128,w2g128,w4ch,w3ch]
        [--samples 128] [--seqlen 256] [--diag-samples 16] [--threads 1] [--skip-llmc]
        [--llmc-venv /tmp/llmc-venv] [--llmc-batch-size 1] [--out results.md] [--json results.json]

Protocol (same for both tools):
* calibration: ``ptqc.data.calibration_batches(tokenizer, MODEL/calib.txt, samples, seqlen,
  seed)`` drawn once and saved as ``WORK/MODEL/calib.pt``; ptqc gets it as
  ``PassContext(calib=tensor)``, llm-compressor as a Dataset of ``input_ids`` + ``attention_mask``
  (ones);
* evaluation: MODEL/eval.txt tokenized once, all non-overlapping windows of ``seqlen``
  (``eval.pt``), mean next-token NLL; ptqc evaluates its graph, llm-compressor's worker a plain
  transformers forward of its fake-quantized model (FP is measured on both sides as a check);
* SQNR: mean over decoder layers of the layer-output SQNR against the float model, accumulated
  mode (each model on its own inputs), on ``diag-samples`` windows drawn with seed 1 from
  calib.txt (``diag.pt``): ``ptqc.diagnose.compare`` for ptqc, forward hooks for llm-compressor;
* weights: integer, asymmetric (``sym=false``), lm_head float; group 128 or per output channel
  (``w4ch`` = group 0); act_order: each side's default (ptqc gptq ``act_order=true`` with static
  groups, llm-compressor ``actorder="static"``: the same algorithm);
* every configuration runs in its own child process; "quant s" is the wall time of the
  quantization only (ptqc: the pass, after tracing; llm-compressor: ``oneshot``, which includes
  its own subgraph tracing and dataset preparation); "peak RSS" is the child's own VmHWM
  (/proc/self/status) after quantization / at exit (after evaluation and SQNR), never the
  parent's ru_maxrss of a child (inherited over fork);
* ``--threads N`` (default 1) sets torch's intra-op threads in both tools' children (other
  jobs share this machine; one thread keeps the timings repeatable);
* a pass not registered in ptqc prints "n/a (no such pass)"; methods llm-compressor does not
  have (GPTAQ, BiLLM, SliM-LLM) show "—"; a method that fails shows its one-line error.

The llm-compressor side runs tools/bench/llmc_worker.py in its own venv (its transformers
pin differs from ptqc's). The venv is created when missing:

    python3 -m venv /tmp/llmc-venv && /tmp/llmc-venv/bin/pip install torch==2.13.0 \\
        && /tmp/llmc-venv/bin/pip install llmcompressor torch==2.13.0

(torch pinned so pip keeps the CPU wheel).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "llmc_worker.py"
DEFAULT_MODELS = ["examples/tiny-qwen2", "examples/tiny-qwen2-outliers"]
GRID_METHODS = ["rtn", "gptq", "gptaq", "awq"]  # run at every weight configuration
METHODS = GRID_METHODS + ["billm", "slim"]
CONFIGS = ["w8g128", "w4g128", "w3g128", "w2g128", "w4ch", "w3ch"]
# methods with a fixed set of rows (their own bit budget): (label, pass, options)
FIXED = {
    "billm": [("BiLLM", "billm", {})],
    "slim": [("SliM-LLM 2-bit", "slim", {"bits": 2}), ("SliM-LLM 3-bit", "slim", {"bits": 3})],
}
LLMC_METHODS = {"rtn", "gptq", "awq"}  # llm-compressor counterparts
LABEL = {"rtn": "RTN", "gptq": "GPTQ", "gptaq": "GPTAQ", "awq": "AWQ"}
MISSING = "n/a (no such pass)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_config(name: str) -> tuple[int, int]:
    """``w4g128`` -> (4, 128); ``w4ch`` / ``w4g0`` -> (4, 0) (per output channel)."""
    m = re.fullmatch(r"w(\d)(?:g(\d+)|(ch|pc))", name.strip().lower())
    if not m:
        raise SystemExit(f"bad config {name!r}: use wBgG (e.g. w4g128) or wBch (per channel)")
    return int(m.group(1)), int(m.group(2) or 0)


def config_label(name: str) -> str:
    b, g = parse_config(name)
    return f"W{b}g{g}" if g else f"W{b} per-channel"


def vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


# ---- rows ------------------------------------------------------------------------------------
def build_rows(methods: list[str], configs: list[str]) -> list[dict]:
    """The table's rows in order: FP, per config the grid methods, then the fixed-budget ones."""
    rows = [{"label": "FP", "config": "", "method": "fp", "pass": None, "options": {}}]
    for c in configs:
        b, g = parse_config(c)
        for m in methods:
            if m in GRID_METHODS:
                rows.append({"label": LABEL[m], "config": config_label(c), "method": m, "pass": m,
                             "options": {"bits": b, "group": g}, "bits": b, "group": g})
    for m in methods:
        for label, p, opts in FIXED.get(m, []):
            rows.append({"label": label, "config": "", "method": m, "pass": p, "options": dict(opts)})
    return rows


# ---- ptqc child ------------------------------------------------------------------------------
def _load_passes():
    """Register every importable pass; a pass file that does not import (being written) is
    reported, not fatal. Returns {module: error} of the ones that failed."""
    import importlib
    import pkgutil

    from ptqc import pipeline

    try:
        pipeline.load_builtin_passes()
        return {}
    except Exception:  # noqa: BLE001
        pipeline._builtins_loaded = True
        import ptqc.passes as pkg

        broken = {}
        for m in pkgutil.iter_modules(pkg.__path__):
            try:
                importlib.import_module(f"ptqc.passes.{m.name}")
            except Exception as e:  # noqa: BLE001
                broken[m.name] = f"{type(e).__name__}: {e}"
        return broken


def child(spec: dict) -> dict:
    """One ptqc configuration (runs in its own process)."""
    import dataclasses

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from ptqc import diagnose, evaluate, frontend, pipeline
    from ptqc.errors import CollapseError

    res: dict = {}
    name = spec.get("pass")
    p = None
    if name:
        broken = _load_passes()
        cls = pipeline.PASSES.get(name)
        if cls is None:
            res["error"] = f"import failed: {broken[name]}" if name in broken else MISSING
            res["missing"] = name not in broken
            return res
        opts = dict(spec.get("options") or {})
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        if "sym" in fields:
            opts["sym"] = False  # asymmetric weights everywhere
        try:
            p = cls(**opts)
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"
            return res
        res["pipeline"] = repr(p)
    ids = torch.load(spec["calib"], weights_only=True).long()
    evalw = torch.load(spec["eval"], weights_only=True).long()
    diag = torch.load(spec["diag"], weights_only=True).long()
    t0 = time.perf_counter()
    qm = frontend.load(spec["model"])
    res["load_s"] = time.perf_counter() - t0
    if p is not None:
        t0 = time.perf_counter()
        try:
            recs = pipeline.PassManager([p]).run(qm, pipeline.PassContext(calib=ids, quiet=True))
        except Exception as e:  # noqa: BLE001 - a failing pass is a table cell
            res["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            return res
        res["quant_s"] = time.perf_counter() - t0
        res["vmhwm_quant"] = vm_hwm()
        res["summary"] = {k: v for k, v in recs[0].get("summary", {}).items() if isinstance(v, (int, float, str))}
        res["quantized_linears"] = sum(1 for v in qm.quant.values() if "weight" in v)
    t0 = time.perf_counter()
    try:
        res["ppl"] = evaluate.perplexity(qm, evalw.reshape(-1), evalw.shape[1])["ppl"]
    except CollapseError as e:
        res["ppl_error"] = str(e)[:200]
    if p is not None:
        fp = frontend.load(spec["model"])
        rep = diagnose.compare(fp, qm, diag)
        sq = [e["output"]["accumulated"]["sqnr_db"] for e in rep["layers"]]
        res["sqnr_layers"] = sq
        res["sqnr_mean"] = sum(sq) / len(sq) if all(v is not None for v in sq) else None
    res["eval_s"] = time.perf_counter() - t0
    res["vmhwm_exit"] = vm_hwm()
    return res


def run_child(cmd: list[str], env: dict, what: str, timeout: float) -> dict:
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s", "wall_s": time.perf_counter() - t}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {r.returncode}"]
        log(f"{what} failed (exit {r.returncode}); stderr tail:\n{r.stderr[-2000:]}")
        return {"error": f"crash: {tail[0][:200]}", "wall_s": time.perf_counter() - t}
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t
    return res


def child_env(threads: int) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


# ---- llm-compressor venv -----------------------------------------------------------------------
def ensure_llmc_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import llmcompressor, sys; print(llmcompressor.__version__)"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    base = Path(sys.base_prefix) / "bin" / "python3"
    log(f"creating the llm-compressor venv {venv} (once; several minutes)")
    steps = [[str(base if base.exists() else "python3"), "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0"],
             [str(venv / "bin" / "pip"), "install", "-q", "llmcompressor", "torch==2.13.0"]]
    for s in steps:
        log("  " + " ".join(s))
        subprocess.run(s, check=True)
    subprocess.run(probe, check=True, capture_output=True)
    return py


def llmc_version(py: Path) -> str:
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' "
                        "for p in ('llmcompressor', 'compressed-tensors', 'transformers', 'torch')))"],
                       capture_output=True, text=True)
    return r.stdout.strip()


# ---- data ------------------------------------------------------------------------------------
def prepare(model: Path, work: Path, samples: int, seqlen: int, seed: int, diag_samples: int) -> dict:
    import torch

    from ptqc import data, evaluate

    work.mkdir(parents=True, exist_ok=True)
    tok = evaluate.load_tokenizer(model)
    calib_src = data.default_calib(model)
    calib = data.calibration_batches(tok, calib_src, samples, seqlen, seed=seed)
    diag = data.calibration_batches(tok, calib_src, diag_samples, seqlen, seed=seed + 1)
    evalw = evaluate.windows(evaluate.tokenize(tok, evaluate.read_text(evaluate.default_text(model))), seqlen)
    paths = {}
    for k, t in (("calib", calib), ("diag", diag), ("eval", evalw)):
        paths[k] = str(work / f"{k}.pt")
        torch.save(t.contiguous().clone(), paths[k])
    log(f"{model}: calib {tuple(calib.shape)} from {calib_src} (seed {seed}), diag {tuple(diag.shape)} "
        f"(seed {seed + 1}), eval {tuple(evalw.shape)}")
    return paths


# ---- table -----------------------------------------------------------------------------------
def _ppl_cell(r: dict | None, fp: float | None) -> str:
    if r is None:
        return "—"
    if "error" in r:
        return r["error"] if r.get("missing") else f"error: {r['error']}"
    if "ppl" not in r:
        return "collapse" if "ppl_error" in r else "?"
    p = r["ppl"]
    if not math.isfinite(p):
        return "inf"
    return f"{p:.3f}" + (f" ({(p / fp - 1) * 100:+.1f}%)" if fp and r.get("quant_s") is not None else "")


def _num(r: dict | None, k: str, fmt: str) -> str:
    v = (r or {}).get(k)
    return "—" if v is None or "error" in (r or {}) else format(v, fmt)


def _rss(r: dict | None) -> str:
    if not r or "error" in r or "vmhwm_exit" not in r:
        return "—"
    q = r.get("vmhwm_quant")
    return (f"{q / 2**20:.0f} / " if q else "") + f"{r['vmhwm_exit'] / 2**20:.0f}"


def format_table(model: str, rows: list[dict], with_llmc: bool) -> str:
    fp_p = (rows[0].get("ptqc") or {}).get("ppl")
    fp_l = (rows[0].get("llmc") or {}).get("ppl")
    out = [f"### {model}", ""]
    if with_llmc:
        out += ["| method | config | ptqc PPL | llm-compressor PPL | ptqc SQNR dB | llmc SQNR dB | ptqc quant s "
                "| llmc quant s | ptqc peak RSS MiB (quant / exit) | llmc peak RSS MiB (quant / exit) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
    else:
        out += ["| method | config | ptqc PPL | ptqc SQNR dB | ptqc quant s | ptqc peak RSS MiB (quant / exit) |",
                "|---|---|---|---|---|---|"]
    for r in rows:
        p, lm = r.get("ptqc"), r.get("llmc")
        cells = [r["label"], r["config"] or "—", _ppl_cell(p, fp_p)]
        if with_llmc:
            cells.append(_ppl_cell(lm, fp_l))
        cells.append(_num(p, "sqnr_mean", ".2f"))
        if with_llmc:
            cells.append(_num(lm, "sqnr_mean", ".2f"))
        cells.append(_num(p, "quant_s", ".1f"))
        if with_llmc:
            cells.append(_num(lm, "quant_s", ".1f"))
        cells.append(_rss(p))
        if with_llmc:
            cells.append(_rss(lm))
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(out)


def gptq_summary(rows: list[dict], with_llmc: bool) -> str:
    """Per config: ptqc GPTQ vs llm-compressor GPTQ (PPL gap, time ratio) and vs ptqc RTN."""
    by = {(r["method"], r["config"]): r for r in rows}
    lines = ["| config | ptqc GPTQ | llmc GPTQ | ptqc vs llmc | ptqc RTN | GPTQ < RTN | time ptqc / llmc |",
             "|---|---|---|---|---|---|---|"]
    any_row = False
    for r in rows:
        if r["method"] != "gptq":
            continue
        p = (r.get("ptqc") or {})
        lm = (r.get("llmc") or {}) if with_llmc else {}
        rtn = (by.get(("rtn", r["config"])) or {}).get("ptqc") or {}
        pp, lp, rp = p.get("ppl"), lm.get("ppl"), rtn.get("ppl")
        gap = f"{(pp / lp - 1) * 100:+.2f}%" if pp and lp else "—"
        beats = ("yes" if pp < rp else "no") if pp and rp else "—"
        ratio = f"{p['quant_s'] / lm['quant_s']:.2f}" if p.get("quant_s") and lm.get("quant_s") else "—"
        lines.append(f"| {r['config']} | {pp and format(pp, '.4f') or '—'} | {lp and format(lp, '.4f') or '—'} "
                     f"| {gap} | {rp and format(rp, '.4f') or '—'} | {beats} | {ratio} |")
        any_row = True
    return "\n".join(lines) if any_row else ""


# ---- main ------------------------------------------------------------------------------------
def add_common_args(ap, work: str) -> None:
    """The options every bench of this folder shares: calibration and diagnosis windows, child
    processes, llm-compressor, output."""
    ap.add_argument("--samples", type=int, default=128, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration and evaluation window length")
    ap.add_argument("--seed", type=int, default=0, help="calibration window seed (diag windows: seed+1)")
    ap.add_argument("--diag-samples", type=int, default=16, help="windows for the layer SQNR")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every child (0: torch's default)")
    ap.add_argument("--skip-llmc", action="store_true", help="ptqc only")
    ap.add_argument("--llmc-venv", type=Path, default=Path("/tmp/llmc-venv"))
    ap.add_argument("--work", type=Path, default=Path(work), help="token files go here")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    ap.add_argument("--out", type=Path, help="also write the Markdown here")
    ap.add_argument("--json", type=Path, help="write all raw results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)


def serve_child(a, child) -> bool:
    """In a child process (``--child SPEC``): run it, print its RESULT line, return True."""
    if not a.child:
        return False
    print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model directories")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated wBgG / wBch")
    add_common_args(ap, "/tmp/ptqc-bench-weight-only")
    ap.add_argument("--llmc-batch-size", type=int, default=1, help="oneshot batch_size (its default: 1)")
    a = ap.parse_args(argv)
    if serve_child(a, child):
        return
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise SystemExit(f"unknown method {bad[0]!r}; use {','.join(METHODS)}")
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    for c in configs:
        parse_config(c)
    with_llmc = not a.skip_llmc
    llmc_py = ensure_llmc_venv(a.llmc_venv) if with_llmc else None
    env = child_env(a.threads)
    header = [f"samples {a.samples} x seqlen {a.seqlen} (seed {a.seed}), SQNR on {a.diag_samples} windows, "
              f"threads {a.threads or 'default'}, asymmetric weights, lm_head float"]
    if with_llmc:
        header.append(f"llm-compressor side: {llmc_version(llmc_py)}; GPTQModifier defaults (block_size 128, "
                      f"dampening_frac 0.01, actorder static), sequential pipeline, oneshot batch_size "
                      f"{a.llmc_batch_size}")
    md = ["## Weight-only quantization: ptqc vs llm-compressor", "", *[f"- {h}" for h in header], ""]
    all_results = {"settings": vars(a) | {"work": str(a.work), "llmc_venv": str(a.llmc_venv),
                                          "out": str(a.out), "json": str(a.json)}, "models": {}}
    for model in [m.strip() for m in a.models.split(",") if m.strip()]:
        mp = Path(model)
        paths = prepare(mp, a.work / mp.name, a.samples, a.seqlen, a.seed, a.diag_samples)
        rows = build_rows(methods, configs)
        for r in rows:
            what = f"{mp.name} {r['label']} {r['config']}".strip()
            spec = {"model": str(mp), **paths, "threads": a.threads}
            log(f"{what}: ptqc ...")
            r["ptqc"] = run_child([sys.executable, str(Path(__file__).resolve()), "--child",
                                   json.dumps({**spec, "pass": r["pass"], "options": r["options"]})],
                                  env, f"{what} ptqc", a.timeout)
            log(f"{what}: ptqc {_brief(r['ptqc'])}")
            if with_llmc and (r["method"] == "fp" or r["method"] in LLMC_METHODS and "bits" in r):
                log(f"{what}: llm-compressor ...")
                wspec = {**spec, "method": r["method"], "bits": r.get("bits", 0), "group": r.get("group", 0),
                         "calib_batch_size": a.llmc_batch_size}
                r["llmc"] = run_child([str(llmc_py), str(WORKER), json.dumps(wspec)], env, f"{what} llmc",
                                      a.timeout)
                log(f"{what}: llm-compressor {_brief(r['llmc'])}")
        table = format_table(model, rows, with_llmc)
        summary = gptq_summary(rows, with_llmc)
        block = table + ("\n\nGPTQ: ptqc vs llm-compressor and vs RTN\n\n" + summary if summary else "")
        print(block + "\n", flush=True)
        md += [block, ""]
        all_results["models"][model] = rows
    write_outputs(a, md, all_results)


def write_outputs(a, md: list[str], all_results: dict) -> None:
    """--out (the Markdown printed) and --json (all raw results), when given."""
    if a.out:
        a.out.write_text("\n".join(md) + "\n")
        log(f"wrote {a.out}")
    if a.json:
        a.json.write_text(json.dumps(all_results, indent=1, default=str))
        log(f"wrote {a.json}")


def _brief(r: dict) -> str:
    if "error" in r:
        return r["error"][:200]
    parts = [f"ppl {r['ppl']:.3f}" if "ppl" in r else "no ppl"]
    for k, f in (("sqnr_mean", ".2f"), ("quant_s", ".1f"), ("wall_s", ".0f")):
        if r.get(k) is not None:
            parts.append(f"{k} {r[k]:{f}}")
    return ", ".join(parts)


if __name__ == "__main__":
    main()
