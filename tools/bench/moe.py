#!/usr/bin/env python
"""Mixture-of-experts bench: ptqc vs llm-compressor on a trained Qwen3-MoE, and peak RSS.

    python tools/bench/moe.py [--model examples/tiny-qwen3-moe] [--rows fp,rtn,gptq*,w8a8,w4a8]
        [--samples 128] [--seqlen 256] [--threads 1] [--skip-llmc] [--llmc-venv /tmp/llmc-venv]
        [--rss] [--rss-only] [--big-layers 8] [--big-hidden 512] [--big-experts 64]
        [--big-moe-intermediate 256] [--big-topk 8] [--out moe.md] [--json moe.json]

Protocol (tools/bench/weight_only.py's helpers, imported): calibration ``samples`` x ``seqlen``
windows of MODEL/calib.txt (seed 0, ``calib.pt``) and every non-overlapping ``seqlen`` window of
MODEL/eval.txt (``eval.pt``) for both tools; one child process per configuration, ``--threads``
torch threads (default 1) in every child, both tools.

* ptqc rows: each a pipeline string applied as written; "PPL" is ``ptqc.evaluate.perplexity`` of
  the fake-quant graph; "Ascend PPL" that of the same graph lowered by the ``ascend`` pass (CPU
  emulation of the torch_npu kernels; ``--target ascend``), or "n/a: <the error's line>" where
  the lowering does not support the row yet; "experts" counts the quantized expert projections
  in the saved artifact's manifest (each quantized stack's experts, from its ``scale_shape``)
  out of all expert projections of the model (layers x 3 x experts); router stays float.
* llm-compressor (tools/bench/llmc_moe_worker.py in its own venv): GPTQModifier W4g128 on the
  model linearized by its ``linearize_moe``, ``moe_calibrate_all_experts`` True for the
  "all-expert" row (ptqc: ``gptq:all_experts=true``), False for the "routed" row (ptqc's
  default); ignore ``lm_head`` and ``mlp.gate``; asymmetric, act order static on both sides.
  Its fake-quantized weights are saved as a float checkpoint and evaluated by ptqc's evaluator
  (the SAME evaluator as ptqc's rows); its own transformers-forward PPL is shown as a check.
* "quant s": wall time of the passes (ptqc) / ``oneshot`` (llm-compressor). On a shared machine
  these are not speed claims.
* ``--rss``: a larger random Qwen3-MoE (``--big-*``, bf16 on disk, made once in WORK) compiled by
  ``ptqc compile --passes gptq:bits=4,group=128`` (float32 compute) under ``/usr/bin/time -v``;
  its maximum resident set size next to that of tracing alone (``ptqc inspect --counts``), the
  checkpoint's total weights and one decoder layer's weights (in float32).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import weight_only as wo  # noqa: E402

ROOT = wo.ROOT
WORKER = Path(__file__).resolve().parent / "llmc_moe_worker.py"
log = wo.log
GPTQ = "gptq:bits=4,group=128,sym=false"
# (key, label, ptqc pipeline or None for float, llm-compressor counterpart or None)
ROWS = [
    ("fp", "FP", None, {"method": "fp"}),
    ("rtn", "RTN W4g128", "rtn:bits=4,group=128,sym=false", None),
    ("gptq-all", "GPTQ W4g128, all-expert stats", GPTQ + ",all_experts=true",
     {"method": "gptq", "bits": 4, "group": 128, "all_experts": True}),
    ("gptq-routed", "GPTQ W4g128, routed stats", GPTQ,
     {"method": "gptq", "bits": 4, "group": 128, "all_experts": False}),
    ("w8a8", "W8A8 dynamic (smooth,int8)", "smooth,int8", None),
    ("w4a8", "W4A8 (w4a8)", "w4a8", None),
]


def one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:240]


# ---- ptqc child ------------------------------------------------------------------------------
def expert_counts(manifest: dict, qm) -> tuple[int, int]:
    """(quantized expert projections in the manifest, all expert projections of the model)."""
    from ptqc import experts

    sites = experts.sites(qm)
    total = sum(qm.store.spec(s.node.args[s.arg].target)[0][0] if s.node.args[s.arg].op == "get_attr"
                else s.node.args[s.arg].meta["shape"][0] for s in sites)
    done = 0
    for s in sites:
        w = manifest.get("quant", {}).get(s.module, {}).get("weight")
        done += w["scale_shape"][0] if w and "scale_shape" in w else 0
    return done, total


def ascend_ppl(qm, evalw) -> dict:
    from ptqc import evaluate, pipeline

    low = qm.clone()
    try:
        pipeline.PassManager(pipeline.parse_pipeline("ascend")).run(low, pipeline.PassContext(quiet=True))
    except Exception as e:  # noqa: BLE001 - an unsupported lowering is a table cell
        return {"ascend_error": one_line(e)}
    return {"ascend_ppl": evaluate.perplexity(low, evalw.reshape(-1), evalw.shape[1])["ppl"]}


def child(spec: dict) -> dict:
    """One ptqc configuration, or ptqc's evaluation of another tool's float checkpoint."""
    import torch

    torch.set_num_threads(spec["threads"] or torch.get_num_threads())
    from ptqc import artifact, evaluate, frontend, pipeline

    res: dict = {}
    evalw = torch.load(spec["eval"], weights_only=True).long()
    qm = frontend.load(spec["model"])
    text = spec.get("pipeline")
    if text:
        wo._load_passes()
        try:
            passes = pipeline.parse_pipeline(text)
            t0 = time.perf_counter()
            pipeline.PassManager(passes).run(qm, pipeline.PassContext(
                calib=torch.load(spec["calib"], weights_only=True).long(), quiet=True))
        except Exception as e:  # noqa: BLE001 - a failing pipeline is a table cell
            return {"error": one_line(e)}
        res["quant_s"] = time.perf_counter() - t0
        res["vmhwm_quant"] = wo.vm_hwm()
    res["ppl"] = evaluate.perplexity(qm, evalw.reshape(-1), evalw.shape[1])["ppl"]
    if spec.get("artifact"):
        artifact.save(qm, spec["artifact"], force=True)
        res["experts_quantized"], res["experts_total"] = expert_counts(
            artifact.read_manifest(spec["artifact"]), qm)
    if text and spec.get("ascend"):
        res.update(ascend_ppl(qm, evalw))
    res["vmhwm_exit"] = wo.vm_hwm()
    return res


# ---- rows ------------------------------------------------------------------------------------
def run_rows(a, keys: list[str], paths: dict, llmc_py) -> list[dict]:
    env = wo.child_env(a.threads)
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    rows = []
    for key, label, text, llmc in ROWS:
        if key not in keys:
            continue
        r = {"key": key, "label": label, "pipeline": text}
        spec = {"model": str(a.model), **paths, "threads": a.threads, "pipeline": text, "ascend": True,
                "artifact": str(a.work / "artifacts" / key)}
        log(f"{label}: ptqc ...")
        r["ptqc"] = wo.run_child(me + [json.dumps(spec)], env, f"{key} ptqc", a.timeout)
        log(f"{label}: ptqc {wo._brief(r['ptqc'])}")
        if llmc and llmc_py:
            save = str(a.work / "llmc" / key)
            wspec = {"model": str(a.model), **paths, "threads": a.threads, "save": save, **llmc}
            log(f"{label}: llm-compressor ...")
            r["llmc"] = wo.run_child([str(llmc_py), str(WORKER), json.dumps(wspec)], env, f"{key} llmc", a.timeout)
            log(f"{label}: llm-compressor {wo._brief(r['llmc'])}")
            if "saved" in r["llmc"]:
                ev = {"model": save, **paths, "threads": a.threads}
                r["llmc_ptqc_eval"] = wo.run_child(me + [json.dumps(ev)], env, f"{key} llmc eval", a.timeout)
        rows.append(r)
    return rows


def _pct(p, ref) -> str:
    return f" ({(p / ref - 1) * 100:+.2f}%)" if p and ref and math.isfinite(p) else ""


def _ppl(r: dict | None, ref: float | None, key: str = "ppl") -> str:
    if not r:
        return "—"
    if "error" in r:
        return "n/a: " + r["error"]
    return f"{r[key]:.3f}" + _pct(r[key], ref) if key in r else "—"


def _ascend(r: dict | None) -> str:
    if not r or "error" in r or r.get("quant_s") is None:
        return "—"
    if "ascend_error" in r:
        return "n/a: " + r["ascend_error"]
    return f"{r['ascend_ppl']:.3f} ({(r['ascend_ppl'] / r['ppl'] - 1) * 100:+.3f}% vs fake-quant)"


def _experts(r: dict | None) -> str:
    if not r or "experts_total" not in r:
        return "—"
    return f"{r['experts_quantized']} / {r['experts_total']}"


def format_table(rows: list[dict]) -> str:
    fp = (rows[0].get("ptqc") or {}).get("ppl") if rows and rows[0]["key"] == "fp" else None
    out = ["| row | ptqc pipeline | ptqc PPL | Ascend emulated PPL | experts quantized (ptqc) "
           "| llm-compressor PPL (ptqc evaluator) | llmc PPL (transformers) | llmc experts quantized "
           "| ptqc quant s | llmc quant s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, lm, le = r.get("ptqc"), r.get("llmc"), r.get("llmc_ptqc_eval")
        lm_ppl = _ppl(lm, fp) if lm and "error" in lm else _ppl(le, fp)
        cells = [r["label"], f"`{r['pipeline']}`" if r["pipeline"] else "—", _ppl(p, fp), _ascend(p),
                 _experts(p), lm_ppl if lm else "—", _ppl(lm, None) if lm else "—",
                 str(lm.get("experts_quantized", "—")) if lm and "error" not in lm else "—",
                 wo._num(p, "quant_s", ".1f"), wo._num(lm, "quant_s", ".1f") if lm else "—"]
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(out)


def targets(rows: list[dict]) -> str:
    """The issue's targets, each with its numbers (yes / no / pending)."""
    by = {r["key"]: r for r in rows}
    ppl = {k: (r.get("ptqc") or {}).get("ppl") for k, r in by.items()}
    lines = []
    if ppl.get("fp") and ppl.get("w8a8"):
        d = (ppl["w8a8"] / ppl["fp"] - 1) * 100
        lines.append(f"- W8A8 dynamic within 1% of FP: {'yes' if abs(d) <= 1 else 'no'} ({d:+.2f}%)")
    for k in ("gptq-all", "gptq-routed"):
        r = by.get(k) or {}
        lp = (r.get("llmc_ptqc_eval") or {}).get("ppl")
        p, lq = (r.get("ptqc") or {}), (r.get("llmc") or {})
        if p.get("ppl") and lp:
            d = (p["ppl"] / lp - 1) * 100
            lines.append(f"- {r['label']}: ptqc within 0.5% of llm-compressor: "
                         f"{'yes' if d <= 0.5 else 'no'} ({d:+.2f}%; same evaluator)")
        if p.get("quant_s") and lq.get("quant_s"):
            lines.append(f"- {r['label']}: calibration time llmc / ptqc = {lq['quant_s'] / p['quant_s']:.2f}x "
                         "(target >= 2x; valid only if nothing else ran)")
    asc = [(r["label"], r["ptqc"]) for r in rows if "ascend_ppl" in (r.get("ptqc") or {})]
    for label, p in asc:
        d = (p["ascend_ppl"] / p["ppl"] - 1) * 100
        lines.append(f"- {label}: emulated Ascend within 0.1% of fake-quant: {'yes' if abs(d) <= 0.1 else 'no'} "
                     f"({d:+.3f}%)")
    left = [(r["label"], r["ptqc"]) for r in rows if "experts_total" in (r.get("ptqc") or {}) and r["pipeline"]]
    if left:
        ok = all(p["experts_quantized"] == p["experts_total"] for _, p in left)
        lines.append(f"- every expert quantized: {'yes' if ok else 'no'} ("
                     + ", ".join(f"{lab}: {_experts(p)}" for lab, p in left) + ")")
    return "\n".join(lines)


# ---- peak RSS on a larger random MoE ------------------------------------------------------------
def make_big(a) -> Path:
    """A random Qwen3-MoE of ``--big-*`` dimensions, bf16 on disk (made once)."""
    out = a.work / (f"big-qwen3-moe-l{a.big_layers}-h{a.big_hidden}-e{a.big_experts}x{a.big_moe_intermediate}"
                    f"-k{a.big_topk}")
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tools"))
    from make_tiny_model import make_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out, 300)
    heads = max(a.big_hidden // 64, 1)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=512, hidden_size=a.big_hidden, num_hidden_layers=a.big_layers,
                               intermediate_size=4 * a.big_moe_intermediate, num_attention_heads=heads,
                               num_key_value_heads=max(heads // 4, 1), head_dim=64, max_position_embeddings=512,
                               num_experts=a.big_experts, num_experts_per_tok=a.big_topk,
                               moe_intermediate_size=a.big_moe_intermediate, norm_topk_prob=True,
                               bos_token_id=0, eos_token_id=0, dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
    model.save_pretrained(str(out))
    (out / "calib.txt").write_text(" ".join(f"the quick brown fox {i} jumps over {i * 7}" for i in range(4000)))
    return out


def weight_bytes(model: Path) -> tuple[int, int]:
    """(all weights, decoder layer 0's weights), as float32 bytes."""
    from ptqc.model import SafetensorsFile

    total = layer = 0
    for f in model.glob("*.safetensors"):
        h = SafetensorsFile(f)
        for k in h.keys():
            n = math.prod(h.spec(k)[0]) * 4
            total += n
            layer += n if re.search(r"\.layers\.0\.", k) else 0
    return total, layer


def max_rss(cmd: list[str], env: dict, timeout: float) -> dict:
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, timeout=timeout)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    if r.returncode or not m:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:200]}
    return {"rss": int(m[1]) * 1024, "wall_s": time.perf_counter() - t}


def rss_section(a) -> tuple[str, dict]:
    big = make_big(a)
    total, layer = weight_bytes(big)
    env = wo.child_env(a.threads)
    ptqc = str(Path(sys.executable).with_name("ptqc"))
    out = a.work / "big-gptq"
    compile_cmd = [ptqc, "compile", str(big), "--passes", "gptq:bits=4,group=128", "-o", str(out), "--force", "-q",
                   "--calib-samples", str(a.rss_samples), "--calib-seqlen", str(a.rss_seqlen)]
    log(f"peak RSS: {big.name} ({total / 2**20:.0f} MiB float32, layer 0 {layer / 2**20:.0f} MiB)")
    res = {"model": str(big), "weights_f32": total, "layer_f32": layer,
           "trace": max_rss([ptqc, "inspect", str(big), "--counts"], env, a.timeout),
           "gptq": max_rss(compile_cmd, env, a.timeout), "command": " ".join(compile_cmd)}
    shutil.rmtree(out, ignore_errors=True)
    mib = lambda v: f"{v / 2**20:.0f} MiB"  # noqa: E731
    cell = lambda r: mib(r["rss"]) if "rss" in r else "n/a: " + r["error"]  # noqa: E731
    md = [f"Peak RSS: `{res['command']}` on a random Qwen3-MoE ({a.big_layers} layers, hidden {a.big_hidden}, "
          f"{a.big_experts} experts of {a.big_moe_intermediate}, top-{a.big_topk}; bf16 on disk, float32 compute; "
          f"calibration {a.rss_samples} x {a.rss_seqlen}):", "",
          "| all weights (float32) | one decoder layer (float32) | peak RSS: trace only (`ptqc inspect --counts`) "
          "| peak RSS: gptq compile | gptq minus trace |", "|---|---|---|---|---|",
          f"| {mib(total)} | {mib(layer)} | {cell(res['trace'])} | {cell(res['gptq'])} | "
          + (mib(res["gptq"]["rss"] - res["trace"]["rss"]) if "rss" in res["gptq"] and "rss" in res["trace"] else "—")
          + " |"]
    return "\n".join(md), res


# ---- main ------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "tiny-qwen3-moe")
    ap.add_argument("--rows", default="*", help=f"comma-separated patterns of {','.join(r[0] for r in ROWS)}")
    wo.add_common_args(ap, "/tmp/ptqc-bench-moe")
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS on a larger random MoE")
    ap.add_argument("--rss-only", action="store_true", help="only the peak RSS measurement")
    ap.add_argument("--rss-samples", type=int, default=16)
    ap.add_argument("--rss-seqlen", type=int, default=128)
    for k, v in (("layers", 8), ("hidden", 512), ("experts", 64), ("moe-intermediate", 256), ("topk", 8)):
        ap.add_argument(f"--big-{k}", type=int, default=v)
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if wo.serve_child(a, child):
        return
    a.work.mkdir(parents=True, exist_ok=True)
    md = ["## MoE: ptqc vs llm-compressor", ""]
    results: dict = {"settings": {k: str(v) for k, v in vars(a).items()}}
    if not a.rss_only:
        keys = [r[0] for r in ROWS if any(fnmatch.fnmatch(r[0], p.strip()) for p in a.rows.split(","))]
        llmc_py = None if a.skip_llmc else wo.ensure_llmc_venv(a.llmc_venv)
        paths = wo.prepare(a.model, a.work / a.model.name, a.samples, a.seqlen, a.seed, 1)
        n_eval = _windows(paths["eval"])
        md += [f"- `{' '.join(['python', 'tools/bench/moe.py', *(argv if argv is not None else sys.argv[1:])])}`",
               f"- model {a.model.name}; calibration {a.samples} x {a.seqlen} tokens (seed {a.seed}) for both tools; "
               f"PPL over {n_eval} windows of {a.seqlen} of eval.txt; threads {a.threads or 'default'}; router float",
               *([f"- llm-compressor side: {wo.llmc_version(llmc_py)}; GPTQModifier (block 128, dampening 0.01, "
                  "actorder static, sequential pipeline), linearize_moe, ignore lm_head and mlp.gate"] if llmc_py else []),
               "- quant s: wall time of the quantization; compare only runs made with nothing else running", ""]
        rows = run_rows(a, keys, paths, llmc_py)
        md += [format_table(rows), "", targets(rows), ""]
        results["rows"] = rows
    if a.rss or a.rss_only:
        text, results["rss"] = rss_section(a)
        md += [text, ""]
    print("\n".join(md), flush=True)
    wo.write_outputs(a, md, results)


def _windows(path: str) -> int:
    import torch

    return int(torch.load(path, weights_only=True).shape[0])


if __name__ == "__main__":
    main()
