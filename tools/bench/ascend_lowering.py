#!/usr/bin/env python
"""Ascend lowering: kernel counts per recipe, emulated vs fake-quant PPL, int8 matmul speed.

    python tools/bench/ascend_lowering.py [--model examples/tiny-qwen2] [--samples 32] [--seqlen 256]
        [--windows 0] [--threads 1]

Prints Markdown:
1. per pipeline: standalone quantization kernels per decoder layer, naive (one per linear),
   shared (one per quantized input) and fused (add+RMSNorm+quant, SwiGLU+quant), max over layers;
2. PPL of the fake-quant graph and of the lowered (CPU-emulated Ascend) graph: W8A8 dynamic,
   W8A8 static with the 19-bit deq_scale truncation, without it (``ascend:truncate=false``) and
   also without rounding the bias into the int32 quant_bias (``int_bias=false``),
   W8A8KV8 with a static int8 cache (npu_fused_infer_attention_score with antiquant scales),
   W8A16, W4A16 g128, W4A4 with QuaRot (int4 quant_matmul, kronecker_quant) and W4A4KV8;
3. the emulation's int8 matmul (``torch._int_mm``, int32 accumulation) against a float32 matmul
   of the same shape (prefill-sized: 512 tokens x hidden 4096 x 4096), median of 5 runs.
Numbers are reported, nothing is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

PIPELINES = [
    ("W8A8 dynamic (smooth,int8)", "smooth,int8"),
    ("W8A8 static (smooth,int8:static=true)", "smooth,int8:static=true"),
    ("W8A8KV8 (smooth,int8,kv:k=channel,v=channel)", "smooth,int8,kv:k=channel,v=channel"),
    ("W8A16", "w8a16"),
    ("W4A16 g128", "w4a16"),
    ("W4A4 (rotate,w4a4)", "rotate,w4a4"),
    ("W4A4KV8 (rotate,w4a4,kv:k=channel,v=channel)", "rotate,w4a4,kv:k=channel,v=channel"),
]


def _timeit(fn, n=5):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def add_args(ap: argparse.ArgumentParser) -> None:
    """The arguments the Ascend benches share: model, calibration, eval windows, threads."""
    ap.add_argument("--model", default=str(ROOT / "examples" / "tiny-qwen2"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=0, help="eval windows (0: all)")
    ap.add_argument("--threads", type=int, default=1)


def setup(a):
    """(calibration batches, the traced float model, ppl(qm)) for :func:`add_args`' arguments."""
    if a.threads:
        torch.set_num_threads(a.threads)
    from ptqc import data, evaluate, frontend

    tok = evaluate.load_tokenizer(a.model)
    calib = data.calibration_batches(tok, data.default_calib(a.model), a.samples, a.seqlen, seed=0)
    ids = evaluate.tokenize(tok, evaluate.read_text(evaluate.default_text(a.model)))
    if a.windows:
        ids = ids[: a.windows * a.seqlen + 1]

    def ppl(qm):
        return evaluate.perplexity(qm, ids, a.seqlen)["ppl"]

    return calib, frontend.load(a.model), ppl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    a = ap.parse_args(argv)
    calib, base, ppl = setup(a)
    from ptqc import pipeline
    from ptqc.lowering.ascend.lower import kernel_counts, kernel_report

    fp = ppl(base)
    print(f"### Ascend lowering on {Path(a.model).name} (FP PPL {fp:.4f}; calibration {a.samples}x{a.seqlen})\n")
    print("| pipeline | quant kernels / layer: naive | shared | fused (max over layers) | fake-quant PPL "
          "| emulated PPL | emulated vs fake-quant | no scale truncation | no truncation, float bias "
          "| lowered kernels / layer (fused quant, cache writes, attention) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, text in PIPELINES:
        qm = base.clone()
        pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True, calib=calib))
        rows = kernel_report(qm)
        naive, shared, fused = (max(r[k] for r in rows) for k in ("naive", "shared", "fused"))
        fq = ppl(qm)
        low = qm.clone()
        pipeline.PassManager(pipeline.parse_pipeline("ascend")).run(low, pipeline.PassContext(quiet=True))
        em = ppl(low)
        kc = kernel_counts(low)
        lk = "/".join(str(max(c[k] for c in kc.values())) for k in ("fused_quant", "cache_quant", "attention"))
        extra = ["—", "—"]
        if "static" in text:
            for j, opts in enumerate(("ascend:truncate=false", "ascend:truncate=false,int_bias=false")):
                low2 = qm.clone()
                pipeline.PassManager(pipeline.parse_pipeline(opts)).run(low2, pipeline.PassContext(quiet=True))
                em2 = ppl(low2)
                extra[j] = f"{em2:.4f} ({(em2 / fq - 1) * 100:+.3f}%)"
        print(f"| {label} | {naive} | {shared} | {fused} | {fq:.4f} | {em:.4f} | {(em / fq - 1) * 100:+.3f}% "
              f"| {extra[0]} | {extra[1]} | {lk} |")

    print("\n### int8 matmul of the emulation (torch._int_mm) vs float32 matmul\n")
    print("| shape (m x k x n) | int8 _int_mm ms | float32 mm ms | ratio |")
    print("|---|---|---|---|")
    for m, k, n in ((512, 4096, 4096), (512, 256, 384)):
        x8 = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        w8 = torch.randint(-128, 128, (k, n), dtype=torch.int8)
        xf, wf = x8.float(), w8.float()
        ti = _timeit(lambda: torch._int_mm(x8, w8))
        tf = _timeit(lambda: xf @ wf)
        print(f"| {m} x {k} x {n} | {ti * 1e3:.2f} | {tf * 1e3:.2f} | {ti / tf:.2f} |")


if __name__ == "__main__":
    main()
