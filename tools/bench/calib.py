#!/usr/bin/env python
"""Memory and speed of layer streaming (issue: calibration engine).

1. Peak RSS of `ptqc compile --passes rtn` and of a calibrated pipeline (`sensitive,rtn`) on a
   random-weight model of >= 1.5 GB in float32 with 28 layers, as a fraction of the model size.
2. Forward throughput of the layer-by-layer runner (what calibration and `ptqc eval` use)
   against a plain transformers forward over the same tokens.

    python tools/bench/calib.py [--model DIR] [--samples 16] [--seqlen 256] [--skip-big]

The random model is written once to /tmp/ptqc-bench-random-1.7g (reused on later runs).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))


def big_model(path: Path) -> Path:
    if not (path / "config.json").exists():  # in a child, so this process stays small
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "tools/make_tiny_model.py"), "-o", str(path), "--arch", "llama",
                        "--layers", "28", "--hidden", "1024", "--intermediate", "2816", "--heads", "16",
                        "--kv-heads", "16", "--vocab", "32000", "--shards", "2"], check=True)
        print(f"wrote random model {path} in {time.perf_counter() - t:.0f}s")
    return path


HWM = """
import atexit, runpy, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            sys.stderr.write("VMHWM " + line.split()[1] + "\\n")
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__")
"""


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """Peak resident set size (bytes, the process's own VmHWM) and wall time of a Python module
    run in a child process (`cmd` = module and its arguments). ru_maxrss of a child is not used:
    Linux carries the parent's high-water mark over fork+exec."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", HWM, *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    kb = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("VMHWM ")][-1]
    return kb * 1024, time.perf_counter() - t


def bench_memory(model: Path, samples: int, seqlen: int) -> None:
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    ptqc = ["ptqc.cli"]
    base, _ = peak_rss(["ptqc.cli", "passes"])
    calib = ["--calib", str(ROOT / "examples/tiny-qwen2/calib.txt"), "--calib-samples", str(samples),
             "--calib-seqlen", str(seqlen)]
    print(f"model {model}: {size / 2**30:.2f} GiB on disk; `ptqc passes` (imports only) peaks at "
          f"{base / 2**20:.0f} MiB")
    print(f"{'pipeline':44s} {'peak RSS':>10s} {'of model':>9s} {'time':>7s}")
    for name, passes in (("rtn:bits=4,group=128", "rtn:bits=4,group=128"),
                         ("sensitive:a_bits=4,top=2 + rtn (calibrated)", "sensitive:a_bits=4,top=2,rtn:bits=4,group=128")):
        out = Path(f"/tmp/ptqc-bench-out-{os.getpid()}")
        rss, sec = peak_rss([*ptqc, "compile", "--passes", passes, str(model), "-o", str(out), "--force", "-q",
                             *calib])
        print(f"{name:44s} {rss / 2**20:8.0f}MiB {rss / size:8.1%} {sec:6.0f}s")
        subprocess.run(["rm", "-rf", str(out)])


@torch.no_grad()
def bench_speed(model: Path, windows: int, seqlen: int, batch: int) -> None:
    from transformers import AutoModelForCausalLM

    from ptqc import calib, frontend

    ids = torch.randint(0, 300, (windows, seqlen), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    hf(ids[:1])  # warm-up

    def plain():
        for b in torch.split(ids, batch):
            hf(b, use_cache=False)

    qm = frontend.load(model)

    def layered():
        r = calib.LayerRunner(qm, list(torch.split(ids, batch)))
        for k in r.segments():
            r.run(k, on_output=(lambda b, o: None) if k == "suffix" else None)

    res = {}
    for name, fn in (("transformers forward", plain), ("ptqc layer-by-layer", layered)) * 2:
        t = time.perf_counter()
        fn()
        res[name] = min(res.get(name, 1e9), time.perf_counter() - t)  # best of two
    tokens = ids.numel()
    for name, s in res.items():
        print(f"  {name:24s} {tokens / s:9.0f} tok/s  ({s:.2f}s for {tokens} tokens)")
    print(f"  ratio layered/plain time: {res['ptqc layer-by-layer'] / res['transformers forward']:.2f}x")
    del hf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/ptqc-bench-random-1.7g"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--skip-big", action="store_true", help="Only the speed test on the example model.")
    a = ap.parse_args(argv)
    if not a.skip_big:
        model = big_model(a.model)
        bench_memory(model, a.samples, a.seqlen)
    print("throughput, examples/tiny-qwen2 (64 windows x 256, batch 8):")
    bench_speed(ROOT / "examples/tiny-qwen2", 64, 256, 8)
    if a.skip_big:
        return
    print(f"throughput, {model.name} ({a.samples} windows x {a.seqlen}, batch 8):")
    bench_speed(model, a.samples, a.seqlen, 8)


if __name__ == "__main__":
    main()
