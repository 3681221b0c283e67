"""The canonical graph computes exactly what the transformers model computes."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ptqc import frontend, ops
from ptqc.ir import graph_from_json, graph_to_json

aten = torch.ops.aten


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
@pytest.mark.parametrize("shape", [(1, 7), (3, 33)])
def test_logits_match_transformers(models, loaded, ids, arch, shape):
    qm = loaded(arch)
    ref = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
    x = ids(*shape, ref.config.vocab_size)
    with torch.no_grad():
        want = ref(x).logits
    got = qm(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sliding_window_matters(models, loaded, ids):
    """Mistral's window (8) is honoured: the same graph with the window removed differs at seq 33."""
    qm = loaded("mistral")
    x = ids(1, 33)
    attn = [n for n in qm.graph.nodes if n.target == ops.ATTENTION]
    assert attn and all(n.kwargs["window"] == 8 for n in attn)
    full = qm.clone()
    for n in full.graph.nodes:
        if n.target == ops.ATTENTION:
            n.kwargs = {**n.kwargs, "window": -1}
    assert not torch.allclose(qm(x), full(x), atol=1e-4)


def test_bfloat16_matches_transformers(models, loaded, ids):
    qm = loaded("qwen2", "bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(models["qwen2"], dtype=torch.bfloat16).eval()
    x = ids(2, 16)
    with torch.no_grad():
        want = ref(x).logits
    got = qm(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_canonical_ops_and_roles(loaded, arch):
    qm = loaded(arch)
    L = qm.num_layers
    targets = [n.target for n in qm.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.LINEAR) == 7 * L + 1
    assert targets.count(ops.RMS_NORM) == 2 * L + 1
    assert targets.count(ops.ATTENTION) == L
    for decomposed in (aten.linear.default, aten.scaled_dot_product_attention.default, aten.rsqrt.default,
                       aten.pow.Tensor_Scalar, aten._assert_tensor_metadata.default):
        assert decomposed not in targets
    roles = [(n.meta["ptqc"]["layer"], n.meta["ptqc"]["role"]) for n in qm.linears()]
    for i in range(L):
        assert [r for layer, r in roles if layer == i] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert roles[-1] == (None, "lm_head")
    q = qm.linears(role="q", layer=1)[0]
    assert q.meta["ptqc"]["module"] == "model.layers.1.self_attn.q_proj"
    assert q.args[1].target == "model.layers.1.self_attn.q_proj.weight"  # HF names kept
    norms = [n.meta["ptqc"]["role"] for n in qm.nodes(ops.RMS_NORM)]
    assert norms == ["input_norm", "post_attention_norm"] * L + ["final_norm"]


def test_gqa_kv_heads_not_repeated_in_graph(loaded):
    qm = loaded("qwen2")  # 4 heads, 2 kv heads
    attn = next(qm.nodes(ops.ATTENTION))
    assert attn.args[0].meta["shape"] == ["B", 4, "S", 32]
    assert attn.args[1].meta["shape"] == ["B", 2, "S", 32]


def test_qwen2_biases_present(loaded):
    qm = loaded("qwen2")
    for role in ("q", "k", "v"):
        n = qm.linears(role=role, layer=0)[0]
        assert n.args[2] is not None and n.args[2].target.endswith(f"{role}_proj.bias")
    assert qm.linears(role="o", layer=0)[0].args[2] is None


def test_tied_embeddings_get_own_names(loaded):
    qm = loaded("llama")
    emb = next(n for n in qm.graph.nodes if n.target == aten.embedding.default)
    head = qm.linears(role="lm_head")[0]
    assert emb.args[0].target == "model.embed_tokens.weight"
    assert head.args[1].target == "lm_head.weight"
    assert qm.store["lm_head.weight"] is qm.store["model.embed_tokens.weight"]
    qm.store["lm_head.weight"] = qm.store["lm_head.weight"] * 2  # writing unties
    assert not torch.equal(qm.store["lm_head.weight"], qm.store["model.embed_tokens.weight"])


def test_graph_json_round_trip(loaded, ids):
    qm = loaded("qwen2")
    data = json.loads(json.dumps(graph_to_json(qm.graph)))
    g2 = graph_from_json(data)
    assert [n.name for n in g2.nodes] == [n.name for n in qm.graph.nodes]
    assert [n.meta.get("ptqc") for n in g2.nodes] == [n.meta.get("ptqc") for n in qm.graph.nodes]
    x = ids(2, 9)
    qm2 = qm.clone()
    qm2.graph = g2
    assert torch.equal(qm(x), qm2(x))


def test_graph_reexports_with_torch_export(loaded, ids):
    """ptqc ops have fake kernels, so a canonical graph re-exports (shapes stay dynamic)."""
    qm = loaded("llama")
    gm = qm.graph_module()
    x = ids(2, 10)
    ep = torch.export.export(gm, (x,), dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("s", min=2, max=256)},))
    assert any(n.target == ops.ATTENTION for n in ep.graph.nodes)
    y = ids(3, 20)
    assert torch.equal(ep.module()(y), qm(y))


def test_input_model_never_modified(models, tmp_path, shared_traces):
    import hashlib

    from ptqc import artifact, pipeline

    def digest(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}

    before = digest(models["qwen2"])
    qm = shared_traces(models["qwen2"])  # the real tracer, not the session's shared trace
    pipeline.PassManager(pipeline.parse_pipeline("rtn:bits=3,group=64")).run(qm, pipeline.PassContext(quiet=True))
    artifact.save(qm, tmp_path / "out")
    assert digest(models["qwen2"]) == before


def test_trace_in_child_process_gives_the_same_model(models, loaded, ids):
    from ptqc.ir import graph_to_json

    ref = loaded("llama")  # tied embeddings: the alias must come back too
    qm = frontend.load(models["llama"], isolate=True)
    assert graph_to_json(qm.graph) == graph_to_json(ref.graph)
    assert qm.store.aliases == ref.store.aliases
    x = ids(2, 7)
    assert torch.equal(qm(x), ref(x))
