#!/usr/bin/env python3
"""Per-expert share of routed tokens of a Hugging Face MoE model on a text (transformers' router logits).

For each MoE layer, the fraction of the top-k assignments that go to each expert over non-overlapping
windows of the text (uniform load is 1 / experts; a dead expert shows 0).

Usage::

    python tools/moe_expert_load.py examples/tiny-qwen3-moe [--text FILE] [--seqlen 256] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def expert_load(model, ids: torch.Tensor, seqlen: int, batch: int = 8) -> list[list[float]]:
    """[layer][expert] share of the top-k assignments over windows of ``seqlen`` tokens of ``ids``."""
    cfg = model.config
    k = cfg.num_experts_per_tok
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    counts = None
    with torch.inference_mode():
        for i in range(0, n, batch):
            logits = model(input_ids=windows[i:i + batch], output_router_logits=True).router_logits
            per = torch.stack([torch.bincount(lg.float().topk(k, dim=-1).indices.reshape(-1),
                                              minlength=lg.size(-1)) for lg in logits])
            counts = per if counts is None else counts + per
    return (counts / counts.sum(-1, keepdim=True)).tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--text", help="default: the model's eval.txt")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    text = Path(args.text or Path(args.model) / "eval.txt").read_text(encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    load = expert_load(model, ids, args.seqlen)
    if args.json:
        print(json.dumps(load))
        return
    print(f"share of top-{model.config.num_experts_per_tok} assignments per expert "
          f"({ids.numel() // args.seqlen} windows of {args.seqlen}; uniform {1 / len(load[0]):.3f})")
    for i, row in enumerate(load):
        print(f"layer {i}: " + " ".join(f"{v:.3f}" for v in row) + f"  (min {min(row):.3f}, max {max(row):.3f})")


if __name__ == "__main__":
    main()
