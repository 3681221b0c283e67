"""Ascend attention: npu_fused_infer_attention_score (float and int8 KV cache through antiquant),
the softmax kernels, their lowering from ptqc.attention, and the C8 (int8 KV cache) export."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptqc import ops
from ptqc.errors import PtqcError
from ptqc.lowering.ascend import export as ax
from ptqc.lowering.ascend import ops as npu
from ptqc.lowering.ascend.lower import kernel_counts
from ascend_helpers import rel as _rel, run as _run, targets as _targets


MASK = torch.ones(npu.FIA_MASK, npu.FIA_MASK, dtype=torch.bool).triu(1)


def _reference(q, k, v, scale, keep):
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = (q.double() @ k.transpose(-2, -1)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


# ---- the ops --------------------------------------------------------------------------------------
def test_fia_float_causal_gqa_and_band_follow_the_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    y = npu.fused_infer_attention_score(q, k, v, MASK, None, None, 4, 2, 0.25, sparse_mode=3)
    assert torch.allclose(y.double(), _reference(q, k, v, 0.25, j <= i), atol=1e-6)
    y = npu.fused_infer_attention_score(q, k, v, MASK, None, None, 4, 2, 0.25, 2, 0, sparse_mode=4)
    assert torch.allclose(y.double(), _reference(q, k, v, 0.25, (j <= i) & (j >= i - 2)), atol=1e-6)
    y = npu.fused_infer_attention_score(q, k, v, None, None, None, 4, 2, 0.25)  # sparse 0 without mask: all
    assert torch.allclose(y.double(), _reference(q, k, v, 0.25, torch.ones(9, 9, dtype=torch.bool)), atol=1e-6)
    # right-down causal with a longer cache: the last query sees every key
    kl, vl = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    y = npu.fused_infer_attention_score(q, kl, vl, MASK, None, None, 4, 2, 0.25, sparse_mode=3)
    j = torch.arange(12)[None, :]
    assert torch.allclose(y.double(), _reference(q, kl, vl, 0.25, j <= i + 3), atol=1e-6)


def test_fia_int8_cache_dequantizes_with_added_offset_per_channel_and_per_tensor():
    torch.manual_seed(1)
    q = torch.randn(1, 4, 5, 8)
    kc = torch.randint(-128, 128, (1, 2, 5, 8), dtype=torch.int8)
    vc = torch.randint(-128, 128, (1, 2, 5, 8), dtype=torch.int8)
    scale = torch.rand(2, 2, 1, 8) * 0.02 + 0.001
    offset = torch.randint(-5, 6, (2, 2, 1, 8)).float()
    keep = torch.arange(5)[None, :] <= torch.arange(5)[:, None]
    y = npu.fused_infer_attention_score(q, kc, vc, MASK, scale, offset, 4, 2, 0.3, sparse_mode=3)
    k = (kc.float() + offset[0]) * scale[0]  # offset ADDED, then scaled
    v = (vc.float() + offset[1]) * scale[1]
    assert torch.allclose(y.double(), _reference(q, k, v, 0.3, keep), atol=1e-6)
    s2 = torch.tensor([0.01, 0.02])  # per tensor, symmetric
    y = npu.fused_infer_attention_score(q, kc, vc, MASK, s2, None, 4, 2, 0.3, sparse_mode=3)
    assert torch.allclose(y.double(), _reference(q, kc.float() * 0.01, vc.float() * 0.02, 0.3, keep), atol=1e-6)


def test_fia_refuses_what_the_kernel_rejects():
    q, k = torch.randn(1, 4, 5, 8), torch.randint(-8, 8, (1, 2, 5, 8), dtype=torch.int8)
    with pytest.raises(PtqcError, match="antiquant_scale must be"):
        npu.fused_infer_attention_score(q, k, k, MASK, torch.ones(2, 8), None, 4, 2, 1.0, sparse_mode=3)
    with pytest.raises(PtqcError, match="query's dtype"):
        npu.fused_infer_attention_score(q, k, k, MASK, torch.ones(2, dtype=torch.float16), None, 4, 2, 1.0,
                                        sparse_mode=3)
    with pytest.raises(PtqcError, match="optimized"):
        npu.fused_infer_attention_score(q, k.float(), k.float(), None, None, None, 4, 2, 1.0, sparse_mode=3)
    assert "ratio" in npu.check_fused_infer_attention(130, 2, 64)
    assert "head_dim <= 512" in npu.check_fused_infer_attention(8, 8, 576)


def test_dropout_with_add_softmax_formula_and_limits():
    torch.manual_seed(2)
    x, x1 = torch.randn(4, 8, 128, 128), torch.randn(4, 8, 128, 128)
    mask, soft, out = npu.dropout_with_add_softmax(x, x1, 0.5, 0.0, -1)
    assert torch.allclose(out, torch.softmax(x1 + 0.5 * x, -1), atol=1e-6) and torch.equal(soft, out)
    assert "H and W in" in npu.check_dropout_with_add_softmax((4, 8, 96, 96))
    assert "N * C divisible by 32" in npu.check_dropout_with_add_softmax((1, 4, 128, 128))
    with pytest.raises(PtqcError, match="prob must be 0"):
        npu.dropout_with_add_softmax(x, x1, 0.5, 0.1, -1)


# ---- lowering ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fia", "softmax"])
def test_float_attention_lowers_and_matches(loaded, ids, mode):
    qm = loaded("qwen2")
    x = ids(2, 64)
    ref = qm(x)
    _run(qm, f"ascend:attention={mode}")
    assert ops.ATTENTION not in _targets(qm)
    kernel = npu.FUSED_INFER_ATTENTION_SCORE if mode == "fia" else npu.SCALED_MASKED_SOFTMAX
    assert _targets(qm).count(kernel) == qm.num_layers
    if mode == "softmax":  # one causal mask, built once and read by every layer
        assert _targets(qm).count(torch.ops.aten.triu.default) == 1
    assert all(c["attention"] == 1 for c in kernel_counts(qm).values())
    y = qm(x)
    assert _rel(y, ref) < 1e-5
    if mode == "fia":  # float32: the emulation computes what ptqc.attention computes, bit for bit
        assert torch.equal(y, ref)


def test_add_softmax_lowering_matches_at_a_kernel_shape(loaded, ids):
    qm = loaded("qwen2")  # 4 heads: batch 8 makes N * C = 32
    x = ids(8, 128)
    ref = qm(x)
    _run(qm, "ascend:attention=add_softmax,seqlen=128")
    assert npu.DROPOUT_WITH_ADD_SOFTMAX in _targets(qm)
    assert _rel(qm(x), ref) < 1e-5
    with pytest.raises(PtqcError, match="H and W in"):
        qm(ids(8, 64))  # the kernel's shape limits hold at run time too


def test_sliding_window_lowers_to_a_band_and_softmax_refuses_it(loaded, ids):
    qm = loaded("mistral")  # sliding window 8
    x = ids(2, 24)
    ref = qm(x)
    low = qm.clone()
    _run(low, "ascend")
    fia = [n for n in low.graph.nodes if n.target == npu.FUSED_INFER_ATTENTION_SCORE]
    assert fia and all(n.args[12] == 4 and n.args[9] == 7 and n.args[10] == 0 for n in fia)
    assert _rel(low(x), ref) < 1e-5
    with pytest.raises(PtqcError, match="without a sliding window only"):
        _run(qm.clone(), "ascend:attention=softmax")


def test_softmax_lowering_checks_the_known_seqlen(loaded):
    with pytest.raises(PtqcError, match=r"multiples of 32 \(H=40\)"):
        _run(loaded("qwen2"), "ascend:attention=softmax,seqlen=40")
    qm = loaded("qwen2")
    r = _run(qm, "ascend:attention=softmax,seqlen=40,fallback=true")
    assert ops.ATTENTION in _targets(qm)  # kept, and said why
    assert any("multiples of 32" in w for w in r[-1]["summary"]["refused"])


@pytest.fixture(scope="module")
def kv8(loaded):
    torch.manual_seed(0)
    calib = torch.randint(0, 300, (4, 32))
    out = {}
    for name, text in (("channel", "int8,kv:k=channel,v=channel"), ("kvonly", "kv:k=channel,v=tensor,sym=false"),
                       ("dynamic", "int8,kv")):
        qm = loaded("qwen2")
        _run(qm, text, calib)
        out[name] = qm
    return out


def test_kv8_lowers_to_cache_quantize_and_fia_with_antiquant(kv8, ids):
    qm = kv8["channel"]
    x = ids(2, 64)
    ref = qm(x)
    low = qm.clone()
    _run(low, "ascend")
    fia = [n for n in low.graph.nodes if n.target == npu.FUSED_INFER_ATTENTION_SCORE]
    assert len(fia) == qm.num_layers and all(n.args[4] is not None for n in fia)
    sc = low.store[fia[0].args[4].target]
    hkv, _, d = qm.store["model.layers.0.self_attn.k_scale"].shape
    assert sc.shape == (2, hkv, 1, d) and sc.dtype == torch.float32  # (2, KV_N, 1, D) in the query's dtype
    counts = kernel_counts(low)
    assert all(c["cache_quant"] == 2 and c["attention"] == 1 for c in counts.values())
    assert counts[1]["standalone_quant"] == 1  # the cache writes are not counted as activation quants
    # the int8 cache holds the fake-quant codes exactly (layer 0: identical inputs)
    att = next(n for n in qm.graph.nodes if n.target == ops.ATTENTION)
    kq = att.args[1]
    vals = {}
    from ptqc.ir import execute

    inp = next(n for n in qm.graph.nodes if n.op == "placeholder").name
    execute(qm.graph, qm.store, {inp: x}, hook=lambda n, v: vals.__setitem__(n.name, v))
    want = torch.clamp(torch.round(vals[kq.args[0].name] / qm.store[kq.args[1].target]), -128, 127)
    lvals = {}
    execute(low.graph, low.store, {inp: x}, hook=lambda n, v: lvals.__setitem__(n.name, v))
    got = lvals[fia[0].args[1].name]
    assert got.dtype == torch.int8 and torch.equal(got.float(), want)
    assert _rel(low(x), ref) < 5e-3  # W8A8 lowering noise: float-order differences flip a few codes


def test_kv8_alone_is_exact_per_tensor_and_asymmetric(kv8, ids):
    qm = kv8["kvonly"].clone()
    x = ids(2, 64)
    ref = qm(x)
    _run(qm, "ascend")
    assert npu.FUSED_INFER_ATTENTION_SCORE in _targets(qm)
    assert _rel(qm(x), ref) < 1e-5


def test_dynamic_kv_cache_is_refused_with_the_reason_or_kept(kv8):
    with pytest.raises(PtqcError, match="per-token .dynamic. KV8 cache only when decoding"):
        _run(kv8["dynamic"].clone(), "ascend")
    low = kv8["dynamic"].clone()
    _run(low, "ascend:fallback=true")
    assert ops.ATTENTION in _targets(low) and npu.QUANT_MATMUL in _targets(low)


# ---- C8 export (vllm-ascend loads C8 for Qwen3, not Qwen2: tests/test_vllm_ascend_load.py) -------
@pytest.fixture(scope="module")
def c8(tmp_path_factory):
    from make_tiny_model import make_model

    from ptqc import frontend

    torch.manual_seed(0)
    calib = torch.randint(0, 300, (4, 32))
    base = frontend.load(make_model(tmp_path_factory.mktemp("qwen3"), "qwen3", layers=2), "float16")
    out = {}
    for name, text in (("channel", "int8,kv:k=channel,v=channel"), ("kvonly", "kv:k=channel,v=tensor,sym=false")):
        out[name] = base.clone()
        _run(out[name], text, calib)
    return out


def test_c8_export_tensors_check_and_round_trip(c8, ids, tmp_path):
    for name in ("channel", "kvonly"):
        qm = c8[name]
        out = tmp_path / name
        res = ax.export(qm, out)
        assert res["kv_cache_type"] == "C8" and ax.check(out) == []
        desc = json.loads((out / ax.DESCRIPTION).read_text())
        t = load_file(str(next(out.glob("quant_model_weight*.safetensors"))))
        base = "model.layers.1.self_attn"
        for which in ("k", "v"):
            s = t[f"{base}.{which}_proj.kv_cache_scale"]
            assert s.shape == t[f"{base}.{which}_proj.weight"].shape[:1] and s.dtype == torch.float32
            assert desc[f"{base}.{which}_proj.kv_cache_offset"] == "C8"
            want = qm.store[f"{base}.{which}_scale"].expand(*qm.store[f"{base}.k_scale"].shape).reshape(-1)
            assert torch.equal(s, want)
        assert f"{base}.k_scale" not in desc  # replaced by the C8 tensors
        x = ids(2, 32)
        assert torch.equal(ax.load(out, "float16")(x), qm(x))


def test_c8_checker_catches_broken_exports(c8, tmp_path):
    good = tmp_path / "good"
    ax.export(c8["channel"], good)
    wfile = next(good.glob("quant_model_weight*.safetensors"))
    base = "model.layers.0.self_attn"

    def broken(name, edit_t=None, edit_d=None):
        import shutil

        d = tmp_path / name
        shutil.copytree(good, d)
        t = load_file(str(d / wfile.name))
        desc = json.loads((d / ax.DESCRIPTION).read_text())
        if edit_t:
            edit_t(t)
        if edit_d:
            edit_d(desc)
        save_file(t, str(d / wfile.name))
        (d / ax.DESCRIPTION).write_text(json.dumps(desc))
        return ax.check(d)

    def drop_v(t):
        del t[f"{base}.v_proj.kv_cache_scale"]

    def drop_v_desc(d):
        del d[f"{base}.v_proj.kv_cache_scale"]

    p = broken("missing", drop_v, drop_v_desc)
    assert any("v_proj.kv_cache_scale, which is missing" in x for x in p)

    def short(t):
        t[f"{base}.k_proj.kv_cache_scale"] = t[f"{base}.k_proj.kv_cache_scale"][:5].clone()

    n = c8["channel"].store[f"{base}.k_scale"].numel()
    assert any(f"expected a float vector [{n}]" in x for x in broken("shape", short))

    def no_type(d):
        del d["kv_cache_type"]

    assert any('no kv_cache_type "C8"' in x for x in broken("notype", edit_d=no_type))


def test_dynamic_kv_is_not_exported_as_c8_and_says_why(kv8, tmp_path):
    res = ax.export(kv8["dynamic"], tmp_path / "d", dtype="float16")
    assert "kv_cache_type" not in res and "found dynamic v" in res["optional"]["kv_cache"]
    assert ax.check(tmp_path / "d") == []


# ---- the real peer: an msModelSlim W8A8 + C8 export (tests/data, see its README) ---------------------
PEER_C8 = __import__("pathlib").Path(__file__).parent / "data" / "msmodelslim-w8a8c8-qwen2"


def test_msmodelslim_c8_export_checks_loads_lowers_and_reexports_bit_for_bit(tmp_path):
    assert ax.check(PEER_C8) == ["C8 does not load for model_type 'qwen2' in vllm-ascend 0.23 (its C8 weights load "
                                 "only for qwen3, glm4_moe, minimax_m2: a KeyError on qkv_proj.kv_cache_offset)"]
    qm = ax.load(PEER_C8)
    kv = [n for n in qm.graph.nodes if n.target == ops.QUANTIZE_ACT and n.meta["ptqc"]["role"].endswith("cache_quant")]
    assert len(kv) == 2 * qm.num_layers and all(n.args[1] is not None for n in kv)  # static K and V
    peer = load_file(str(PEER_C8 / "quant_model_weight_w8a8-00001-of-00001.safetensors"))
    k0 = next(n for n in kv if n.meta["ptqc"]["module"] == "model.layers.0.self_attn" and n.args[0] is not None
              and n.meta["ptqc"]["role"] == "k_cache_quant")
    assert torch.equal(qm.store[k0.args[1].target].reshape(-1), peer["model.layers.0.self_attn.k_proj.kv_cache_scale"])
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 64))
    ref = qm(x)
    low = qm.clone()
    _run(low, "ascend:truncate=false,int_bias=false")  # exact up to float order: int8 cache + FIA antiquant
    assert _targets(low).count(npu.FUSED_INFER_ATTENTION_SCORE) == qm.num_layers
    assert _rel(low(x), ref) < 1e-5
    with pytest.raises(PtqcError, match="C8 .* does not load for model_type 'qwen2'"):
        ax.export(qm, tmp_path / "again", dtype="float16")  # msModelSlim writes it, vllm-ascend's Qwen2 cannot load it
    qm.config.model_type = "qwen3"  # to compare the tensors the writer gives with the peer's
    ax.export(qm, tmp_path / "again", dtype="float16")  # the peer's int64 deq_scale is the float16 form
    mine = load_file(str(next((tmp_path / "again").glob("quant_model_weight*.safetensors"))))
    desc = json.loads((PEER_C8 / ax.DESCRIPTION).read_text())
    assert sorted(mine) == sorted(peer)
    for k in peer:  # input_offset: int8, the dtype of vllm-ascend's parameter (msModelSlim: float32)
        want = torch.int8 if k.endswith(".input_offset") else torch.float16 if desc[k] == "FLOAT" else peer[k].dtype
        assert mine[k].dtype == want, k  # float tensors in the serving dtype (the peer's model is float32)
        assert torch.equal(mine[k], peer[k].to(want)), k
    d_peer = json.loads((PEER_C8 / ax.DESCRIPTION).read_text())
    d_mine = json.loads((tmp_path / "again" / ax.DESCRIPTION).read_text())
    assert all(d_mine.get(k) == v for k, v in d_peer.items())


def test_softmax_mode_picks_the_fused_add_softmax_where_shapes_allow(loaded):
    qm = loaded("qwen2")  # 4 heads: N * C % 32 depends on the batch, so the plain kernel is kept
    _run(qm, "ascend:attention=softmax,seqlen=128")
    assert npu.SCALED_MASKED_SOFTMAX in _targets(qm) and npu.DROPOUT_WITH_ADD_SOFTMAX not in _targets(qm)
    from ptqc.lowering.ascend.lower import Lowering

    low = Lowering(loaded("qwen2"), attention="softmax", seqlen=128)
    for n in low.g.nodes:  # pretend 32 heads: any batch then satisfies N * C % 32
        if n.target == ops.ATTENTION:
            n.args[0].meta["shape"] = [1, 32, 128, 16]
    low.run_phase("attention")
    assert any(n.target == npu.DROPOUT_WITH_ADD_SOFTMAX for n in low.g.nodes)
