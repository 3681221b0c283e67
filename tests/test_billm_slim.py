"""BiLLM and SliM-LLM: beat their baselines on synthetic weights/Hessians, run end to end, store
what they computed (BiLLM: float weights; SliM: codes whose dequantization is exactly the GPTQ
loop's values), and reject bad options in one line."""
import importlib

import pytest
import torch

from ptqc import pipeline, quant
from ptqc.errors import PtqcError
from ptqc.weights import dequantized_weight, is_quantized

billm = importlib.import_module("ptqc.passes.billm")
slim = importlib.import_module("ptqc.passes.slim")
gptq = importlib.import_module("ptqc.passes.gptq")


def _hessian(x):
    return 2 * x.t() @ x / x.shape[0]


def _correlated_hessian(n, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n)
    return _hessian(torch.randn(tokens, n, generator=g) @ mix * (1 + 5 * torch.rand(n, generator=g)))


def _uneven_groups(n, group, seed=0):
    """Inputs whose column groups differ in scale: a few groups dominate the output error."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.2, 0.3, 1, 1, 1, 1, 3, 5])[: n // group].repeat_interleave(group)
    return _hessian(torch.randn(2048, n, generator=g) * scales)


def _run(qm, text, x):
    return pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True, calib=x))


# ---- BiLLM -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_billm_beats_sign_binarization(seed):
    torch.manual_seed(seed)
    w, h = torch.randn(64, 256), _correlated_hessian(256, seed=seed)
    w[:, torch.randperm(256)[:6]] *= 4  # a few salient columns
    wq, k, _ = billm.billm_quantize(w, h, block=128, max_salient=16)
    err, err_sign = gptq.output_error(w, wq, h), gptq.output_error(w, billm.sign_binarize(w), h)
    assert err < 0.5 * err_sign, (err, err_sign)
    assert 0 < k <= 32


def test_billm_block_structure():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[:, 5] *= 10
    p = billm.fit_block(w, torch.ones(128), max_salient=8)
    assert p.salient[5]  # the dominant column is salient
    q = p.binarize(w, p.salient)
    non = q[:, ~p.salient]
    for r in range(16):  # non-salient: at most 4 values per row (two groups, +-)
        assert non[r].unique().numel() <= 4
    fixed = billm.fit_block(w, torch.ones(128), salient_frac=0.25)
    assert int(fixed.salient.sum()) == 32


def test_billm_pass_end_to_end(loaded, ids):
    qm = loaded("qwen2")
    rec = _run(qm, "billm:max_salient=4", ids(8, 32))
    s = rec[0]["summary"]
    assert s["linears"] == 14 and s["storage"] == "float" and 1.0 <= s["avg_bits"] <= 1.07
    assert s["mean_err_billm"] < s["mean_err_sign"]
    for mod, q in qm.quant.items():
        r = q["weight"]
        assert r["method"] == "billm" and r["bits"] == 1 and r["storage"] == "float"
        assert r["err_billm"] < r["err_sign"] and 1.0 <= r["avg_bits"] <= 1.07
    lin = qm.linears(role="down", layer=1)[0]
    assert not is_quantized(lin)  # float storage: no dequantize node
    assert lin.meta["ptqc"]["quant"]["weight"]["method"] == "billm"
    w = dequantized_weight(qm, lin)
    assert all(w[r, :128].unique().numel() <= 12 for r in range(4))  # binary levels, not a float matrix


# ---- SliM-LLM --------------------------------------------------------------------------------
def _allocations(w, h, bits, group, act_order=True, one_bit="sign"):
    d = slim.hinv_diag(h, 0.01, 4, act_order)
    cands = slim.candidate_allocations(slim.group_salience(w, d, group), bits)
    return cands, slim.rtn_errors(w, h, cands, group, False, one_bit)


@pytest.mark.parametrize("act_order", [True, False])
def test_slim_beats_gptq_at_2_bits_with_uneven_salience(act_order):
    torch.manual_seed(0)
    n, group = 512, 64
    w, h = torch.randn(96, n), _uneven_groups(n, group)
    cands, proxy = _allocations(w, h, 2, group, act_order)
    assert len(cands) == 5 and cands[0] == [2] * 8
    assert all(sum(c) == 2 * 8 and c.count(1) == c.count(3) == i for i, c in enumerate(cands))
    assert cands[2][:2] == [1, 1] and cands[2][-2:] == [3, 3]  # the quiet groups go down, the loud up
    assert min(proxy[1:]) < proxy[0]
    runs = []
    for c in cands:
        codes, scale, zp, wq, _ = slim.slim_quantize(w, h, c, group, act_order=act_order)
        assert torch.equal(quant.dequantize(codes, scale, zp, group), wq)  # stored codes are what GPTQ used
        runs.append(gptq.output_error(w, wq, h))
    gc, gs, gz, _ = gptq.gptq_quantize(w, h, quant.QuantSpec(2, group, False), act_order=act_order)
    err_gptq = gptq.output_error(w, quant.dequantize(gc, gs, gz, group), h)
    assert runs[0] == pytest.approx(err_gptq, rel=1e-5)  # uniform candidate = GPTQ
    assert min(runs) < 0.5 * err_gptq, (runs, err_gptq)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("sym", [False, True])
def test_slim_with_uniform_bits_is_gptq(act_order, sym):
    torch.manual_seed(3)
    w, h = torch.randn(16, 128), _correlated_hessian(128, seed=3)
    codes, scale, zp, _, _ = slim.slim_quantize(w, h, [3] * 4, 32, sym=sym, block=32, act_order=act_order)
    gc, gs, gz, _ = gptq.gptq_quantize(w, h, quant.QuantSpec(3, 32, sym), block=32, act_order=act_order)
    assert torch.equal(codes, gc) and torch.equal(scale, gs)
    assert (zp is None and gz is None) or torch.equal(zp, gz)


@pytest.mark.parametrize("bits, one_bit", [(2, "sign"), (2, "grid"), (3, "sign")])
def test_slim_codes_stay_in_each_groups_range(bits, one_bit):
    torch.manual_seed(1)
    n, group = 256, 32
    w, h = torch.randn(24, n), _uneven_groups(n, group, seed=1)
    cands, _ = _allocations(w, h, bits, group, one_bit=one_bit)
    codes, scale, zp, wq, _ = slim.slim_quantize(w, h, cands[-1], group, one_bit=one_bit)
    for gi, b in enumerate(cands[-1]):
        c = codes[:, gi * group:(gi + 1) * group]
        lo, hi = (-1, 1) if b == 1 and one_bit == "sign" else (-(1 << (b - 1)), (1 << (b - 1)) - 1)
        assert c.min() >= lo and c.max() <= hi
        assert all(c[r].unique().numel() <= 1 << b for r in range(24))
    assert torch.equal(quant.dequantize(codes, scale, zp, group), wq)


def test_slim_allocations_without_room_are_uniform():
    assert slim.candidate_allocations(torch.tensor([3.0, 1.0, 2.0]), 8) == [[8, 8, 8]]  # no 9-bit groups
    assert slim.candidate_allocations(torch.tensor([3.0, 1.0, 2.0]), 2) == [[2, 2, 2], [3, 1, 2]]
    assert slim.candidate_allocations(torch.tensor([5.0]), 3) == [[3]]


@pytest.mark.parametrize("text", ["slim:bits=2,group=32", "slim:bits=3,group=32,search=rtn"])
def test_slim_pass_end_to_end(loaded, ids, text):
    qm = loaded("qwen2")
    rec = _run(qm, text, ids(8, 32))
    s, bits = rec[0]["summary"], int(text.split("bits=")[1][0])
    assert s["linears"] == 14 and s["avg_bits"] == bits
    assert s["mean_err_slim"] < s["mean_err_rtn"]
    for mod, q in qm.quant.items():
        r = q["weight"]
        assert r["method"] == "slim" and sum(r["group_bits"]) == bits * len(r["group_bits"])
        assert r["bits"] == max(max(r["group_bits"]), 2) and r["err_slim"] < r["err_rtn"]
        assert r.get("err_gptq", 1.0) >= r["err_slim"]  # search=gptq: never worse than uniform GPTQ
    lin = qm.linears(role="down", layer=1)[0]
    assert is_quantized(lin)
    w = dequantized_weight(qm, lin)
    assert w.shape == qm.store.spec(lin.args[1].args[0].target)[0]


@pytest.mark.parametrize("text, msg", [
    ("slim:bits=5", "bits=5 is outside 2..4"),
    ("slim:bits=1", "bits=1 is outside 2..4"),
    ("slim:group=0", "group=0 must be a positive group size"),
    ("slim:one_bit=maybe", "one_bit is sign|grid"),
    ("slim:sym=true,one_bit=grid", "sym with one_bit=grid"),
    ("slim:search=all", "search='all': use gptq or rtn"),
    ("billm:block=1", "block=1 must be >= 2"),
    ("billm:salient_frac=2", r"salient_frac must be in \[0, 1\]"),
    ("billm:propagate=sideways", "propagate='sideways'"),
    ("billm:damp=0", r"damp must be in \(0, 10\)"),
])
def test_bad_options_are_one_line_errors(text, msg):
    with pytest.raises(PtqcError, match=msg) as e:
        pipeline.parse_pipeline(text)
    assert "\n" not in str(e.value)


def test_slim_group_must_divide_inputs(loaded):
    with pytest.raises(PtqcError, match="group size 48 does not divide"):
        _run(loaded("qwen2"), "slim:group=48", torch.randint(0, 300, (2, 8)))
