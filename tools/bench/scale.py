#!/usr/bin/env python
"""ptqc at real size: a random checkpoint with the layer shapes of a 70B Llama (hidden 8192,
intermediate 28672, GQA 64/8, vocab 128256, bf16), compiled through ``rtn:bits=4`` and
``gptq:bits=4`` at two depths; the difference gives the cost per layer, the rest the fixed cost,
and the two extrapolate to the real depth (80 layers) and to N ranks.

    python tools/bench/scale.py --work /tmp/scale [--shape llama-70b] [--depths 1 2] \\
        [--passes rtn:bits=4 gptq:bits=4] [--calib-samples 16 --calib-seqlen 256] [--json out.json]

With one depth (``--depths 1``, for a pass too slow to run twice) all of the passes' time counts as
layer time: an upper bound.

Every compile runs alone in its own process (time it on a quiet machine); its peak RSS is the
largest resident set of that process and its children. The checkpoint is written once
(tools/make_shaped_checkpoint.py, shard by shard) at the largest depth; smaller depths are views
over the same shards. Disk: the shards, each artifact, and the temporary files of the run
(offload, checkpoints) are measured.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

_MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.stderr.write(r.stderr + r.stdout)")


def du(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def checkpoint(work: Path, shape: str, depths: list[int]) -> dict[int, Path]:
    import make_shaped_checkpoint as msc

    deep = work / f"{shape}-{max(depths)}"
    if not (deep / "config.json").is_file():
        shutil.rmtree(deep, ignore_errors=True)
        t = time.perf_counter()
        msc.write(deep, shape, max(depths))
        print(f"wrote {deep} ({du(deep) / 2**30:.1f} GiB) in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    out = {}
    for d in depths:
        p = work / f"{shape}-{d}"
        if d != max(depths) and not p.exists():
            msc.view(deep, p, d)
        out[d] = p
    return out


def compile_once(model: Path, out: Path, passes: str, calib: Path, samples: int, seqlen: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", "from ptqc.cli import main; main()", "compile", str(model), "-o", str(out),
           "--passes", passes, "--calib", str(calib), "--calib-samples", str(samples), "--calib-seqlen", str(seqlen)]
    r = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    code, wall, rss_kb = r.stdout.split()
    if code != "0":
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    pass_s = {m[1]: float(m[2]) for m in re.finditer(r"^  (\S+)\s+([\d.]+)s", r.stderr, re.M)}
    return {"wall_s": round(float(wall), 1), "peak_rss_gib": round(int(rss_kb) / 2**20, 2),
            "pass_s": pass_s, "artifact_gib": round(du(out) / 2**30, 3)}


def cost_model(runs: dict[int, dict], layers: int) -> dict:
    """Wall = fixed + per_layer x depth. The cost per layer is the growth of the passes' own time
    between the two depths (the wall clock's growth also carries page-cache luck in reading the
    1 GB embedding); the fixed cost is the rest of the wall time at the smaller depth."""
    (d0, r0), (d1, r1) = sorted(runs.items())[0], sorted(runs.items())[-1]
    if d0 == d1:  # one depth: all of the passes' time counted as layer time (an upper bound), no slopes
        per = sum(r0["pass_s"].values()) / d0
        fixed = r0["wall_s"] - per * d0
        return {"per_layer_s_upper_bound": round(per, 1), "fixed_s": round(fixed, 1),
                f"wall_{layers}_layers_h": round((fixed + per * layers) / 3600, 2), "peak_rss_gib": r0["peak_rss_gib"]}
    per = (sum(r1["pass_s"].values()) - sum(r0["pass_s"].values())) / (d1 - d0)
    fixed = r0["wall_s"] - per * d0
    art = (r1["artifact_gib"] - r0["artifact_gib"]) / (d1 - d0)
    return {"per_layer_s": round(per, 1), "per_layer_wall_s": round((r1["wall_s"] - r0["wall_s"]) / (d1 - d0), 1),
            "fixed_s": round(fixed, 1), f"wall_{layers}_layers_h": round(
        (fixed + per * layers) / 3600, 2), "artifact_per_layer_gib": round(art, 3),
        f"artifact_{layers}_layers_gib": round(r0["artifact_gib"] + art * (layers - d0), 1),
        "peak_rss_gib": max(r["peak_rss_gib"] for r in runs.values())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="directory for the checkpoint and the artifacts")
    ap.add_argument("--shape", default="llama-70b")
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2],
                    help="one or two depths (one: the per-layer time is an upper bound)")
    ap.add_argument("--real-layers", type=int, default=80, help="depth to extrapolate to")
    ap.add_argument("--passes", nargs="+", default=["rtn:bits=4", "gptq:bits=4"])
    ap.add_argument("--calib", type=Path, default=ROOT / "examples" / "tiny-qwen2" / "calib.txt")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    models = checkpoint(a.work, a.shape, a.depths)
    res = {"shape": a.shape, "depths": a.depths, "calibration": [a.calib_samples, a.calib_seqlen],
           "checkpoint_gib": round(du(models[max(a.depths)]) / 2**30, 2),
           "runs": {}, "model": {}}
    for passes in a.passes:
        runs = {}
        for d in a.depths:
            runs[d] = compile_once(models[d], a.work / f"out-{d}", passes, a.calib, a.calib_samples, a.calib_seqlen)
            print(f"{passes} depth {d}: {json.dumps(runs[d])}", file=sys.stderr)
        res["runs"][passes] = runs
        res["model"][passes] = cost_model(runs, a.real_layers)
        print(f"{passes}: {json.dumps(res['model'][passes])}", file=sys.stderr)
        shutil.rmtree(a.work / f"out-{max(a.depths)}", ignore_errors=True)
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
