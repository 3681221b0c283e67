"""GPTQ: equals RTN when there is nothing to compensate, beats it when there is, keeps the
ordinary group layout with act_order, and fails (or falls back) clearly on a singular Hessian."""
import importlib

import pytest
import torch

from ptqc import gptq_core, pipeline, quant
from ptqc.errors import PtqcError
from ptqc.weights import dequantized_weight, is_quantized

gptq = importlib.import_module("ptqc.passes.gptq")


def _rtn(w, spec):
    s, z = quant.compute_qparams(w, spec)
    return quant.quantize(w, s, z, spec), s, z


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [quant.QuantSpec(4, 32, False), quant.QuantSpec(3, 0, True)])
def test_identity_hessian_gives_exactly_rtn(act_order, spec):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    codes, scale, zp, _ = gptq.gptq_quantize(w, torch.eye(64), spec, block=16, act_order=act_order)
    rc, rs, rz = _rtn(w, spec)
    assert torch.equal(codes, rc) and torch.equal(scale, rs)
    assert (zp is None and rz is None) or torch.equal(zp, rz)


def _correlated_hessian(n, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix * (1 + 5 * torch.rand(n, generator=g))  # uneven channels
    return 2 * x.t() @ x / tokens


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits, group", [(4, 32), (3, 64), (2, 0)])
def test_gptq_output_error_below_rtn(act_order, bits, group):
    torch.manual_seed(1)
    w, h = torch.randn(48, 128), _correlated_hessian(128)
    spec = quant.QuantSpec(bits, group, False)
    codes, scale, zp, _ = gptq.gptq_quantize(w, h, spec, block=32, act_order=act_order)
    assert codes.dtype == torch.int8 and codes.min() >= spec.qmin and codes.max() <= spec.qmax
    assert scale.shape == (48, 128 // group if group else 1)  # contiguous group layout, no g_idx
    err = gptq.output_error(w, quant.dequantize(codes, scale, zp, group), h)
    rc, rs, rz = _rtn(w, spec)
    err_rtn = gptq.output_error(w, quant.dequantize(rc, rs, rz, group), h)
    assert err < 0.8 * err_rtn, (err, err_rtn)


def test_singular_hessian_is_reported():
    with pytest.raises(gptq.SingularHessian, match="not positive definite"):
        gptq.gptq_quantize(torch.randn(4, 8), -torch.eye(8), quant.QuantSpec(4, 0, True), retries=2)


def test_dead_inputs_are_zeroed():
    h = torch.eye(8)
    h[2, 2] = 0
    codes, scale, zp, _ = gptq.gptq_quantize(torch.randn(4, 8), h, quant.QuantSpec(4, 0, True))
    assert torch.equal(codes[:, 2], torch.zeros(4, dtype=torch.int8))


def _run(qm, text, x):
    return pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True, calib=x))


def test_gptq_pass_beats_rtn_on_every_linear(loaded, ids):
    qm = loaded("qwen2")
    rec = _run(qm, "gptq:bits=3,group=32", ids(8, 32))
    assert all(is_quantized(n) for i in range(2) for n in qm.linears(layer=i))
    recs = [q["weight"] for m, q in qm.quant.items()]
    assert len(recs) == 14 and all(r["method"] == "gptq" and r["err_gptq"] < r["err_rtn"] for r in recs)
    assert rec[0]["summary"]["mean_err_gptq"] < rec[0]["summary"]["mean_err_rtn"]
    # stored codes + scales are what the graph computes with
    lin = qm.linears(role="down", layer=1)[0]
    w = dequantized_weight(qm, lin)
    assert w.shape == qm.store.spec(lin.args[1].args[0].target)[0]


def test_gptq_singular_hessian_names_module_or_falls_back(loaded, ids, monkeypatch):
    def boom(h, damp, retries, perm=None):
        raise gptq.SingularHessian("Hessian is not positive definite even with damp=100")
    monkeypatch.setattr(gptq_core, "inverse_cholesky", boom)
    with pytest.raises(PtqcError, match=r"model\.layers\.0\.self_attn\.q_proj.*fallback=rtn"):
        _run(loaded("qwen2"), "gptq:bits=4,group=32", ids(2, 16))
    qm = loaded("qwen2")
    _run(qm, "gptq:bits=4,group=32,fallback=rtn", ids(2, 16))
    assert {q["weight"]["method"] for q in qm.quant.values()} == {"rtn-fallback"}


def test_gptq_options_are_checked():
    pipeline.load_builtin_passes()
    with pytest.raises(PtqcError, match="bits=9 is outside 2..8"):
        pipeline.parse_pipeline("gptq:bits=9")
    with pytest.raises(PtqcError, match="fallback is error|rtn"):
        pipeline.parse_pipeline("gptq:fallback=maybe")


def test_gptaq_term_moves_outputs_towards_the_float_model():
    g = torch.Generator().manual_seed(3)
    n, tokens = 64, 4096
    x_fp = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n ** 0.5)
    # inputs after earlier quantized layers: a systematic (hence compensable) distortion
    x_q = x_fp @ (torch.eye(n) + 0.2 * torch.randn(n, n, generator=g) / n ** 0.5)
    w = torch.randn(32, n, generator=g)
    h = 2 * x_q.t() @ x_q / tokens
    dxxt = 2 * (x_fp - x_q).t() @ x_q / tokens
    spec = quant.QuantSpec(4, 32, False)
    target = x_fp @ w.t()

    def err(codes, scale, zp, _):
        return (x_q @ quant.dequantize(codes, scale, zp, 32).t() - target).pow(2).mean().item()
    plain = err(*gptq.gptq_quantize(w, h, spec, block=16))
    asym = err(*gptq.gptq_quantize(w, h, spec, block=16, dxxt=dxxt, alpha=0.25))
    assert asym < 0.95 * plain, (asym, plain)
    assert err(*gptq.gptq_quantize(w, h, spec, block=16, dxxt=dxxt, alpha=0.0)) == plain


def test_gptaq_pass_with_alpha_zero_is_gptq(loaded, ids):
    x = ids(4, 16)
    a, b = loaded("qwen2"), loaded("qwen2")
    _run(a, "gptq:bits=3,group=32,propagate=quantized", x)
    rec = _run(b, "gptaq:bits=3,group=32,alpha=0", x)
    assert rec[0]["summary"]["linears"] == 14
    for n in a.linears():
        if is_quantized(n):
            name = n.args[1].args[0].target
            torch.testing.assert_close(b.store[name].float(), a.store[name].float(), atol=1, rtol=0)
    assert {q["weight"]["method"] for q in b.quant.values()} == {"gptaq"}
    y = ids(1, 9)
    torch.testing.assert_close(b(y), a(y), atol=1e-3, rtol=1e-3)


def test_gptaq_runs_and_checks_options(loaded, ids):
    qm = loaded("llama")
    rec = _run(qm, "gptaq:bits=2,group=32", ids(4, 16))
    assert rec[0]["summary"]["mean_err_gptaq"] > 0
    with pytest.raises(PtqcError, match="alpha=2.0 must be in"):
        pipeline.parse_pipeline("gptaq:alpha=2")


def test_staged_run_equals_plain_layer_run(loaded, ids):
    """run_staged with callbacks that change nothing computes exactly what run_layer does."""
    from ptqc.calib import LayerRunner, calibration_batches
    from ptqc.observers import Hessian

    qm = loaded("qwen2")
    batches = calibration_batches(ids(4, 16), 2)
    a, b = LayerRunner(qm, batches), LayerRunner(qm, batches)
    a.run_prefix()
    b.run_prefix()
    a.run_layer(0)
    lins = qm.linears(layer=0)
    seen = []
    stages = {}
    for n in lins:
        stages.setdefault(n.args[0], {})[n] = {"h": Hessian()}
    b.run_staged("layer.0", [(st, lambda st=st: seen.append(sorted(n.meta["ptqc"]["role"] for n in st)))
                             for st in stages.values()])
    assert seen == [["k", "q", "v"], ["o"], ["gate", "up"], ["down"]]  # graph order
    for sa, sb in zip(a.state, b.state):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)


def test_sequential_observes_later_linears_after_earlier_ones_are_quantized(loaded, ids):
    """In sequential mode o_proj's Hessian comes from quantized q/k/v, so o's codes differ from
    the two-forward mode while q/k/v's (same inputs in both) are identical."""
    calib = ids(4, 16)
    res = {}
    for mode in ("sequential", "quantized"):
        qm = loaded("qwen2")
        pipeline.PassManager(pipeline.parse_pipeline(f"gptq:bits=3,group=32,propagate={mode}")).run(
            qm, pipeline.PassContext(quiet=True, calib=calib))
        res[mode] = {n.meta["ptqc"]["module"]: dequantized_weight(qm, n) for n in qm.linears(layer=0)}
    for mod, w in res["sequential"].items():
        same = torch.equal(w, res["quantized"][mod])
        assert same == any(mod.endswith(p) for p in ("q_proj", "k_proj", "v_proj")), mod


def test_error_feedback_loop_and_its_callbacks():
    """A diagonal U feeds nothing back: each column is just rounded. The callbacks see each
    block's columns and the error-corrected columns ahead."""
    W = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    ref, starts, ahead_ok = W.clone(), [], []

    def column(c, w, ahead):
        ahead_ok.append(torch.equal(ahead(2), ref[:, c:c + 2]))
        return w.round()

    Q = gptq_core.error_feedback(W, torch.eye(12), column, block=5,
                                 start=lambda c, blk: starts.append((c, blk.shape[1])))
    assert torch.equal(Q, ref.round()) and all(ahead_ok) and len(ahead_ok) == 12
    assert starts == [(0, 5), (5, 5), (10, 2)]
    U = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    for block in (1, 2):  # across blocks and inside one
        seen = []
        gptq_core.error_feedback(torch.tensor([[0.3, 0.0]]), U, lambda c, w, a: seen.append(w.clone()) or 0 * w,
                                 block=block)
        torch.testing.assert_close(seen[1], torch.tensor([[-0.15]]))  # column 0's error 0.3 times U[0, 1]


def test_inverse_cholesky_in_place_equals_the_textbook_formula():
    """One buffer, factorized in place through its column-major view, gives exactly
    U = chol_upper(chol_inverse(chol(H[perm][:, perm] + damp mean(diag) I))), dead inputs' H_jj = 1,
    and a retry with 10x the damp when the first factorization fails."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 64, generator=g) * torch.rand(64, generator=g)
    x[:, 7] = 0  # a dead input
    h = x.t() @ x * (2 / 300)
    for perm, damp in ((None, 0.01), (gptq_core.visiting_order(h, True), 0.01)):
        p = torch.arange(64) if perm is None else perm
        H = h[p][:, p].clone()
        H[H.diagonal() == 0, H.diagonal() == 0] = 1
        L = torch.linalg.cholesky(H + damp * torch.diag(H).mean().item() * torch.eye(64))
        ref = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        U, used = gptq_core.inverse_cholesky(h, damp, 0, perm)
        assert torch.equal(U, ref) and used == damp
    indefinite = -torch.eye(4)
    indefinite[0, 0] = 30.0  # mean(diag) = 6.75: damp 0.01 leaves it indefinite, 1.0 does not
    assert gptq_core.inverse_cholesky(indefinite, 0.01, 2)[1] == pytest.approx(1.0)
    with pytest.raises(gptq.SingularHessian):
        gptq_core.inverse_cholesky(indefinite, 0.01, 1)


def test_hessian_is_scaled_in_place_once():
    from ptqc.observers import Hessian
    o, x = Hessian(), torch.randn(10, 4)
    o.update(x)
    h = o.result()
    assert o.result() is h and torch.allclose(h, 2 * x.t() @ x / 10)


def test_output_error_beyond_max_rows_reads_every_kth_row():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 32, generator=g)
    h, w = x.t() @ x, torch.randn(3000, 32, generator=g)
    wq = w + 0.1 * torch.randn(3000, 32, generator=g)
    k = -(-3000 // gptq_core.ERROR_ROWS)
    assert gptq_core.output_error(w, wq, h) == gptq_core.output_error(w[::k], wq[::k], h, max_rows=None)
    few = slice(0, gptq_core.ERROR_ROWS)
    assert gptq_core.output_error(w[few], wq[few], h) == gptq_core.output_error(w[few], wq[few], h, None)
    exact = gptq_core.output_error(w, wq, h, max_rows=None)
    assert gptq_core.output_error(w, wq, h) == pytest.approx(exact, rel=0.1)


def test_hessian_past_1024_inputs_accumulates_the_upper_triangle_and_mirrors_it():
    from ptqc.moe_calib import ExpertHessians
    from ptqc.observers import GRAM_BLOCK, Hessian

    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(300, 2 * GRAM_BLOCK + 77, generator=g, dtype=torch.float64) for _ in range(3)]
    o = Hessian(dtype=torch.float64)
    for x in xs:
        o.update(x)
    h, ref = o.result(), 2 * sum(x.t() @ x for x in xs) / 900
    assert torch.equal(h, h.t()) and torch.allclose(h, ref, rtol=1e-12, atol=1e-12)
    e = ExpertHessians(2)
    x = torch.randn(8, GRAM_BLOCK + 5, generator=g)
    gate, up = torch.randn(2, 3, x.shape[1], generator=g), torch.randn(2, 3, x.shape[1], generator=g)
    e.update((x, None, torch.tensor([[0], [1]] * 4), gate, up))  # tokens 0, 2, 4, 6 go to expert 0
    h0 = e.hessian("gate", 0)
    assert torch.equal(h0, h0.t()) and torch.allclose(h0, 2 * x[0::2].t() @ x[0::2] / 4, rtol=1e-5, atol=1e-5)
