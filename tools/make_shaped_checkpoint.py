#!/usr/bin/env python
"""Write a random Llama checkpoint with the layer shapes of a real model, shard by shard (one decoder
layer per shard), without ever building the model: for measuring ptqc at real size.

    python tools/make_shaped_checkpoint.py --shape llama-70b --layers 4 -o /tmp/llama70b-4
    python tools/make_shaped_checkpoint.py --view /tmp/llama70b-4 --layers 2 -o /tmp/llama70b-2

Weights are bf16, N(0, 1/in) for matrices (activations keep their scale through the layers), norms 1.
Peak memory is one layer's tensors (1.7 GB at 70B shapes); the disk used is what the shards hold
(70B shapes: 1.71 GB per layer, 2.1 GB each for the embedding and lm_head). ``--view`` makes a
checkpoint of the first N layers of another one: a config and an index over symlinks to its shards
(no copy), so runs over several depths share one set of files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {  # hidden, intermediate, heads, kv heads, vocab, rope theta
    "llama-70b": (8192, 28672, 64, 8, 128256, 500000.0),
    "llama-8b": (4096, 14336, 32, 8, 128256, 500000.0),
    "llama2-7b": (4096, 11008, 32, 32, 32000, 10000.0),
    "tiny": (256, 512, 4, 2, 300, 10000.0),  # for tests of this tool
}


def config(shape: str, layers: int) -> dict:
    h, i, heads, kv, vocab, theta = SHAPES[shape]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
            "intermediate_size": i, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "rope_theta": theta, "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 0, "eos_token_id": 0, "ptqc_shape": shape}


def _matrix(rows: int, cols: int, gen: torch.Generator, std: float) -> torch.Tensor:
    """A bf16 N(0, std²) matrix, drawn in float32 chunks of 2048 rows (bf16 randn is slow here and a
    whole float32 copy of a 70B-shape matrix is 1 GB)."""
    w = torch.empty(rows, cols, dtype=torch.bfloat16)
    for r in range(0, rows, 2048):
        w[r: r + 2048] = torch.randn(min(2048, rows - r), cols, generator=gen).mul_(std)
    return w


def layer_tensors(cfg: dict, i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    hd = h // heads
    kvd = cfg["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kvd, h), "self_attn.v_proj": (kvd, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    out = {f"model.layers.{i}.{name}.weight": _matrix(o, n, gen, n ** -0.5) for name, (o, n) in shapes.items()}
    for name in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{name}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out




def write(out: Path, shape: str, layers: int, seed: int = 0) -> None:
    from make_tiny_model import make_tokenizer

    out.mkdir(parents=True, exist_ok=False)
    cfg = config(shape, layers)
    gen = torch.Generator().manual_seed(seed)
    n = layers + 2
    name = lambda k: f"model-{k + 1:05d}-of-{n:05d}.safetensors"  # noqa: E731
    wmap: dict[str, str] = {}

    def shard(k: int, tensors: dict) -> None:
        save_file(tensors, str(out / name(k)), metadata={"format": "pt"})
        wmap.update({t: name(k) for t in tensors})

    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    shard(0, {"model.embed_tokens.weight": _matrix(vocab, h, gen, 1.0)})
    for i in range(layers):
        t = time.perf_counter()
        shard(i + 1, layer_tensors(cfg, i, gen))
        print(f"layer {i}: {time.perf_counter() - t:.1f}s", file=sys.stderr)
    shard(n - 1, {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                  "lm_head.weight": _matrix(vocab, h, gen, h ** -0.5)})
    _finish(out, cfg, wmap)
    make_tokenizer(out, 300)


def _finish(out: Path, cfg: dict, wmap: dict) -> None:
    total = sum((out / f).stat().st_size for f in set(wmap.values()))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))


def view(src: Path, out: Path, layers: int) -> None:
    """The first ``layers`` layers of ``src`` (symlinked shards, see module doc)."""
    cfg = json.loads((src / "config.json").read_text())
    if layers > cfg["num_hidden_layers"]:
        raise SystemExit(f"{src} has {cfg['num_hidden_layers']} layers, fewer than {layers}")
    wmap = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {k: f for k, f in wmap.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    out.mkdir(parents=True, exist_ok=False)
    for f in sorted(set(keep.values())):
        os.symlink((src / f).resolve(), out / f)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            os.symlink(f.resolve(), out / f.name)
    _finish(out, {**cfg, "num_hidden_layers": layers}, keep)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-70b")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--view", type=Path, default=None, help="make a view of the first --layers layers of this checkpoint")
    a = ap.parse_args(argv)
    if a.view is not None:
        view(a.view, a.out, a.layers)
    else:
        write(a.out, a.shape, a.layers, a.seed)


if __name__ == "__main__":
    main()
