#!/usr/bin/env python
"""Time and memory of tracing + canonicalizing a 7B-shaped model on the meta device (no weights).

    python tools/bench/trace_7b.py [--arch llama|qwen2] [--layers 32]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    ap.add_argument("--layers", type=int, default=32)
    a = ap.parse_args(argv)
    from transformers import LlamaConfig, Qwen2Config

    from ptqc import frontend, ops
    from ptqc.model import build_meta_model

    if a.arch == "llama":  # Llama-2-7B
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=a.layers,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    else:  # Qwen2-7B
        cfg = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=a.layers,
                          num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768)
    t0 = time.perf_counter()
    model = build_meta_model(cfg, torch.bfloat16)
    model.to("meta")
    t1 = time.perf_counter()
    ep = frontend.export(model, cfg.max_position_embeddings)
    t2 = time.perf_counter()
    g = frontend.to_ptqc_graph(ep)
    frontend.canonicalize(g)
    frontend.check_canonical(g)
    frontend.annotate(g, cfg)
    t3 = time.perf_counter()
    n_lin = sum(1 for n in g.nodes if n.target == ops.LINEAR)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{a.arch} {a.layers} layers: build {t1 - t0:.1f}s, export {t2 - t1:.1f}s, canonicalize+annotate {t3 - t2:.1f}s, "
          f"{len(g.nodes)} nodes, {n_lin} linears, peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
