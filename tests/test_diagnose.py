"""ptqc diagnose: metrics equal a direct computation, local and accumulated modes mean what they
say, a deliberately broken layer is found, the CLI writes its report and fails in one line."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

from ptqc import calib, diagnose, ops, pipeline, probes, quant
from ptqc.cli import main
from ptqc.errors import PtqcError
from ptqc.ir import execute
from ptqc.weights import set_quantized_weight, weight_of


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _rtn_layer(qm, layer, bits=3):
    spec = quant.QuantSpec(bits, 32, False)
    for n in qm.linears(layer=layer):
        w = weight_of(qm, n).float()
        s, z = quant.compute_qparams(w, spec)
        set_quantized_weight(qm, n, spec, quant.quantize(w, s, z, spec), s, z, "test")
    return qm


def _capture(qm, x):
    """Full forward: every linear's output by module path, each layer's output, the logits."""
    outs = {s.layer: probes.layer_output(s) for s in calib.split(qm.graph) if s.layer is not None}
    by_name = {v: k for k, v in outs.items()}
    vals = {}

    def hook(n, v):
        if n.op == "call_function" and n.target == ops.LINEAR:
            vals[n.meta["ptqc"]["module"]] = v
        elif n.name in by_name:
            vals[f"layer.{by_name[n.name]}"] = v
    vals["logits"] = execute(qm.graph, qm.store, {"input_ids": x}, hook=hook)
    return vals


def _expected(yf, yq):
    yf, yq = yf.double(), yq.double()
    return diagnose.metrics_from_sums(float((yf ** 2).sum()), float(((yq - yf) ** 2).sum()), yf.numel())


def _close(got, want, rtol=1e-5):
    assert got["exact"] == want["exact"]
    for m in diagnose.METRICS:
        if want[m] is None:
            assert got[m] is None
        else:
            assert got[m] == pytest.approx(want[m], rel=rtol, abs=1e-12), (m, got, want)


def test_identical_models_are_exact(loaded, ids):
    fp, q = loaded("qwen2"), loaded("qwen2")
    r = diagnose.compare(fp, q, ids(5, 19), batch_size=2)
    recs = [e["output"][mo] for e in r["layers"] for mo in diagnose.MODES]
    recs += [rec[mo] for e in r["layers"] for rec in e["linears"].values() for mo in diagnose.MODES]
    recs += [r["logits"][mo] for mo in diagnose.MODES]
    assert len(recs) == 2 * 2 + 2 * 2 * 7 + 2
    assert all(m == {"mse": 0.0, "rel_error": 0.0, "sqnr_db": None, "exact": True} for m in recs)
    assert r["sensitive_layers"] == [] and r["sensitive_linears"] == []
    assert r["num_layers"] == 2 and r["tokens"] == 95 and r["unmatched_linears"] == {"fp_only": [],
                                                                                       "quantized_only": []}
    json.dumps(r, allow_nan=False)  # valid JSON: no inf / nan anywhere


@pytest.mark.parametrize("batch_size", [4, 3])
def test_metrics_equal_direct_computation(loaded, ids, batch_size):
    fp = loaded("qwen2")
    q = _rtn_layer(_rtn_layer(loaded("qwen2"), 0), 1)
    hybrid = _rtn_layer(loaded("qwen2"), 1)  # float layer 0, the same quantized layer 1
    x = ids(4, 17)
    r = diagnose.compare(fp, q, x, batch_size=batch_size)
    f, qq, h = _capture(fp, x), _capture(q, x), _capture(hybrid, x)
    rtol = 1e-5 if batch_size == 4 else 1e-4  # other batch shapes: float rounding of the matmuls
    for e in r["layers"]:
        i = e["layer"]
        assert len(e["linears"]) == 7
        for mod, rec in e["linears"].items():
            _close(rec["accumulated"], _expected(f[mod], qq[mod]), rtol)  # q's linear on q's own inputs
            # local: q's layer on the float model's inputs == the hybrid model (only that layer quantized)
            _close(rec["local"], _expected(f[mod], (qq if i == 0 else h)[mod]), rtol)
        _close(e["output"]["accumulated"], _expected(f[f"layer.{i}"], qq[f"layer.{i}"]), rtol)
        _close(e["output"]["local"], _expected(f[f"layer.{i}"], (qq if i == 0 else h)[f"layer.{i}"]), rtol)
    _close(r["logits"]["accumulated"], _expected(f["logits"], qq["logits"]), rtol)
    assert r["logits"]["local"]["exact"]  # lm_head stays float: the suffix adds no error of its own
    l0, l1 = r["layers"]
    assert l0["output"]["local"] == l0["output"]["accumulated"]
    # layer 1 sees layer 0's error only in the accumulated mode
    assert l1["output"]["accumulated"]["rel_error"] > 1.05 * l1["output"]["local"]["rel_error"]
    assert l1["output"]["accumulated"]["sqnr_db"] < l1["output"]["local"]["sqnr_db"]
    assert all(rec["accumulated"]["mse"] > rec["local"]["mse"] for rec in l1["linears"].values())


def test_outlier_rule():
    flagged, st = diagnose.outliers({0: 1.0, 1: 1.1, 2: 0.9, 3: 1.05, 4: 5.0, 5: 0.95}, k=3)
    assert flagged == [4] and st["median"] == pytest.approx(1.025)
    assert diagnose.outliers({i: 1.0 + 0.01 * i for i in range(6)})[0] == []  # small spread: not noise-flagged
    assert diagnose.outliers({0: 0.0, 1: 0.0, 2: math.inf})[0] == [2]  # non-finite always counts
    assert diagnose.outliers({0: 1.0, 1: 2.0})[0] == []  # two layers: nothing is an outlier


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    from make_tiny_model import make_model

    from ptqc import frontend

    path = make_model(tmp_path_factory.mktemp("m6") / "m6", "llama", layers=6, kv_heads=2, seed=3)
    fp = frontend.load(path)
    q8 = fp.clone()
    pipeline.PassManager(pipeline.parse_pipeline("rtn:bits=8,group=32")).run(q8, pipeline.PassContext(quiet=True))
    return fp, q8


@pytest.mark.parametrize("K,how", [(3, "random"), (1, "random"), (4, "noise")])
def test_corrupted_layer_is_the_sensitive_one(six_layers, K, how):
    fp, q8 = six_layers
    q = q8.clone()
    name = f"model.layers.{K}.mlp.down_proj.weight"
    codes = q.store[name]
    assert codes.dtype == torch.int8
    g = torch.Generator().manual_seed(K)
    if how == "random":  # garbage codes
        bad = torch.randint(-128, 128, codes.shape, generator=g, dtype=torch.int16)
    else:  # +-12 steps of an 8-bit grid on every weight: about a 5-bit quantization of this one linear
        bad = codes.to(torch.int16) + torch.randint(-12, 13, codes.shape, generator=g, dtype=torch.int16)
    q.store[name] = bad.clamp(-128, 127).to(torch.int8)
    x = torch.randint(0, 300, (8, 48), generator=torch.Generator().manual_seed(0))
    r = json.loads(json.dumps(diagnose.compare(fp, q, x, batch_size=4), allow_nan=False))
    assert r["sensitive_layers"][0] == K, r["sensitivity"]["layers"]
    # layer 0 has a genuinely larger local error on these random models (a small residual stream)
    assert set(r["sensitive_layers"]) <= {K, 0}
    assert r["sensitive_linears"][0] == f"model.layers.{K}.mlp.down_proj"
    assert r["sensitivity"]["k"] == 3 and "median" in r["sensitivity"]["rule"]
    assert r["sensitivity"]["layers"]["ranking"][0]["layer"] == K
    # the damage shows up locally in layer K only, and downstream in the accumulated mode
    loc = [e["output"]["local"]["rel_error"] for e in r["layers"]]
    acc = [e["output"]["accumulated"]["rel_error"] for e in r["layers"]]
    assert loc[K] == max(loc) and all(a >= loc[K] * 0.5 for a in acc[K:])


def test_uncorrupted_int8_model_flags_no_late_layer(six_layers):
    fp, q8 = six_layers
    r = diagnose.compare(fp, q8, torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0)))
    assert all(e["output"]["local"]["sqnr_db"] > 25 for e in r["layers"])
    assert not set(r["sensitive_layers"]) & {3, 4, 5}


def test_layer_count_mismatch_and_renamed_stream(loaded, six_layers, ids):
    fp, q8 = six_layers
    with pytest.raises(PtqcError, match="float model has 2 decoder layers and the quantized model 6"):
        diagnose.compare(loaded("qwen2"), q8, ids(2, 8))
    # a pass that renames the residual stream: layer 1 reads a value the float state lacks
    q = loaded("qwen2")
    seg = calib.split(q.graph)[1]
    out = next(n for n in q.graph.nodes if n.name == probes.layer_output(seg))
    with q.graph.inserting_after(out):
        new = q.graph.call_function(torch.ops.aten.mul.Tensor, (out, 1.0))
    out.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    new.meta["ptqc"] = {"module": "model.layers.0", "layer": 0, "role": None}
    with pytest.raises(PtqcError, match=f"layer 1 of the quantized model reads {new.name}"):
        diagnose.compare(loaded("qwen2"), q, ids(2, 8))


def test_write_report(loaded, ids, tmp_path):
    fp, q = loaded("qwen2"), _rtn_layer(loaded("qwen2"), 1)
    r = diagnose.compare(fp, q, ids(2, 16))
    paths = diagnose.write_report(r, tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["diagnostics.json", "mse.png", "rel_error.png",
                                                                  "sqnr_db.png"]
    assert all(p.exists() for p in paths)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths[1:])
    table = diagnose.format_table(r).splitlines()
    assert table[0].split()[:3] == ["layer", "rel", "local"] and table[1].split()[1:3] == ["exact", "exact"]
    assert table[3].startswith("logits") and table[4].startswith("sensitive layers")
    r2 = diagnose.add_sensitivity(json.loads(json.dumps(r)), k=2, metric="sqnr_db", top=1)
    assert r2["sensitivity"]["metric"] == "sqnr_db" and len(r2["sensitivity"]["linears"]["ranking"]) == 1
    back = json.loads((tmp_path / "d" / "diagnostics.json").read_text())
    assert back["format"] == "ptqc-diagnostics" and back["layers"][0]["output"]["local"]["exact"]
    with pytest.raises(PtqcError, match="already exists"):
        diagnose.write_report(r, tmp_path / "d")
    diagnose.write_report(r, tmp_path / "d", force=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d")]


def test_cli_diagnose_and_compile_report(models, tmp_path):
    art = tmp_path / "a"
    r = cli("compile", "--passes", "rtn:bits=3,group=32", models["qwen2"], "-o", art, "-q",
            "--calib-samples", "4", "--calib-seqlen", "32", "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep" / "diagnostics.json").read_text())
    assert rep["samples"] == 4 and rep["seqlen"] == 32 and rep["num_layers"] == 2
    assert (tmp_path / "rep" / "rel_error.png").exists()
    r = cli("diagnose", models["qwen2"], art, "-o", tmp_path / "d", "--calib-samples", "4", "--calib-seqlen", "32",
            "--json", "--k", "2", "-q")
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    assert j["sensitivity"]["k"] == 2 and j["sensitivity"]["metric"] == "rel_error"
    assert {p.name for p in (tmp_path / "d").iterdir()} == {"diagnostics.json", "mse.png", "rel_error.png",
                                                           "sqnr_db.png"}
    d = json.loads((tmp_path / "d" / "diagnostics.json").read_text())
    assert d == j
    # the same data (seed, samples) and models as the compile report: the same numbers
    assert d["layers"] == rep["layers"] and d["logits"] == rep["logits"]


@pytest.mark.parametrize("case", ["missing", "layers", "exists"])
def test_cli_diagnose_errors_are_one_line(models, tmp_path, six_layers, case):
    out = tmp_path / "d"
    if case == "missing":
        args, msg = [models["qwen2"], tmp_path / "nope"], "is not a directory"
    elif case == "layers":
        from ptqc import artifact

        artifact.save(six_layers[1], tmp_path / "a6")
        args, msg = [models["qwen2"], tmp_path / "a6"], "float model has 2 decoder layers and the quantized model 6"
    else:
        out.mkdir()
        args, msg = [models["qwen2"], models["qwen2"]], "already exists"
    r = cli("diagnose", *args, "-o", out, "--calib-samples", "2", "--calib-seqlen", "16", "-q")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.output
    assert case == "exists" or not out.exists()
