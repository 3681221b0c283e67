#!/usr/bin/env python3
"""Quick standalone RTN sanity check (to be replaced by the real ptqc pipeline).

Loads a saved model in float32, fake-quantizes every nn.Linear inside the decoder
layers (asymmetric min/max per group along the input dim, round to nearest;
lm_head/embeddings untouched) and prints eval perplexity (non-overlapping windows
of --seqlen over eval.txt, mean NLL, exp).

    python tools/_rtn_check.py examples/tiny-qwen2 --bits 16 3 2 --group 128
"""
import argparse
import math
import os

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer


@torch.no_grad()
def rtn_(w: torch.Tensor, bits: int, group: int) -> None:
    out_f, in_f = w.shape
    g = w.view(out_f, in_f // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    qmax = 2 ** bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
    w.copy_(((q - zero) * scale).view(out_f, in_f))


@torch.no_grad()
def ppl(model, ids: torch.Tensor, seqlen: int, batch: int = 16) -> float:
    n = ids.numel() // seqlen
    win = ids[: n * seqlen].view(n, seqlen)
    nll, cnt = 0.0, 0
    for i in range(0, n, batch):
        x = win[i:i + batch]
        logits = model(input_ids=x).logits.float()
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                               reduction="sum").item()
        cnt += x[:, 1:].numel()
    return math.exp(nll / cnt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 3, 2], help="16 = no quantization")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-file", default=None, help="default: <model_dir>/eval.txt")
    a = ap.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    with open(a.eval_file or os.path.join(a.model_dir, "eval.txt"), encoding="utf-8") as f:
        ids = torch.tensor(tok(f.read(), add_special_tokens=False)["input_ids"])
    base = None
    for bits in a.bits:
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
        if bits < 16:
            for layer in model.model.layers:
                for mod in layer.modules():
                    if isinstance(mod, torch.nn.Linear):
                        rtn_(mod.weight.data, bits, a.group)
        p = ppl(model, ids, a.seqlen)
        base = p if base is None else base
        tag = "float" if bits >= 16 else f"RTN W{bits}g{a.group}"
        print(f"{tag:>14}: PPL {p:8.3f}  ({100 * (p / base - 1):+6.1f}% vs first)", flush=True)


if __name__ == "__main__":
    main()
