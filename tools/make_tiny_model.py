#!/usr/bin/env python
"""Make a random-weight tiny causal LM directory (config, safetensors, tokenizer) in seconds.

Used by the tests: every supported architecture gets the same treatment, so no test depends on
a downloaded model. The tokenizer is a byte-level BPE trained on a few lines of text.

    python tools/make_tiny_model.py --arch qwen2 -o /tmp/tiny-qwen2 [--layers 2] [--shards 2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe",
         "deepseek_v3", "deepseek_v3_q_proj", "deepseek_v2")

# Mixture-of-experts layouts (hidden 64+, moe_intermediate = intermediate // 4, top-2):
# mixtral 4 experts; qwen2_moe 4 experts + sigmoid-gated shared expert, layer 0 dense;
# qwen3_moe 8 experts, norm_topk_prob; glm4_moe (DeepSeek-V3's MoE) 8 experts in 4 groups (2 kept),
# sigmoid scores + e_score_correction_bias, routed_scaling_factor 2.5, a shared expert, layer 0 dense.
MOE = {
    "mixtral": lambda i: dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda i: dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=i // 4,
                                shared_expert_intermediate_size=i // 2, mlp_only_layers=[0]),
    "qwen3_moe": lambda i: dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=i // 4,
                                norm_topk_prob=True),
    "glm4_moe": lambda i: dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=i // 4,
                               n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                               routed_scaling_factor=2.5, norm_topk_prob=True),
}

# Multi-head latent attention (DeepSeek-V2/V3): heads of qk_nope 12 + qk_rope 8 (decoupled rope),
# values of 10, q LoRA rank 24 (None: a plain q_proj), KV latent 16; MoE from layer 1 on
# (8 experts, top-2, a shared expert). V3: sigmoid routing in 2 groups of 4 (what npu_moe_gating_top_k
# takes; 1 kept) with e_score_correction_bias, scale 2.5, interleaved rope; V2: softmax greedy
# routing (which ignores its 2 groups), complex rope.
MLA = {
    "deepseek_v3": dict(q_lora_rank=24, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    "deepseek_v3_q_proj": dict(q_lora_rank=None, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                               norm_topk_prob=True),
    "deepseek_v2": dict(q_lora_rank=24, topk_method="greedy", n_group=2, topk_group=1, routed_scaling_factor=1.0),
}


def make_mla_config(arch: str, common: dict, intermediate: int):
    """A DeepSeek-V2/V3 config (see :data:`MLA`); MLA has as many KV heads as query heads."""
    from transformers import AutoConfig

    common = {**common, "num_key_value_heads": common["num_attention_heads"]}
    return AutoConfig.for_model(arch.removesuffix("_q_proj"), **common, **MLA[arch], kv_lora_rank=16,
                                qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=8,
                                num_experts_per_tok=2, moe_intermediate_size=intermediate // 4,
                                n_shared_experts=1, first_k_dense_replace=1)



def _family(name, **extra):
    """A maker of a dense family's config from the common fields (their names mapped to the family's)."""
    def make(common, hidden, heads, kv_heads, sliding_window):
        from transformers import AutoConfig
        kw = dict(common)
        for k, v in extra.items():
            kw[k] = v(common, hidden, heads, sliding_window) if callable(v) else v
        for old, new in RENAMES.get(name, {}).items():
            kw[new] = kw.pop(old)
        for k in DROPS.get(name, ()):
            kw.pop(k, None)
        return AutoConfig.for_model(name, **kw)
    return make


def _alternating(common, hidden, heads, sliding_window):
    n = common["num_hidden_layers"]
    return [("sliding_attention", "full_attention")[i % 2] for i in range(n)]


# Dense families beyond Llama's layout (hidden 64, head_dim hidden/heads): Gemma 2 (logit softcaps
# small enough to bite on a random model, sandwich norms, sliding/full layers), Gemma 3 text (q/k norms,
# sliding/full layers with two rope bases), GPT-NeoX (LayerNorm, parallel residual, partial rotary, fused
# qkv, untied embed_out), StableLM (LayerNorm, partial rotary), Phi-2 (LayerNorm, parallel residual,
# q/k/v/dense with bias), Falcon (new decoder architecture: two LayerNorms, fused qkv, GQA).
_GEMMA = dict(head_dim=lambda c, h, n, w: h // n, query_pre_attn_scalar=lambda c, h, n, w: h // n,
              sliding_window=lambda c, h, n, w: w or 8, layer_types=_alternating,
              hidden_activation="gelu_pytorch_tanh")
FAMILIES = {
    "gemma2": _family("gemma2", attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **_GEMMA),
    "gemma3_text": _family("gemma3_text", **_GEMMA),
    "gpt_neox": _family("gpt_neox", hidden_act="gelu", rotary_pct=0.5, use_parallel_residual=True),
    "stablelm": _family("stablelm", partial_rotary_factor=0.5, use_qkv_bias=True),
    "phi": _family("phi", partial_rotary_factor=0.5, hidden_act="gelu_new"),
    "falcon": _family("falcon", new_decoder_architecture=False, multi_query=False, parallel_attn=True, bias=True,
                      ffn_hidden_size=lambda c, h, n, w: c["intermediate_size"], alibi=False),
    # Llama-like families of the architecture matrix (tools/bench/arch_matrix.py): Gemma 1 ((1 + w) norms,
    # scaled embeddings), Phi-3 (fused qkv_proj / gate_up_proj), OLMo2 (post-norms, q/k norms), GLM-4
    # (sandwich norms, fused gate_up, partial rotary), Granite (embedding/residual/attention/logit
    # multipliers), SmolLM3 (no rope in every 2nd layer).
    "gemma": _family("gemma", head_dim=lambda c, h, n, w: h // n, hidden_activation="gelu_pytorch_tanh"),
    "phi3": _family("phi3", pad_token_id=0),
    "olmo2": _family("olmo2", pad_token_id=0),
    "glm4": _family("glm4", head_dim=lambda c, h, n, w: h // n, pad_token_id=0),
    "granite": _family("granite", embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0,
                       attention_multiplier=0.2),
    "smollm3": _family("smollm3", pad_token_id=0, no_rope_layer_interval=2),
}
RENAMES: dict = {}
DROPS = {"gpt_neox": ("num_key_value_heads",), "falcon": ("intermediate_size", "num_key_value_heads")}
ARCHS = ARCHS + tuple(FAMILIES)

def make_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [f"def f{i}(x): return x * {i} + {i * i}  # the quick brown fox" for i in range(200)]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(str(out))


def make_config(arch: str, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                vocab: int, tie: bool, sliding_window: int | None):
    from transformers import AutoConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        from transformers import Qwen3Config
        return Qwen3Config(**common, head_dim=hidden // heads)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=sliding_window)
    if arch in MOE:
        return AutoConfig.for_model(arch, **common, **MOE[arch](intermediate))
    if arch in FAMILIES:
        return FAMILIES[arch](common, hidden, heads, kv_heads, sliding_window)
    if arch in MLA:
        return make_mla_config(arch, common, intermediate)
    raise SystemExit(f"unknown arch {arch}; choose from {', '.join(ARCHS)}")


def make_model(out, arch: str = "qwen2", layers: int = 2, hidden: int = 128, intermediate: int = 256,
               heads: int = 4, kv_heads: int = 2, vocab: int = 0, tie: bool = False, shards: int = 1,
               dtype: str = "float32", seed: int = 0, sliding_window: int | None = None) -> Path:
    """Write a random tiny model to `out` and return its path."""
    from transformers import AutoModelForCausalLM

    from ptqc.artifact import AtomicDir

    out = Path(out)
    with AtomicDir(out, force=True) as tmp:  # replaces out in one rename
        make_tokenizer(tmp, 300)
        from transformers import AutoTokenizer
        vocab = vocab or len(AutoTokenizer.from_pretrained(str(tmp)))
        cfg = make_config(arch, layers, hidden, intermediate, heads, kv_heads, vocab, tie, sliding_window)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # larger-than-default init so random models have visible activations
            for name, p in model.named_parameters():
                if p.dim() >= 2:  # matrices and [E, out, in] expert stacks
                    p.normal_(0, 0.5 / p.shape[-1] ** 0.5 * 4)
                elif "norm" in name:
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0, 0.02)
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):  # DeepSeek-V3 routing: a bias that matters
                    b.normal_(0, 0.1)
        model.to(getattr(torch, dtype))
        max_shard = None
        if shards > 1:
            total = sum(p.numel() * p.element_size() for p in model.parameters())
            max_shard = f"{max(1, total // shards // 1000 + 1)}KB"
        model.save_pretrained(str(tmp), safe_serialization=True, **({"max_shard_size": max_shard} if max_shard else {}))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--arch", default="qwen2", choices=ARCHS)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sliding-window", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=0, help="Embedding rows (default: the tokenizer's size).")
    a = ap.parse_args(argv)
    p = make_model(a.out, a.arch, a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab, a.tie,
                   a.shards, a.dtype, a.seed, a.sliding_window)
    print(json.dumps({"out": str(p), "files": sorted(x.name for x in p.iterdir())}))


if __name__ == "__main__":
    main()
