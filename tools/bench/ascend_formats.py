#!/usr/bin/env python
"""Ascend export types on an example model: FP, fake-quant and CPU-emulated Ascend PPL, and whether
each export loads in vllm-ascend 0.23.0's real loader (fp16 / bf16).

    python tools/bench/ascend_formats.py [--model examples/tiny-qwen2] [--samples 32] [--seqlen 256]
        [--windows 0] [--threads 1] [--flatquant-epochs 2] [--no-load] [--only TYPE,...]

Per type: the recipe, fake-quant PPL, emulated PPL (the ``ascend`` lowering) and its difference,
both against FP, and the loader's verdict for the export served in float16 and in bfloat16
(``yes``: built, every parameter filled exactly once; else the error). The loader runs in the peer
venv of tools/vllm_ascend_env.py (one process for every export). Prints Markdown; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from ascend_lowering import add_args, setup  # noqa: E402

TYPES = [  # (export type, recipe; {E}: flatquant epochs)
    ("W8A8", "smooth,int8:static=true"),
    ("W8A8_DYNAMIC", "smooth,int8"),
    ("W8A8_MIX", "smooth,w8a8_mix"),
    ("W8A16", "w8a16"),
    ("W4A8_DYNAMIC", "w4a8"),
    ("W4A4_DYNAMIC", "rotate:online_down=false,qk=false,w4a4"),
    ("W4A4_FLATQUANT_DYNAMIC", "flatquant:epochs={E},k_transform=false"),
    ("W8A8_MXFP8", "w8a8_mxfp8"),
    ("W4A4_MXFP4", "w4a4_mxfp4"),
]
DTYPES = ("float16", "bfloat16")


def load_verdicts(dirs: dict, root: Path) -> dict:
    """(type, dtype) -> "yes" or the loader's error, for every export directory in ``dirs``."""
    env = subprocess.run([sys.executable, str(ROOT / "tools" / "vllm_ascend_env.py")], capture_output=True, text=True)
    if env.returncode != 0:
        return {k: f"not run ({env.stdout.strip()[-80:] or 'no peer venv'})" for k in dirs}
    peer = json.loads(env.stdout.strip().splitlines()[-1])
    r = subprocess.run([peer["python"], str(ROOT / "tools" / "vllm_ascend_load.py"), *map(str, dirs.values()),
                        "--json", str(root / "report.json")], capture_output=True, text=True,
                       env={"PYTHONPATH": peer["pythonpath"], "PATH": "/usr/bin:/bin", "HOME": str(root)})
    if r.returncode != 0:
        return {k: f"loader failed: {r.stderr.strip()[-120:]}" for k in dirs}
    rep = json.loads((root / "report.json").read_text())["dirs"]
    out = {}
    for k, d in dirs.items():
        v = rep[str(d)]
        ok = v.get("ok") and not v["unfilled"] and not v["refilled"]
        out[k] = "yes" if ok else v.get("error") or f"unfilled {v['unfilled'][:1]} refilled {v['refilled'][:1]}"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    ap.add_argument("--flatquant-epochs", type=int, default=2)
    ap.add_argument("--no-load", action="store_true", help="skip the vllm-ascend loader")
    ap.add_argument("--only", default="", help="comma-separated export types (default: all)")
    a = ap.parse_args(argv)
    calib, base, ppl = setup(a)
    from ptqc import pipeline
    from ptqc.errors import PtqcError
    from ptqc.lowering.ascend import export as ax

    fp = ppl(base)
    only = set(filter(None, a.only.split(",")))
    rows, dirs = [], {}
    root = Path(tempfile.mkdtemp(prefix="ascend_formats_"))
    for kind, recipe in TYPES:
        if only and kind not in only:
            continue
        recipe = recipe.format(E=a.flatquant_epochs)
        qm = base.clone()
        pipeline.PassManager(pipeline.parse_pipeline(recipe)).run(qm, pipeline.PassContext(quiet=True, calib=calib))
        fq = ppl(qm)
        low = qm.clone()
        try:  # a type vllm-ascend serves through another kernel than ptqc's lowering has (dense W4A8) is n/a
            pipeline.PassManager(pipeline.parse_pipeline("ascend")).run(low, pipeline.PassContext(quiet=True))
            em = ppl(low)
        except PtqcError as e:
            em = f"n/a: {str(e).split(': ', 1)[-1].split(';')[0]}"
        for dt in DTYPES:
            d = root / f"{kind}-{dt}"
            desc = ax.export(qm, d, dtype=dt)
            assert desc["model_quant_type"] == kind, (kind, desc["model_quant_type"])
            dirs[kind, dt] = d
        rows.append((kind, recipe, fq, em))
    loads = {} if a.no_load else load_verdicts(dirs, root)
    print(f"### Ascend export types on {Path(a.model).name} (FP PPL {fp:.4f}; calibration {a.samples}x{a.seqlen}, "
          f"eval seqlen {a.seqlen})\n")
    print("| type | recipe | fake-quant PPL (vs FP) | emulated Ascend PPL | emulated vs fake-quant "
          "| loads in vllm-ascend fp16 | bf16 |")
    print("|---|---|---|---|---|---|---|")
    for kind, recipe, fq, em in rows:
        v = [loads.get((kind, dt), "not run") for dt in DTYPES]
        ems = (f"{em:.4f}", f"{(em / fq - 1) * 100:+.3f}%") if isinstance(em, float) else (em, "-")
        print(f"| {kind} | `{recipe}` | {fq:.4f} ({(fq / fp - 1) * 100:+.2f}%) | {ems[0]} | {ems[1]} | {v[0]} | {v[1]} |")


if __name__ == "__main__":
    main()
