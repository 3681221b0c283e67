"""Mixture-of-experts models: traced to router -> ptqc.moe_route -> ptqc.moe_experts, exact against
transformers, expert stacks read from per-expert checkpoint tensors and written back as such."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from make_tiny_model import make_model
from ptqc import artifact, frontend, moe, ops, pipeline
from ptqc.errors import PtqcError
from ptqc.ir import graph_from_json, graph_to_json

aten = torch.ops.aten
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe")
# arch: (experts, MoE layers, route kwargs that must be in the node, checkpoint name of layer 1's gate stack)
EXPECT = {
    "mixtral": (4, [0, 1], {"scoring": "softmax", "norm_topk_prob": True, "weights_dtype": torch.float32},
                "model.layers.1.block_sparse_moe.experts.w1.weight"),
    "qwen2_moe": (4, [1], {"scoring": "softmax", "norm_topk_prob": False, "weights_dtype": None},
                  "model.layers.1.mlp.experts.gate_proj.weight"),
    "qwen3_moe": (8, [0, 1], {"scoring": "softmax", "norm_topk_prob": True},
                  "model.layers.1.mlp.experts.gate_proj.weight"),
    "glm4_moe": (8, [1], {"scoring": "sigmoid", "norm_topk_prob": True, "n_group": 4, "topk_group": 2,
                          "scale": 2.5}, "model.layers.1.mlp.experts.gate_proj.weight"),
}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {a: make_model(root / a, a, layers=2, hidden=64, intermediate=128, seed=i) for i, a in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def moe_loaded(moe_models):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = frontend.load(moe_models[arch])
        return cache[arch].clone()
    return get


def _ref(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", [(1, 7), (3, 33)])
def test_logits_match_transformers(moe_models, moe_loaded, ids, arch, shape):
    x = ids(*shape)
    with torch.no_grad():
        want = _ref(moe_models[arch])(x).logits
    torch.testing.assert_close(moe_loaded(arch)(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "glm4_moe"])
def test_bfloat16_matches_transformers(moe_models, ids, arch):
    """bf16: experts combined in float32 as transformers does; GLM's float32 router weight and
    e_score_correction_bias read uncast (rounding them to bf16 moves logits by 3e-2 here)."""
    qm = frontend.load(moe_models[arch], "bfloat16")
    x = ids(2, 16)
    with torch.no_grad():
        want = _ref(moe_models[arch], torch.bfloat16)(x).logits
    torch.testing.assert_close(qm(x).float(), want.float(), atol=1e-2, rtol=0)
    fp32 = {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"}
    assert qm.store.keep_dtype == (fp32 if arch == "glm4_moe" else set())
    assert all(qm.store[n].dtype == torch.float32 for n in qm.store.keep_dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_shows_router_route_experts(moe_loaded, arch):
    qm = moe_loaded(arch)
    n_exp, moe_layers, route_kw, gate_name = EXPECT[arch]
    targets = {n.target for n in qm.graph.nodes if n.op == "call_function"}
    assert not targets & {aten.one_hot.default, aten.nonzero.default, aten.index_add.default, aten.where.self}
    routes, experts = list(qm.nodes(ops.MOE_ROUTE)), list(qm.nodes(ops.MOE_EXPERTS))
    assert [n.meta["ptqc"]["layer"] for n in routes] == [n.meta["ptqc"]["layer"] for n in experts] == moe_layers
    for r, x in zip(routes, experts):
        router = r.args[0]
        assert router.target == ops.LINEAR and router.meta["ptqc"]["role"] == "router"
        assert qm.store.spec(router.args[1].target)[0] == (n_exp, 64)
        assert r.kwargs["top_k"] == 2 and route_kw.items() <= r.kwargs.items()
        assert (r.args[1] is not None) == (arch == "glm4_moe")  # e_score_correction_bias
        assert x.args[1].args == (r, 0) and x.args[2].args == (r, 1)  # weights, ids
        assert x.meta["ptqc"]["role"] == "experts" and x.meta["ptqc"]["module"].endswith(".experts")
        shapes = [qm.store.spec(w.target)[0] for w in x.args[3:6]]
        i = 128 if arch == "mixtral" else 32  # Mixtral's experts are intermediate_size wide
        assert shapes == [(n_exp, i, 64), (n_exp, i, 64), (n_exp, 64, i)] and x.kwargs == {"act": "silu", "down_act_bits": 0}  # float down input until int8 sets it
    assert experts[-1].args[3].target == gate_name
    dense = sorted({n.meta["ptqc"]["layer"] for n in qm.linears(role="down")})
    shared = {"qwen2_moe": [0, 1], "glm4_moe": [0, 1]}.get(arch, [])  # dense layer 0 + shared experts
    assert dense == shared
    assert [n.meta["ptqc"]["layer"] for n in qm.linears(role="shared_expert_gate")] == ([1] if arch == "qwen2_moe" else [])


def test_stacks_read_per_expert_tensors_lazily(moe_models, moe_loaded):
    qm = moe_loaded("mixtral")
    name = "model.layers.0.block_sparse_moe.experts.w2.weight"
    assert qm.store.stacks[name] == [f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)]
    assert not qm.store._cache
    t = qm.store[name]
    assert list(qm.store._cache) == [name] and t.shape == (4, 64, 128)
    with safe_open(str(moe_models["mixtral"] / "model.safetensors"), "pt") as f:
        for e in range(4):
            assert torch.equal(t[e], f.get_tensor(f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"))
    qm.store.release()
    assert not qm.store._cache


def test_route_matches_transformers_routers():
    """ptqc.moe_route == each family's router, grouped top-k with a correction bias included."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    x = torch.randn(50, 64)
    for arch, kw in (("mixtral", {"num_local_experts": 8}), ("qwen3_moe", {"num_experts": 8, "norm_topk_prob": True}),
                     ("glm4_moe", {"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5})):
        block = [m for m in AutoModelForCausalLM.from_config(AutoConfig.for_model(
            arch, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_experts_per_tok=2,
            first_k_dense_replace=0, vocab_size=10, **kw)).modules() if moe._is_moe_block(m)][0]
        with torch.no_grad():
            block.gate.weight.normal_()
            if hasattr(block.gate, "e_score_correction_bias"):
                block.gate.e_score_correction_bias.normal_(0, 0.3)
            _, want_w, want_ids = block.gate(x)
            route, fp32 = moe._route_of(block.gate)
            ours = moe.Router(block.gate.weight, getattr(block.gate, "e_score_correction_bias", None), route, fp32)
            _, w, ids = ours(x)
        order, want_order = ids.sort(-1).indices, want_ids.sort(-1).indices
        assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order)), arch
        assert torch.equal(w.gather(1, order), want_w.gather(1, want_order)) and w.dtype == want_w.dtype, arch
    all_groups = ops._moe_route(x @ block.gate.weight.T, block.gate.e_score_correction_bias, **{**route, "topk_group": 4})
    assert not torch.equal(all_groups[1].sort(-1).values, ids.sort(-1).values)  # the group limit matters here


@pytest.mark.parametrize("arch", ARCHS)
def test_float_artifact_reloads_in_transformers(moe_models, moe_loaded, ids, tmp_path, arch):
    qm = moe_loaded(arch)
    out = artifact.save(qm, tmp_path / "out")
    keys = lambda p: set(safe_open(str(p / "model.safetensors"), "pt").keys())  # noqa: E731
    assert keys(out) - {"model.rotary_emb.inv_freq"} == keys(moe_models[arch])  # the checkpoint's own names
    x = ids(2, 19)
    with torch.no_grad():
        assert torch.equal(_ref(out)(x).logits, _ref(moe_models[arch])(x).logits)
    back = artifact.load(out)
    assert graph_to_json(back.graph) == graph_to_json(qm.graph)
    assert torch.equal(back(x), qm(x))


def test_graph_json_round_trip_and_reexport(moe_loaded, ids):
    qm = moe_loaded("glm4_moe")
    g2 = graph_from_json(json.loads(json.dumps(graph_to_json(qm.graph))))
    r = next(n for n in g2.nodes if n.target == ops.MOE_ROUTE)
    assert r.kwargs["weights_dtype"] == torch.float32 and r.kwargs["scale"] == 2.5
    ep = torch.export.export(qm.graph_module(), (ids(2, 10),), dynamic_shapes=(
        {0: torch.export.Dim("b"), 1: torch.export.Dim("s", min=2, max=256)},))
    y = ids(3, 20)
    assert torch.equal(ep.module()(y), qm(y))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "glm4_moe"])
def test_rtn_compiles_moe_keeping_routing_float(moe_loaded, ids, tmp_path, arch):
    qm = moe_loaded(arch)
    pipeline.PassManager(pipeline.parse_pipeline("rtn:bits=4,group=32,pack")).run(qm, pipeline.PassContext(quiet=True))
    quantized = {n.meta["ptqc"]["role"] for n in qm.linears() if "quant" in n.meta["ptqc"]}
    assert {"q", "k", "v", "o"} <= quantized and not quantized & {"router", "shared_expert_gate", "lm_head"}
    assert all(set(n.meta["ptqc"]["quant"]) == {"gate_proj", "up_proj", "down_proj"} for n in qm.nodes(ops.MOE_EXPERTS))
    back = artifact.load(artifact.save(qm, tmp_path / "out"))
    x = ids(2, 9)
    assert torch.equal(back(x), qm(x)) and torch.isfinite(back(x)).all()


def test_trace_in_child_process_gives_the_same_moe_model(moe_models, moe_loaded, ids):
    ref = moe_loaded("glm4_moe")
    qm = frontend.load(moe_models["glm4_moe"], isolate=True)
    assert graph_to_json(qm.graph) == graph_to_json(ref.graph)
    x = ids(2, 7)
    assert torch.equal(qm(x), ref(x))


def test_unknown_router_is_refused_in_one_line(moe_models, monkeypatch):
    monkeypatch.delitem(moe.ROUTERS, "Qwen3MoeTopKRouter")
    with pytest.raises(PtqcError, match=r"^MoE router Qwen3MoeTopKRouter is not known to ptqc \(known: [^\n]*\)"):
        frontend.load(moe_models["qwen3_moe"])


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fused_checkpoint_traces_like_the_per_expert_one(moe_models, moe_loaded, ids, tmp_path, arch):
    """A checkpoint holding transformers' in-memory fused experts (``mlp.experts.gate_up_proj``
    [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) reads its stacks as slices of them."""
    from safetensors.torch import save_file

    src, fused = moe_models[arch], tmp_path / "fused"
    fused.mkdir()
    state = _ref(src).state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            (fused / f.name).write_bytes(f.read_bytes())
    qm, ref = frontend.load(fused), moe_loaded(arch)
    down = "model.layers.1.mlp.experts.down_proj.weight"
    e, i = EXPECT[arch][0], state["model.layers.0.mlp.experts.down_proj"].shape[2]
    assert qm.store.slices["model.layers.0.mlp.experts.up_proj.weight"] == \
        ("model.layers.0.mlp.experts.gate_up_proj", i, 2 * i) and not qm.store.stacks
    assert qm.store[down].shape == qm.store.spec(down)[0] == (e, 64, i)
    assert torch.equal(qm.store[down], state["model.layers.1.mlp.experts.down_proj"])
    x = ids(2, 11)
    torch.testing.assert_close(qm(x), ref(x), atol=1e-5, rtol=1e-5)
    out = artifact.save(qm, tmp_path / "out")  # written per expert, as transformers saves
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in safe_open(str(out / "model.safetensors"), "pt").keys()


def test_inspect_shows_tokens_and_scheme_per_expert(moe_loaded, tmp_path):
    from click.testing import CliRunner

    from ptqc.cli import main as cli
    from ptqc.inspect import experts as expert_rows

    qm = moe_loaded("qwen3_moe")
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    pipeline.PassManager(pipeline.parse_pipeline("gptq:bits=4,group=32,propagate=float,min_tokens=20")).run(
        qm, pipeline.PassContext(quiet=True, calib=calib))
    rec = qm.quant["model.layers.0.mlp.experts.down_proj"]["weight"]
    few = [e for e, t in enumerate(rec["tokens"]) if t < 20]
    assert few == rec["fallback"] and 0 < len(few) < 8 and sum(rec["tokens"]) == 2 * calib.numel()
    out = artifact.save(qm, tmp_path / "art")
    r = CliRunner().invoke(cli, ["inspect", str(out), "--experts"])
    assert r.exit_code == 0, r.output
    block = r.output.split("model.layers.1.mlp.experts")[0].splitlines()
    assert block[0] == "model.layers.0.mlp.experts: 8 experts" and block[1].split() == \
        ["expert", "tokens", "gate_proj", "up_proj", "down_proj"]
    for e, line in enumerate(block[2:10]):
        scheme = "rtn (few tokens) int4 g32 asym" if e in few else "gptq int4 g32 asym"
        assert line.split(None, 2)[:2] == [str(e), str(rec["tokens"][e])] and line.count(scheme) == 3, line
    assert "MoE experts (routed calibration tokens" in CliRunner().invoke(cli, ["inspect", str(out)]).output
    assert expert_rows(moe_loaded("qwen3_moe"))[1]["experts"][7] == {
        "expert": 7, "tokens": None, "gate_proj": "float", "up_proj": "float", "down_proj": "float"}


def test_expert_scheme_shows_each_experts_own_bits():
    """sensitive:unit=expert records the widest width as "bits", the others' as "base_bits", and the
    kept experts in "expert_bits": the per-expert table shows each expert's own."""
    from ptqc.inspect import _expert_scheme

    rec = {"method": "rtn", "bits": 8, "base_bits": 4, "expert_bits": {"3": 8}, "group": 128, "sym": True}
    assert _expert_scheme(rec, 3) == "rtn int8 g128 sym"
    assert _expert_scheme(rec, 0) == "rtn int4 g128 sym"
    assert _expert_scheme({"method": "gptq", "bits": 4, "group": 0, "sym": False}, 1) == "gptq int4 ch asym"
