"""rotate: Hadamard construction, exact rotations (norm fusion, residual, online down/QK, per-head V),
artifact round trip, pipeline order, and the point of it all: fewer activation outliers."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ptqc import artifact, frontend, hadamard, ops, pipeline
from ptqc.cli import main
from ptqc.errors import PtqcError
from ptqc.ir import info

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-qwen2"
OUTLIERS = ROOT / "examples" / "tiny-qwen2-outliers"


def _run(qm, text="rotate"):
    return pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True))


def _transforms(qm):
    return [n for n in qm.graph.nodes if n.op == "call_function" and n.target == ops.TRANSFORM]


@pytest.fixture(scope="module")
def example():
    """Fresh clones of the traced example; ``example(OUTLIERS)``: the same graph (both models
    share one config, checked) reading the outlier model's weights, which saves a trace."""
    from ptqc.model import WeightStore, weight_files

    qm = frontend.load(EXAMPLE)

    def get(path=EXAMPLE):
        c = qm.clone()
        if path != EXAMPLE:
            assert json.loads((path / "config.json").read_text()) == json.loads((EXAMPLE / "config.json").read_text())
            files = weight_files(path)
            c.store = WeightStore(files, qm.dtype, aliases=dict(qm.store.aliases))
            c.store.overlay.update({k: v for k, v in qm.store.overlay.items() if k not in files})  # buffers
            c.source = str(path.resolve())
        return c
    return get


# ---- Hadamard matrices -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 100, 256, 344, 384])
def test_hadamard_is_orthonormal_with_equal_magnitudes(n):
    h = hadamard.hadamard(n)
    assert h.shape == (n, n)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))  # a scaled +-1 matrix


def test_factorizations_of_model_sizes():
    assert hadamard.factor(384) == (12, 32)  # the example's intermediate size
    assert hadamard.factor(256) == (1, 256)
    assert hadamard.factor(64) == (1, 64)
    assert hadamard.factor(11008) == (344, 32)  # Llama-2-7B: Paley I over GF(7^3)
    assert hadamard.factor(14336) == (28, 512)  # Llama-3-8B: Paley I over GF(27)
    assert hadamard.factor(18944) == (148, 128)  # Qwen2-7B: Paley II, q = 73
    assert hadamard.construction(12) == "paley1 q=11" and hadamard.construction(36) == "paley2 q=17"
    for n in (92, 6, 18, 7):
        with pytest.raises(PtqcError) as e:
            hadamard.factor(n, "hidden size", "use rotate:residual=orthogonal")
        msg = str(e.value)
        assert f"hidden size {n} has no Hadamard factorization" in msg and "residual=orthogonal" in msg
        assert "\n" not in msg
    with pytest.raises(PtqcError, match="92"):
        hadamard.hadamard(92)


def test_random_and_kronecker_forms():
    h = hadamard.hadamard(384)
    r0, r0b, r1 = hadamard.random_hadamard(384, 0), hadamard.random_hadamard(384, 0), hadamard.random_hadamard(384, 1)
    assert torch.equal(r0, r0b) and not torch.equal(r0, r1)
    assert torch.allclose(r0 @ r0.t(), torch.eye(384, dtype=r0.dtype), atol=1e-12)
    s = (r0 / h)[0]  # H diag(s): every column of H flipped or not
    assert torch.allclose(r0, h * s[None, :]) and set(s.round().tolist()) == {-1.0, 1.0}
    q = hadamard.random_orthogonal(96, 3)
    assert torch.allclose(q @ q.t(), torch.eye(96, dtype=q.dtype), atol=1e-12)
    for n, sizes in ((384, (24, 16)), (64, (8, 8)), (12, (12, 1)), (256, (16, 16))):
        a, b = hadamard.kron_factors(n)
        assert (a.shape[0], b.shape[0]) == sizes
        assert torch.allclose(torch.kron(a, b), hadamard.hadamard(n), atol=1e-14)
        x = torch.randn(3, 5, n)
        assert torch.allclose(ops.transform(x, a.float(), b.float()), (x.double() @ hadamard.hadamard(n)).float(),
                              atol=1e-5)


# ---- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_rotation_keeps_logits(loaded, ids, arch):
    qm = loaded(arch)
    x = ids(2, 19)
    ref = qm(x)
    w_before = {n: qm.store[n] for n in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight")}
    rec = _run(qm)[0]
    y = qm(x)
    assert (y - ref).abs().max().item() < 1e-4
    assert "rotated" in qm.properties
    # it really rotated: weights changed, norms are ones, transforms are in place
    assert all(not torch.allclose(qm.store[n], w) for n, w in w_before.items())
    for n in qm.nodes(ops.RMS_NORM):
        assert torch.equal(qm.store[n.args[1].target], torch.ones_like(qm.store[n.args[1].target]))
    L = qm.num_layers
    ts = _transforms(qm)
    assert len(ts) == 3 * L and rec["summary"]["transforms_inserted"] == 3 * L
    assert all(info(t)["role"] == "online_hadamard" and info(t)["layer"] is not None for t in ts)
    for attn in qm.nodes(ops.ATTENTION):
        assert all(a.target == ops.TRANSFORM for a in attn.args[:2])
    for down in qm.linears(role="down"):
        assert down.args[0].target == ops.TRANSFORM
        assert down.args[0].args[1].target == f"{info(down)['module']}.hadamard_a"
    assert rec["summary"]["layers"][0]["fused"] == ["input_norm -> q/k/v", "post_attention_norm -> gate/up"]
    if arch == "llama":  # tied embeddings: untied, and now different
        assert rec["summary"]["untied"] == ["lm_head.weight"] and "lm_head.weight" not in qm.store.aliases
        assert not torch.allclose(qm.store["lm_head.weight"], qm.store["model.embed_tokens.weight"])


def test_rotation_keeps_logits_of_the_example(example):
    qm = example()
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = qm(x)
    rec = _run(qm)[0]
    # float32 reassociation only: 1e-5 of the logits' range (measured 7.9e-6; the absolute error,
    # 1.4e-4 on logits up to 17.6, depends on the CPU's BLAS kernels)
    assert (qm(x) - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    s = rec["summary"]
    assert s["online_down"] == {"384": "12*32"} and s["head_dim"] == {"64": "1*64"}
    assert s["residual"].startswith("random hadamard 256") and s["v_folded"] == 8
    assert qm.store.spec("model.layers.0.mlp.down_proj.hadamard_a")[0] == (24, 24)  # 384 = 24 * 16


@pytest.mark.parametrize("opts,transforms_per_layer", [
    ("online_down=false", 2), ("qk=false", 1), ("v=false", 3),
    ("online_down=false,qk=false,v=false", 0), ("residual=orthogonal,seed=5", 3)])
def test_each_step_alone_is_exact(loaded, ids, opts, transforms_per_layer):
    qm = loaded("qwen2")
    x = ids(2, 17)
    ref = qm(x)
    rec = _run(qm, f"rotate:{opts}")[0]
    assert (qm(x) - ref).abs().max().item() < 1e-4
    assert len(_transforms(qm)) == transforms_per_layer * qm.num_layers
    assert rec["summary"]["v_folded"] == (0 if "v=false" in opts else qm.num_layers)


def test_writer_biases_and_offset_norms(loaded, ids):
    """o/down biases rotate with the stream; Gemma-style (1 + w) norms are fused to w = 0."""
    qm = loaded("qwen2")
    g = qm.graph
    torch.manual_seed(1)
    for lin in qm.linears(role=("o", "down")):
        name = lin.args[1].target.replace(".weight", ".bias")
        qm.store[name] = torch.randn(qm.store.spec(lin.args[1].target)[0][0]) * 0.02
        with g.inserting_before(lin):
            b = g.get_attr(name)
        lin.args = (lin.args[0], lin.args[1], b)
    for n in qm.nodes(ops.RMS_NORM):  # x * (1 + (w - 1)): the same function in Gemma's form
        n.args = (*n.args[:3], 1.0)
        qm.store[n.args[1].target] = qm.store[n.args[1].target] - 1
    x = ids(2, 15)
    ref = qm(x)
    _run(qm)
    assert (qm(x) - ref).abs().max().item() < 1e-4
    for n in qm.nodes(ops.RMS_NORM):
        assert torch.equal(qm.store[n.args[1].target], torch.zeros_like(qm.store[n.args[1].target]))


# ---- refusals ----------------------------------------------------------------------------------
def test_norm_feeding_a_non_linear_is_refused_before_any_change(loaded):
    qm = loaded("qwen2")
    g = qm.graph
    head = qm.linears(role="lm_head")[0]
    with g.inserting_before(head):
        r = g.call_function(torch.ops.aten.relu.default, (head.args[0],))
    info(r).update({"module": "model.norm", "layer": None, "role": None})
    head.args = (r, *head.args[1:])
    with pytest.raises(PtqcError, match=r"model\.norm \(ptqc\.rms_norm\) feeds model\.norm \(relu\), not only linears"):
        _run(qm)
    assert not qm.store.written and not _transforms(qm)


def _shrink(qm, hidden: int, inter: int):
    """The same graph with narrower weights: hidden and intermediate sizes without a Hadamard
    factorization (the graph only fixes heads and head_dim; every weight is sliced)."""
    from ptqc.ir import propagate

    for n in qm.graph.nodes:
        if n.op != "get_attr" or "rotary" in n.target:
            continue
        t = qm.store[n.target]
        role = n.target.rsplit(".", 2)[-2]
        if t.dim() == 1:
            t = t[:hidden] if "norm" in n.target or role in ("o_proj", "down_proj") else t
        elif role in ("o_proj", "down_proj"):
            t = t[:hidden, :inter] if role == "down_proj" else t[:hidden]
        elif role in ("gate_proj", "up_proj"):
            t = t[:inter, :hidden]
        else:  # q/k/v, embed_tokens, lm_head
            t = t[:, :hidden]
        qm.store[n.target] = t.contiguous()
    propagate(qm.graph, qm.store)
    return qm


def test_sizes_without_hadamard_are_refused_with_the_fix(loaded, ids):
    qm = _shrink(loaded("llama"), 92, 92)  # 92 = 4 * 23: no Hadamard matrix built here
    assert qm.store.spec("model.embed_tokens.weight")[0][1] == 92
    x = ids(2, 9)
    ref = qm(x)
    with pytest.raises(PtqcError, match=r"^rotate: hidden size 92 has no Hadamard .*use rotate:residual=orthogonal$"):
        _run(qm)
    with pytest.raises(PtqcError, match=r"intermediate size 92 has no Hadamard .*use rotate:online_down=false$"):
        _run(qm, "rotate:residual=orthogonal")
    assert not _transforms(qm) and not any("hadamard" in k for k in qm.store.overlay)  # nothing changed
    _run(qm, "rotate:residual=orthogonal,online_down=false")
    assert (qm(x) - ref).abs().max().item() < 1e-4
    assert len(_transforms(qm)) == 2 * qm.num_layers  # q and k (head_dim 32)
    with pytest.raises(PtqcError, match="already rotated"):  # its properties say so
        pipeline.get_pass("rotate")().run(qm, pipeline.PassContext(quiet=True))


def test_pipeline_order(loaded):
    for before in ("rtn", "smooth", "kv", "act_quant"):
        with pytest.raises(PtqcError, match=rf"pass 'rotate' must run before '{before}'"):
            pipeline.check_order(pipeline.parse_pipeline(f"{before},rotate"), {"canonical"})
    pipeline.check_order(pipeline.parse_pipeline("rotate,gptq,kv,act_quant"), {"canonical"})
    with pytest.raises(PtqcError, match="must run before"):
        _run(loaded("qwen2"), "rtn,rotate")
    r = CliRunner().invoke(main, ["passes", "rotate"], catch_exceptions=False)
    assert r.exit_code == 0 and "QuaRot rotations" in r.output and "residual=hadamard (hadamard|orthogonal)" in r.output


# ---- artifact ----------------------------------------------------------------------------------
def test_artifact_round_trip_keeps_outputs(loaded, ids, tmp_path):
    qm = loaded("llama")  # tied embeddings
    _run(qm, "rotate,rtn:bits=4,group=32")
    out = artifact.save(qm, tmp_path / "out")
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.down_proj.hadamard_a",
            "model.layers.1.self_attn.qk_hadamard_b"} <= keys
    back = artifact.load(out)
    x = ids(2, 13)
    assert torch.equal(back(x), qm(x))
    man = json.loads((out / "ptqc.json").read_text())
    assert "rotated" in man["properties"] and man["passes"][0]["summary"]["untied"] == ["lm_head.weight"]
    assert man["weights"]["aliases"] == {}


# ---- the point: outliers -----------------------------------------------------------------------
def _q_and_down_inputs(qm, x):
    """Per role, (mean over tokens of max|x|/rms(x), W4 per-token act-quant output error of the linear)."""
    readers = {}
    for n in qm.linears(role=("q", "down")):
        readers[n.args[0]] = n
    acc = {"q": [], "down": []}

    def hook(node, v):
        lin = readers.get(node)
        if lin is None:
            return
        a = v.reshape(-1, v.shape[-1]).float()
        w = qm.store[lin.args[1].target].float()
        ratio = (a.abs().amax(-1) / a.pow(2).mean(-1).sqrt()).mean().item()
        err = ((ops.quantize_act(a, None, None, 4, 0, True) - a) @ w.t()).norm() / (a @ w.t()).norm()
        acc[info(lin)["role"]].append((ratio, err.item()))
    qm(x, hook=hook)
    return {k: tuple(sum(v[i] for v in vals) / len(vals) for i in range(2)) for k, vals in acc.items()}


def test_rotation_removes_activation_outliers(example):
    from ptqc import evaluate

    qm = example(OUTLIERS)
    tok = evaluate.load_tokenizer(qm.source)
    x = torch.tensor([tok((OUTLIERS / "eval.txt").read_text()[:3000])["input_ids"][:128]])
    before = _q_and_down_inputs(qm, x)
    _run(qm)
    after = _q_and_down_inputs(qm, x)
    # measured: q max/rms 13.7 -> 3.1, W4A4 q output error 0.91 -> 0.03; down 13.5 -> 2.4, 0.35 -> 0.15
    assert before["q"][0] > 10 and after["q"][0] < before["q"][0] / 3
    assert after["q"][1] < before["q"][1] / 5
    assert after["down"][0] < before["down"][0] / 3
    assert after["down"][1] < before["down"][1] / 1.5
