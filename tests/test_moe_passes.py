"""Weight passes on MoE expert stacks: rtn, gptq (per-expert Hessians of the routed rows) and int8
quantize every stack per expert; passes that cannot are refused; artifacts split per expert."""
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from make_tiny_model import make_model
from ptqc import artifact, experts, frontend, ops, quant
from ptqc.errors import PtqcError
from ptqc.moe_calib import ExpertHessians
from ptqc.patterns import activation_input, skip_transparent
from ptqc.pipeline import PassContext, PassManager, parse_pipeline
from ptqc.weights import dequantized_weight, is_quantized, weight_of

ARCHS = ("mixtral", "qwen3_moe", "glm4_moe")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_passes")
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = frontend.load(make_model(root / arch, arch, layers=2, hidden=64, intermediate=128,
                                                   seed=ARCHS.index(arch)))
        return cache[arch].clone()
    return get


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))


def run(qm, pipeline, calib=None):
    PassManager(parse_pipeline(pipeline)).run(qm, PassContext(quiet=True, calib=calib))
    return qm.history[-1]["summary"] if qm.history else None


def routed_counts(qm, ids) -> dict:
    """{experts module: tokens routed to each expert} of the model as it is, on ``ids``."""
    seen, out = {}, {}

    def hook(n, y):
        seen[n.name] = y
        if n.target == ops.MOE_EXPERTS:
            out[n.meta["ptqc"]["module"]] = torch.bincount(seen[n.args[2].name].reshape(-1), minlength=8).tolist()
    with torch.no_grad():
        qm(ids, hook=hook)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pipeline", ["rtn:bits=4,group=32", "gptq:bits=4,group=32", "int8"])
def test_every_expert_stack_is_quantized(moe, calib, arch, pipeline):
    qm = moe(arch)
    stacks = experts.sites(qm)
    assert len(stacks) == 3 * len(list(qm.nodes(ops.MOE_EXPERTS))) >= 3
    run(qm, pipeline, calib)
    assert all(is_quantized(s) for s in stacks)
    for s in stacks:
        rec = qm.quant[s.module]["weight"]
        assert rec["method"] == pipeline.split(":")[0] and rec["scale_shape"][0] == qm.store.spec(
            s.node.args[s.arg].args[0].target)[0][0]
    assert not any(is_quantized(n) for n in qm.linears(role=("router", "shared_expert_gate", "lm_head")))


def test_mixtral_artifact_saves_per_expert_codes_and_scales(moe, ids, tmp_path):
    qm = moe("mixtral")
    run(qm, "rtn:bits=4,group=32,pack")
    x = ids(2, 11)
    out = artifact.save(qm, tmp_path / "out")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        pre = "model.layers.1.block_sparse_moe.experts"
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                assert {f"{pre}.{e}.{w}.weight", f"{pre}.{e}.{w}.weight_scale",
                        f"{pre}.{e}.{w}.weight_zero_point"} <= keys
            codes = f.get_tensor(f"{pre}.{e}.w1.weight")
            assert codes.dtype == torch.int8 and codes.shape == (128, 32)  # packed int4 [I, H / 2]
            assert torch.equal(codes, qm.store[f"{pre}.w1.weight"][e])
            assert torch.equal(f.get_tensor(f"{pre}.{e}.w2.weight_scale"), qm.store[f"{pre}.w2.weight_scale"][e])
        assert not any(k.startswith(f"{pre}.w1") for k in keys)
    back = artifact.load(out)
    assert torch.equal(back(x), qm(x))


def test_gptq_artifact_round_trip(moe, calib, ids, tmp_path):
    qm = moe("glm4_moe")
    run(qm, "gptq:bits=4,group=32,sym=true", calib)
    back = artifact.load(artifact.save(qm, tmp_path / "out"))
    x = ids(2, 13)
    assert torch.equal(back(x), qm(x))
    assert back.quant["model.layers.1.mlp.experts.down_proj"]["weight"]["tokens"] == \
        qm.quant["model.layers.1.mlp.experts.down_proj"]["weight"]["tokens"]


@pytest.mark.parametrize("spec", [quant.QuantSpec(4, 32, False), quant.QuantSpec(3, 0, True)])
def test_rtn_on_experts_equals_fake_quantize_per_expert(moe, spec):
    qm = moe("qwen3_moe")
    floats = {s.name: weight_of(qm, s).clone() for s in experts.sites(qm)}
    run(qm, f"rtn:bits={spec.bits},group={spec.group_size},sym={spec.symmetric}")
    for s in experts.sites(qm):
        w, deq = floats[s.name], dequantized_weight(qm, s)
        for e in range(w.shape[0]):
            assert torch.equal(deq[e], quant.fake_quantize(w[e], spec)), (s.module, e)


def test_expert_hessians_use_exactly_the_routed_rows():
    torch.manual_seed(0)
    x, ids = torch.randn(40, 16), torch.stack([torch.randperm(4)[:2] for _ in range(40)])
    gate, up, down = torch.randn(4, 8, 16), torch.randn(4, 8, 16), torch.randn(4, 16, 8)
    st = ExpertHessians(4, "silu", all_tokens=True)
    st.update((x[:25], None, ids[:25], gate, up, down))
    st.update((x[25:], None, ids[25:], gate, up, down))
    assert st.counts.tolist() == torch.bincount(ids.reshape(-1), minlength=4).tolist()
    for e in range(4):
        rows = x[(ids == e).any(-1)]
        hid = F.silu(rows @ gate[e].T) * (rows @ up[e].T)
        torch.testing.assert_close(st.hessian("up", e), 2 * rows.T @ rows / len(rows))
        torch.testing.assert_close(st.hessian("down", e), 2 * hid.T @ hid / len(rows))
        hid_all = F.silu(x @ gate[e].T) * (x @ up[e].T)
        torch.testing.assert_close(st.hessian("gate", e, all_tokens=True), 2 * x.T @ x / 40)
        torch.testing.assert_close(st.hessian("down", e, all_tokens=True), 2 * hid_all.T @ hid_all / 40)


def test_gptq_token_counts_equal_the_routing(moe, calib):
    qm = moe("qwen3_moe")
    want = routed_counts(qm, calib)
    summary = run(qm, "gptq:bits=4,group=32,propagate=float", calib)
    got = {m.rsplit(".", 1)[0]: r["tokens"] for m, r in summary["experts"].items()}
    assert got == want and len(want) == 2
    assert all(sum(t) == calib.numel() * 2 for t in want.values())  # top-2
    rec = qm.quant["model.layers.0.mlp.experts.gate_proj"]["weight"]
    assert rec["tokens"] == want["model.layers.0.mlp.experts"] and rec["stats"] == "routed"


def test_min_tokens_falls_back_and_is_recorded(moe, calib):
    qm = moe("qwen3_moe")
    floats = {s.name: weight_of(qm, s).clone() for s in experts.sites(qm)}
    few = routed_counts(qm, calib)["model.layers.0.mlp.experts"]
    n = sorted(few)[3]  # the experts routed fewer tokens than the 4th smallest count
    summary = run(qm, f"gptq:bits=4,group=32,sym=true,propagate=float,min_tokens={n}", calib)
    fb = [e for e, t in enumerate(few) if t < n]
    assert fb and summary["experts"]["model.layers.0.mlp.experts.down_proj"]["fallback"] == fb
    spec = quant.QuantSpec(4, 32, True)
    for s in experts.sites(qm)[:3]:
        deq, w = dequantized_weight(qm, s), floats[s.name]
        for e in range(8):
            rtn = quant.fake_quantize(w[e], spec)
            assert torch.equal(deq[e], rtn) == (e in fb), (s.module, e)
    qm2 = moe("qwen3_moe")
    run(qm2, f"gptq:bits=4,group=32,sym=true,propagate=float,min_tokens={n},few_tokens=all", calib)
    rec = qm2.quant["model.layers.0.mlp.experts.up_proj"]["weight"]
    assert rec["fallback"] == fb and rec["few_tokens"] == "all"
    s = experts.sites(qm2)[1]
    assert not torch.equal(dequantized_weight(qm2, s)[fb[0]], quant.fake_quantize(floats[s.name][fb[0]], spec))


def test_all_experts_changes_statistics_not_the_forward(moe, calib):
    a, b = moe("glm4_moe"), moe("glm4_moe")
    sa = run(a, "gptq:bits=4,group=32,propagate=float", calib)
    sb = run(b, "gptq:bits=4,group=32,propagate=float,all_experts=true", calib)
    assert {m: r["tokens"] for m, r in sa["experts"].items()} == {m: r["tokens"] for m, r in sb["experts"].items()}
    assert all(r["fallback"] == [] for r in sb["experts"].values())
    assert b.quant["model.layers.1.mlp.experts.gate_proj"]["weight"]["stats"] == "all"
    for s, t in zip(experts.sites(a), experts.sites(b)):
        assert not torch.equal(dequantized_weight(a, s), dequantized_weight(b, t))
    assert [n.format_node() for n in a.graph.nodes] == [n.format_node() for n in b.graph.nodes]


def test_int8_quantizes_expert_inputs_and_keeps_the_router_float(moe, ids):
    qm = moe("glm4_moe")
    run(qm, "int8")
    (node,) = qm.nodes(ops.MOE_EXPERTS)
    q = node.args[0]
    assert q.target == ops.QUANTIZE_ACT and q.args[3:6] == (8, 0, True)
    assert node.kwargs["down_act_bits"] == 8
    (router,) = qm.linears(role="router")
    assert not is_quantized(router) and q not in router.all_input_nodes
    norm = activation_input(router)  # the router reads the float x, through shape ops only
    assert norm.target == ops.RMS_NORM and skip_transparent(q.args[0]) is norm
    for s in experts.sites(qm):
        want = {"method": "int8", "bits": 8, "group": 0, "sym": True, "scale_shape": [8, 64 if s.proj == "down" else 32, 1]}
        assert want.items() <= qm.quant[s.module]["weight"].items()
    assert torch.isfinite(qm(ids(2, 7))).all()


def test_moe_experts_down_act_bits_fake_quantizes_down_input_per_token():
    torch.manual_seed(0)
    x, w = torch.randn(30, 16), torch.rand(30, 2)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(30)])
    gate, up, down = torch.randn(4, 8, 16), torch.randn(4, 8, 16), torch.randn(4, 16, 8)
    got = ops.moe_experts(x, w, ids, gate, up, down, act="silu", down_act_bits=8)
    want = torch.zeros(30, 16)
    spec = quant.QuantSpec(8, 0, True)
    for t in range(30):
        for k in range(2):
            e = ids[t, k]
            h = F.silu(x[t:t + 1] @ gate[e].T) * (x[t:t + 1] @ up[e].T)
            want[t] += (quant.fake_quant_act(h, None, None, spec) @ down[e].T)[0] * w[t, k]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, ops.moe_experts(x, w, ids, gate, up, down, act="silu"), atol=1e-4)


@pytest.mark.parametrize("pipeline", ["awq:group=32", "gptaq:group=32", "billm"])
def test_passes_that_cannot_quantize_experts_refuse(moe, calib, pipeline):
    qm = moe("qwen3_moe")
    name = pipeline.split(":")[0]
    with pytest.raises(PtqcError, match=rf"^pass {name} cannot quantize MoE expert stacks "
                                        r"\(model\.layers\.0\.mlp\.experts\.gate_proj and 5 more\); exclude them"):
        run(qm, pipeline, calib)
    assert not list(qm.nodes(ops.DEQUANTIZE_WEIGHT))


def test_static_activations_on_experts_are_refused(moe):
    with pytest.raises(PtqcError, match=r"experts\.gate_proj: static activation quantization of MoE experts"):
        run(moe("qwen3_moe"), "int8:static=true")


def test_patterns_select_expert_stacks(moe):
    qm = moe("qwen3_moe")
    run(qm, "rtn:bits=4,group=32,include=layers.1.*|experts.down_proj,exclude=lm_head|router|self_attn.*")
    got = sorted(s.module for s in experts.sites(qm) if is_quantized(s))
    assert got == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj",
                   "model.layers.1.mlp.experts.gate_proj", "model.layers.1.mlp.experts.up_proj"]
    qm = moe("qwen3_moe")
    run(qm, "rtn:bits=4,group=32,exclude=experts|lm_head|router")
    assert not any(is_quantized(s) for s in experts.sites(qm)) and is_quantized(qm.linears(role="q")[0])
