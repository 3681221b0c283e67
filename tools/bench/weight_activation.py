#!/usr/bin/env python
"""Weight-activation (W8A8, W4A4) and KV-cache pipelines: PPL, collapse check, SQNR, time, RSS.

Prints one Markdown table per model (rows: FP, then one ptqc pipeline per row, then
llm-compressor's SmoothQuant W8A8), then a "targets" section (yes/no with the numbers).

    python tools/bench/weight_activation.py [--models examples/tiny-qwen2,examples/tiny-qwen2-outliers]
        [--rows fp,w8a8-*,...] [--samples 128] [--seqlen 256] [--diag-samples 16] [--threads 1]
        [--gen-tokens 48] [--skip-llmc] [--llmc-venv /tmp/llmc-venv] [--timeout 3600]
        [--out results.md] [--json results.json]

Protocol: that of tools/bench/weight_only.py (its functions are imported): the same
calibration windows (``calib.pt``: ``samples`` x ``seqlen`` from MODEL/calib.txt, seed 0), the same
evaluation windows (all non-overlapping ``seqlen`` windows of MODEL/eval.txt), SQNR windows
(``diag.pt``, seed 1), one child process per configuration, ``--threads 1`` by default, "quant s"
= wall time of the passes only (after tracing), peak RSS = the child's own VmHWM after the passes /
at exit. In addition:

* every row is a ptqc pipeline string (``ptqc.pipeline.parse_pipeline``) applied as written;
  a pass that is not registered shows "n/a (no such pass)";
* PPL: ``ptqc.evaluate.perplexity``; non-finite logits are never a number: the cell says
  "collapse (at <node, module, layer>)" from its ``CollapseError``;
* generation: greedy, ``--gen-tokens`` new tokens from 4 fixed prompts taken from MODEL/eval.txt
  (the first words of 4 paragraphs spread over the file, :func:`eval_prompts`), judged by
  ``ptqc.generate.collapse_signals``: "ok", or the signal ("loop 12x", "non-finite logits",
  "gibberish (19% known words)": too few generated words occur in MODEL/eval.txt, ...);
* SQNR: ``ptqc.diagnose.compare`` as in weight_only (a rotated model's layer outputs are mapped
  back to the float basis before comparing);
* "W / A / KV": linears with a quantized weight (``qm.quant[module]["weight"]``) and linears
  reading a ``quantize_act`` node, out of the decoder's linears (lm_head excluded), and attention
  ops with both K and V cache quantizers; "act q" = number of activation quantizer nodes;
* llm-compressor row: tools/bench/llmc_worker.py method ``smoothquant`` in its own venv
  (SmoothQuantModifier(smoothing_strength=0.5) + QuantizationModifier(scheme="W8A8"): int8
  per-channel symmetric weights, int8 dynamic per-token activations, lm_head float), PPL with a
  plain transformers forward of the frozen fake-quant model; the worker checks that every
  quantized Linear's forward really fake-quantizes its input (see its docstring). Its "+%" is
  against ptqc's FP PPL (the worker's own FP PPL is printed in the header as a check).

Row keys for ``--rows`` (comma-separated, shell-style patterns; FP always runs): see ``ROWS``.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import weight_only as wo  # noqa: E402

ROOT = wo.ROOT
WORKER = wo.WORKER
DEFAULT_MODELS = wo.DEFAULT_MODELS
MISSING = wo.MISSING
log = wo.log

# (key, label, ptqc pipeline); None = float model
ROWS = [
    ("fp", "FP", None),
    ("w8a8-static", "W8A8 plain (static per-tensor)", "int8:static=true"),
    ("w8a8-dynamic", "W8A8 plain (dynamic per-token)", "int8"),
    ("w8a8-smooth", "W8A8 smooth", "smooth,int8"),
    ("w8a8kv8-smooth", "W8A8KV8 smooth", "smooth,int8,kv:bits=8"),
    ("w8a8kv8-flatquant", "W8A8KV8 flatquant", "flatquant:w_bits=8,a_bits=8,kv:bits=8"),
    ("w4a4kv4-plain", "W4A4KV4 plain", "w4a4,kv:bits=4"),
    ("w4a4kv4-smooth", "W4A4KV4 smooth", "smooth,w4a4,kv:bits=4"),
    ("w4a4kv4-rotate", "W4A4KV4 rotate", "rotate,w4a4,kv:bits=4,k=head,sym=false"),
    ("w4a4kv4-rotate-gptq", "W4A4KV4 rotate+gptq",
     "rotate,gptq:bits=4,group=0,sym=true,w4a4,kv:bits=4,k=head,sym=false"),
    ("w4a4kv4-flatquant", "W4A4KV4 flatquant", "flatquant,kv:bits=4,k=head,sym=false"),
    ("w4a4-flatquant", "W4A4 KV16 flatquant", "flatquant"),
    ("w4a4-rotate-gptq", "W4A4 KV16 rotate+gptq", "rotate,gptq:bits=4,group=0,sym=true,w4a4"),
]
LLMC_KEY = "llmc-smoothquant"
LLMC_LABEL = "W8A8 SmoothQuant (llm-compressor)"
LLMC_PIPELINE = "SmoothQuantModifier(0.5) + QuantizationModifier(W8A8)"
# the W4A4KV4 ordering target: best first
ORDER = ["w4a4kv4-flatquant", "w4a4kv4-rotate-gptq", "w4a4kv4-rotate", "w4a4kv4-smooth", "w4a4kv4-plain"]
N_PROMPTS = 4
PROMPT_WORDS = 4


# ---- rows ------------------------------------------------------------------------------------
def build_rows(patterns: list[str] | None = None, with_llmc: bool = True) -> list[dict]:
    """The table's rows in order; ``patterns`` (shell-style) select keys, FP is always first."""
    keys = [k for k, _, _ in ROWS] + [LLMC_KEY]
    if patterns:
        bad = [p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in keys)]
        if bad:
            raise SystemExit(f"--rows {bad[0]!r} matches no row; rows: {', '.join(keys)}")

    def wanted(k):
        return k == "fp" or not patterns or any(fnmatch.fnmatchcase(k, p) for p in patterns)

    rows = [{"key": k, "label": lab, "pipeline": pl, "side": "ptqc"} for k, lab, pl in ROWS if wanted(k)]
    if with_llmc and wanted(LLMC_KEY):
        rows.append({"key": LLMC_KEY, "label": LLMC_LABEL, "pipeline": LLMC_PIPELINE, "side": "llmc"})
    return rows


def pass_names(text: str) -> list[str]:
    """Pass names of a pipeline string, in order (the tokens ``parse_pipeline`` reads as names)."""
    names = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if ":" in tok:
            names.append(tok.partition(":")[0].strip())
        elif "=" not in tok:
            names.append(tok)
    return names


def eval_prompts(text: str, n: int = N_PROMPTS, words: int = PROMPT_WORDS) -> list[str]:
    """``n`` short prompts from a model's eval text: the first ``words`` words of ``n``
    paragraphs spread evenly over the text (paragraphs whose first line is prose: starts with a
    capital letter, has at least ``words + 2`` words, and is not a ``Module``/``Class`` heading)."""
    cands = []
    for para in re.split(r"\n\s*\n", text):
        line = para.strip().splitlines()[0].strip() if para.strip() else ""
        w = line.split()
        if len(w) >= words + 2 and w[0][:1].isupper() and w[0].isalpha() and w[0] not in ("Module", "Class"):
            cands.append(" ".join(w[:words]))
    if len(cands) < n:
        raise SystemExit(f"the eval text has only {len(cands)} usable paragraphs for {n} prompts")
    return [cands[(2 * i + 1) * len(cands) // (2 * n)] for i in range(n)]


# ---- ptqc child ------------------------------------------------------------------------------
def counts(qm) -> dict:
    """What got quantized: weights (qm.quant), linear inputs read through a quantize_act node
    (the graph), attention ops with quantized K and V caches; lm_head excluded."""
    from ptqc import ops
    from ptqc.ir import info, is_op

    lins = [n for n in qm.linears() if info(n).get("role") != "lm_head"]
    w_q = [n for n in lins if "weight" in qm.quant.get(info(n)["module"], {})]
    a_q = [n for n in lins if is_op(n.args[0], ops.QUANTIZE_ACT)]
    attn = list(qm.nodes(ops.ATTENTION))
    kv_q = [n for n in attn if all(is_op(a, ops.QUANTIZE_ACT) for a in n.args[1:3])]
    act_nodes = [n for n in qm.graph.nodes if is_op(n, ops.QUANTIZE_ACT) and not
                 str(info(n).get("role", "")).endswith("cache_quant")]
    roles = sorted({info(n).get("role") for n in lins})
    return {"linears": len(lins), "w_quantized": len(w_q), "a_quantized": len(a_q),
            "attention": len(attn), "kv_quantized": len(kv_q), "act_quantizers": len(act_nodes),
            "roles": roles,
            "w_float": [info(n)["module"] for n in lins if n not in w_q][:8],
            "a_float": [info(n)["module"] for n in lins if n not in a_q][:8],
            "down_w": sum(1 for n in w_q if info(n).get("role") == "down"),
            "down_a": sum(1 for n in a_q if info(n).get("role") == "down"),
            "down": sum(1 for n in lins if info(n).get("role") == "down")}


def generation(qm, model: str, prompts: list[str], tokens: int) -> dict:
    from ptqc import evaluate, generate

    tok = evaluate.load_tokenizer(model)
    outs = generate.greedy(qm, tok, prompts, max_new_tokens=tokens, model_dir=model)
    s = generate.collapse_signals(outs, tok, generate.reference_vocabulary(model, qm))
    return {"collapsed": s["collapsed"], "reasons": s["reasons"], "describe": generate.describe(s),
            "loop": {k: v for k, v in s["loop"].items() if k != "text"}, "finite": s["finite"],
            "degenerate": s["degenerate"], "distinct_2": s["distinct_2"], "known_words": s.get("known_words"),
            "texts": [o["text"][:120] for o in outs]}


def child(spec: dict) -> dict:
    """One ptqc pipeline (runs in its own process)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from ptqc import diagnose, evaluate, frontend, pipeline
    from ptqc.errors import CollapseError

    res: dict = {}
    text = spec.get("pipeline")
    passes = []
    if text:
        broken = wo._load_passes()
        for name in pass_names(text):
            if name not in pipeline.PASSES:
                res["error"] = f"import failed: {broken[name]}" if name in broken else MISSING
                res["missing"] = name not in broken
                res["missing_pass"] = name
                return res
        try:
            passes = pipeline.parse_pipeline(text)
        except Exception as e:  # noqa: BLE001 - a bad option is a table cell
            res["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            return res
        res["pipeline"] = " -> ".join(repr(p) for p in passes)
    ids = torch.load(spec["calib"], weights_only=True).long()
    evalw = torch.load(spec["eval"], weights_only=True).long()
    diag = torch.load(spec["diag"], weights_only=True).long()
    t0 = time.perf_counter()
    qm = frontend.load(spec["model"])
    res["load_s"] = time.perf_counter() - t0
    # the SQNR's float reference: a fresh load after evaluation (weight_only's protocol), or with
    # fp_clone (tests) a clone taken now, which saves a second trace
    fp = qm.clone() if passes and spec.get("fp_clone") else None
    if passes:
        t0 = time.perf_counter()
        try:
            recs = pipeline.PassManager(passes).run(qm, pipeline.PassContext(calib=ids, quiet=True))
        except Exception as e:  # noqa: BLE001 - a failing pass is a table cell
            res["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            return res
        res["quant_s"] = time.perf_counter() - t0
        res["vmhwm_quant"] = vm_hwm()
        res["summaries"] = [{"pass": r["pass"], "seconds": r["seconds"],
                             **{k: v for k, v in (r.get("summary") or {}).items() if isinstance(v, (int, float, str))}}
                            for r in recs]
    res["counts"] = counts(qm)
    t0 = time.perf_counter()
    try:
        res["ppl"] = evaluate.perplexity(qm, evalw.reshape(-1), evalw.shape[1])["ppl"]
    except CollapseError as e:
        res["ppl_error"] = str(e)[:300]
    res["eval_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        res["gen"] = generation(qm, spec["model"], spec["prompts"], int(spec.get("gen_tokens", 48)))
    except Exception as e:  # noqa: BLE001
        res["gen"] = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:200]}
    res["gen_s"] = time.perf_counter() - t0
    if passes:
        try:
            fp = fp or frontend.load(spec["model"])
            rep = diagnose.compare(fp, qm, diag)
            sq = [e["output"]["accumulated"]["sqnr_db"] for e in rep["layers"]]
            res["sqnr_layers"] = sq
            ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in sq)
            res["sqnr_mean"] = sum(sq) / len(sq) if ok and sq else None
        except Exception as e:  # noqa: BLE001
            res["sqnr_error"] = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    res["vmhwm_exit"] = vm_hwm()
    return res


vm_hwm = wo.vm_hwm


# ---- cells -----------------------------------------------------------------------------------
def collapse_where(msg: str) -> str:
    """'... became non-finite at node X (module, layer 3)' -> 'node X (module, layer 3)'."""
    m = re.search(r"non-finite at (.*)$", msg or "")
    return m.group(1).strip() if m else (msg or "?")


def ppl_cell(r: dict | None, fp: float | None) -> str:
    """PPL (+% vs FP); a non-finite PPL is never printed as a number."""
    if r and "error" not in r and "ppl_error" in r:
        return f"collapse (at {collapse_where(r['ppl_error'])})"
    if r and "error" not in r and "ppl" in r and not math.isfinite(r["ppl"]):
        return "collapse (PPL overflow)"
    return wo._ppl_cell(r, fp)


def gen_cell(r: dict | None) -> str:
    g = (r or {}).get("gen")
    if not r or "error" in r or not g:
        return "—"
    if "error" in g:
        return f"error: {g['error']}"
    if not g["collapsed"]:
        return "ok"
    if not g.get("finite", True):
        return "non-finite logits"
    from ptqc.generate import DEGENERATE_OUTPUTS, MIN_KNOWN_WORDS

    kw = g.get("known_words")
    if kw is not None and kw < MIN_KNOWN_WORDS and g.get("degenerate", 1.0) <= DEGENERATE_OUTPUTS:
        return f"gibberish ({kw:.0%} known words)"  # broken words that neither loop nor repeat
    lp = g.get("loop") or {}
    if lp.get("tokens"):
        return f"loop {lp['repeats']}x" + (f" (period {lp['period']})" if lp.get("period", 1) > 1 else "")
    if g.get("distinct_2") is not None and g["distinct_2"] < 0.1:
        return f"distinct-2 {g['distinct_2']:.3f}"
    return (g.get("reasons") or ["collapsed"])[0]


def quantized_cell(r: dict | None) -> str:
    c = (r or {}).get("counts")
    if not r or "error" in r or not c:
        return "—"
    if not (c["w_quantized"] or c["a_quantized"] or c["kv_quantized"]):
        return "—"
    return (f"{c['w_quantized']}/{c['linears']} / {c['a_quantized']}/{c['linears']} / "
            f"{c['kv_quantized']}/{c['attention']} ({c['act_quantizers']} act q)")


def sqnr_cell(r: dict | None) -> str:
    """Mean layer-output SQNR (``ptqc.diagnose`` maps a rotated model's layer outputs back to the
    float basis, :mod:`ptqc.basis`)."""
    if r and "error" not in r and r.get("sqnr_mean") is None and r.get("sqnr_layers"):
        return "non-finite"
    return wo._num(r, "sqnr_mean", ".2f")


def format_table(model: str, rows: list[dict]) -> str:
    fp = (rows[0].get("res") or {}).get("ppl") if rows and rows[0]["key"] == "fp" else None
    out = [f"### {model}", "",
           "| config | pipeline | PPL (+% vs FP) | generation | W / A / KV quantized | SQNR dB | quant s "
           "| peak RSS MiB (quant / exit) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = r.get("res")
        cells = [r["label"], f"`{r['pipeline']}`" if r["pipeline"] else "—", ppl_cell(res, fp),
                 gen_cell(res), quantized_cell(res),
                 sqnr_cell(res),
                 wo._num(res, "quant_s", ".1f"), wo._rss(res)]
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(out)


# ---- targets ---------------------------------------------------------------------------------
def _ppl(rows: list[dict], key: str) -> float | None:
    """The finite PPL of a row (None if it is missing, failed or collapsed)."""
    r = next((x for x in rows if x["key"] == key), None)
    p = ((r or {}).get("res") or {}).get("ppl")
    return p if isinstance(p, (int, float)) and math.isfinite(p) and "error" not in r["res"] else None


def _state(rows: list[dict], key: str) -> str:
    """Why a row has no PPL: 'not run', 'n/a (no such pass)', 'error', 'collapse (at ...)'."""
    r = next((x for x in rows if x["key"] == key), None)
    if r is None or r.get("res") is None:
        return "not run"
    return ppl_cell(r["res"], None)


def _pct(p: float, fp: float) -> str:
    return f"{(p / fp - 1) * 100:+.2f}%"


def _yn(ok) -> str:
    return "n/a" if ok is None else "yes" if ok else "no"


def targets(models: dict[str, list[dict]]) -> str:
    """The targets section: each claim as yes / no / n/a with the numbers."""
    out = ["## Targets", ""]
    # (1) W8A8KV8 smooth within 1% of FP, every linear quantized incl. down_proj
    out.append("1. W8A8KV8 smooth within 1% of FP, every decoder linear's weight and input quantized "
               "(incl. down_proj), K and V caches quantized:")
    for m, rows in models.items():
        fp, p = _ppl(rows, "fp"), _ppl(rows, "w8a8kv8-smooth")
        r = next((x for x in rows if x["key"] == "w8a8kv8-smooth"), None)
        c = ((r or {}).get("res") or {}).get("counts")
        if fp is None or p is None or not c:
            out.append(f"   - {m}: n/a (W8A8KV8 smooth: {_state(rows, 'w8a8kv8-smooth')})")
            continue
        within = p <= fp * 1.01
        full = (c["w_quantized"] == c["a_quantized"] == c["linears"] and c["down_w"] == c["down_a"] == c["down"] > 0
                and c["kv_quantized"] == c["attention"] > 0)
        out.append(f"   - {m}: **{_yn(within and full)}** — PPL {p:.3f} vs FP {fp:.3f} ({_pct(p, fp)}, "
                   f"{'within' if within else 'outside'} 1%); weights {c['w_quantized']}/{c['linears']}, "
                   f"inputs {c['a_quantized']}/{c['linears']} ({c['act_quantizers']} act quantizers), "
                   f"down_proj {c['down_w']}/{c['down']} W + {c['down_a']}/{c['down']} A, "
                   f"KV {c['kv_quantized']}/{c['attention']} attention ops")
    # (1b) plain static W8A8 worse on the outlier model
    out.append("   Plain static W8A8 is worse on the outlier model (its PPL increase over FP larger than on "
               "the other model, and larger than W8A8 smooth's on the outlier model):")
    outl = [m for m in models if "outlier" in Path(m).name]
    base = [m for m in models if m not in outl]
    if not outl:
        out.append("   - n/a (no outlier model in --models)")
    for m in outl:
        rows = models[m]
        fp, st, sm = _ppl(rows, "fp"), _ppl(rows, "w8a8-static"), _ppl(rows, "w8a8-smooth")
        if fp is None or st is None:
            st_s = _state(rows, "w8a8-static")
            out.append(f"   - {m}: {'yes' if st_s.startswith('collapse') else 'n/a'} (static W8A8: {st_s})")
            continue
        parts, oks = [f"static {st:.3f} ({_pct(st, fp)})"], []
        if sm is not None:
            oks.append(st > sm)
            parts.append(f"smooth {sm:.3f} ({_pct(sm, fp)})")
        for b in base:
            bfp, bst = _ppl(models[b], "fp"), _ppl(models[b], "w8a8-static")
            if bfp is not None and bst is not None:
                oks.append(st / fp > bst / bfp)
                parts.append(f"static on {b} {bst:.3f} ({_pct(bst, bfp)})")
        out.append(f"   - {m}: **{_yn(all(oks) if oks else None)}** — " + "; ".join(parts))
    # (2) W4A4KV4 ordering
    out.append("2. W4A4KV4 ordering flatquant < rotate+gptq < rotate < smooth < plain (PPL), pair by pair:")
    names = {k: lab.replace("W4A4KV4 ", "") for k, lab, _ in ROWS}
    for m, rows in models.items():
        cells = []
        held = na = 0
        for a, b in zip(ORDER, ORDER[1:]):
            pa, pb = _ppl(rows, a), _ppl(rows, b)
            if pa is None or pb is None:
                miss = [f"{names[k]}: {_state(rows, k)}" for k, p in ((a, pa), (b, pb)) if p is None]
                # a collapsed "worse" side still means the better side wins
                if pa is not None and pb is None and _state(rows, b).startswith("collapse"):
                    cells.append(f"{names[a]} < {names[b]}: yes ({pa:.3f} < collapse)")
                    held += 1
                else:
                    cells.append(f"{names[a]} < {names[b]}: n/a ({'; '.join(miss)})")
                    na += 1
                continue
            ok = pa < pb
            held += ok
            cells.append(f"{names[a]} < {names[b]}: {_yn(ok)} ({pa:.3f} vs {pb:.3f})")
        out.append(f"   - {m}: {held} of {len(ORDER) - 1 - na} pairs hold" + (f" ({na} n/a)" if na else "")
                   + " — " + "; ".join(cells))
    # (3) flatquant W4A4KV4 within 15% of FP
    out.append("3. W4A4KV4 flatquant within 15% of FP:")
    for m, rows in models.items():
        fp, p = _ppl(rows, "fp"), _ppl(rows, "w4a4kv4-flatquant")
        if fp is None or p is None:
            st = _state(rows, "w4a4kv4-flatquant")
            out.append(f"   - {m}: {'no' if st.startswith('collapse') else 'n/a'} (flatquant: {st})")
            continue
        out.append(f"   - {m}: **{_yn(p <= fp * 1.15)}** — PPL {p:.3f} vs FP {fp:.3f} ({_pct(p, fp)})")
    return "\n".join(out)


# ---- main ------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model directories")
    ap.add_argument("--rows", help="comma-separated row keys (shell patterns): "
                    + ",".join([k for k, _, _ in ROWS] + [LLMC_KEY]))
    wo.add_common_args(ap, "/tmp/ptqc-bench-weight-activation")
    ap.add_argument("--gen-tokens", type=int, default=48, help="new tokens per prompt in the collapse check")
    a = ap.parse_args(argv)
    if wo.serve_child(a, child):
        return
    patterns = [p.strip() for p in a.rows.split(",") if p.strip()] if a.rows else None
    with_llmc = not a.skip_llmc
    rows0 = build_rows(patterns, with_llmc)
    with_llmc = any(r["side"] == "llmc" for r in rows0)
    llmc_py = wo.ensure_llmc_venv(a.llmc_venv) if with_llmc else None
    env = wo.child_env(a.threads)
    header = [f"samples {a.samples} x seqlen {a.seqlen} (seed {a.seed}), SQNR on {a.diag_samples} windows, "
              f"threads {a.threads or 'default'}, generation: greedy {a.gen_tokens} new tokens x {N_PROMPTS} "
              f"prompts from eval.txt",
              "W / A / KV: linears with quantized weights / linears with a quantized input (of the decoder's, "
              "lm_head excluded) / attention ops with quantized K and V caches"]
    if with_llmc:
        header.append(f"llm-compressor side: {wo.llmc_version(llmc_py)}; SmoothQuantModifier(smoothing_strength=0.5, "
                      "default mappings: norms -> q/k/v and gate/up) + QuantizationModifier(scheme=\"W8A8\", ignore "
                      "lm_head), oneshot batch_size 1; PPL by a transformers forward of the frozen fake-quant model")
    md = ["## Weight-activation and KV-cache quantization", "", *[f"- {h}" for h in header], ""]
    all_results = {"settings": vars(a) | {"work": str(a.work), "llmc_venv": str(a.llmc_venv),
                                          "out": str(a.out), "json": str(a.json)}, "models": {}}
    models: dict[str, list[dict]] = {}
    for model in [m.strip() for m in a.models.split(",") if m.strip()]:
        mp = Path(model)
        paths = wo.prepare(mp, a.work / mp.name, a.samples, a.seqlen, a.seed, a.diag_samples)
        from ptqc import evaluate

        prompts = eval_prompts(evaluate.read_text(evaluate.default_text(mp)))
        log(f"{mp.name}: prompts {prompts}")
        rows = build_rows(patterns, with_llmc)
        notes = [f"prompts: {', '.join(repr(p) for p in prompts)}"]
        for r in rows:
            what = f"{mp.name} {r['label']}"
            spec = {"model": str(mp), **paths, "threads": a.threads}
            log(f"{what}: ...")
            if r["side"] == "ptqc":
                r["res"] = wo.run_child([sys.executable, str(Path(__file__).resolve()), "--child",
                                         json.dumps({**spec, "pipeline": r["pipeline"], "prompts": prompts,
                                                     "gen_tokens": a.gen_tokens})], env, what, a.timeout)
            else:
                wspec = {**spec, "bits": 8, "group": 0, "calib_batch_size": 1}
                fpres = wo.run_child([str(llmc_py), str(WORKER), json.dumps({**wspec, "method": "fp"})], env,
                                     f"{what} fp", a.timeout)
                r["llmc_fp"] = fpres
                r["res"] = wo.run_child([str(llmc_py), str(WORKER),
                                         json.dumps({**wspec, "method": "smoothquant",
                                                     "extra": {"smoothing_strength": 0.5}})], env, what, a.timeout)
                if "ppl" in fpres:
                    notes.append(f"llm-compressor venv FP PPL (transformers forward): {fpres['ppl']:.3f}")
                ac = r["res"].get("act_check")
                if ac:
                    notes.append(f"llm-compressor activation check ({ac['linears']} Linears, {ac['status']}): "
                                 f"output vs per-token int8 reference max rel err {ac['max_rel_err_vs_ref_a8']:.1e}, "
                                 f"vs weight-only >= {ac['min_rel_err_vs_weight_only']:.1e}; logits rel diff vs float "
                                 f"{ac['logits_rel_diff_vs_float']:.4f}, vs quantizers disabled "
                                 f"{ac['logits_rel_diff_vs_quantizers_disabled']:.4f}")
            log(f"{what}: {_brief(r['res'])}")
        table = format_table(model, rows)
        block = table + "\n\n" + "\n".join(f"- {n}" for n in notes)
        print(block + "\n", flush=True)
        md += [block, ""]
        models[model] = rows
        all_results["models"][model] = rows
    tg = targets(models)
    print(tg + "\n", flush=True)
    md += [tg, ""]
    wo.write_outputs(a, md, all_results)


def _brief(r: dict) -> str:
    if "error" in r:
        return r["error"][:200]
    parts = [f"ppl {r['ppl']:.3f}" if "ppl" in r else f"ppl: {ppl_cell(r, None)}", f"gen {gen_cell(r)}"]
    for k, f in (("sqnr_mean", ".2f"), ("quant_s", ".1f"), ("wall_s", ".0f")):
        if r.get(k) is not None:
            parts.append(f"{k} {r[k]:{f}}")
    return ", ".join(parts)


if __name__ == "__main__":
    main()
