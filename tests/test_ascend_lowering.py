"""Ascend lowering: the rewrite rules, kernel counts before/after fusion, numerics against the
fake-quant graph, refusals with reasons, artifact round trip."""
import json

import pytest
import torch
from click.testing import CliRunner

from ptqc import artifact
from ptqc.cli import main
from ptqc.errors import PtqcError
from ptqc.lowering.ascend import ops as npu
from ptqc.lowering.ascend.lower import kernel_counts
from ascend_helpers import rel as _rel, run as _run, targets as _targets


def test_w8a8_dynamic_kernel_counts_naive_and_fused(loaded, ids):
    qm = loaded("qwen2")
    x, calib = ids(2, 16), ids(4, 16)
    _run(qm, "smooth,int8", calib)
    ref = qm(x)
    naive, fused = qm.clone(), qm.clone()
    _run(naive, "ascend:fuse=false")
    _run(fused, "ascend")
    for layer, c in kernel_counts(naive).items():
        assert c == {"standalone_quant": 4, "fused_quant": 0, "quant_matmul": 7, "weight_quant_matmul": 0,
                     "cache_quant": 0, "attention": 1}  # float attention -> npu_fused_infer_attention_score
    counts = kernel_counts(fused)
    assert counts[0]["standalone_quant"] == 2  # layer 0's input norm has no residual add to fuse with
    assert all(c["standalone_quant"] == 1 and c["fused_quant"] == 3 for k, c in counts.items() if k > 0)
    assert all(c["quant_matmul"] == 6 for c in counts.values())  # gate/up run as one matmul
    assert npu.SWIGLU_QUANT in _targets(fused) and npu.ADD_RMS_NORM_DYNAMIC_QUANT in _targets(fused)
    for lowered in (naive, fused):
        assert _rel(lowered(x), ref) < 5e-3  # integer kernels vs fake-quant: rounding-flip noise only


def test_dynamic_quant_matmul_equals_fake_quant_on_one_linear(loaded, ids):
    qm = loaded("llama")
    _run(qm, "int8", ids(2, 16))
    low = qm.clone()
    _run(low, "ascend:fuse=false")
    x = ids(1, 9)
    got, want = {}, {}
    q_lin = next(n for n in qm.linears(role="q", layer=0))
    qm(x, hook=lambda n, v: want.__setitem__("q", v) if n is q_lin else None)
    mm = next(n for n in low.graph.nodes if n.target == npu.QUANT_MATMUL and n.meta["ptqc"]["role"] == "q")
    low(x, hook=lambda n, v: got.__setitem__("q", v) if n is mm else None)
    assert torch.allclose(got["q"], want["q"], rtol=1e-5, atol=1e-5)  # same codes, int32 vs float sums


def test_static_path_difference_is_the_scale_truncation(loaded, ids):
    qm = loaded("qwen2")
    x, calib = ids(2, 16), ids(4, 16)
    _run(qm, "int8:static=true", calib)
    ref = qm(x)
    a, b = qm.clone(), qm.clone()
    _run(a, "ascend")
    _run(b, "ascend:truncate=false")
    name = "model.layers.0.self_attn.q_proj"
    assert a.store[f"{name}.deq_scale"].dtype == torch.int64 and b.store[f"{name}.deq_scale"].dtype == torch.float32
    assert a.store[f"{name}.quant_bias"].dtype == torch.int32  # qwen2 q_proj has a bias: folded in
    assert torch.equal(npu.deq_scale_value(a.store[f"{name}.deq_scale"]), npu.truncate19(b.store[f"{name}.deq_scale"]))
    ea, eb = _rel(a(x), ref), _rel(b(x), ref)
    assert eb < ea, (ea, eb)


def test_weight_only_uses_weight_quant_batchmatmul_and_matches(loaded, ids):
    qm = loaded("qwen2")
    _run(qm, "w4a16:w_group=32")
    x = ids(2, 16)
    ref = qm(x)
    _run(qm, "pack,ascend")
    assert sum(t == npu.WEIGHT_QUANT_BATCHMATMUL for t in _targets(qm)) == 7 * 2
    assert _rel(qm(x), ref) < 1e-5


def test_refusals_name_the_module_and_the_reason(loaded, ids):
    qm = loaded("qwen2")
    _run(qm, "w4a16:w_group=16")
    with pytest.raises(PtqcError, match=r"cannot lower model\.layers\.0\..*multiples of 32.*fallback=true"):
        _run(qm.clone(), "ascend")
    low = qm.clone()
    rec = _run(low, "ascend:fallback=true")
    assert len(rec[0]["summary"]["refused"]) == 14 and npu.WEIGHT_QUANT_BATCHMATMUL not in _targets(low)
    # (W4A4 lowers now: tests/test_ascend_w4a4.py; W4A8 as weight-only: test_ascend_rules.test_w4a8_weight_only)


def test_lowered_artifact_round_trip_and_eval(models, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(models["llama"]), "-o", str(out), "--passes", "smooth,int8,ascend",
                                  "--calib-samples", "4", "--calib-seqlen", "32", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = artifact.read_manifest(out)
    assert m["passes"][-1]["summary"]["max_standalone_quant_per_layer"] <= 2
    qm = artifact.load(out)
    assert any(n.target == npu.QUANT_MATMUL for n in qm.graph.nodes)
    r = CliRunner().invoke(main, ["eval", str(out), "--seqlen", "32", "--max-windows", "4", "--json", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0 and json.loads(r.output.strip().splitlines()[-1])["ppl"] > 1


def test_inspect_ops_reports_naive_shared_and_fused_counts(models, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(models["qwen2"]), "-o", str(out), "--passes", "int8",
                                  "--calib-samples", "2", "--calib-seqlen", "16", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", str(out), "--ops", "--format", "json"], catch_exceptions=False)
    rows = json.loads(r.output)
    assert [(x["naive"], x["shared"], x["fused"]) for x in rows] == [(7, 4, 2), (7, 4, 1)]


def test_static_without_truncation_and_with_float_bias_is_the_fake_quant_graph(loaded, ids):
    qm = loaded("qwen2")  # q/k/v biases
    x, calib = ids(2, 16), ids(4, 16)
    _run(qm, "int8:static=true", calib)
    ref = qm(x)
    exact, rounded = qm.clone(), qm.clone()
    _run(exact, "ascend:truncate=false,int_bias=false,fuse=false")
    _run(rounded, "ascend:truncate=false,fuse=false")
    assert _rel(exact(x), ref) < 1e-5 < _rel(rounded(x), ref)


def test_static_asymmetric_fused_norm_quant(loaded, ids):
    qm = loaded("qwen2")
    x, calib = ids(2, 16), ids(4, 16)
    _run(qm, "int8:static=true,a_sym=false", calib)
    ref = qm(x)
    low = qm.clone()
    _run(low, "ascend:truncate=false,int_bias=false")
    assert npu.ADD_RMS_NORM_QUANT in _targets(low)
    assert _rel(low(x), ref) < 1e-3  # only rounding ties (offset added before rounding) may differ


def test_eval_target_ascend_lowers_in_memory(models, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(models["qwen2"]), "-o", str(out), "--passes", "int8",
                                  "--calib-samples", "2", "--calib-seqlen", "16", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = {}
    for target in ("torch", "ascend"):
        r = CliRunner().invoke(main, ["eval", str(out), "--seqlen", "32", "--max-windows", "3", "--json", "-q",
                                      "--target", target], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        res[target] = json.loads(r.output.strip().splitlines()[-1])["ppl"]
    assert res["ascend"] != res["torch"] and abs(res["ascend"] / res["torch"] - 1) < 0.01
    assert not any(str(n.target).startswith("ptqc_npu.") for n in artifact.load(out).graph.nodes)


def test_unfolded_smooth_scales_become_the_kernels_smooth_scales(loaded, ids):
    qm = loaded("qwen2")
    x, calib = ids(2, 16), ids(4, 16)
    ref_float = qm(x)
    _run(qm, "smooth:fold=false", calib)
    muls = [n for n in qm.graph.nodes if n.meta.get("ptqc", {}).get("role") == "smooth_scale"]
    assert len(muls) == 4 * qm.num_layers  # q/k/v, o, gate/up, down: explicit x * (1/s)
    assert _rel(qm(x), ref_float) < 1e-5  # the float model is unchanged
    _run(qm, "int8")
    fused, naive = qm.clone(), qm.clone()
    _run(fused, "ascend")
    _run(naive, "ascend:fuse=false")
    roles = [n.meta.get("ptqc", {}).get("role") for n in fused.graph.nodes]
    assert "smooth_scale" not in roles and roles.count("smooth_scale") == 0
    with_smooth = {n.target for n in fused.graph.nodes if n.op == "call_function" and n.target in (
        npu.DYNAMIC_QUANT, npu.ADD_RMS_NORM_DYNAMIC_QUANT, npu.SWIGLU_QUANT)
        and any(isinstance(a, torch.fx.Node) and a.op == "get_attr" and "smooth_scale" in a.target for a in n.args)}
    assert with_smooth == {npu.DYNAMIC_QUANT, npu.ADD_RMS_NORM_DYNAMIC_QUANT, npu.SWIGLU_QUANT}
    assert all(c["standalone_quant"] == 1 for k, c in kernel_counts(fused).items() if k > 0)
    assert sum(1 for n in naive.graph.nodes if n.meta.get("ptqc", {}).get("role") == "smooth_scale") == len(muls)
    assert _rel(fused(x), naive(x)) < 1e-6  # the multiply inside the kernel is the multiply before it
    assert "at most 8192" in npu.check_swiglu_quant(2 * 11008)  # 7B-sized MLPs keep gate/up separate


def test_compile_target_ascend_and_eval_says_what_stays_float(models, tmp_path):
    out = tmp_path / "low"
    r = CliRunner().invoke(main, ["compile", str(models["qwen2"]), "-o", str(out), "--passes", "w4a16:w_group=32",
                                  "--target", "ascend", "--calib-samples", "2", "--calib-seqlen", "16", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    qm = artifact.load(out)
    assert [h["pass"] for h in qm.history][-2:] == ["pack", "ascend"]  # packed, then lowered
    t = _targets(qm)
    assert npu.WEIGHT_QUANT_BATCHMATMUL in t and npu.FUSED_INFER_ATTENTION_SCORE in t
    kv = tmp_path / "kv"
    r = CliRunner().invoke(main, ["compile", str(models["qwen2"]), "-o", str(kv), "--passes", "int8,kv",
                                  "--calib-samples", "2", "--calib-seqlen", "16", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["eval", str(kv), "--seqlen", "32", "--max-windows", "2", "--target", "ascend"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "ascend: kept as a float op: model.layers.0.self_attn: npu_fused_infer_attention_score reads a " \
           "per-token (dynamic) KV8 cache only when decoding" in r.output
