#!/usr/bin/env python
"""Make a tiny random causal LM that loads only through custom (remote) code, in the spirit of
openPangu-Embedded: a Llama-like GQA decoder with a bias on q/k/v AND o_proj, ``model_type``
"TinyPangu", an ``auto_map`` to its own configuration and modeling files (written here).

    python tools/make_remote_code_model.py -o /tmp/tiny-pangu [--layers 2] [--hidden 64]

The model directory is self-contained: transformers reads it with ``trust_remote_code=True`` and
no hub access.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

CONFIG_PY = '''
from transformers import PretrainedConfig


class TinyPanguConfig(PretrainedConfig):
    model_type = "TinyPangu"

    def __init__(self, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.hidden_act = "silu"
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

MODELING_PY = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tiny_pangu import TinyPanguConfig


class TinyPanguRMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class TinyPanguAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.h, self.kv, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.h * self.d, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.kv * self.d, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.kv * self.d, bias=True)
        self.o_proj = nn.Linear(self.h * self.d, config.hidden_size, bias=True)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.h // self.kv
        k = k[:, :, None].expand(b, self.kv, rep, s, self.d).reshape(b, self.h, s, self.d)
        v = v[:, :, None].expand(b, self.kv, rep, s, self.d).reshape(b, self.h, s, self.d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.d ** -0.5)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, self.h * self.d))


class TinyPanguMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyPanguDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = TinyPanguRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TinyPanguAttention(config)
        self.post_attention_layernorm = TinyPanguRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = TinyPanguMLP(config)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def inv_freq(config):
    d = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


class TinyPanguPreTrainedModel(PreTrainedModel):
    config_class = TinyPanguConfig
    base_model_prefix = "model"
    _no_split_modules = ["TinyPanguDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, TinyPanguModel):  # a non-persistent buffer: transformers leaves it to us
            from transformers import initialization as init

            init.copy_(module.inv_freq, inv_freq(self.config))


class TinyPanguModel(TinyPanguPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TinyPanguDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = TinyPanguRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", inv_freq(config), persistent=False)
        self.post_init()

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class TinyPanguForCausalLM(TinyPanguPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = TinyPanguModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, **kwargs):
        return CausalLMOutputWithPast(logits=self.lm_head(self.model(input_ids)))
'''


def _load(out: Path):
    """The modeling module of ``out``, imported from its files (not through transformers' cache)."""
    pkg = f"tiny_pangu_{abs(hash(str(out)))}"
    for name in ("configuration_tiny_pangu", "modeling_tiny_pangu"):
        spec = importlib.util.spec_from_file_location(f"{pkg}.{name}", out / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        if name == "configuration_tiny_pangu":
            sys.modules[pkg] = type(sys)(pkg)
            sys.modules[pkg].__path__ = [str(out)]
        spec.loader.exec_module(mod)
    return mod


def make_remote_code_model(out, layers: int = 2, hidden: int = 64, intermediate: int = 128, heads: int = 4,
                           kv_heads: int = 2, seed: int = 0) -> Path:
    """Write the tiny TinyPangu model (code, config, random weights, tokenizer) to ``out``."""
    from make_tiny_model import make_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "configuration_tiny_pangu.py").write_text(CONFIG_PY.lstrip())
    (out / "modeling_tiny_pangu.py").write_text(MODELING_PY.lstrip())
    make_tokenizer(out, 300)
    mod = _load(out)
    cfg_mod = sys.modules[mod.__name__.rsplit(".", 1)[0] + ".configuration_tiny_pangu"]
    cfg = cfg_mod.TinyPanguConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = mod.TinyPanguForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else
                    torch.randn_like(p) * (2.0 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.05))
    model.save_pretrained(str(out), safe_serialization=True)
    raw = json.loads((out / "config.json").read_text())
    raw.update(architectures=["TinyPanguForCausalLM"], model_type="TinyPangu",
               auto_map={"AutoConfig": "configuration_tiny_pangu.TinyPanguConfig",
                         "AutoModelForCausalLM": "modeling_tiny_pangu.TinyPanguForCausalLM"})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = make_remote_code_model(a.out, a.layers, a.hidden, seed=a.seed)
    print(json.dumps({"out": str(p), "files": sorted(x.name for x in p.iterdir())}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
