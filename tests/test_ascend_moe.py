"""Ascend lowering of mixture-of-experts blocks: the kernels' emulations against their documented
semantics, each rule on a hand-built graph (numerics against the ptqc.moe_* ops, refusals with
reasons), and tiny Mixtral / Qwen2-MoE / Qwen3-MoE / GLM-4.5 models equal to their unlowered graphs."""
import json
import operator

import pytest
import torch
import torch.fx as fx
from click.testing import CliRunner

from make_tiny_model import make_model
from ptqc import artifact, frontend, ops
from ptqc.cli import main
from ptqc.errors import PtqcError
from ptqc.ir import QModel, execute
from ptqc.lowering.ascend import ops as npu
from ptqc.lowering.ascend.lower import Lowering, kernel_counts
from ptqc.model import WeightStore

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe")
KERNELS = {npu.MOE_INIT_ROUTING_V2, npu.GROUPED_MATMUL, npu.SWIGLU, npu.MOE_FINALIZE_ROUTING}


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
                                    "weight_quant_matmul": 0, "cache_quant": 0, "attention": 0,
                                    "moe_routing": 3, "grouped_matmul": 2}


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


# ---- tiny models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {a: make_model(root / a, a, layers=2, hidden=64, intermediate=128, seed=i) for i, a in enumerate(ARCHS)}
    glm = make_model(root / "glm_g2", "glm4_moe", layers=2, hidden=64, intermediate=128, seed=7)
    cfg = json.loads((glm / "config.json").read_text())
    (glm / "config.json").write_text(json.dumps({**cfg, "n_group": 2, "topk_group": 1}))  # 4 experts per group
    out["glm4_moe_g2"] = glm
    return out


@pytest.mark.parametrize("arch", [*ARCHS, "glm4_moe_g2"])
def test_tiny_models_lowered_equal_their_graphs(moe_models, ids, arch):
    qm = frontend.load(moe_models[arch])
    x = ids(3, 19)
    ref = qm(x)
    lw = lower(qm, fallback=True)
    torch.testing.assert_close(qm(x), ref, atol=1e-5, rtol=1e-5)
    moe_layers = [k for k, c in kernel_counts(qm).items() if "grouped_matmul" in c]
    assert moe_layers == ([1] if arch.startswith(("qwen2_moe", "glm")) else [0, 1])
    assert lw.fired["moe_experts"] == lw.fired["moe_route"] == len(moe_layers)
    kept = ["model.layers.1.mlp.gate: npu_moe_gating_top_k needs the experts to split evenly into groups of more "
            "than 2 (8 experts in 4 groups)"] if arch == "glm4_moe" else []
    assert lw.refused == kept  # the tiny GLM's 2 experts per group: its router stays ptqc.moe_route
    assert ops.MOE_EXPERTS not in targets(qm)


def test_lowered_moe_artifact_round_trip_and_inspect_ops(moe_models, ids, tmp_path):
    out = tmp_path / "low"
    r = CliRunner().invoke(main, ["compile", str(moe_models["qwen2_moe"]), "-o", str(out), "--passes", "ascend", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    x = ids(2, 9)
    want = frontend.load(moe_models["qwen2_moe"])(x)
    torch.testing.assert_close(artifact.load(out)(x), want, atol=1e-5, rtol=1e-5)
    r = CliRunner().invoke(main, ["inspect", str(out), "--ops", "--format", "json"], catch_exceptions=False)
    rows = json.loads(r.output)
    assert [(x["moe_routing"], x["grouped_matmul"]) for x in rows] == [(0, 0), (3, 2)]  # layer 0 is dense
    r = CliRunner().invoke(main, ["inspect", str(moe_models["mixtral"]), "--ops"], catch_exceptions=False)
    assert "moe_routing" in r.output and "grouped_matmul" in r.output


# ---- W8A8 dynamic experts (the kernels; the quantized moe_experts form and its rule come later) ------------
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


def test_w8a8_dynamic_expert_chain_matches_fake_quant():
    """init_routing (quant_mode 1: per-token int8 of each token copy) -> int8 grouped matmul gate|up
    -> swiglu -> dynamic_quant -> int8 grouped matmul down -> finalize, against fake-quant experts."""
    from ptqc import quant

    torch.manual_seed(0)
    t, h, i, e = 13, 32, 16, 4
    x = torch.randn(t, h)
    w, ids, _ = npu.moe_gating_top_k_softmax(torch.randn(t, e), None, 2)
    codes = {p: torch.randint(-127, 128, s, dtype=torch.int8) for p, s in (("gate", (e, i, h)), ("up", (e, i, h)),
                                                                           ("down", (e, h, i)))}
    scales = {p: torch.rand(e, c.shape[1]) * 0.01 + 1e-3 for p, c in codes.items()}  # per channel [E, out]
    ex, row_idx, counts, xs = npu.moe_init_routing_v2(x, ids, expert_num=e, expert_tokens_num_type=1, quant_mode=1,
                                                      active_expert_range=[0, e])
    gu = torch.cat([codes["gate"], codes["up"]], 1).transpose(1, 2)
    y = npu.grouped_matmul(ex, gu, counts, None, torch.cat([scales["gate"], scales["up"]], 1), xs, 1, torch.float32)
    hq, hs = npu.dynamic_quant(npu.swiglu(y))
    d = npu.grouped_matmul(hq, codes["down"].transpose(1, 2), counts, None, scales["down"], hs, 1, torch.float32)
    out = npu.moe_finalize_routing(d, None, None, None, w, row_idx, None, 2)

    fq = lambda v: quant.fake_quant_act(v, None, None, quant.QuantSpec(8, 0, True))  # noqa: E731
    dq = {p: codes[p].float() * scales[p].unsqueeze(-1) for p in codes}
    ref, first = torch.zeros(t, h), torch.zeros(t, 2 * i)
    for tok, k in ((a, b) for a in range(t) for b in range(2)):
        j = int(ids[tok, k])
        a = fq(x[tok:tok + 1])
        g, u = a @ dq["gate"][j].t(), a @ dq["up"][j].t()
        first[tok] = torch.cat([g, u], 1)[0] if k == 0 else first[tok]
        ref[tok] += w[tok, k] * (fq(torch.nn.functional.silu(g) * u) @ dq["down"][j].t())[0]
    rows0 = row_idx.reshape(t, 2)[:, 0].long()  # each token's first copy
    torch.testing.assert_close(y[rows0], first, atol=1e-5, rtol=1e-5)  # same codes: int32 vs float sums only
    assert ((out - ref).norm() / ref.norm()).item() < 5e-3  # the intermediate's rounding may flip a code
