"""flatquant: the transforms are exact in float, training lowers the layer loss, the trained
numerics are the deployed graph's, W4A4 beats plain per-token RTN, per-layer overrides and
option errors."""
import importlib

import pytest
import torch

from ptqc import artifact, ops, pipeline
from ptqc.calib import LayerRunner, calibration_batches, split
from ptqc.errors import PtqcError
from ptqc.ir import is_op

fq = importlib.import_module("ptqc.passes.flatquant_model")  # the numerics and the layer model


def _run(qm, text, calib):
    return pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True, calib=calib))


def _summary(rec, name="flatquant"):
    return next(r for r in rec if r["pass"] == name)["summary"]


def _outliers(qm, layer=0, channels=(3, 17), factor=32.0):
    """Function-preserving outlier input channels (test_awq's helper), so per-token activation
    quantization has something to fix."""
    importlib.import_module("test_awq")._outliers(qm, layer, channels, factor)


def _general_init(monkeypatch):
    """Well-conditioned but non-orthogonal initial matrices: inverse != transpose, so a wrong
    inverse or a transposed fold shows."""
    def init(n, gen):
        return torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen, dtype=torch.float64).float() / n ** 0.5
    monkeypatch.setattr(fq, "init_matrix", init)


# ---- (1) exactness in float -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # qwen2: GQA + q/k/v bias; llama: MHA
def test_transforms_are_exact_in_float(loaded, ids, arch, monkeypatch, tmp_path):
    _general_init(monkeypatch)
    qm = loaded(arch)
    _outliers(qm)  # the SmoothQuant-style scales are far from 1
    x = ids(2, 19)
    before = qm(x)
    rec = _run(qm, "flatquant:w_bits=16,a_bits=16,epochs=0", ids(4, 16))
    after = qm(x)
    assert (after - before).abs().max() <= 1e-4 * max(1.0, before.abs().max().item())
    # it did transform: per layer q/k/v, o, gate/up, down online + Q and K for the cache
    for layer in range(qm.num_layers):
        t = [n for n in qm.nodes(ops.TRANSFORM, layer=layer)]
        assert len(t) == 6
        assert not list(qm.nodes(ops.QUANTIZE_ACT, layer=layer))
    norm = next(qm.nodes(role="input_norm", layer=0)).args[1].target
    assert not torch.allclose(qm.store[norm], loaded(arch).store[norm])  # the scales were folded
    assert _summary(rec)["transforms"] == 6 * qm.num_layers
    # and it survives the artifact round trip
    assert torch.allclose(artifact.load(artifact.save(qm, tmp_path / "out"))(x), after, atol=1e-5)


def test_helpers_match_the_shared_quantizer():
    """The differentiable fake quantizers give the shared quantizer's values (forward)."""
    from ptqc import quant

    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 4, 64)
    for bits, sym in ((4, True), (4, False), (8, True)):
        for clip in (1.0, 0.8):
            logit = torch.logit(torch.tensor(clip)) if clip < 1 else None
            c = float(torch.sigmoid(logit)) if logit is not None else 1.0
            ref = quant.fake_quant_act(x, None, None, quant.QuantSpec(bits, 0, sym, c))
            assert torch.allclose(fq.fake_quant_act(x, bits, sym, logit), ref, atol=1e-6)
        w = torch.randn(16, 64)
        for group in (0, 32):
            spec = quant.QuantSpec(bits, group, sym)
            assert torch.allclose(fq.fake_quant_weight(w, spec), quant.fake_quantize(w, spec), atol=1e-6)
    assert fq.kron_dims(256) == (16, 16) and fq.kron_dims(384) == (16, 24) and fq.kron_dims(128) == (8, 16)


# ---- (2) training lowers the loss; trained numerics == the rewritten graph -------------------
def test_training_lowers_the_layer_loss_and_matches_the_graph(loaded, ids):
    qm = loaded("qwen2")
    float_qm = qm.clone()
    calib = ids(8, 32)
    rec = _run(qm, "flatquant:epochs=2", calib)
    layers = _summary(rec)["layers"]
    assert [r["layer"] for r in layers] == [0, 1]
    for r in layers:
        assert len(r["epoch_losses"]) == 2
        assert r["epoch_losses"][-1] < r["epoch_losses"][0]
        assert r["loss_end"] < r["loss_init"]
    # layer 0's reported final loss is the MSE of the rewritten (quantized) graph's layer 0
    batches = calibration_batches(calib, 8)
    outs = []
    for m in (float_qm, qm):
        runner = LayerRunner(m, batches)
        runner.run_prefix()
        runner.run_layer(0)
        outs.append(runner.state[0])
    key = next(n.name for n in reversed(split(qm.graph)[1].nodes) if n.name in outs[0])
    mse = (outs[1][key] - outs[0][key]).pow(2).mean().item()
    assert mse == pytest.approx(layers[0]["loss_end"], rel=1e-3)


# ---- (3) W4A4 flatquant beats plain per-token W4A4 RTN ---------------------------------------
def test_w4a4_beats_plain_rtn_w4a4(loaded, ids):
    base = loaded("qwen2")
    _outliers(base, layer=0)
    _outliers(base, layer=1, channels=(5, 40))
    x = ids(4, 32)
    ref = base(x)
    calib = ids(16, 32)
    rtn = base.clone()
    _run(rtn, "w4a4", calib)  # RTN W4 per channel sym + A4 dynamic per token
    flat = base.clone()
    rec = _run(flat, "flatquant:epochs=3", calib)
    err_rtn = (rtn(x) - ref).pow(2).mean().item()
    err_flat = (flat(x) - ref).pow(2).mean().item()
    assert err_flat < 0.7 * err_rtn, (err_flat, err_rtn)
    # structure: one quantizer shared by q/k/v, one by gate/up, one each for o and down
    for layer in range(2):
        qa = list(flat.nodes(ops.QUANTIZE_ACT, layer=layer))
        assert sorted(len(q.users) for q in qa) == [1, 1, 2, 3]
        assert all(is_op(q.args[0], ops.TRANSFORM) for q in qa)
        assert 0.5 < min(q.args[6] for q in qa) and max(q.args[6] for q in qa) < 1.0  # learned clips
        assert len(list(flat.nodes(ops.DEQUANTIZE_WEIGHT, layer=layer))) == 7
    assert {"weight_quant", "act_quant", "flatquant"} <= flat.properties
    assert flat.quant["model.layers.0.self_attn.q_proj"]["weight"]["method"] == "flatquant"
    s = _summary(rec)
    assert s["weights_quantized"] == 14 and s["act_quant"] == 8


# ---- (4) per-layer overrides -------------------------------------------------------------------
def test_per_layer_overrides_of_epochs_and_lr(loaded, ids):
    qm = loaded("qwen2")
    p = pipeline.get_pass("flatquant")(epochs=1, overrides=[{"match": "layers.1.*", "epochs": 3, "lr": 1e-3}])
    rec = pipeline.PassManager([p]).run(qm, pipeline.PassContext(quiet=True, calib=ids(8, 16)))
    l0, l1 = _summary(rec)["layers"]
    assert len(l0["epoch_losses"]) == 1 and l0["options"]["epochs"] == 1 and l0["options"]["lr"] == 5e-3
    assert len(l1["epoch_losses"]) == 3 and l1["options"]["epochs"] == 3 and l1["options"]["lr"] == 1e-3


def test_auto_retrains_flagged_layers(loaded, ids, monkeypatch, tmp_path):
    import ptqc.diagnose

    seen = {}

    def flag_last(scores, k=3.0):
        seen.update(scores)
        return [max(scores)], {"median": 0.0, "mad": 0.0, "threshold": 0.0}
    monkeypatch.setattr(ptqc.diagnose, "outliers", flag_last)
    qm = loaded("qwen2")
    rec = _run(qm, "flatquant:epochs=1,auto=2", ids(8, 16))
    s = _summary(rec)
    assert set(seen) == {0, 1} and s["auto"]["flagged"] == [1]
    (r,) = s["auto"]["retrained"]
    assert r["layer"] == 1 and r["epochs"] == 2 and r["kept"] in ("retrained", "first")
    assert len(s["layers"][1]["retrain"]["epoch_losses"]) == 2 and "retrain" not in s["layers"][0]
    importlib.import_module("ptqc.passes.flatquant_plot").plot_losses(s, tmp_path / "losses.png")
    assert (tmp_path / "losses.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_losses_leaves_matplotlib_global_state_alone(monkeypatch, tmp_path):
    import matplotlib

    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("plot_losses switched matplotlib's backend"))
    summary = {"layers": [{"layer": 0, "epoch_losses": [1.0, 0.5]},
                          {"layer": 1, "epoch_losses": [2.0], "retrain": {"epoch_losses": [1.5, 1.0]}}]}
    importlib.import_module("ptqc.passes.flatquant_plot").plot_losses(summary, tmp_path / "l.png")
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"


def test_kv_bits_trains_the_k_transform_and_composes_with_kv(loaded, ids):
    name = "model.layers.0.self_attn.k_transform.k"
    plain = loaded("qwen2")
    _run(plain, "flatquant:epochs=1", ids(8, 16))
    trained = loaded("qwen2")
    _run(trained, "flatquant:epochs=1,kv_bits=4,kv:bits=4,k=head,sym=false", ids(8, 16))
    assert torch.allclose(plain.store[name] @ plain.store[name].t(), torch.eye(32), atol=1e-5)  # untrained: orthogonal
    assert not torch.allclose(trained.store[name], plain.store[name])
    attn = next(trained.nodes(ops.ATTENTION, layer=0))
    assert is_op(attn.args[1], ops.QUANTIZE_ACT) and is_op(attn.args[1].args[0], ops.TRANSFORM)


def test_quantize_false_leaves_float_weights_for_a_weight_pass(loaded, ids):
    qm = loaded("qwen2")
    p = pipeline.parse_pipeline("flatquant:quantize=false,epochs=1,gptq:group=0,sym=true")
    pipeline.check_order(p, {"canonical"})  # gptq may follow: weight_quant is not provided yet
    assert "weight_quant" not in p[0].provides and "act_quant" in p[0].provides
    _run(qm, "flatquant:quantize=false,epochs=1", ids(8, 16))
    assert not list(qm.nodes(ops.DEQUANTIZE_WEIGHT)) and len(list(qm.nodes(ops.QUANTIZE_ACT))) == 8
    assert "weight_quant" not in qm.properties
    # the float weights are the transformed ones clipped per row: at init (epochs=0, same seed)
    # clip=true gives clip=false's rows clamped to sigmoid(4) of their range
    a, b, calib = loaded("qwen2"), loaded("qwen2"), ids(8, 16)
    _run(a, "flatquant:quantize=false,epochs=0,clip=false", calib)
    _run(b, "flatquant:quantize=false,epochs=0", calib)
    c = torch.sigmoid(torch.tensor(4.0))
    for n in a.linears(layer=0):
        wa, wb = a.store[n.args[1].target], b.store[n.args[1].target]
        hi, lo = wa.amax(1, keepdim=True) * c, wa.amin(1, keepdim=True) * c
        assert torch.allclose(wb, torch.minimum(torch.maximum(wa, lo), hi), atol=1e-6)
        assert not torch.allclose(wa, wb)


# ---- (5) option errors -------------------------------------------------------------------------
@pytest.mark.parametrize("text, msg", [
    ("flatquant:w_bits=9", "w_bits=9"),
    ("flatquant:a_bits=1", "a_bits=1"),
    ("flatquant:kv_bits=12", "kv_bits=12"),
    ("flatquant:lr=0", "lr=0"),
    ("flatquant:epochs=-1", "epochs=-1"),
    ("flatquant:alpha=1.5", "alpha=1.5"),
    ("flatquant:auto=-2", "auto=-2"),
    ("flatquant:w_group=-3", "w_group=-3"),
    ("flatquant:epochs=many", "not an int"),
    ("flatquant:bits=4", "unknown option 'bits'"),
])
def test_option_errors_are_one_line(text, msg):
    with pytest.raises(PtqcError) as e:
        pipeline.parse_pipeline(text)
    assert msg in str(e.value) and "\n" not in str(e.value) and "flatquant" in str(e.value)


def test_run_errors_are_one_line_and_change_nothing(loaded, ids):
    with pytest.raises(PtqcError) as e:
        pipeline.get_pass("flatquant")(overrides=[{"match": "layers.0.*", "lr": -1.0}])
    assert "lr=-1.0" in str(e.value) and "\n" not in str(e.value)
    for text, msg in (("flatquant:w_group=48", "group size 48 does not divide"),
                      ("flatquant:exclude=", "outside them")):
        qm = loaded("qwen2")
        before = [n.format_node() for n in qm.graph.nodes]
        with pytest.raises(PtqcError) as e:
            _run(qm, text, ids(4, 16))
        assert msg in str(e.value) and "\n" not in str(e.value)
        assert [n.format_node() for n in qm.graph.nodes] == before
