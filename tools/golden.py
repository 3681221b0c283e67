"""Digests of the artifacts ptqc writes for a fixed set of pipelines on the example models.

    python tools/golden.py write tests/data/golden.json    # record (before a refactor)
    python tools/golden.py check tests/data/golden.json    # compare (after it); exit 1 on a change

Each pipeline runs on a clone of one traced model with the same 16 x 128 calibration windows;
the digest is the SHA-256 of every saved tensor's bytes and of graph.json. A refactor that keeps
behaviour keeps every digest (tests/test_golden.py runs the check).
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (model, pipeline). Pack is written out, so the list does not depend on how the CLI completes a pipeline.
PIPELINES = [
    ("tiny-qwen2", "rtn:bits=4,group=128,pack"),
    ("tiny-qwen2", "rtn:bits=8,group=0,sym=true"),
    ("tiny-qwen2", "gptq:bits=4,group=128,pack"),
    ("tiny-qwen2", "gptaq:bits=4,group=128,pack"),
    ("tiny-qwen2", "slim:bits=3,pack"),
    ("tiny-qwen2", "billm"),
    ("tiny-qwen2-outliers", "awq:bits=4,group=128,pack"),
    ("tiny-qwen2", "sensitive:top=1,rtn:bits=3,group=128,pack"),
    ("tiny-qwen2", "smooth,int8"),
    ("tiny-qwen2", "int8:static=true"),
    ("tiny-qwen2", "rotate"),
    ("tiny-qwen2", "flatquant:epochs=1"),
    ("tiny-qwen2", "smooth,int8,kv:k=channel,v=channel"),
    ("tiny-qwen2", "smooth,int8,ascend"),
    ("tiny-qwen2", "int8:static=true,ascend"),
    ("tiny-qwen2", "smooth,int8,kv:k=channel,v=channel,ascend"),
    ("tiny-qwen2", "rotate,w4a4,ascend"),
    ("tiny-qwen2", "rtn:bits=4,group=128,pack,ascend"),
]


def _digest_dir(path: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for name in sorted(sf.keys()):
                t = sf.get_tensor(name).contiguous()
                raw = t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""
                out[name] = f"{t.dtype}{list(t.shape)}:" + hashlib.sha256(raw).hexdigest()[:16]
    out["graph.json"] = hashlib.sha256((path / "graph.json").read_bytes()).hexdigest()[:16]
    return out


def compute(pipelines=PIPELINES, *, samples: int = 16, seqlen: int = 128) -> dict:
    import torch

    from ptqc import artifact, frontend, pipeline

    torch.set_num_threads(1)
    traced: dict = {}
    result: dict = {}
    for model, text in pipelines:
        if model not in traced:
            traced[model] = frontend.load(ROOT / "examples" / model, "float32")
        qm = traced[model].clone()
        torch.manual_seed(0)
        ctx = pipeline.PassContext(quiet=True, calib=pipeline.CalibConfig(samples=samples, seqlen=seqlen))
        pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, ctx)
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "art"
            artifact.save(qm, out)
            result[f"{model} {text}"] = _digest_dir(out)
    return result


def diff(expected: dict, got: dict) -> list[str]:
    problems = []
    for key, exp in expected.items():
        if key not in got:
            problems.append(f"{key}: not computed")
            continue
        for name in sorted(set(exp) | set(got[key])):
            if exp.get(name) != got[key].get(name):
                problems.append(f"{key}: {name} {exp.get(name)} -> {got[key].get(name)}")
    return problems


def main(argv) -> int:
    mode, path = argv[1], Path(argv[2])
    only = argv[3:]  # optional pipeline keys (substring match)
    pipes = [p for p in PIPELINES if not only or any(o in f"{p[0]} {p[1]}" for o in only)]
    got = compute(pipes)
    if mode == "write":
        old = json.loads(path.read_text()) if path.exists() and only else {}
        path.write_text(json.dumps({**old, **got}, indent=1, sort_keys=True) + "\n")
        return 0
    expected = {k: v for k, v in json.loads(path.read_text()).items() if k in got}
    problems = diff(expected, got)
    print("\n".join(problems) or f"{len(got)} pipelines identical")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
