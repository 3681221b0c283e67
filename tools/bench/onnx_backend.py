#!/usr/bin/env python
"""ONNX reference backend: accuracy against torch, integer W8A8 speed, file sizes. Prints Markdown.

For each model (a directory, or ``random:LxH`` = a random Llama-style model made with
tools/make_tiny_model.py with L layers and hidden size H):

1. float: the float graph exported to ONNX, onnxruntime reference session (no graph
   optimization) vs torch, logits max abs error on one prefill of ``--seqlen`` tokens; for scale,
   the error of torch fp32 itself against a float64 run of the same graph;
2. W8A8 (``int8`` pass: int8 per-channel weights, dynamic per-token int8 activations):
   ``mode="fake"`` and ``mode="integer"`` (MatMulInteger) exports against the fake-quant torch graph
   (logits max abs error and SQNR);
3. latency of one ``--seqlen``-token prefill (batch 1), optimized onnxruntime sessions
   (ORT_ENABLE_ALL, ``--threads`` intra-op threads): fp32 vs W8A8 fake vs W8A8 integer with the
   three MatMulInteger operand types (s8s8, the default; u8u8; u8s8), median of ``--repeats``
   runs after one warm-up; the u8 kernels' logits are checked to be bit-identical to s8s8's;
4. file sizes (model + external data).

Reports numbers, asserts nothing.

    python tools/bench/onnx_backend.py [examples/tiny-qwen2 random:4x1024] [--seqlen 512] [--threads 1]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))


def make_random(spec: str, root: Path) -> Path:
    from make_tiny_model import make_model

    layers, hidden = (int(v) for v in spec.removeprefix("random:").split("x"))
    heads = max(1, hidden // 64)
    return make_model(root / spec.replace(":", "_"), "llama", layers=layers, hidden=hidden,
                      intermediate=int(hidden * 2.75) // 64 * 64, heads=heads, kv_heads=max(1, heads // 4), seed=0)


def float64_logits(qm, ids):
    """The same graph with every op in float64 (a reference for fp32 rounding noise)."""
    from ptqc import ops
    from ptqc.ir import execute

    aten = torch.ops.aten

    def rms64(x, w, eps, offset=0.0):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (w + offset) * h if offset else w * h

    def to64(x, *a, dtype=None, **k):
        return x.double() if dtype is not None and dtype.is_floating_point else x.to(dtype)

    class Store:
        def __getitem__(self, n):
            t = qm.store[n]
            return t.double() if t.is_floating_point() else t

    rep = {ops.RMS_NORM: rms64, ops.LINEAR: F.linear, aten._to_copy.default: to64,
           ops.ATTENTION: lambda q, k, v, scale, causal=True, window=-1: ops._attention(q, k, v, scale, causal, window)}
    g = qm.clone().graph
    for n in g.nodes:
        if n.op == "call_function" and n.target in rep:
            n.target = rep[n.target]
    return execute(g, Store(), {"input_ids": ids})


def sqnr(ref, x):
    e = (x.double() - ref.double()).pow(2).sum()
    return math.inf if e == 0 else 10 * math.log10(float(ref.double().pow(2).sum() / e))


def size(res) -> int:
    return res.path.stat().st_size + (res.data_path.stat().st_size if res.data_path else 0)


def latency(path, ids, threads, repeats) -> float:
    from ptqc.lowering.onnx import session

    s = session(path, reference=False, threads=threads)
    feed = {"input_ids": ids.numpy()}
    s.run(["logits"], feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(["logits"], feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def bench(model: str, root: Path, a) -> dict:
    from ptqc import evaluate, frontend, pipeline
    from ptqc.lowering.onnx import export, logits, session

    path = make_random(model, root) if model.startswith("random:") else Path(model)
    fp = frontend.load(path, "float32")
    try:
        text = evaluate.read_text(evaluate.default_text(path))
        ids = evaluate.tokenize(evaluate.load_tokenizer(path), text)[: a.seqlen][None]
    except Exception:  # noqa: BLE001 - random models have no text: random tokens
        ids = None
    if ids is None or ids.shape[1] < a.seqlen:
        ids = torch.randint(0, fp.config.vocab_size, (1, a.seqlen), generator=torch.Generator().manual_seed(0))
    out = {"model": model, "params_M": None}
    d = root / Path(model).name.replace(":", "_")
    r_fp = export(fp, d / "fp32.onnx")
    t_fp = fp(ids)
    out["float_err"] = (logits(session(r_fp.path), ids) - t_fp).abs().max().item()
    out["float_err_opt"] = (logits(session(r_fp.path, reference=False), ids) - t_fp).abs().max().item()
    out["torch_vs_f64"] = (t_fp.double() - float64_logits(fp, ids)).abs().max().item()
    out["logits_max"] = t_fp.abs().max().item()
    q = fp.clone()
    calib = torch.randint(0, fp.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(1))
    pipeline.PassManager(pipeline.parse_pipeline("int8")).run(q, pipeline.PassContext(quiet=True, calib=calib))
    t_q = q(ids)
    r_fake = export(q, d / "w8a8_fake.onnx")
    r_int = export(q, d / "w8a8_int.onnx", "integer")
    y_fake = logits(session(r_fake.path), ids)
    y_int = logits(session(r_int.path), ids)
    out["fake_err"] = (y_fake - t_q).abs().max().item()
    out["fake_sqnr"] = sqnr(t_q, y_fake)
    for k in ("u8u8", "u8s8"):  # same int32 sums by construction: logits must be bit-identical to s8s8
        r_k = export(q, d / f"w8a8_int_{k}.onnx", "integer", int_kernel=k)
        out[f"exact_{k}"] = torch.equal(logits(session(r_k.path), ids), y_int)
        out[f"lat_{k}"] = latency(r_k.path, ids, a.threads, a.repeats)
    out["int_err"] = (y_int - t_q).abs().max().item()
    out["int_sqnr"] = sqnr(t_q, y_int)
    out["w8a8_vs_fp_sqnr"] = sqnr(t_fp, t_q)
    out["int_linears"] = len(r_int.integer_linears)
    out["lat_fp"] = latency(r_fp.path, ids, a.threads, a.repeats)
    out["lat_fake"] = latency(r_fake.path, ids, a.threads, a.repeats)
    out["lat_int"] = latency(r_int.path, ids, a.threads, a.repeats)
    out["size_fp"], out["size_fake"], out["size_int"] = size(r_fp), size(r_fake), size(r_int)
    out["params_M"] = sum(math.prod(fp.store.spec(n)[0]) for n in set(fp.weight_names())) / 1e6
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["examples/tiny-qwen2", "random:4x1024"])
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="ptqc-onnx-bench-") as tmp:
        rows = [bench(m, Path(tmp), a) for m in a.models]
    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, {a.threads} thread(s), "
          f"prefill 1 x {a.seqlen} tokens, median of {a.repeats}\n")
    print("| model | params | float ONNX vs torch (max abs) | same, optimized session | torch fp32 vs fp64 "
          "| max abs logit |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params_M']:.1f}M | {r['float_err']:.2e} | {r['float_err_opt']:.2e} | "
              f"{r['torch_vs_f64']:.2e} | {r['logits_max']:.1f} |")
    print("\n| model | W8A8 fake ONNX vs fake torch: max abs / SQNR | W8A8 integer ONNX vs fake torch: max abs / "
          "SQNR | W8A8 vs float (the quantization itself) | MatMulInteger linears | u8u8, u8s8 logits == s8s8 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['fake_err']:.2e} / {r['fake_sqnr']:.1f} dB | {r['int_err']:.2e} / "
              f"{r['int_sqnr']:.1f} dB | {r['w8a8_vs_fp_sqnr']:.1f} dB | {r['int_linears']} | "
              f"{r['exact_u8u8']}, {r['exact_u8s8']} |")
    print("\n| model | ORT fp32 ms | W8A8 fake ms | W8A8 integer s8s8 ms | u8u8 ms | u8s8 ms "
          "| speed-up vs fp32 (s8s8 / u8u8 / u8s8) | fp32 MB | W8A8 MB | size ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = " / ".join(f"{r['lat_fp'] / r[k]:.2f}x" for k in ("lat_int", "lat_u8u8", "lat_u8s8"))
        print(f"| {r['model']} | {r['lat_fp']:.1f} | {r['lat_fake']:.1f} | {r['lat_int']:.1f} | {r['lat_u8u8']:.1f} | "
              f"{r['lat_u8s8']:.1f} | {sp} | {r['size_fp'] / 2**20:.1f} | {r['size_int'] / 2**20:.1f} | "
              f"{r['size_int'] / r['size_fp']:.2f} |")


if __name__ == "__main__":
    main()
