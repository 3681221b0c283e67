"""The shared quantizer and the rtn pass."""
import pytest
import torch

from ptqc import ops, pipeline, quant
from ptqc.errors import PtqcError
from ptqc.weights import dequantized_weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 32, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_codes_in_range_and_error_bounded_by_half_scale(bits, group, sym):
    torch.manual_seed(bits * 7 + group)
    w = torch.randn(16, 128) * torch.rand(16, 1) * 3
    w[3, 5] = 40.0  # an outlier
    spec = quant.QuantSpec(bits, group, sym)
    scale, zp = quant.compute_qparams(w, spec)
    n_groups = 1 if group == -1 else (1 if group == 0 else 128 // group)
    assert scale.shape == ((1, 1) if group == -1 else (16, n_groups))
    assert (zp is None) == sym
    codes = quant.quantize(w, scale, zp, spec)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    deq = quant.dequantize(codes, scale, zp, group)
    g = 128 if group <= 0 else group
    bound = scale.repeat_interleave(g if group != -1 else 128, dim=-1) if group != -1 else scale.expand_as(w)
    err = (deq - w).abs()
    assert torch.all(err <= bound / 2 * (1 + 1e-5) + 1e-7), (err - bound / 2).max()
    if sym and bits == 8:  # symmetric int8 uses the restricted range
        assert int(codes.min()) >= -127


def test_asymmetric_zero_is_exact():
    w = torch.tensor([[0.0, 0.5, 1.0, 3.0, -1.0, 0.0, 2.0, 0.25]])
    spec = quant.QuantSpec(4, 0, False)
    deq = quant.fake_quantize(w, spec)
    assert deq[0, 0] == 0.0 and deq[0, 5] == 0.0


def test_rounding_is_half_to_even():
    spec = quant.QuantSpec(8, 0, True)
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0]])  # scale = 127/127 = 1
    scale, _ = quant.compute_qparams(x, spec)
    assert scale.item() == 1.0
    assert quant.quantize(x, scale, None, spec).tolist() == [[0, 2, 2, 0, -2, 127]]


def test_clip_ratio_saturates():
    spec = quant.QuantSpec(8, 0, True, clip_ratio=0.5)
    x = torch.tensor([[-10.0, 1.0, 10.0]])
    scale, _ = quant.compute_qparams(x, spec)
    codes = quant.quantize(x, scale, None, spec)
    assert codes.tolist() == [[-128, 25, 127]]  # beyond the clipped range: saturated, not wrapped


def test_zero_tensor_does_not_divide_by_zero():
    for sym in (True, False):
        spec = quant.QuantSpec(4, 0, sym)
        out = quant.fake_quantize(torch.zeros(2, 8), spec)
        assert torch.equal(out, torch.zeros(2, 8))


@pytest.mark.parametrize("kw,msg", [
    (dict(bits=9), "outside 1..8"), (dict(bits=4, group_size=-2), "group size"),
    (dict(clip_ratio=1.5), "clip_ratio"),
])
def test_spec_rejects_bad_values(kw, msg):
    with pytest.raises(PtqcError, match=msg):
        quant.QuantSpec(**kw)


def test_group_must_divide_lists_valid_sizes():
    with pytest.raises(PtqcError, match=r"group size 48 does not divide the input dimension 128.*valid group sizes: 32, 64, 128"):
        quant.QuantSpec(4, 48).check_fits(128, "x")


def _run(qm, text):
    return pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True))


def test_rtn_rewrites_graph_and_keeps_lm_head(loaded, ids):
    qm = loaded("qwen2")
    ref = qm.clone()
    _run(qm, "rtn:bits=4,group=64")
    lin = qm.linears()
    quantized = [n for n in lin if n.args[1].target == ops.DEQUANTIZE_WEIGHT]
    assert len(quantized) == 7 * qm.num_layers  # lm_head kept float by default
    assert qm.linears(role="lm_head")[0].args[1].op == "get_attr"
    q = qm.linears(role="down", layer=1)[0]
    name = "model.layers.1.mlp.down_proj"
    assert qm.store[f"{name}.weight"].dtype == torch.int8
    assert qm.store[f"{name}.weight_scale"].shape == (128, 256 // 64)
    assert qm.store[f"{name}.weight_zero_point"].dtype == torch.int8
    assert q.meta["ptqc"]["quant"]["weight"] == {"method": "rtn", "bits": 4, "group": 64, "sym": False}
    assert qm.quant[name]["weight"]["bits"] == 4
    # the graph computes with exactly the dequantized weights of the shared quantizer
    w = ref.store[f"{name}.weight"]
    torch.testing.assert_close(dequantized_weight(qm, q), quant.fake_quantize(w, quant.QuantSpec(4, 64, False)), rtol=0, atol=0)
    x = ids(2, 12)
    assert not torch.allclose(qm(x), ref(x))


def test_rtn_error_grows_as_bits_shrink(loaded, ids):
    """Random models amplify weight noise (~6x here), so compare bit-widths with each other."""
    x = ids(2, 24)
    ref = loaded("qwen2")
    base = ref(x)
    errs = {}
    for bits in (8, 4, 2):
        qm = ref.clone()
        _run(qm, f"rtn:bits={bits},group=64")
        errs[bits] = ((qm(x) - base).norm() / base.norm()).item()
    assert errs[8] < 0.1 and errs[8] * 5 < errs[4] < errs[2]


def test_rtn_include_exclude(loaded):
    qm = loaded("qwen2")
    _run(qm, "rtn:bits=4,group=0,include=layers.1.*,exclude=down_proj|lm_head")
    done = sorted(m for m in qm.quant)
    assert done == sorted(f"model.layers.1.{p}" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"))


def test_rtn_bad_group_refused_before_changing_anything(loaded):
    qm = loaded("qwen2")
    with pytest.raises(PtqcError, match="group size 96 does not divide"):
        _run(qm, "rtn:bits=4,group=96")
    assert not qm.quant and not any(n.target == ops.DEQUANTIZE_WEIGHT for n in qm.graph.nodes)


def test_rtn_quantizes_tied_lm_head_without_touching_embedding(loaded, ids):
    qm = loaded("llama")
    emb_before = qm.store["model.embed_tokens.weight"].clone()
    _run(qm, "rtn:bits=4,group=64,exclude=none")
    assert "lm_head" in qm.quant
    assert torch.equal(qm.store["model.embed_tokens.weight"], emb_before)
    assert qm.store["lm_head.weight"].dtype == torch.int8
