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


def test_shaped_checkpoint_and_its_view(tmp_path):
    """tools/make_shaped_checkpoint.py: a Llama checkpoint transformers loads, one layer per shard;
    a view of its first layers equals the same model cut to that depth (the scale bench's depths)."""
    import make_shaped_checkpoint as msc

    from ptqc import frontend

    msc.write(tmp_path / "t3", "tiny", 3, seed=1)
    msc.view(tmp_path / "t3", tmp_path / "t1", 1)
    idx = json.loads((tmp_path / "t3" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(idx.values())) == 5 and idx["model.layers.2.mlp.down_proj.weight"] == "model-00004-of-00005.safetensors"
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "t3", dtype=torch.float32).eval()
    w = full.model.layers[0].mlp.down_proj.weight
    assert full.config.num_hidden_layers == 3 and w.shape == (256, 512) and 0.5 < w.std().item() * 512 ** 0.5 < 2
    cut = AutoModelForCausalLM.from_pretrained(tmp_path / "t1", dtype=torch.float32).eval()
    full.model.layers = full.model.layers[:1]
    full.config.num_hidden_layers = 1
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(cut(ids).logits, full(ids).logits)
    qm = frontend.load(tmp_path / "t1", "float32")
    assert (qm(ids) - cut(ids).logits).abs().max() < 1e-4
    assert not any(p.is_symlink() for p in (tmp_path / "t3").iterdir())
    assert {p.name for p in (tmp_path / "t1").iterdir() if p.is_symlink()} >= {"model-00001-of-00005.safetensors"}


def test_scale_cost_model_from_two_depths_and_from_one():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
    import scale

    r1 = {"wall_s": 100.0, "pass_s": {"gptq": 60.0}, "artifact_gib": 5.0, "peak_rss_gib": 6.0}
    r2 = {"wall_s": 170.0, "pass_s": {"gptq": 120.0}, "artifact_gib": 5.5, "peak_rss_gib": 6.5}
    two = scale.cost_model({1: r1, 2: r2}, 80)
    assert two["per_layer_s"] == 60.0 and two["fixed_s"] == 40.0 and two["peak_rss_gib"] == 6.5
    assert two["wall_80_layers_h"] == round((40 + 60 * 80) / 3600, 2) and two["artifact_80_layers_gib"] == 44.5
    one = scale.cost_model({1: r1}, 80)
    assert one["per_layer_s_upper_bound"] == 60.0 and one["fixed_s"] == 40.0 and "artifact_80_layers_gib" not in one
