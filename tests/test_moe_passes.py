"""Passes on MoE expert stacks: rtn, gptq, gptaq, awq, int8 and smooth work per expert (folds exact,
routing unchanged, per-expert statistics and fallbacks recorded), sensitive scores experts, kv
runs on MoE models; passes that cannot are refused; artifacts split per expert."""
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from make_tiny_model import make_model
from ptqc import artifact, experts, frontend, inspect, ops, quant
from ptqc.errors import PtqcError
from ptqc.moe_calib import ExpertAsym, ExpertHessians
from ptqc.patterns import activation_input, skip_transparent
from ptqc.pipeline import PassContext, PassManager, parse_pipeline
from ptqc.weights import dequantized_weight, is_quantized, weight_of

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral")  # each traced once per module (~9 s of CPU each)


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


@pytest.mark.parametrize("arch,pipeline", [("mixtral", "rtn:bits=4,group=32"), ("qwen2_moe", "gptq:bits=4,group=32"),
                                           ("qwen3_moe", "int8")])
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


def test_gptq_artifact_round_trip(gptq_runs, ids, tmp_path):
    qm = gptq_runs["rtn"][0]
    back = artifact.load(artifact.save(qm, tmp_path / "out"))
    x = ids(2, 13)
    assert torch.equal(back(x), qm(x))
    assert back.quant["model.layers.1.mlp.experts.down_proj"]["weight"]["tokens"] == \
        qm.quant["model.layers.1.mlp.experts.down_proj"]["weight"]["tokens"]
    rows = [r["quant"] for r in inspect.rows(qm, op="moe_experts")]
    assert [r["quant"] for r in inspect.rows(back, op="moe_experts")] == rows and rows[0]["up_proj"]["fallback"]


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


GPTQ = "gptq:bits=4,group=32,sym=true,propagate=float,include=experts"


@pytest.fixture(scope="module")
def gptq_runs(moe, calib):
    """qwen3_moe with its experts GPTQ'd, each run once: min_tokens at the 4th smallest layer-0
    routed count with few_tokens=rtn (``rtn``) and all (``all``), and all_experts=true."""
    base = moe("qwen3_moe")
    counts = routed_counts(base, calib)
    n = sorted(counts["model.layers.0.mlp.experts"])[3]
    out = {"float": base, "counts": counts, "n": n}
    for key, extra in (("rtn", ""), ("all", ",few_tokens=all"), ("all_experts", ",all_experts=true")):
        qm = base.clone()
        out[key] = (qm, run(qm, f"{GPTQ},min_tokens={n}{extra}", calib))
    return out


def test_gptq_token_counts_equal_the_routing(gptq_runs, calib):
    qm, summary = gptq_runs["rtn"]
    want = gptq_runs["counts"]
    got = {m.rsplit(".", 1)[0]: r["tokens"] for m, r in summary["experts"].items()}
    assert got == want and len(want) == 2
    assert all(sum(t) == calib.numel() * 2 for t in want.values())  # top-2
    rec = qm.quant["model.layers.0.mlp.experts.gate_proj"]["weight"]
    assert rec["tokens"] == want["model.layers.0.mlp.experts"] and rec["stats"] == "routed"


def test_min_tokens_falls_back_and_is_recorded(gptq_runs):
    (qm, summary), base, n = gptq_runs["rtn"], gptq_runs["float"], gptq_runs["n"]
    few = gptq_runs["counts"]["model.layers.0.mlp.experts"]
    fb = [e for e, t in enumerate(few) if t < n]
    assert fb and summary["experts"]["model.layers.0.mlp.experts.down_proj"]["fallback"] == fb
    spec = quant.QuantSpec(4, 32, True)
    for s, s0 in zip(experts.sites(qm)[:3], experts.sites(base)[:3]):
        deq, w = dequantized_weight(qm, s), weight_of(base, s0)
        for e in range(8):
            rtn = quant.fake_quantize(w[e], spec)
            assert torch.equal(deq[e], rtn) == (e in fb), (s.module, e)
    qm2 = gptq_runs["all"][0]
    rec = qm2.quant["model.layers.0.mlp.experts.up_proj"]["weight"]
    assert rec["fallback"] == fb and rec["few_tokens"] == "all"
    s, s0 = experts.sites(qm2)[1], experts.sites(base)[1]
    assert not torch.equal(dequantized_weight(qm2, s)[fb[0]], quant.fake_quantize(weight_of(base, s0)[fb[0]], spec))


def test_all_experts_changes_statistics_not_the_forward(gptq_runs):
    (a, sa), (b, sb) = gptq_runs["rtn"], gptq_runs["all_experts"]
    assert {m: r["tokens"] for m, r in sa["experts"].items()} == {m: r["tokens"] for m, r in sb["experts"].items()}
    assert all(r["fallback"] == [] for r in sb["experts"].values())
    assert b.quant["model.layers.1.mlp.experts.gate_proj"]["weight"]["stats"] == "all"
    for s, t in zip(experts.sites(a), experts.sites(b)):
        assert not torch.equal(dequantized_weight(a, s), dequantized_weight(b, t))
    assert [n.format_node() for n in a.graph.nodes] == [n.format_node() for n in b.graph.nodes]


def test_int8_quantizes_expert_inputs_and_keeps_the_router_float(moe, ids):
    qm = moe("qwen2_moe")
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
        want = {"method": "int8", "bits": 8, "group": 0, "sym": True, "scale_shape": [4, 64 if s.proj == "down" else 32, 1]}
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


@pytest.mark.parametrize("pipeline", ["billm"])
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


# ---- smooth ---------------------------------------------------------------------------------------
def router_outputs(qm, ids) -> tuple[torch.Tensor, dict]:
    """Logits of ``qm`` on ``ids`` and, per router, (router logits, top-k ids)."""
    logits, out = {}, {}

    def hook(n, y):
        if n.meta.get("ptqc", {}).get("role") == "router":
            logits[n.name] = y
        if n.target == ops.MOE_ROUTE:
            out[n.meta["ptqc"]["module"]] = (logits[n.args[0].name], y[1])
    with torch.no_grad():
        return qm(ids, hook=hook), out


def close(a, b, tol=1e-5) -> bool:
    return (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_smooth_moe_block_fold_is_exact_and_keeps_routing(moe, calib, arch):
    qm = moe(arch)
    ref, (node, *_) = qm.clone(), list(qm.nodes(ops.MOE_EXPERTS))
    y0, r0 = router_outputs(ref, calib)
    summary = run(qm, "smooth", calib)
    y1, r1 = router_outputs(qm, calib)
    assert close(y1, y0) and r0.keys() == r1.keys() and r0
    for m in r0:
        assert close(r1[m][0], r0[m][0]) and torch.equal(r1[m][1], r0[m][1]), m
    assert summary["skipped"] == []
    block = [r for r in summary["scales"] if r["into"].endswith("post_attention_layernorm") and
             "experts.gate" in r["linears"]]
    assert len(block) == len(r0)
    shared = ["gate", "up"] if arch == "qwen2_moe" else []
    assert block[0]["linears"] == ["experts.gate", "experts.up", *shared]
    assert block[0]["compensated"] == ["router", *(["shared_expert_gate"] if shared else [])]
    down = [r for r in summary["scales"] if r["linears"] == ["experts.down"]]
    assert len(down) == len(r0) and all(sum(r["tokens"]) == 2 * calib.numel() for r in down)


def test_smooth_moe_one_scale_shared_by_every_reader(moe, calib):
    qm = moe("qwen2_moe")
    ref = qm.clone()
    run(qm, "smooth:down=false", calib)
    (node,) = qm.nodes(ops.MOE_EXPERTS)
    pre = "model.layers.1"
    norm = f"{pre}.post_attention_layernorm.weight"
    s = ref.store[norm] / qm.store[norm]  # norm / s
    assert not torch.allclose(s, torch.ones_like(s))
    names = [f"{pre}.mlp.experts.{p}_proj.weight" for p in ("gate", "up")] + \
        [f"{pre}.mlp.{m}.weight" for m in ("gate", "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert_gate")]
    for name in names:
        torch.testing.assert_close(qm.store[name], ref.store[name] * s, rtol=1e-5, atol=0), name
    down = f"{pre}.mlp.experts.down_proj.weight"
    assert torch.equal(qm.store[down], ref.store[down])


def test_smooth_moe_down_scales_per_expert_and_few_token_fallback(moe, calib):
    qm = moe("qwen3_moe")
    ref = qm.clone()
    counts = routed_counts(ref, calib)["model.layers.0.mlp.experts"]
    n = sorted(counts)[2]
    summary = run(qm, f"smooth:min_tokens={n}", calib)
    rec = next(r for r in summary["scales"] if r["into"] == "model.layers.0.mlp.experts.up_proj")
    fb = [e for e, t in enumerate(counts) if t < n]
    assert rec["tokens"] == counts and rec["fallback"] == fb and fb
    down = "model.layers.0.mlp.experts.down_proj.weight"
    t = qm.store[down] / ref.store[down]  # [E, H, I]: each expert's column scales
    for e in range(8):
        col = t[e, 0]
        torch.testing.assert_close(t[e], col.expand_as(t[e]), rtol=1e-5, atol=0)
        assert torch.allclose(col, torch.ones_like(col)) == (e in fb), e
    y0, y1 = ref(calib), qm(calib)
    assert close(y1, y0)
    qm2 = moe("qwen3_moe")
    rec = next(r for r in run(qm2, f"smooth:min_tokens={n},few_tokens=all", calib)["scales"]
               if r["into"] == "model.layers.0.mlp.experts.up_proj")
    assert rec["fallback"] == fb and not torch.allclose(qm2.store[down][fb[0]], ref.store[down][fb[0]])


def test_smooth_moe_reasons_and_selection(moe, calib):
    qm = moe("qwen3_moe")
    summary = run(qm, "smooth:fold=false", calib)
    why = "fold=false (an explicit smooth multiply) is not supported on MoE block inputs"
    assert [s for s in summary["skipped"] if "experts" in s[0]] == [
        ("model.layers.0.mlp.experts", why), ("model.layers.1.mlp.experts", why)]
    qm = moe("qwen3_moe")
    ref = qm.clone()
    summary = run(qm, "smooth:exclude=experts|router|lm_head", calib)
    assert not any("experts" in str(r["linears"]) for r in summary["scales"]) and summary["skipped"] == []
    norm = "model.layers.0.post_attention_layernorm.weight"
    assert torch.equal(qm.store[norm], ref.store[norm])


def test_smooth_int8_quantizes_every_expert(moe, calib):
    qm = moe("qwen2_moe")
    run(qm, "smooth,int8", calib)
    assert all(is_quantized(s) for s in experts.sites(qm))
    assert torch.isfinite(qm(calib)).all()


# ---- awq ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_awq_moe_folds_are_exact_and_keep_routing(moe, calib, arch):
    qm = moe(arch)
    ref = qm.clone()
    y0, r0 = router_outputs(ref, calib)
    summary = run(qm, "awq:group=32,quantize=false,clip=false,grid=5", calib)
    y1, r1 = router_outputs(qm, calib)
    assert close(y1, y0)
    for m in r0:
        assert close(r1[m][0], r0[m][0]) and torch.equal(r1[m][1], r0[m][1]), m
    shared = ["gate", "up"] if arch == "qwen2_moe" else []
    block = [r for r in summary["scales"] if "experts.gate" in r["linears"]]
    assert len(block) == len(r0) and block[0]["linears"] == ["experts.gate", "experts.up", *shared]
    assert block[0]["compensated"] == ["router", *(["shared_expert_gate"] if shared else [])]
    down = [r for r in summary["scales"] if r["linears"] == ["experts.down"]]
    assert len(down) == len(r0) and down[0]["experts_scaled"] >= 1
    name = down[0]["into"].replace("up_proj", "down_proj") + ".weight"
    t = qm.store[name] / ref.store[name]  # each expert's own column scales
    assert torch.allclose(t, t[:, :1].expand_as(t), rtol=1e-5)
    assert not torch.allclose(t, torch.ones_like(t))


def test_awq_quantizes_every_expert_with_per_expert_fallback(moe, calib):
    qm = moe("qwen3_moe")
    base = qm.clone()
    counts = routed_counts(base, calib)["model.layers.0.mlp.experts"]
    n = sorted(counts)[2]
    fb = [e for e, t in enumerate(counts) if t < n]
    summary = run(qm, f"awq:group=32,min_tokens={n},grid=5,samples=128", calib)
    assert all(is_quantized(s) for s in experts.sites(qm)) and fb
    down, down0 = experts.sites(qm)[2], experts.sites(base)[2]
    rec = qm.quant[down.module]["weight"]
    assert rec["method"] == "awq" and rec["tokens"] == counts and rec["fallback"] == fb
    assert rec["clipped"] == [e for e in range(8) if e not in fb]
    assert summary["experts"][down.module] == {"tokens": counts, "fallback": fb}
    shown = inspect._quant_str(inspect.rows(qm, op="moe_experts")[0]["quant"])  # what `ptqc inspect` prints
    assert shown.startswith(f"gate_proj:int4 g32 asym (awq) tokens {'/'.join(map(str, counts))} fallback {fb}:rtn; ")
    deq, w = dequantized_weight(qm, down), weight_of(base, down0)
    spec = quant.QuantSpec(4, 32, False)
    for e in range(8):  # fallback experts: plain RTN (no down scale, no clip); the others scaled or clipped
        assert torch.equal(deq[e], quant.fake_quantize(w[e], spec)) == (e in fb), e


# ---- gptaq ----------------------------------------------------------------------------------------
def test_expert_asym_statistics_use_the_quantized_routing():
    torch.manual_seed(0)
    x, ids = torch.randn(40, 16), torch.stack([torch.randperm(4)[:2] for _ in range(40)])
    xf = x + 0.1 * torch.randn(40, 16)
    gate, up, down = torch.randn(4, 8, 16), torch.randn(4, 8, 16), torch.randn(4, 16, 8)
    gf = gate + 0.1 * torch.randn(4, 8, 16)
    st = ExpertAsym(4, "silu", all_tokens=True)
    st.update((xf, gf, up), (x, None, ids, gate, up, down))
    for e in range(4):
        rows = (ids == e).any(-1)
        q, f = x[rows], xf[rows]
        h, d = st.hessian("up", e)
        torch.testing.assert_close(h, 2 * q.T @ q / len(q))
        torch.testing.assert_close(d, 2 * (f - q).T @ q / len(q))
        hq, hf = F.silu(q @ gate[e].T) * (q @ up[e].T), F.silu(f @ gf[e].T) * (f @ up[e].T)
        h, d = st.hessian("down", e)
        torch.testing.assert_close(h, 2 * hq.T @ hq / len(q))
        torch.testing.assert_close(d, 2 * (hf - hq).T @ hq / len(q))
        torch.testing.assert_close(st.hessian("gate", e, all_tokens=True)[1], 2 * (xf - x).T @ x / 40)


def test_gptaq_quantizes_every_expert(moe, calib):
    qm = moe("qwen2_moe")
    summary = run(qm, "gptaq:group=32,min_tokens=2000", calib)
    assert all(is_quantized(s) for s in experts.sites(qm))
    rec = qm.quant["model.layers.1.mlp.experts.up_proj"]["weight"]
    assert rec["method"] == "gptaq" and sum(rec["tokens"]) == 2 * calib.numel() and rec["fallback"] == [0, 1, 2, 3]
    qm = moe("qwen2_moe")
    summary = run(qm, "gptaq:group=32", calib)
    rec = qm.quant["model.layers.1.mlp.experts.down_proj"]["weight"]
    assert rec["fallback"] == [] and rec["err_gptaq"] > 0 and rec["stats"] == "routed"
    assert summary["experts"]["model.layers.1.mlp.experts.down_proj"]["tokens"] == rec["tokens"]



@pytest.mark.parametrize("pipeline,stats", [("gptq:bits=4,group=32", ExpertHessians),
                                            ("gptaq:bits=4,group=32", ExpertAsym)])
def test_expert_statistics_are_held_one_layer_at_a_time(moe, calib, monkeypatch, pipeline, stats):
    """Peak memory: per-expert statistics (E Hessians [in, in] per stack) live while their layer is
    quantized only: at every stack quantized, one statistics object holding data is alive."""
    import gc
    import importlib
    import weakref

    live, held = weakref.WeakSet(), []
    init = stats.__init__
    monkeypatch.setattr(stats, "__init__", lambda self, *a, **k: (init(self, *a, **k), live.add(self))[0])
    mod = importlib.import_module(f"ptqc.passes.{pipeline.split(':')[0]}")
    setq = mod.set_quantized_weight

    def counting(qm, site, *a, **k):
        if isinstance(site, experts.ExpertSite):
            gc.collect()
            held.append(sum(st.tokens > 0 for st in live))
        return setq(qm, site, *a, **k)
    monkeypatch.setattr(mod, "set_quantized_weight", counting)
    qm = moe("qwen3_moe")
    run(qm, pipeline, calib)
    assert held == [1] * len(experts.sites(qm)) and len(held) == 6

# ---- sensitive, kv --------------------------------------------------------------------------------
def test_sensitive_scores_experts_and_keeps_the_chosen_at_more_bits(moe, calib):
    qm = moe("qwen3_moe")
    base = qm.clone()
    run(qm, "sensitive:unit=expert,top=2,keep=8,w_group=32,rtn:bits=4,group=32", calib)
    summary = qm.history[0]["summary"]
    scores = summary["scores"]
    assert len(scores) == 16 and summary["chosen"] == sorted(scores, key=scores.get, reverse=True)[:2]
    assert summary["experts"]["model.layers.1.mlp.experts"]["3"] == scores["model.layers.1.mlp.experts.3"]
    for s, s0 in zip(experts.sites(qm), experts.sites(base)):
        layer = s.module.rsplit(".", 1)[0]
        kept = [int(c.rsplit(".", 1)[1]) for c in summary["chosen"] if c.startswith(layer + ".")]
        rec = qm.quant[s.module]["weight"]
        assert rec["expert_bits"] == {str(e): 8 for e in kept} and rec["bits"] == 8 and rec["base_bits"] == 4 \
            if kept else "expert_bits" not in rec and rec["bits"] == 4
        deq, w = dequantized_weight(qm, s), weight_of(base, s0)
        for e in range(8):
            spec = quant.QuantSpec(8 if e in kept else 4, 32, False)
            assert torch.equal(deq[e], quant.fake_quantize(w[e], spec)), (s.module, e)
    qm = moe("qwen3_moe")
    summary = run(qm, "sensitive:unit=linear,top=1,w_group=32", calib)
    assert "model.layers.0.mlp.experts.down_proj" in summary["scores"]
    with pytest.raises(PtqcError, match="unit=expert: one expert of a stack cannot stay float"):
        run(qm, "sensitive:unit=expert")


def test_kv_runs_on_moe_attention(moe, calib):
    qm = moe("qwen2_moe")
    ref = qm(calib)
    summary = run(qm, "kv", calib)
    assert summary["attention_ops"] == 2
    for n in qm.nodes(ops.ATTENTION):
        assert all(a.target == ops.QUANTIZE_ACT for a in n.args[1:3])
    y = qm(calib)
    assert torch.isfinite(y).all() and 0 < ((y - ref).norm() / ref.norm()) < 0.2  # KV8 on a random model
