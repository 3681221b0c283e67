"""Digests of the artifacts ptqc writes for a fixed set of pipelines on the example models.

    python tools/golden.py write tests/data/golden.json    # record (before a refactor)
    python tools/golden.py check tests/data/golden.json    # compare (after it); exit 1 on a change

Each pipeline runs on a clone of one traced model with the same 16 x 128 calibration windows;
each saved tensor is recorded as its SHA-256 and its float64 sum and absolute sum, graph.json as
its SHA-256 and the SHA-256 of its structure (every float in it replaced by null). A refactor that
keeps behaviour keeps every digest (tests/test_golden.py runs the check).

Bits depend on the machine's float kernels (MKL and oneDNN pick code paths by CPU): the file also
records a canary per model, the calibration windows' digest and the float model's NLL on them to
the last bit. Where the canary matches, the check is bit for bit; where it does not (another
CPU), tensors are compared by dtype, shape and sums (``TOLERANCE``) and graphs by structure, and the check
says so.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE = "_machine"  # the canaries' key
TOLERANCE = 0.05  # another MKL code path moved sums by up to 2.3e-2 (awq zero points), median 0

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


def _stats(t) -> str:
    d = t.double()
    return f"{d.sum().item():.9g} {d.abs().sum().item():.9g}"


def _structure(obj):
    if isinstance(obj, float):
        return None
    if isinstance(obj, dict):
        return {k: _structure(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_structure(v) for v in obj]
    return obj


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def _digest_dir(path: Path) -> dict:
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for name in sorted(sf.keys()):
                t = sf.get_tensor(name).contiguous()
                raw = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                out[name] = f"{t.dtype}{list(t.shape)}:{_sha(raw)} {_stats(t)}"
    graph = (path / "graph.json").read_bytes()
    out["graph.json"] = f"{_sha(graph)} {_sha(json.dumps(_structure(json.loads(graph)), sort_keys=True).encode())}"
    return out


def kernels() -> str:
    """Digest of float32 matmuls, softmax and norms at the example models' shapes."""
    import torch

    g, h = torch.Generator().manual_seed(0), hashlib.sha256()
    for m, k, n in [(2048, 256, 384), (2048, 384, 256), (256, 2048, 256), (384, 2048, 384), (8, 256, 512)]:
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        for t in (a @ b, a.t() @ a, torch.softmax(a, -1), a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True))):
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def canary(model: str, samples: int, seqlen: int) -> str:
    """The calibration windows' digest and the float model's NLL on them, as bits."""
    from ptqc import data, evaluate, frontend

    path = ROOT / "examples" / model
    ids = data.calibration_batches(evaluate.load_tokenizer(path), data.default_calib(path), samples, seqlen)
    nll = evaluate.perplexity(frontend.load(path, "float32"), ids.flatten(), seqlen)["nll"]
    return f"{_sha(ids.numpy().tobytes())} {float(nll).hex()}"


def compute(pipelines=PIPELINES, *, samples: int = 16, seqlen: int = 128) -> dict:
    import torch

    from ptqc import artifact, frontend, pipeline

    torch.set_num_threads(1)
    traced: dict = {}
    machine = {m: canary(m, samples, seqlen) for m in sorted({m for m, _ in pipelines})}
    result: dict = {MACHINE: {"kernels": kernels(), **machine}}
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


def _close(a: str, b: str) -> bool:
    """Same dtype and shape, sums within TOLERANCE (relative to the absolute sum)."""
    (ka, *va), (kb, *vb) = a.rsplit(" ", 2), b.rsplit(" ", 2)
    if ka.split(":")[0] != kb.split(":")[0] or len(va) != 2 or len(vb) != 2:
        return False
    (sa, aa), (sb, ab) = map(float, va), map(float, vb)
    scale = max(aa, ab, 1e-30)
    return abs(sa - sb) <= TOLERANCE * scale and abs(aa - ab) <= TOLERANCE * scale


def _near(name: str, a: str, b: str) -> bool:
    """Equal but for the float kernels: graph.json by structure, tensors by :func:`_close`."""
    return a.split()[-1] == b.split()[-1] if name == "graph.json" else _close(a, b)


def exact(expected: dict, got: dict) -> bool:
    """Bits are comparable: the float kernels computed the same canaries."""
    mine = got.get(MACHINE, {})
    return all(expected.get(MACHINE, {}).get(m) == c for m, c in mine.items())


def diff(expected: dict, got: dict, bitwise: bool = True) -> list[str]:
    problems = []
    for key, exp in expected.items():
        if key == MACHINE:
            continue
        if key not in got:
            problems.append(f"{key}: not computed")
            continue
        for name in sorted(set(exp) | set(got[key])):
            a, b = exp.get(name), got[key].get(name)
            if a == b or (not bitwise and a and b and _near(name, a, b)):
                continue
            problems.append(f"{key}: {name} {a} -> {b}")
    return problems


def check(expected: dict, got: dict) -> tuple[str, list[str]]:
    """('bitwise' or 'by sums', problems)."""
    bitwise = exact(expected, got)
    return ("bitwise" if bitwise else "by sums"), diff(expected, got, bitwise)


def main(argv) -> int:
    mode, path = argv[1], Path(argv[2])
    only = argv[3:]  # optional pipeline keys (substring match)
    pipes = [p for p in PIPELINES if not only or any(o in f"{p[0]} {p[1]}" for o in only)]
    got = compute(pipes)
    if mode == "write":
        old = json.loads(path.read_text()) if path.exists() and only else {}
        if old and not exact(old, got):
            print("this machine computes other bits than the recorded canaries: re-record every pipeline")
            return 1
        machine = {**old.get(MACHINE, {}), **got[MACHINE]}
        path.write_text(json.dumps({**old, **got, MACHINE: machine}, indent=1, sort_keys=True) + "\n")
        return 0
    expected = {k: v for k, v in json.loads(path.read_text()).items() if k in got}
    how, problems = check(expected, got)
    print("\n".join(problems) or f"{len(got) - 1} pipelines identical ({how})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
