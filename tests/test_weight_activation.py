"""Weight-activation and KV-cache passes: act_quant, int8 (+ presets), smooth, kv."""
import importlib
import json

import pytest
import torch
from click.testing import CliRunner

from ptqc import artifact, ops, pipeline, quant
from ptqc.cli import main
from ptqc.errors import PtqcError
from ptqc.weights import dequantized_weight, is_quantized

awq_tests = importlib.import_module("test_awq")


def _run(qm, text, calib):
    return pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True, calib=calib))


def _rel(y, ref):
    return ((y - ref).norm() / ref.norm()).item()


def _act_nodes(qm):
    return [n for n in qm.graph.nodes if n.target == ops.QUANTIZE_ACT]


def test_dynamic_act_quant_one_shared_node_per_input(loaded, ids):
    qm = loaded("qwen2")
    _run(qm, "act_quant", ids(2, 16))
    nodes = _act_nodes(qm)
    assert len(nodes) == 4 * qm.num_layers  # qkv, o, gate/up, down
    for n in nodes:
        readers = sorted(u.meta["ptqc"]["role"] for u in n.users)
        assert readers in (["k", "q", "v"], ["o"], ["gate", "up"], ["down"])
        assert n.args[1] is None  # dynamic
    for lin in qm.linears():
        assert (lin.args[0].target == ops.QUANTIZE_ACT) == (lin.meta["ptqc"]["role"] != "lm_head")
    assert "act_quant" in qm.properties


def test_dynamic_per_token_numerics_are_the_shared_quantizer():
    x = torch.randn(2, 5, 64) * torch.rand(64) * 4
    y = ops.quantize_act(x, None, None, 8, 0, True)
    scale = x.abs().amax(-1, keepdim=True) / 127  # npu_dynamic_quant: rowmax|x| / 127
    assert torch.equal(y, torch.clamp(torch.round(x / scale), -128, 127) * scale)
    assert torch.equal(y, quant.fake_quantize(x, quant.QuantSpec(8, 0, True)))


def test_static_scale_is_calibrated_absmax_of_the_input(loaded, ids):
    qm = loaded("llama")
    calib = ids(4, 16)
    seen = []
    ref = qm.clone()
    ref(calib, hook=lambda n, v: seen.append(v) if n.meta.get("ptqc", {}).get("role") == "input_norm"
        and n.meta["ptqc"]["layer"] == 0 else None)
    _run(qm, "act_quant:static=true", calib)
    q0 = next(n for n in _act_nodes(qm) if n.meta["ptqc"]["layer"] == 0 and
              any(u.meta["ptqc"]["role"] == "q" for u in n.users))
    s = qm.store[q0.args[1].target]
    assert s.shape == (1,)
    assert torch.allclose(s, seen[0].abs().max() / 127, rtol=1e-6)
    # codes of a static quantizer are integers in range, dequantized exactly as codes * scale
    x = seen[0]
    codes = quant.quantize_static(x, s, None, quant.QuantSpec(8, -1, True))
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    assert torch.equal(ops.quantize_act(x, s, None, 8, -1, True), codes.float() * s)


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_static_methods_clip_below_absmax(loaded, ids, method):
    qm = loaded("qwen2")
    calib = ids(4, 16)
    a, b = qm.clone(), qm.clone()
    _run(a, "act_quant:static=true", calib)
    _run(b, f"act_quant:static=true,method={method},percentile=99", calib)
    sa = [a.store[n.args[1].target].item() for n in _act_nodes(a)]
    sb = [b.store[n.args[1].target].item() for n in _act_nodes(b)]
    assert all(y <= x * (1 + 1e-6) for x, y in zip(sa, sb)) and sum(sb) < sum(sa)


def test_int8_quantizes_weights_per_channel_and_activations(loaded, ids):
    qm = loaded("qwen2")
    x = ids(2, 16)
    ref = qm(x)
    _run(qm, "int8", x)
    for lin in qm.linears():
        if lin.meta["ptqc"]["role"] == "lm_head":
            assert not is_quantized(lin)
            continue
        q = lin.meta["ptqc"]["quant"]
        assert q["weight"]["bits"] == 8 and q["weight"]["group"] == 0 and q["weight"]["sym"]
        assert q["input"]["bits"] == 8
    w4a4 = loaded("qwen2")
    _run(w4a4, "w4a4", x)
    assert _rel(qm(x), ref) < 0.1 and _rel(qm(x), ref) < 0.25 * _rel(w4a4(x), ref)


def test_presets_are_int8_with_other_defaults(loaded, ids):
    x = ids(2, 16)
    for text, wb, wg, acts in (("w4a4", 4, 0, 4), ("w4a8", 4, 0, 8), ("w8a16", 8, 0, None), ("w4a16", 4, 128, None)):
        qm = loaded("qwen2")
        _run(qm, text if wg != 128 else "w4a16:w_group=32", x)
        lin = qm.linears(role="q")[0]
        assert lin.meta["ptqc"]["quant"]["weight"]["bits"] == wb
        assert lin.meta["ptqc"]["quant"]["weight"]["group"] == (32 if wg == 128 else wg)
        assert (len(_act_nodes(qm)) > 0) == (acts is not None)
        if acts:
            assert _act_nodes(qm)[0].args[3] == acts
    assert pipeline.get_pass("w4a16")().options.w_group == 128 and not pipeline.get_pass("w4a16")().options.w_sym


def test_w4a4_keeps_weights_quantized_by_an_earlier_pass(loaded, ids):
    qm = loaded("qwen2")
    x = ids(4, 16)
    _run(qm, "gptq:bits=4,group=0,sym=true", x)
    before = {n.name: dequantized_weight(qm, n).clone() for n in qm.linears() if is_quantized(n)}
    _run(qm, "w4a4", x)
    assert before and all(torch.equal(dequantized_weight(qm, n), before[n.name]) for n in qm.linears() if n.name in before)
    assert all(n.meta["ptqc"]["quant"]["weight"]["method"] == "gptq" for n in qm.linears() if n.name in before)
    assert len(_act_nodes(qm)) == 4 * qm.num_layers


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
def test_smooth_fold_is_exact_in_float(loaded, ids, arch):
    qm = loaded(arch)
    x = ids(2, 16)
    ref = qm(x)
    rec = _run(qm, "smooth", ids(4, 16))
    s = rec[0]["summary"]
    roles = {tuple(r["linears"]) for r in s["scales"]}
    assert {("q", "k", "v"), ("gate", "up"), ("o",), ("down",)} <= roles  # o folded under GQA too (qwen2)
    assert s["folds"] == 4 * qm.num_layers
    assert max(r["act_max_before"] / r["act_max_after"] for r in s["scales"]) > 2  # something moved
    assert _rel(qm(x), ref) < 1e-5
    assert "smoothed" in qm.properties


def test_smooth_then_int8_beats_int8_with_outlier_channels(loaded, ids):
    qm = loaded("qwen2")
    awq_tests._outliers(qm, layer=0, factor=64.0)
    awq_tests._outliers(qm, layer=1, channels=(5, 9), factor=64.0)
    x, calib = ids(2, 16), ids(8, 16)
    ref = qm(x)
    errs = {}
    for text in ("int8", "smooth,int8", "w4a4", "smooth,w4a4"):
        q = qm.clone()
        _run(q, text, calib)
        errs[text] = _rel(q(x), ref)
    assert errs["smooth,int8"] < 0.5 * errs["int8"], errs
    assert errs["smooth,w4a4"] < errs["w4a4"], errs


def test_smooth_per_layer_alpha_override(loaded, ids):
    qm = loaded("qwen2")
    p = pipeline.get_pass("smooth")(alpha=0.5, overrides={"layers.1.*": {"alpha": 0.9}})
    pipeline.PassManager([p]).run(qm, pipeline.PassContext(quiet=True, calib=ids(2, 16)))
    alphas = {r["layer"]: r["alpha"] for r in qm.history[-1]["summary"]["scales"]}
    assert alphas == {0: 0.5, 1: 0.9}


def test_smooth_after_int8_is_rejected_with_the_reason():
    with pytest.raises(PtqcError, match="pass 'smooth' must run before 'int8'"):
        pipeline.check_order(pipeline.parse_pipeline("int8,smooth"), {"canonical"})


def test_bad_activation_options_are_one_line():
    with pytest.raises(PtqcError, match="activation bits=1 is outside 2..8"):
        pipeline.parse_pipeline("int8:a_bits=1")
    with pytest.raises(PtqcError, match="alpha=1.5 must be in"):
        pipeline.parse_pipeline("smooth:alpha=1.5")


def test_group_that_does_not_divide_is_refused(loaded, ids):
    qm = loaded("qwen2")
    with pytest.raises(PtqcError, match="group size 48 does not divide"):
        _run(qm, "int8:a_group=48", ids(2, 16))


def test_kv_quantizes_cache_inputs_of_attention(loaded, ids):
    qm = loaded("qwen2")
    x = ids(2, 16)
    calib = torch.cat([x, ids(6, 16)])  # static cache scales need representative calibration data
    ref = qm(x)
    errs = {}
    for text in ("kv", "kv:bits=4", "kv:k=tensor,v=tensor"):
        q = qm.clone()
        _run(q, text, calib)
        for attn in q.nodes(ops.ATTENTION):
            k, v = attn.args[1], attn.args[2]
            assert k.target == ops.QUANTIZE_ACT and v.target == ops.QUANTIZE_ACT
            kv_heads, d = attn.args[1].meta["shape"][1], attn.args[1].meta["shape"][3]
            if "tensor" not in text:
                assert tuple(q.store[k.args[1].target].shape) == (kv_heads, 1, d)  # static per channel
                assert v.args[1] is None  # dynamic per token
            else:
                assert q.store[k.args[1].target].shape == (1,) == q.store[v.args[1].target].shape
        errs[text] = _rel(q(x), ref)
    assert 0 < errs["kv"] < 0.05 and errs["kv"] < errs["kv:bits=4"] and errs["kv"] < errs["kv:k=tensor,v=tensor"], errs


def test_kv_static_channel_scale_is_the_calibrated_range(loaded, ids):
    qm = loaded("llama")
    calib = ids(4, 16)
    ks = []
    ref = qm.clone()
    attn0 = next(ref.nodes(ops.ATTENTION, layer=0))
    ref(calib, hook=lambda n, v: ks.append(v) if n is attn0.args[1] else None)
    _run(qm, "kv:bits=8", calib)
    k = next(qm.nodes(ops.ATTENTION, layer=0)).args[1]
    s = qm.store[k.args[1].target]
    expect = ks[0].abs().amax(dim=(0, 2)).unsqueeze(1) / 127
    assert torch.allclose(s, expect, rtol=1e-6)


def test_kv_dynamic_per_head_equals_shared_quantizer(loaded, ids):
    qm = loaded("qwen2")
    _run(qm, "kv:k=head,bits=4", ids(2, 16))
    k = next(qm.nodes(ops.ATTENTION, layer=0)).args[1]
    assert k.args[1] is None and k.args[3] == 4
    t = torch.randn(1, 2, 7, 16)
    assert torch.equal(k.target(t, *k.args[1:]), quant.fake_quantize(t, quant.QuantSpec(4, 0, True)))


def test_cli_smooth_int8_static_artifact_round_trip(models, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(models["qwen2"]), "-o", str(out), "--passes",
                                  "smooth,int8:static=true,kv", "--calib-samples", "4", "--calib-seqlen", "32", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = artifact.read_manifest(out)
    q = m["quant"]["model.layers.0.self_attn.q_proj"]
    assert q["input"]["method"] == "static-absmax" and q["weight"]["bits"] == 8
    assert "k_cache" in m["quant"]["model.layers.0.self_attn"]
    r = CliRunner().invoke(main, ["inspect", str(out), "--op", "quantize_act"], catch_exceptions=False)
    assert r.exit_code == 0 and r.output.count("quantize_act") >= 6 * 2
    r = CliRunner().invoke(main, ["eval", str(out), "--seqlen", "32", "--max-windows", "4", "--json", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0 and json.loads(r.output.strip().splitlines()[-1])["ppl"] > 1


def test_every_shipped_recipe_parses_and_orders():
    from ptqc import recipes

    assert {"w8a8kv8-smoothquant", "w8a8kv8-flatquant", "w4a4kv4-flatquant", "w4a4kv4-quarot", "w4a16-awq",
            "w4a16-gptq", "w3a16-gptq"} <= set(recipes.names())
    for name in recipes.names():
        passes, settings = pipeline.load_recipe(name)
        pipeline.check_order(passes, {"canonical"})
        assert settings["calib"]["samples"] == 128 and recipes.describe(name)


def test_compile_with_a_shipped_recipe_by_name(models, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(models["llama"]), "-o", str(out), "--recipe", "w8a8kv8-smoothquant",
                                  "--calib-samples", "4", "--calib-seqlen", "32", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = artifact.read_manifest(out)
    assert [p["pass"] for p in m["passes"]] == ["smooth", "int8", "kv", "pack"]
    assert m["calibration"]["samples"] == 4  # the command line overrides the recipe's calib
    r = CliRunner().invoke(main, ["compile", str(models["llama"]), "-o", str(tmp_path / "o2"), "--recipe", "nope"])
    assert r.exit_code == 2 and "is not a shipped recipe (w3a16-gptq" in r.output
