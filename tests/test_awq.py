"""AWQ: the scale fold keeps the float model's output, clipping and scaling lower the error,
and the pass quantizes every selected linear."""
import importlib

import pytest
import torch

from ptqc import pipeline, quant
from ptqc.calib import LayerRunner
from ptqc.weights import dequantized_weight, is_quantized

awq = importlib.import_module("ptqc.passes.awq")


def _run(qm, text, x):
    return pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True, calib=x))


def _outliers(qm, layer=0, channels=(3, 17), factor=64.0):
    """Function-preserving outlier input channels (norm channel * f, weight columns / f)."""
    for norm_role, roles in (("input_norm", ("q", "k", "v")), ("post_attention_norm", ("gate", "up"))):
        norm = next(qm.nodes(role=norm_role, layer=layer)).args[1].target
        g = qm.store[norm].clone()
        g[list(channels)] *= factor
        qm.store[norm] = g
        for n in qm.linears(role=roles, layer=layer):
            w = qm.store[n.args[1].target].clone()
            w[:, list(channels)] /= factor
            qm.store[n.args[1].target] = w


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama fixture is MHA (v -> o folded), qwen2 GQA
def test_fold_is_exact_in_float(loaded, ids, arch):
    qm = loaded(arch)
    _outliers(qm)
    x = ids(2, 19)
    before = qm(x)
    rec = _run(qm, "awq:quantize=false,clip=false,group=32", ids(4, 16))
    after = qm(x)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    scales = rec[0]["summary"]["scales"]
    folded_into = {r["into"].split(".")[-1] for r in scales}
    assert {"input_layernorm", "post_attention_layernorm", "up_proj"} <= folded_into
    assert ("v_proj" in folded_into) == (arch == "llama")
    assert any(r["alpha"] is not None for r in scales)  # some group was actually rescaled
    changed = [n for n in qm.linears(layer=0) if qm.store.written.get(n.args[1].target)]
    assert changed and not any(is_quantized(n) for n in qm.linears())


def test_fold_into_gemma_style_norm_is_exact(loaded, ids):
    qm = loaded("llama")
    for n in qm.nodes(role=("input_norm", "post_attention_norm")):  # same function as x * (1 + (w - 1))
        n.args = (n.args[0], n.args[1], n.args[2], 1.0)
        qm.store[n.args[1].target] = qm.store[n.args[1].target] - 1.0
    _outliers(qm, factor=16.0)
    x = ids(2, 11)
    before = qm(x)
    _run(qm, "awq:quantize=false,clip=false,group=32", ids(4, 16))
    after = qm(x)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_awq_beats_rtn_with_outlier_channels(loaded, ids):
    x, calib = ids(4, 24), ids(8, 32)
    ref = loaded("llama")
    _outliers(ref)
    fp = ref(x)
    errs = {}
    for name, text in (("rtn", "rtn:bits=3,group=32"), ("awq", "awq:bits=3,group=32")):
        qm = loaded("llama")
        _outliers(qm)
        _run(qm, text, calib)
        errs[name] = (qm(x) - fp).pow(2).mean().item()
        assert all(is_quantized(n) for n in qm.linears() if n.meta["ptqc"]["role"] != "lm_head")
    assert errs["awq"] < 0.9 * errs["rtn"], errs


def test_clip_search_never_increases_the_error():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[:, 5] *= 8
    x = torch.randn(256, 64)
    spec = quant.QuantSpec(3, 32, False)
    clipped = awq.search_clip(x, w, spec)
    err = lambda v: (x @ quant.fake_quantize(v, spec).t() - x @ w.t()).pow(2).mean()  # noqa: E731
    assert err(clipped) <= err(w) + 1e-7
    assert not torch.equal(clipped, w)


def test_clip_search_clamps_symmetrically_on_the_autoawq_grid():
    """AutoAWQ's clip: each group clamped to [-r m, r m] (m = max|w|, r in 1, 0.95, ... 0.55), so a
    group with one large positive weight keeps its negative end (the search used to shrink both
    ends in proportion on a 0.1 grid, a coarser search with a higher output error)."""
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[:, ::32] = 6.0  # asymmetric groups: range about [-2.5, 6]
    x = torch.randn(512, 64)
    spec = quant.QuantSpec(3, 32, False)
    wg = w.reshape(32, 2, 32)
    cg = awq.search_clip(x, w, spec).reshape(32, 2, 32)
    m = wg.abs().amax(-1, keepdim=True)
    r = (cg.amax(-1, keepdim=True) / m * 20).round() / 20
    assert torch.equal(cg, torch.maximum(torch.minimum(wg, r * m), -r * m))
    assert ((r >= 0.55) & (r <= 1)).all() and torch.equal(cg.amin(-1), wg.amin(-1))
    assert (r < 1).any() and ((r * 20).round() % 2 == 1).any()  # some r = 0.95, 0.85, ...
    many = torch.randn(4096, 64)
    assert torch.equal(awq.search_clip(many, w, spec), awq.search_clip(many[::8], w, spec))  # 512 tokens


def test_o_proj_is_clipped_under_gqa(loaded, ids):
    """As AutoAWQ, every linear but q/k gets the clip search, also o_proj where GQA rules out the
    v -> o scale (it used to get plain RTN)."""
    qm = loaded("qwen2")
    o = qm.linears(role="o", layer=0)[0]
    w = qm.store[o.args[1].target].clone()
    _run(qm, "awq:bits=3,group=32", ids(4, 16))
    rec = {n.meta["ptqc"]["role"]: qm.quant[n.meta["ptqc"]["module"]]["weight"] for n in qm.linears(layer=0)}
    assert rec["o"]["clipped"] and not rec["o"]["scaled"]
    assert [r for r in rec if rec[r]["clipped"]] == [r for r in rec if r not in ("q", "k")]
    assert not torch.equal(dequantized_weight(qm, o), quant.fake_quantize(w, quant.QuantSpec(3, 32, False)))


def test_awq_then_gptq_composes(loaded, ids):
    qm = loaded("qwen2")
    rec = _run(qm, "awq:quantize=false,gptq:bits=4,group=32", ids(4, 16))
    assert {q["weight"]["method"] for q in qm.quant.values()} == {"gptq"}
    assert rec[0]["summary"]["groups_scaled"] > 0


def test_quantize_false_does_not_claim_weight_quant():
    """``awq:quantize=false`` only scales and clips: it must not claim quantized weights, so the
    compile pipeline adds no ``pack`` after it, while a quantizing awq still gets one."""
    scale_only = pipeline.complete(pipeline.parse_pipeline("awq:quantize=false"))
    assert [p.name for p in scale_only] == ["awq"]
    assert "weight_quant" not in scale_only[0].provides and "awq_scaled" in scale_only[0].provides
    assert [p.name for p in pipeline.complete(pipeline.parse_pipeline("awq"))] == ["awq", "pack"]
    assert [p.name for p in pipeline.complete(pipeline.parse_pipeline("awq:quantize=false,gptq"))] == ["awq", "gptq", "pack"]


def test_scale_search_scores_the_block_output(loaded, ids):
    """As AutoAWQ's module2inspect: q/k/v are scored on o_proj's output (the attention block),
    gate/up on down_proj's (the MLP), v -> o and up -> down on the linear itself; the block runs
    the layer's own nodes, so with float weights its loss is 0 and it sees a changed weight."""
    qm = loaded("llama")
    runner = LayerRunner(qm, [ids(2, 16), ids(2, 16)])
    runner.run_prefix()
    seg = runner.segments()["layer.0"]
    groups = awq.AWQ()._groups(qm, {n.name: None for n in qm.linears()})[0]
    pos = {n: k for k, n in enumerate(seg.nodes)}
    starts = {min(pos[n] for n in lins) for _, lins in groups}
    snaps = awq.snapshots(qm, seg, runner.state, sorted(starts))
    closes = {}
    for prev, lins in groups:
        block = awq.Block(qm, seg, prev, lins, snaps[min(pos[n] for n in lins)])
        roles = tuple(n.meta["ptqc"]["role"] for n in lins)
        closes[roles] = [n.meta["ptqc"]["role"] for n in block.outs]
        assert block.loss({}) == 0
        w = lins[0].args[1].target
        assert block.loss({w: qm.store[w] * 1.01}) > 0
    assert closes == {("q", "k", "v"): ["o"], ("o",): ["o"], ("gate", "up"): ["down"], ("down",): ["down"]}
