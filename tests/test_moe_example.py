"""examples/tiny-qwen3-moe (trained here by tools/train_tiny_lm.py --arch qwen3_moe): the shipped
checkpoint is what the README says, ptqc traces it exactly, and every expert is routed to."""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moe_expert_load import expert_load
from ptqc import evaluate, frontend

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-qwen3-moe"


def _window_ids(n_tokens):
    tok = evaluate.load_tokenizer(EXAMPLE)
    return evaluate.tokenize(tok, evaluate.read_text(EXAMPLE / "eval.txt"))[:n_tokens]


def test_checkpoint_is_small_bf16_qwen3_moe():
    cfg = json.loads((EXAMPLE / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"]) == ("qwen3_moe", 2, True)
    assert cfg.get("num_experts", cfg.get("num_local_experts")) == 8
    files = list(EXAMPLE.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in EXAMPLE.iterdir()) <= 10 * 2**20
    with safe_open(files[0], "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_traced_logits_match_transformers():
    x = _window_ids(256).reshape(2, 128)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(EXAMPLE, dtype=torch.float32).eval()(x).logits
    torch.testing.assert_close(frontend.load(EXAMPLE)(x), want, atol=1e-5, rtol=1e-5)


def test_every_expert_is_routed_to():
    model = AutoModelForCausalLM.from_pretrained(EXAMPLE, dtype=torch.float32).eval()
    load = torch.tensor(expert_load(model, _window_ids(16 * 256), 256))
    assert load.shape == (model.config.num_hidden_layers, 8)
    torch.testing.assert_close(load.sum(-1), torch.ones(load.size(0)))
    assert load.min() > 0.03, load  # uniform is 0.125; a dead expert would show 0
