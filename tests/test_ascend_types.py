"""The Ascend types W8A8_MIX, W4A4_DYNAMIC, W4A4_FLATQUANT_DYNAMIC, W8A8_MXFP8 and W4A4_MXFP4: the MX
quantizer (OCP MX v1.0) and the mix kind in ptqc.quant, their CPU emulation in the Ascend lowering
against the fake-quant graph, the export's tensors and values, and check-export catching a broken
export of each (the vllm-ascend loader: tests/test_vllm_ascend_load.py)."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptqc import frontend, ops, quant
from ptqc.errors import PtqcError
from ptqc.ir import info, is_op
from ptqc.lowering import checkpoint
from ptqc.lowering.ascend import export as ax
from ptqc.lowering.ascend import export_types as et
from ptqc.lowering.ascend import ops_mx, ops_quant
from ascend_helpers import rel, run, targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import make_model  # noqa: E402

RECIPES = {"W8A8_MIX": "w8a8_mix", "W4A4_DYNAMIC": "w4a4", "W4A4_FLATQUANT_DYNAMIC": "flatquant:epochs=0,k_transform=false",
           "W8A8_MXFP8": "w8a8_mxfp8", "W4A4_MXFP4": "w4a4_mxfp4"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """type -> the one-layer Qwen2 (float32) compiled with its recipe (each compiled once)."""
    src = make_model(tmp_path_factory.mktemp("m") / "qwen2", "qwen2", layers=1, hidden=64, intermediate=128, seed=3)
    base = frontend.load(src, "float32")
    torch.manual_seed(0)
    calib = torch.randint(0, 300, (2, 16))
    cache = {}

    def get(kind):
        if kind not in cache:
            qm = base.clone()
            run(qm, RECIPES[kind], calib)
            cache[kind] = qm
        return cache[kind].clone()
    get.base = base
    return get


# ---- the MX quantizer -------------------------------------------------------------------------
def test_fp8_elements_round_half_even_and_saturate_like_torch_float8_e4m3fn():
    torch.manual_seed(0)
    v = torch.cat([torch.randn(20000) * 100, torch.randn(2000) * 1e-2,
                   torch.tensor([0.0, 448.0, 464.0, 470.0, 1e4, -1e4, 2 ** -9 * 1.5, 2 ** -10])])
    assert torch.equal(quant.round_fp(v, 8), v.clamp(-448, 448).to(torch.float8_e4m3fn).float())


def test_fp4_elements_round_half_even_on_the_e2m1_grid_and_saturate_at_6():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 100.0, -5.0, -0.2])
    assert quant.round_fp(ties, 4).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -4.0, -0.0]


def test_mx_block_scale_is_floor_log2_amax_minus_emax_in_e8m0():
    x = torch.zeros(1, 96)
    x[0, 0], x[0, 32], x[0, 64:96] = 1.0, 7.9, 0.0  # amax 1 -> 2^(0 - emax); 7.9 -> 2^(2 - emax); zeros -> 1
    for bits, emax in ((8, 8), (4, 2)):
        scale, zp = quant.compute_qparams(x, quant.QuantSpec(bits, 32, True, kind="mx"))
        assert zp is None and scale.tolist() == [[2.0 ** -emax, 2.0 ** (2 - emax), 1.0]]
        assert quant.mx_exponent(scale).tolist() == [[127 - emax, 129 - emax, 127]]
        assert torch.equal(quant.mx_scale_of(quant.mx_exponent(scale)), scale)
    ends = quant.mx_scale(torch.tensor([2.0 ** 127 * 1.5, 2.0 ** -140]), 8)  # tiny: clamped to E8M0's 2^-127
    assert ends.tolist() == [2.0 ** 119, 2.0 ** -127]


def test_mx_codes_are_element_values_and_dequantize_with_the_shared_int_code_path():
    torch.manual_seed(1)
    x = torch.randn(3, 64) * 5
    for bits in (8, 4):
        spec = quant.QuantSpec(bits, 32, True, kind="mx")
        codes, scale, zp = quant.rtn(x, spec)
        assert codes.dtype == torch.float8_e4m3fn and scale.shape == (3, 2)
        ref = quant.round_fp(x.reshape(3, 2, 32) / scale.unsqueeze(-1), bits).reshape(3, 64)
        assert torch.equal(codes.float(), ref)
        assert torch.equal(quant.fake_quantize(x, spec), (ref.reshape(3, 2, 32) * scale.unsqueeze(-1)).reshape(3, 64))
    assert quant.QuantSpec(8) == quant.QuantSpec(8, kind="int")  # int specs are what they were


def test_fp4_packing_is_the_e2m1_bit_pattern_low_nibble_first():
    packed = quant.pack_fp4(torch.tensor([[0.5, -6.0, 1.5, 0.0]]))
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xF1, 0x03]]
    v = quant.round_fp(torch.randn(4, 64) * 3, 4)
    assert torch.equal(quant.unpack_fp4(quant.pack_fp4(v)), v)
    with pytest.raises(PtqcError, match="off the FP4 E2M1 grid"):
        quant.pack_fp4(torch.tensor([[0.7, 1.0]]))


@pytest.mark.parametrize("kw, msg", [({"bits": 6, "group_size": 32}, "bits 8"), ({"bits": 8, "group_size": 16}, "blocks of 32"),
                                     ({"bits": 8, "group_size": 32, "symmetric": False}, "no zero point"),
                                     ({"kind": "nf4"}, "unknown")])
def test_bad_quant_kinds_are_refused(kw, msg):
    with pytest.raises(PtqcError, match=msg):
        quant.QuantSpec(**kw) if "kind" in kw else quant.QuantSpec(**kw, kind="mx")


def test_mix_is_per_token_for_prefill_and_the_static_scale_for_one_token():
    spec = quant.QuantSpec(8, 0, True, kind="mix")
    s = torch.tensor([0.05])
    torch.manual_seed(2)
    x = torch.randn(1, 5, 64)
    assert torch.equal(quant.fake_quant_act(x, s, None, spec), quant.fake_quantize(x, quant.QuantSpec(8, 0, True)))
    one = x[:, :1]
    assert torch.equal(quant.fake_quant_act(one, s, None, spec), torch.clamp(torch.round(one / s), -128, 127) * s)


# ---- emulation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, kernel", [("W8A8_MIX", ops_quant.PD_MIX_QUANT), ("W8A8_MXFP8", ops_mx.DYNAMIC_MX_QUANT),
                                          ("W4A4_MXFP4", ops_mx.DYNAMIC_MX_QUANT),
                                          ("W4A4_FLATQUANT_DYNAMIC", torch.ops.ptqc_npu.kronecker_quant.default)])
def test_lowered_graph_matches_fake_quant(compiled, kind, kernel):
    qm = compiled(kind)
    low = qm.clone()
    run(low, "ascend")
    assert targets(low).count(kernel) == 4 and ops.QUANTIZE_ACT not in targets(low)
    torch.manual_seed(3)
    for n in (12, 1):  # prefill, and one token (W8A8_MIX: the static decode scale)
        x = torch.randint(0, 300, (2, n))
        assert rel(low(x), qm(x)) < 2e-5, (kind, n)


def test_mx_emulation_codes_equal_the_shared_quantizer_and_the_matmul_is_their_product():
    torch.manual_seed(4)
    x, w = torch.randn(3, 64), torch.randn(16, 64)
    for bits in (8, 4):
        spec = quant.QuantSpec(bits, 32, True, kind="mx")
        codes, e8 = ops_mx.dynamic_mx_quant(x, bits)
        c_ref, s_ref, _ = quant.rtn(x, spec)
        assert torch.equal(codes.float(), c_ref.float()) and torch.equal(e8, quant.mx_exponent(s_ref))
        wc, ws, _ = quant.rtn(w, spec)
        y = ops_mx.mx_quant_matmul(codes, e8, wc.t().contiguous(), quant.mx_exponent(ws).t().contiguous(), None,
                                   torch.float32)
        want = quant.fake_quantize(x, spec) @ quant.dequantize(wc, ws, None, 32).t()
        assert torch.allclose(y, want, rtol=1e-6, atol=1e-6)


def test_mix_decode_uses_npu_quantize_with_the_static_scale():
    x = torch.tensor([[[0.1, -0.25, 3.0, 0.0]]])
    codes, scale = ops_quant.pd_mix_quant(x, torch.tensor([0.02]))
    assert codes.tolist() == [[[5, -12, 127, 0]]] and scale.tolist() == [[0.019999999552965164]]
    codes, scale = ops_quant.pd_mix_quant(x.expand(1, 2, 4), torch.tensor([0.02]))
    assert codes[0, 0].tolist() == [4, -11, 127, 0]  # per token: 3.0 / 127


# ---- export ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(compiled, tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    return {k: (ax.export(q := compiled(k), root / k, dtype="bfloat16"), root / k, q) for k in RECIPES}


def _tensors(d):
    return load_file(str(d / ax.WEIGHTS))


def test_every_type_exports_as_itself_and_checks_clean(exported):
    for kind, (desc, d, _) in exported.items():
        assert desc["model_quant_type"] == kind and desc["metadata"]["linears"] == {kind: 7}, kind
        assert ax.check(d) == [], kind
        types = json.loads((d / ax.DESCRIPTION).read_text())
        assert types["model.layers.0.mlp.down_proj.weight"] == kind


def test_mx_export_holds_the_artifact_codes_and_e8m0_scales(exported):
    for kind in ("W8A8_MXFP8", "W4A4_MXFP4"):
        _, d, qm = exported[kind]
        t = _tensors(d)
        for lin in qm.linears()[:-1]:
            mod, dq = info(lin)["module"], lin.args[1]
            codes, scale = checkpoint.weight_codes(qm, dq), qm.store[dq.args[1].target]
            w = t[f"{mod}.weight"]
            got = w.float() if kind == "W8A8_MXFP8" else quant.unpack_fp4(w)
            assert w.dtype == (torch.float8_e4m3fn if kind == "W8A8_MXFP8" else torch.uint8)
            assert torch.equal(got, codes.float()) and torch.equal(quant.mx_scale_of(t[f"{mod}.weight_scale"]), scale)


def test_flatquant_export_writes_ptqc_transform_as_left_and_right(exported):
    _, d, qm = exported["W4A4_FLATQUANT_DYNAMIC"]
    t = _tensors(d)
    for lin in qm.linears()[:-1]:
        mod, tr = info(lin)["module"], lin.args[0].args[0]
        a, b = (qm.store[n.target] for n in tr.args[1:3])
        left, right = t[f"{mod}.left_trans"].float(), t[f"{mod}.right_trans"].float()
        k = checkpoint.weight_codes(qm, lin.args[1]).shape[1]
        assert (left.shape[0], right.shape[0]) == et.decompose_dim(k)
        if a.shape[0] != left.shape[0]:  # o_proj: O kron I_d written as (O kron I_{M / heads}) kron I_N
            assert mod.endswith("o_proj") and torch.equal(b, torch.eye(b.shape[0]))
            a, b = torch.kron(a, torch.eye(left.shape[0] // a.shape[0])), torch.eye(right.shape[0])
        assert torch.equal(left, a.bfloat16().float()) and torch.equal(right, b.bfloat16().float()), mod
        assert t[f"{mod}.clip_ratio"].item() == pytest.approx(lin.args[0].args[6])
        assert torch.equal(t[f"{mod}.weight_offset"], torch.zeros_like(t[f"{mod}.weight_offset"]))
    assert not any(k.endswith((".left", ".right")) for k in t)  # ptqc's own transform tensors are not written


def test_exports_read_back_and_re_export_bit_for_bit(exported):
    torch.manual_seed(8)
    x = torch.randint(0, 300, (2, 9))
    for kind in ("W8A8_MIX", "W4A4_DYNAMIC", "W8A8_MXFP8", "W4A4_MXFP4"):
        _, d, qm = exported[kind]
        back = ax.load(d, "bfloat16")
        def quantizers(m):
            return sorted(tuple(q.args[3:]) for q in m.nodes(ops.QUANTIZE_ACT))
        assert quantizers(back) == quantizers(qm), kind  # the same activation quantizers (bits, group, kind)
        assert torch.isfinite(back(x).float()).all(), kind
        again = back.clone()
        assert ax.export(again, d.parent / f"{kind}-again", dtype="bfloat16")["model_quant_type"] == kind
        a, b = _tensors(d), _tensors(d.parent / f"{kind}-again")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.endswith(".quant_bias")), kind
        # quant_bias = round(bias / deq_scale) is recomputed from the bias as exported (bf16): off by at most 1
        assert all((a[k] - b[k]).abs().max() <= 1 for k in a if k.endswith(".quant_bias")), kind
    with pytest.raises(PtqcError, match="reading back W4A4_FLATQUANT_DYNAMIC .* is not supported"):
        ax.load(exported["W4A4_FLATQUANT_DYNAMIC"][1])


def test_decompose_dim_is_vllm_ascend_get_decompose_dim():
    assert [et.decompose_dim(n) for n in (64, 128, 256, 384, 896, 11008)] == [(8, 8), (8, 16), (16, 16), (16, 24),
                                                                            (28, 32), (86, 128)]


BROKEN = {  # type -> (tensor suffix of q_proj, how to break it, the message check-export gives)
    "W8A8_MIX": ("deq_scale", None, r"W8A8_MIX needs model.layers.0.self_attn.q_proj.deq_scale, which is missing"),
    "W4A4_DYNAMIC": ("weight_scale", lambda v: v.reshape(-1), r"weight_scale: expected float32 \[64, 1\]"),
    "W4A4_FLATQUANT_DYNAMIC": ("left_trans", lambda v: v[:4, :4].contiguous(), r"left_trans: expected float \[8, 8\]"),
    "W8A8_MXFP8": ("weight_scale", lambda v: v.float(), r"weight_scale: expected uint8 \(E8M0\) \[64, in / 32\], found F32"),
    "W4A4_MXFP4": ("weight", lambda v: v.view(torch.int8), r"q_proj.weight: expected uint8 \(two FP4 E2M1 per byte\)"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_check_export_catches_a_broken_export_of_each_type(exported, tmp_path, kind):
    _, d, _ = exported[kind]
    bad = tmp_path / kind
    shutil.copytree(d, bad)
    suffix, how, msg = BROKEN[kind]
    t = _tensors(bad)
    name = f"model.layers.0.self_attn.q_proj.{suffix}"
    if how is None:
        del t[name]
        desc = json.loads((bad / ax.DESCRIPTION).read_text())
        del desc[name]
        (bad / ax.DESCRIPTION).write_text(json.dumps(desc))
    else:
        t[name] = how(t[name])
    save_file(t, str(bad / ax.WEIGHTS))
    problems = ax.check(bad)
    assert len(problems) == 1 and __import__("re").search(msg, problems[0]), problems


def test_exports_vllm_ascend_cannot_run_are_refused(compiled, tmp_path):
    qm = compiled.base.clone()
    run(qm, "flatquant:epochs=0", torch.randint(0, 300, (2, 16)))  # k_transform on by default
    with pytest.raises(PtqcError, match="online Q/K transform .* compile flatquant:k_transform=false") as e:
        ax.export(qm, tmp_path / "x", dtype="float16")
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
    mixed = compiled.base.clone()
    run(mixed, "w8a8_mxfp8:exclude=lm_head|down_proj,int8")
    assert ax.export(mixed, tmp_path / "m", dtype="float16")["metadata"]["linears"] == {"W8A8_MXFP8": 6,
                                                                                       "W8A8_DYNAMIC": 1}
    assert ax.check(tmp_path / "m") == []


# ---- ONNX (opset 21: FLOAT8E4M3FN weights, arithmetic MX rounding; no FP4 / E8M0 storage types) ----
@pytest.mark.parametrize("bits", [8, 4])
def test_onnx_mx_quantize_act_is_bit_exact(tmp_path, bits):
    from test_onnx import run_op

    torch.manual_seed(6)
    x = torch.randn(2, 3, 96) * torch.linspace(0.01, 50, 96)
    x[0, 0] = 0.0  # an all-zero block: scale 1
    x[1, 1, :32] = torch.tensor([2.0 ** k for k in range(-8, 24)])  # powers of two: floor(log2) exactly
    x[1, 2, 32:40] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.9])  # element ties (amax 7.9)
    y, ref = run_op(tmp_path, ops.QUANTIZE_ACT, (x, None, None, bits, 32, True, 1.0, "mx"))
    assert torch.equal(y, ref)


def test_onnx_mix_quantize_act_switches_on_one_token(tmp_path):
    from test_onnx import run_op

    torch.manual_seed(7)
    s = torch.tensor([0.03])
    for n in (5, 1):
        x = torch.randn(2, n, 32)
        y, ref = run_op(tmp_path, ops.QUANTIZE_ACT, (x, s, None, 8, 0, True, 1.0, "mix"), weights={1})
        assert torch.equal(y, ref), n


@pytest.mark.parametrize("kind", ["W8A8_MXFP8", "W4A4_MXFP4", "W8A8_MIX"])
def test_onnx_export_of_the_model_matches_fake_quant(compiled, tmp_path, kind):
    from ptqc.lowering import onnx as lo

    qm = compiled(kind)
    r = lo.export(qm, tmp_path / "m.onnx")
    f8 = [i for i in __import__("onnx").load(str(r.path)).graph.initializer if i.data_type == 17]  # FLOAT8E4M3FN
    assert len(f8) == (7 if "MX" in kind else 0)  # MX weights stored as their E4M3 / E2M1 element values
    for n in (9, 1):
        x = torch.randint(0, 300, (2, n))
        ref = qm(x)
        assert (lo.logits(lo.session(r.path), x) - ref).abs().max().item() < 1e-4 * ref.abs().max().item(), n
