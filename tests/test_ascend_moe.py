"""Ascend lowering of mixture-of-experts blocks: the kernels' emulations against their documented
semantics (quantized grouped matmuls against plain per-expert references), each rule on a hand-built
graph (numerics against the fake-quant ptqc.moe_* ops, refusals with reasons), and tiny Mixtral /
Qwen2-MoE / Qwen3-MoE / GLM-4.5 models (traced once per module) equal to their unlowered graphs,
float and quantized (weight-only, W8A8, the w4a8 preset), through artifacts and ``inspect --ops``."""
import json
import operator

import pytest
import torch
import torch.fx as fx
from click.testing import CliRunner

from make_tiny_model import make_model
from ptqc import artifact, frontend, ops, pipeline, quant
from ptqc.cli import main
from ptqc.errors import PtqcError
from ptqc.ir import QModel, execute, info
from ptqc.lowering.ascend import ops as npu
from ptqc.lowering.ascend.lower import Lowering, kernel_counts
from ptqc.model import WeightStore

from ascend_helpers import run

KERNELS = {npu.MOE_INIT_ROUTING_V2, npu.GROUPED_MATMUL, npu.SWIGLU, npu.MOE_FINALIZE_ROUTING}
MOE_LAYER = {"moe_gating": 1, "moe_init_routing": 1, "grouped_matmul": 2, "moe_finalize": 1}  # kernels per MoE layer


def targets(qm):
    return [n.target for n in qm.graph.nodes if n.op == "call_function"]


def lower(qm, **options) -> Lowering:
    lw = Lowering(qm, **options)
    lw.run()
    return lw


# ---- the kernels' emulations ------------------------------------------------------------------------
def test_init_routing_sorts_token_copies_expert_major_and_finalize_puts_them_back():
    x = torch.arange(12.0).reshape(3, 4)
    idx = torch.tensor([[1, 2], [0, 1], [0, 2]], dtype=torch.int32)  # pairs r = t * 2 + k: experts 1 2 0 1 0 2
    ex, row_idx, counts, _ = npu.moe_init_routing_v2(x, idx, active_num=6, expert_num=3, expert_tokens_num_type=1,
                                                     expert_tokens_num_flag=True, quant_mode=-1,
                                                     active_expert_range=[0, 3])
    assert torch.equal(ex, x[[1, 2, 0, 1, 0, 2]])  # expert 0: tokens 1, 2; expert 1: 0, 1; expert 2: 0, 2
    assert row_idx.tolist() == [2, 4, 0, 3, 1, 5] and counts.tolist() == [2, 2, 2] and counts.dtype == torch.int64
    cum = npu.moe_init_routing_v2(x, idx, expert_num=3, expert_tokens_num_type=0, quant_mode=-1)[2]
    assert cum.tolist() == [2, 4, 6]
    part = npu.moe_init_routing_v2(x, idx, expert_num=3, expert_tokens_num_type=1, quant_mode=-1,
                                   active_expert_range=[1, 3])
    assert part[2].tolist() == [2, 2] and torch.equal(part[0][:4], x[[0, 1, 0, 2]]) and not part[0][4:].any()
    w = torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, -1.0]])
    out = npu.moe_finalize_routing(ex, None, None, None, w, row_idx, None, 2)  # row-major pairs
    assert torch.equal(out, x * w.sum(1, keepdim=True))
    col = npu.moe_finalize_routing(ex, None, None, None, w, row_idx.reshape(3, 2).t().reshape(-1), None, 0)
    assert torch.equal(col, out)  # drop_pad_mode 0 reads the same pairs column-major (r = t + k * T)
    bias, skip = torch.randn(3, 4), torch.randn(3, 4)
    full = npu.moe_finalize_routing(ex, skip, None, bias, w, row_idx, idx, 2)
    assert torch.allclose(full, skip + out + (w.unsqueeze(-1) * bias[idx.long()]).sum(1))


def test_init_routing_dynamic_quant_mode_quantizes_each_copy_per_token():
    x, idx = torch.randn(5, 16), torch.randint(0, 4, (5, 2), dtype=torch.int32)
    smooth = torch.rand(4, 16) + 0.5
    ex, row_idx, _, s = npu.moe_init_routing_v2(x, idx, smooth, expert_num=4, expert_tokens_num_type=1, quant_mode=1)
    ref, _, _, _ = npu.moe_init_routing_v2(x, idx, expert_num=4, expert_tokens_num_type=1, quant_mode=-1)
    experts = torch.sort(idx.reshape(-1).long(), stable=True).values
    codes, scale = npu.dynamic_quant(ref * smooth[experts])
    assert ex.dtype == torch.int8 and torch.equal(ex, codes) and torch.equal(s, scale)


def test_grouped_matmul_splits_rows_by_group_list():
    x, w = torch.randn(7, 8), torch.randn(3, 8, 5)
    sizes = torch.tensor([3, 0, 4])
    want = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    assert torch.allclose(npu.grouped_matmul(x, w, sizes, group_list_type=1), want, atol=1e-6)
    assert torch.equal(npu.grouped_matmul(x, w, sizes.cumsum(0), group_list_type=0),
                       npu.grouped_matmul(x, w, sizes, group_list_type=1))
    b = torch.randn(3, 5)
    assert torch.allclose(npu.grouped_matmul(x, w, sizes, b, group_list_type=1)[3:], want[3:] + b[2], atol=1e-6)
    assert "at most 1024 groups" in npu.check_grouped_matmul(1025, 8, 8)
    assert torch.equal(npu.swiglu(torch.tensor([[1.0, -2.0, 3.0, 4.0]])),
                       torch.nn.functional.silu(torch.tensor([[1.0, -2.0]])) * torch.tensor([[3.0, 4.0]]))


def test_gating_kernels_follow_the_documented_routing():
    torch.manual_seed(0)
    x, bias = torch.randn(20, 16), torch.randn(16) * 0.3
    y, idx, scores = npu.moe_gating_top_k(x, 3, bias, 2, 4, 1, 0, 1, False, 2.5, 1e-20)
    w, ids = ops._moe_route(x, bias, 3, "sigmoid", True, 4, 2, 2.5)  # DeepSeek-V3: top-2-sum groups, renorm
    assert torch.equal(idx.long(), ids) and torch.equal(y, w) and idx.dtype == torch.int32
    assert torch.equal(scores, x.sigmoid())
    y0, idx0, _ = npu.moe_gating_top_k(x, 2, None, 1, 4, 0, 0, 0, False, 2.0)  # softmax, max-scored groups
    best = x.softmax(-1).view(20, 4, 4).amax(-1).argmax(-1)
    assert torch.equal(idx0.long() // 4, best.unsqueeze(-1).expand(20, 2))  # both from the best group
    assert torch.allclose(y0, x.softmax(-1).gather(1, idx0.long()) * 2.0)  # softmax: scaled, not renormalized
    ys, ids_s, row = npu.moe_gating_top_k_softmax(x, None, 2)
    assert torch.equal(ys, x.softmax(-1).topk(2).values) and row.tolist()[1] == [1, 21]
    assert "groups of more than 2 (8 experts in 4 groups)" in npu.check_moe_gating_top_k(8, 2, 4, 2)


def test_w8a8_grouped_matmul_is_the_dense_dynamic_int8_matmul_per_group():
    torch.manual_seed(0)
    xq, w = torch.randint(-127, 128, (9, 32), dtype=torch.int8), torch.randint(-127, 128, (3, 32, 16), dtype=torch.int8)
    ws, ts, sizes = torch.rand(3, 16) * 0.01, torch.rand(9) * 0.02, torch.tensor([4, 0, 5])
    got = npu.grouped_matmul(xq, w, sizes, None, ws, ts, 1, torch.float32)
    want = torch.cat([npu.quant_matmul(xq[:4], w[0], ws[0], None, ts[:4], None, torch.float32),
                      npu.quant_matmul(xq[4:], w[2], ws[2], None, ts[4:], None, torch.float32)])
    assert torch.equal(got, want)  # int32 accumulation, then * per-channel scale * per-token scale
    with pytest.raises(PtqcError, match="needs scale and per_token_scale"):
        npu.grouped_matmul(xq, w, sizes, group_list_type=1)


@pytest.mark.parametrize("bits, groups", [(8, 1), (4, 1), (4, 4)])
def test_antiquant_grouped_matmul_is_each_experts_dequantized_matmul(bits, groups):
    """A16W8 / A16W4 (int4 packed 8 per int32 along N): x_e @ ((w_e + offset_e) * scale_e), scale and
    offset [E, N] per channel or [E, G, N] per group, against ptqc.quant.dequantize per expert."""
    torch.manual_seed(0)
    e, k, n, sizes = 3, 32, 16, torch.tensor([4, 0, 5])
    x = torch.randn(9, k)
    codes = torch.randint(-(1 << bits - 1), 1 << bits - 1, (e, n, k), dtype=torch.int8)  # [E, out, in]
    s, zp = torch.rand(e, n, groups) * 0.1, torch.randint(-3, 4, (e, n, groups), dtype=torch.int8)
    kn = codes.transpose(1, 2).contiguous()
    w = npu.pack_int4x8(kn) if bits == 4 else kn
    assert w.dtype == (torch.int32 if bits == 4 else torch.int8)
    layout = (lambda t: t[..., 0]) if groups == 1 else (lambda t: t.transpose(1, 2))
    got = npu.grouped_matmul(x, w, sizes, None, None, None, 1, None, layout(s), layout(-zp.float()))
    group = 0 if groups == 1 else k // groups
    want = torch.cat([x[:4] @ quant.dequantize(codes[0], s[0], zp[0], group).t(),
                      x[4:] @ quant.dequantize(codes[2], s[2], zp[2], group).t()])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # float matmuls: summation order only


def test_a8w4_grouped_matmul_int_path_is_exact_and_its_bias_undoes_the_shift():
    """A8W4 (aclnnGroupedMatmulV5): ((x - 8) @ w * scale + bias) * per_token_scale with the offline
    bias 8 * sum_k(w * scale): with unit scales the int path is x @ w bit for bit; with real scales
    it is x @ (w * scale) * per_token_scale."""
    from ptqc.lowering.ascend.ops_moe import uint64_scale

    torch.manual_seed(0)
    e, k, n, sizes = 3, 32, 16, torch.tensor([4, 0, 5])
    x = torch.randint(-128, 128, (9, k), dtype=torch.int8)
    w = torch.randint(-8, 8, (e, k, n), dtype=torch.int8)
    packed, ones = npu.pack_int4x8(w), torch.ones(e, 1, n)
    bias = 8 * w.float().sum(1)
    got = npu.grouped_matmul(x, packed, sizes, bias, uint64_scale(ones), torch.ones(9), 1, torch.float32)
    want = torch.cat([x[:4].long() @ w[0].long(), x[4:].long() @ w[2].long()])
    assert torch.equal(got, want.float())
    s, ts = torch.rand(e, 1, n) * 0.01, torch.rand(9) * 0.02
    bias = 8 * (w.float() * s).sum(1)
    got = npu.grouped_matmul(x, packed, sizes, bias, uint64_scale(s), ts, 1, torch.float32)
    want = torch.cat([(x[:4].float() @ (w[0] * s[0])) * ts[:4, None], (x[4:].float() @ (w[2] * s[2])) * ts[4:, None]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(PtqcError, match="UINT64 scale and the float bias"):
        npu.grouped_matmul(x, packed, sizes, None, uint64_scale(s), ts, 1, torch.float32)


# ---- the rules on hand-built graphs -------------------------------------------------------------------
class Moe:
    """A hand-built MoE block: router linear -> moe_route -> moe_experts on stacks [E, out, in]."""

    def __init__(self, e=8, h=32, i=16, t=11):
        torch.manual_seed(0)
        self.g, self.store, self.e, self.h, self.i = fx.Graph(), WeightStore(), e, h, i
        self.inputs = {"x": torch.randn(t, h)}
        self.x = self.g.placeholder("x")

    def op(self, target, *args, role=None, **kwargs):
        n = self.g.call_function(target, args, kwargs)
        n.meta["ptqc"] = {"module": f"layers.0.mlp.{role}", "layer": 0, "role": role}
        return n

    def const(self, name, t):
        self.store[name] = t
        return self.g.get_attr(name)

    def model(self, bias=False, act="silu", **route) -> QModel:
        logits = self.op(ops.LINEAR, self.x, self.const("mlp.gate.weight", torch.randn(self.e, self.h)), None,
                         role="router")
        b = self.const("mlp.gate.e_score_correction_bias", torch.randn(self.e) * 0.1) if bias else None
        r = self.op(ops.MOE_ROUTE, logits, b, role="route", **{"top_k": 2, **route})
        w, ids = (self.op(operator.getitem, r, i) for i in (0, 1))
        stacks = [self.const(f"mlp.experts.{p}.weight", torch.randn(*s) * 0.2) for p, s in
                  (("gate_proj", (self.e, self.i, self.h)), ("up_proj", (self.e, self.i, self.h)),
                   ("down_proj", (self.e, self.h, self.i)))]
        self.g.output(self.op(ops.MOE_EXPERTS, self.x, w, ids, *stacks, role="experts", act=act))
        return QModel(graph=self.g, store=self.store, config=None)

    def run(self, qm):
        return execute(qm.graph, qm.store, self.inputs)


@pytest.mark.parametrize("route, kernel", [
    ({"scoring": "softmax", "norm_topk_prob": True, "weights_dtype": torch.float32}, npu.MOE_GATING_TOP_K_SOFTMAX),
    ({"scoring": "softmax", "scale": 1.5}, npu.MOE_GATING_TOP_K_SOFTMAX),
    ({"scoring": "sigmoid", "norm_topk_prob": True, "n_group": 2, "topk_group": 1, "scale": 2.5, "bias": True},
     npu.MOE_GATING_TOP_K),
    ({"scoring": "softmax", "norm_topk_prob": True, "n_group": 2, "topk_group": 1, "scale": 2.0}, npu.MOE_GATING_TOP_K),
])
def test_moe_route_and_float_experts_lower_exactly(route, kernel):
    t = Moe()
    route = dict(route)
    qm = t.model(bias=route.pop("bias", False), **route)
    ref = t.run(qm)
    assert lower(qm).fired == {"moe_route": 1, "moe_experts": 1}
    got = targets(qm)
    assert kernel in got and KERNELS <= set(got) and got.count(npu.GROUPED_MATMUL) == 2
    assert not {ops.MOE_ROUTE, ops.MOE_EXPERTS} & set(got)
    assert qm.store["mlp.experts.gate_up_proj.weight"].shape == (8, 32, 32)  # [E, 2I, H]
    torch.testing.assert_close(t.run(qm), ref, atol=1e-5, rtol=1e-5)
    assert kernel_counts(qm)[0] == {"standalone_quant": 0, "fused_quant": 0, "quant_matmul": 0,
                                    "weight_quant_matmul": 0, "cache_quant": 0, "attention": 0, **MOE_LAYER}


def test_routers_no_kernel_takes_stay_with_the_reason():
    t = Moe()
    qm = t.model(scoring="sigmoid", norm_topk_prob=False)
    ref = t.run(qm)
    lw = lower(qm, fallback=True)
    assert lw.refused == ["layers.0.mlp.route: npu_moe_gating_top_k always renormalizes sigmoid weights (y / sum y); "
                          "this router keeps them unnormalized (norm_topk_prob=false)"]
    assert ops.MOE_ROUTE in targets(qm) and npu.MOE_INIT_ROUTING_V2 in targets(qm)  # the experts still lower
    torch.testing.assert_close(t.run(qm), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(PtqcError, match=r"groups of more than 2 \(8 experts in 4 groups\).*fallback=true"):
        lower(Moe().model(scoring="sigmoid", norm_topk_prob=True, n_group=4, topk_group=2))


def test_experts_no_kernel_takes_stay_with_the_reason():
    t = Moe()
    qm = t.model(act="gelu")
    ref = t.run(qm)
    lw = lower(qm, fallback=True)
    assert lw.refused == ["layers.0.mlp.experts: npu_swiglu computes silu(gate) * up; experts with act='gelu' "
                          "have no kernel here"]
    assert ops.MOE_EXPERTS in targets(qm) and npu.MOE_GATING_TOP_K_SOFTMAX in targets(qm)  # int32 ids read fine
    torch.testing.assert_close(t.run(qm), ref, atol=1e-5, rtol=1e-5)


def quantized(t: "Moe", text: str, **route) -> QModel:
    """The hand-built block with ``text``'s passes run on it (fake-quant)."""
    qm = t.model(**{"scoring": "softmax", "norm_topk_prob": True, **route})
    for p in pipeline.parse_pipeline(text):
        p.run(qm, pipeline.PassContext(quiet=True))
    return qm


@pytest.mark.parametrize("text, rule, weight_dtype, operands", [
    ("rtn:bits=4,group=16,include=experts", "moe_experts_weight_only", torch.int32,
     {"antiquant_scale": (8, 2, 32), "antiquant_offset": (8, 2, 32)}),
    ("rtn:bits=8,group=0,sym=false,include=experts", "moe_experts_weight_only", torch.int8,
     {"antiquant_scale": (8, 32), "antiquant_offset": (8, 32)}),
    ("int8:include=experts", "moe_experts_w8a8", torch.int8, {"scale": (8, 32)}),
    ("w4a8:include=experts", "moe_experts_w4a8", torch.int32, {"scale": (8, 1, 32), "bias": (8, 32)}),
])
def test_quantized_experts_lower_to_grouped_matmuls_equal_to_fake_quant(text, rule, weight_dtype, operands):
    t = Moe()
    qm = quantized(t, text)
    ref = t.run(qm)
    assert lower(qm).fired == {"moe_route": 1, rule: 1}
    assert not {ops.MOE_EXPERTS, ops.QUANTIZE_ACT, ops.DEQUANTIZE_WEIGHT} & set(targets(qm))
    gu = {n.target.rsplit("gmm_", 1)[1]: qm.store[n.target] for n in qm.graph.nodes
          if n.op == "get_attr" and n.target.startswith("mlp.experts.gate_up_proj.gmm_")}
    assert gu.pop("weight").dtype == weight_dtype and {k: tuple(v.shape) for k, v in gu.items()} == operands
    torch.testing.assert_close(t.run(qm), ref, atol=1e-5, rtol=1e-5)  # float32: rounding differences only
    a8 = {"moe_dynamic_quant": 1} if "a8" in rule else {}
    assert {k: v for k, v in kernel_counts(qm)[0].items() if v} == {**MOE_LAYER, **a8}


@pytest.mark.parametrize("text, why", [
    ("w4a4:include=experts", r"lower with float stacks, weight-only stacks, or int8 dynamic symmetric per-token "
     r"inputs .* \(got x int4 group 0, down_act_bits=4, stacks int4\)"),
    ("rtn:bits=8,group=16,include=experts", r"gate_proj: npu_grouped_matmul takes int8 expert weights per channel "
     r"only \(group 16\)"),
    ("rtn:bits=4,group=16,include=experts,w4a8:include=experts", r"gate_proj: W4A8 experts need symmetric "
     r"per-channel weights"),
])
def test_quantized_experts_no_kernel_takes_stay_with_the_reason(text, why):
    t = Moe()
    qm = quantized(t, text)
    with pytest.raises(PtqcError, match=why):
        lower(qm.clone())
    ref = t.run(qm)
    lw = lower(qm, fallback=True)  # the experts and their input quantizer stay fake-quant ops
    assert lw.fired["moe_experts_unsupported" if "w4a4" in text else "moe_experts_weight_only" if "w4a8" not in text
                    else "moe_experts_w4a8"] == 1 and len(lw.refused) == 1
    assert ops.MOE_EXPERTS in targets(qm) and npu.MOE_GATING_TOP_K_SOFTMAX in targets(qm)
    torch.testing.assert_close(t.run(qm), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, n_group", [("mixtral", 1), ("qwen2_moe", 1), ("qwen3_moe", 1), ("glm4_moe", 4),
                                           ("glm4_moe", 2)])
def test_each_familys_router_lowers_as_its_frontend_traces_it(arch, n_group):
    """The route arguments ptqc.moe gives each family's transformers router (built on the meta
    device, not traced) lower exactly, or stay with the reason (GLM's 2 experts per group)."""
    from make_tiny_model import make_config
    from transformers import AutoModelForCausalLM

    from ptqc import moe

    cfg = make_config(arch, 2, 64, 128, 4, 2, 300, False, None)
    cfg.n_group, cfg.topk_group = n_group, 1 if n_group == 2 else 2
    with torch.device("meta"):
        router = next(m.gate for m in AutoModelForCausalLM.from_config(cfg).modules() if moe._is_moe_block(m))
    route, _ = moe._route_of(router)
    t = Moe(e=router.weight.shape[0])
    qm = t.model(bias=hasattr(router, "e_score_correction_bias"), **route)
    ref = t.run(qm)
    lw = lower(qm, fallback=True)
    torch.testing.assert_close(t.run(qm), ref, atol=1e-5, rtol=1e-5)
    assert lw.fired == {"moe_route": 1, "moe_experts": 1} and ops.MOE_EXPERTS not in targets(qm)
    kept = ["layers.0.mlp.route: npu_moe_gating_top_k needs the experts to split evenly into groups of more than 2 "
            "(8 experts in 4 groups)"] if n_group == 4 else []
    assert lw.refused == kept
    assert (ops.MOE_ROUTE in targets(qm)) == bool(kept)


# ---- a tiny Qwen3-MoE, traced once per module ---------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    """The canonical graph of a tiny random Qwen3-MoE (2 layers, 8 experts top-2); tests .clone() it."""
    return frontend.load(make_model(tmp_path_factory.mktemp("moe") / "q3", "qwen3_moe", layers=2, hidden=64,
                                    intermediate=128, seed=2))


def test_tiny_qwen3_moe_lowered_equals_its_graph(qwen3_moe, ids):
    qm = qwen3_moe.clone()
    x = ids(3, 19)
    ref = qm(x)
    lw = lower(qm)
    torch.testing.assert_close(qm(x), ref, atol=1e-5, rtol=1e-5)
    assert [k for k, c in kernel_counts(qm).items() if c.get("grouped_matmul") == 2] == [0, 1]
    assert lw.fired["moe_experts"] == lw.fired["moe_route"] == 2 and not lw.refused
    assert ops.MOE_EXPERTS not in targets(qm)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("text, rule", [("rtn:bits=4,group=32,pack", "moe_experts_weight_only"),
                                        ("int8,pack", "moe_experts_w8a8"), ("w4a8:include=experts,pack", "moe_experts_w4a8")])
def test_tiny_qwen3_moe_quantized_lowered_logits_equal_fake_quant(qwen3_moe, ids, text, rule):
    """Every linear and expert stack quantized (W4A8: the experts; dense W4A8 lowers weight-only, as
    vllm-ascend serves it, so not equal to its fake-quant), packed as compile packs them, lowered: the
    logits of the emulated kernels equal the fake-quant graph's."""
    qm = qwen3_moe.clone()
    run(qm, text)
    x = ids(2, 17)
    ref = qm(x)
    lw = lower(qm, fallback=True)
    assert lw.fired[rule] == 2
    assert not lw.refused
    assert _rel(qm(x), ref) < 1e-5


def test_w4a8_preset_quantizes_every_expert_stack_int4_and_its_inputs_int8(qwen3_moe):
    qm = qwen3_moe.clone()
    summary = run(qm, "w4a8")[0]["summary"]
    for x in qm.nodes(ops.MOE_EXPERTS):
        q = info(x)["quant"]
        w4 = {"method": "w4a8", "bits": 4, "group": 0, "sym": True}
        assert q["gate_proj"] == q["up_proj"] == q["down_proj"] == w4
        assert q["input"] == q["down_input"] == {"bits": 8, "group": 0, "sym": True, "method": "dynamic"}
        assert x.kwargs["down_act_bits"] == 8 and x.args[0].target == ops.QUANTIZE_ACT and x.args[0].args[3] == 8
    assert summary["expert_inputs"] == 2 and summary["weights_quantized"] == 2 * 3 + 2 * 4  # stacks + attention


def test_lowered_moe_artifacts_round_trip_and_inspect_ops_counts_moe_kernels(qwen3_moe, ids, tmp_path):
    qm = qwen3_moe.clone()
    run(qm, "int8")
    artifact.save(qm, tmp_path / "fq")
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "fq"), "--ops", "--format", "json"], catch_exceptions=False)
    moe = {"moe_gating": 1, "moe_init_routing": 1, "grouped_matmul": 2, "moe_dynamic_quant": 1, "moe_finalize": 1}
    assert [{k: r[k] for k in moe} for r in json.loads(r.output)] == [moe, moe]  # lowered in memory (fused)
    x = ids(2, 9)
    ref = qm(x)
    run(qm, "ascend")
    artifact.save(qm, tmp_path / "low")
    torch.testing.assert_close(artifact.load(tmp_path / "low")(x), ref, atol=1e-4, rtol=1e-4)
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "low"), "--ops"], catch_exceptions=False)
    head, *rows = (line.split() for line in r.output.strip().splitlines()[1:])
    assert head[-5:] == list(moe) and [r[-5:] for r in rows] == [["1", "1", "2", "1", "1"]] * 2


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "glm4_moe", "deepseek_v3"])
def test_each_moe_family_quantized_lowers_to_its_fake_quant(tmp_path, ids, arch):
    """Beyond Qwen3-MoE: weight-only experts lower exactly (1e-5); W8A8 within int8 rounding-flip noise
    (a flipped code in one layer's per-token quantization moves the tiny models' logits by up to ~6e-3)."""
    base = frontend.load(make_model(tmp_path / arch, arch, layers=2, hidden=64, intermediate=128, seed=5))
    x = ids(2, 17)
    for text, bound in (("rtn:bits=4,group=8,pack", 1e-5), ("int8,pack", 1e-2)):
        qm = base.clone()
        run(qm, text)
        ref = qm(x)
        lw = lower(qm, fallback=True)
        assert any(k.startswith("moe_experts_") for k in lw.fired), lw.fired
        assert ops.MOE_EXPERTS not in targets(qm)
        assert _rel(qm(x), ref) < bound, (text, _rel(qm(x), ref))
