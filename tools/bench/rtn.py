#!/usr/bin/env python
"""RTN sensitivity of a model: PPL at FP and RTN W8/W4/W3/W2 (group 128 and per channel).

Prints a Markdown table. Used to check that a benchmark model notices quantization (a model
that barely moves under 2-bit weights cannot tell methods apart).

    python tools/bench/rtn.py examples/tiny-qwen2 [examples/tiny-qwen2-outliers] [--seqlen 256]
"""
from __future__ import annotations

import argparse
import time

from ptqc import evaluate, frontend, pipeline

CONFIGS = ["fp", "rtn:bits=8,group=128", "rtn:bits=4,group=128", "rtn:bits=3,group=128", "rtn:bits=2,group=128",
           "rtn:bits=4,group=0", "rtn:bits=3,group=0"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--configs", default=";".join(CONFIGS), help="';'-separated pipelines ('fp' = none)")
    a = ap.parse_args(argv)
    print("| model | config | PPL | vs FP | quantize s | eval s |")
    print("|---|---|---|---|---|---|")
    for m in a.models:
        base = frontend.load(m)
        ids = evaluate.tokenize(evaluate.load_tokenizer(m), evaluate.read_text(evaluate.default_text(m)))
        fp = None
        for cfg in a.configs.split(";"):
            qm = base.clone()
            t0 = time.perf_counter()
            if cfg != "fp":
                pipeline.PassManager(pipeline.parse_pipeline(cfg)).run(qm, pipeline.PassContext(quiet=True))
            t1 = time.perf_counter()
            try:
                ppl = evaluate.perplexity(qm, ids, a.seqlen)["ppl"]
                cell = f"{ppl:.3f}"
            except Exception as e:  # noqa: BLE001 - a collapse is a result, not a crash
                ppl, cell = None, f"collapse: {e}"
            t2 = time.perf_counter()
            fp = ppl if cfg == "fp" else fp
            rel = f"{(ppl / fp - 1) * 100:+.1f}%" if ppl and fp and cfg != "fp" else ""
            print(f"| {m} | {cfg} | {cell} | {rel} | {t1 - t0:.2f} | {t2 - t1:.1f} |", flush=True)


if __name__ == "__main__":
    main()
