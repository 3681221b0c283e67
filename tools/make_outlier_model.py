#!/usr/bin/env python
"""Give a model the massive-activation channels real LLMs have, without changing its function.

A model trained for a few minutes never grows the outlier channels that make activation
quantization hard in real LLMs (and that SmoothQuant, AWQ, QuaRot and FlatQuant exist for).
This tool adds them with two function-preserving transforms, per decoder layer:

1. norm channels: multiply chosen RMSNorm weight channels by ``--norm-factor`` and divide the
   matching input columns of the linears the norm feeds (q/k/v, gate/up) by the same factor.
   Those linears' *inputs* now have outlier channels; their *weights* have tiny columns.
2. MLP channels: multiply chosen up_proj rows (and bias) by ``--mlp-factor`` and divide the
   matching down_proj columns: down_proj's input gets outlier channels.

Factors are rounded to powers of two, so the transform is exact even in bfloat16 (scaling by
2^k only changes exponents). The tool checks that logits are unchanged (relative 1e-4) before
writing, copies tokenizer and text files, and records the channels in ``outliers.json``.

    python tools/make_outlier_model.py examples/tiny-qwen2 -o examples/tiny-qwen2-outliers
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

NORM_FEEDS = {"input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
              "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj"))}


def pow2(x: float) -> float:
    return 2.0 ** round(math.log2(x))


@torch.no_grad()
def add_outliers(model, n_norm: int = 4, norm_factor: float = 64.0, n_mlp: int = 4, mlp_factor: float = 32.0,
                 seed: int = 0) -> dict:
    """Apply the transforms in place; returns what was done (channels and factors)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    nf, mf = pow2(norm_factor), pow2(mlp_factor)
    # Massive activations sit in the same few residual channels in every layer.
    norm_ch = torch.randperm(cfg.hidden_size, generator=g)[:n_norm].sort().values
    record = {"norm_factor": nf, "mlp_factor": mf, "norm_channels": norm_ch.tolist(), "mlp_channels": {}}
    for i, layer in enumerate(model.model.layers):
        for norm_name, (block, linears) in NORM_FEEDS.items():
            getattr(layer, norm_name).weight[norm_ch] *= nf
            for lin in linears:
                getattr(getattr(layer, block), lin).weight[:, norm_ch] /= nf
        mlp_ch = torch.randperm(cfg.intermediate_size, generator=g)[:n_mlp].sort().values
        layer.mlp.up_proj.weight[mlp_ch] *= mf
        if layer.mlp.up_proj.bias is not None:
            layer.mlp.up_proj.bias[mlp_ch] *= mf
        layer.mlp.down_proj.weight[:, mlp_ch] /= mf
        record["mlp_channels"][i] = mlp_ch.tolist()
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--norm-channels", type=int, default=4)
    ap.add_argument("--norm-factor", type=float, default=64.0)
    ap.add_argument("--mlp-channels", type=int, default=4)
    ap.add_argument("--mlp-factor", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from ptqc.artifact import AtomicDir

    src, out = Path(a.model), Path(a.out)
    if out.exists() and not a.force:
        raise SystemExit(f"error: {out} exists; pass --force to overwrite")
    model = AutoModelForCausalLM.from_pretrained(src).eval()  # stored dtype
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    rec = add_outliers(model, a.norm_channels, a.norm_factor, a.mlp_channels, a.mlp_factor, a.seed)
    test = AutoModelForCausalLM.from_config(ref.config, dtype=torch.float32).eval()
    test.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=False)
    test.tie_weights()
    ids = torch.randint(0, ref.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, test(ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    if rel > 1e-4:
        raise SystemExit(f"error: transform changed the logits (relative {rel:.2e} > 1e-4); not written")
    rec["logits_rel_change"] = rel
    with AtomicDir(out, force=a.force) as tmp:  # written in full or not at all
        model.save_pretrained(str(tmp), safe_serialization=True)
        for f in src.iterdir():  # tokenizer, eval/calib text...; weights and configs were just written
            if f.is_file() and not (tmp / f.name).exists() and not f.name.endswith((".safetensors", ".index.json")):
                shutil.copy2(f, tmp / f.name)
        (tmp / "outliers.json").write_text(json.dumps({"source": str(src), **rec}, indent=1))
    print(json.dumps({"out": str(out), "logits_rel_change": rel, "norm_channels": rec["norm_channels"]}))


if __name__ == "__main__":
    main()
