"""The model-making tools the benchmarks rely on."""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_outlier_model  # noqa: E402


def test_outlier_model_preserves_function_and_has_outliers(models, tmp_path):
    src, out = models["qwen2"], tmp_path / "outl"
    make_outlier_model.main([str(src), "-o", str(out), "--norm-factor", "50"])  # rounded to 64
    rec = json.loads((out / "outliers.json").read_text())
    assert rec["norm_factor"] == 64.0 and len(rec["norm_channels"]) == 4
    assert (out / "tokenizer.json").exists() and (out / "eval.txt").exists()
    a = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, a.config.vocab_size, (2, 40))
    captured = {}
    b.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.update(x=i[0]))  # returns None
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert ((la - lb).norm() / la.norm()).item() < 1e-4
    x = captured["x"].abs().amax(dim=(0, 1))
    ch = rec["norm_channels"]
    others = torch.ones_like(x, dtype=torch.bool)
    others[ch] = False
    assert x[ch].min() > 10 * x[others].median()  # outlier input channels for q/k/v
    w = b.model.layers[0].self_attn.q_proj.weight.abs().amax(0)
    assert w[ch].max() < w[others].median()  # and tiny weight columns
