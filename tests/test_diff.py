"""`ptqc diff`: metrics on hand-made values, a known injected error found first, backends
(torch, onnx, onnx-int, a registered test target), --fail-under, refusals."""
import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ptqc import artifact, diff, pipeline
from ptqc.cli import main
from ptqc.errors import PtqcError


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def arts(tmp_path_factory, loaded):
    """Artifacts (fast to load: no trace): float qwen2, a copy with one weight perturbed, int8."""
    root = tmp_path_factory.mktemp("diff")
    fp = artifact.save(loaded("qwen2"), root / "fp")
    bad = root / "bad"
    shutil.copytree(fp, bad)
    name = "model.layers.1.self_attn.o_proj.weight"
    t = load_file(bad / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    t[name] = t[name] + 0.02 * t[name].std() * torch.randn(t[name].shape, generator=g)
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    qm = loaded("qwen2")
    torch.manual_seed(0)
    pipeline.PassManager(pipeline.parse_pipeline("int8")).run(
        qm, pipeline.PassContext(quiet=True, calib=torch.randint(0, 300, (4, 32))))
    q = artifact.save(qm, root / "int8")
    return {"fp": fp, "bad": bad, "int8": q, "root": root}


def test_metrics_on_hand_made_values():
    torch.manual_seed(0)
    x = torch.randn(1000)
    e = torch.randn(1000) * 0.01
    a = diff.Acc()
    a.update(x[:600], (x + e)[:600], "t")  # two batches: sums accumulate
    a.update(x[600:], (x + e)[600:], "t")
    m = a.metrics()
    xd, ed, yd = x.double(), e.double(), (x + e).double()
    assert math.isclose(m["sqnr_db"], 10 * math.log10((xd ** 2).sum() / (((x + e) - x).double() ** 2).sum()), rel_tol=1e-9)
    assert math.isclose(m["sqnr_db"], 10 * math.log10((xd ** 2).sum() / (ed ** 2).sum()), rel_tol=1e-4)
    assert math.isclose(m["cosine"], float((xd * yd).sum() / (xd.norm() * yd.norm())), rel_tol=1e-12)
    assert m["max_abs"] == float(((x + e) - x).abs().max())
    assert math.isclose(m["max_rel"], float((((x + e) - x).abs() / x.abs()).max()), rel_tol=1e-6)
    assert m["numel"] == 1000 and not m["exact"]
    same = diff.Acc()
    same.update(x, x.clone(), "t")
    assert same.metrics()["exact"] and same.metrics()["sqnr_db"] is None and same.metrics()["cosine"] == 1.0
    half = diff.Acc()
    half.update(x, x * 0.5, "t")  # e = -x/2: SQNR = 10 log10(4) = 6.02 dB, cosine 1
    assert math.isclose(half.metrics()["sqnr_db"], 10 * math.log10(4), rel_tol=1e-9)
    assert math.isclose(half.metrics()["cosine"], 1.0, rel_tol=1e-12)
    nan = diff.Acc()
    nan.update(x, torch.full_like(x, math.nan), "t")
    assert nan.metrics()["finite"] is False and diff.sqnr_value(nan.metrics()) == -math.inf
    with pytest.raises(PtqcError, match="shapes differ"):
        diff.Acc().update(x, x[:10], "t")


def test_injected_error_is_named_first_and_fail_under(arts, tmp_path):
    js, png = tmp_path / "d.json", tmp_path / "d.png"
    r = cli("diff", arts["fp"], arts["bad"], "--samples", "2", "--seqlen", "32", "--threshold", "80",
            "--json", js, "--plot", png, "-q")
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    assert rep["first_below"] == "model.layers.1.self_attn.o_proj"
    rows = {x["key"]: x for x in rep["rows"]}
    order = [x["key"] for x in rep["rows"]]
    i = order.index("model.layers.1.self_attn.o_proj")
    assert all(x["exact"] for x in rep["rows"][:i])  # everything before the perturbed weight is identical
    assert not rows["layers.1"]["exact"] and rows["logits"]["sqnr_db"] < 80
    assert order[:2] == ["embed", "model.layers.0.self_attn.q_proj"] and order[-1] == "logits"
    assert {"layers.0", "layers.1", "model.layers.1.mlp.down_proj"} <= set(rows)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "<- first below 80 dB" in r.output and "model.layers.1.self_attn.o_proj" in r.output
    sq = rows["model.layers.1.self_attn.o_proj"]["sqnr_db"]
    assert sq > 20  # a 2% perturbation: about 34 dB
    r = cli("diff", arts["fp"], arts["bad"], "--samples", "2", "--seqlen", "32", "--fail-under", f"{sq + 1:.2f}", "-q")
    assert r.exit_code == 1 and "SQNR below" in r.output
    r = cli("diff", arts["fp"], arts["bad"], "--samples", "2", "--seqlen", "32", "--fail-under", "10", "-q")
    assert r.exit_code == 0


def test_artifact_against_its_onnx_exports(arts, models, tmp_path):
    a = diff.open_target(str(arts["int8"]))
    b = diff.open_target(f"{arts['int8']}/:onnx")
    c = diff.open_target(f"{arts['int8']}:onnx-int")
    assert (a.target, b.target, c.target) == ("torch", "onnx", "onnx-int")
    ids, _ = diff.input_windows(a, text=models["qwen2"] / "eval.txt", samples=2, seqlen=32)
    try:
        rep = diff.diff(a, b, ids, threshold=60)
        rep_int = diff.diff(a, c, ids, threshold=60, linears=False)
    finally:
        b.close()
        c.close()
    assert rep["unmatched"] == {"a_only": [], "b_only": []} and len(rep["rows"]) == 2 * 8 + 2
    assert rep["first_below"] is None and rep["min_sqnr_db"] > 90, rep["min_sqnr_db"]  # fp32 rounding only
    assert rep["rows"][0]["key"] == "embed" and rep["rows"][0]["exact"]
    assert [r["kind"] for r in rep_int["rows"]] == ["embed", "layer", "layer", "logits"]
    assert rep_int["min_sqnr_db"] > 40  # integer kernels: float rounding (and rare code flips) only


def test_model_directory_against_its_float_artifact_is_exact(models, arts):
    r = cli("diff", models["qwen2"], arts["fp"], "--samples", "2", "--seqlen", "16", "--fail-under", "200", "-q")
    assert r.exit_code == 0, r.output  # exact everywhere: no probe under any threshold
    assert "inf (all exact)" in r.output and "first below 40 dB: none" in r.output


def test_registered_target_and_specs(arts, tmp_path):
    @diff.register_target("twice")
    class Twice(diff.TorchTarget):  # a stand-in for a backend added later (e.g. #7's Ascend emulation)
        def run(self, batch, names):
            return {k: v * 2 for k, v in super().run(batch, names).items()}

    try:
        assert diff.parse_spec(f"{arts['fp']}/:twice") == (arts["fp"], "twice")
        assert diff.parse_spec(str(arts["fp"])) == (arts["fp"], "torch")
        with pytest.raises(PtqcError, match="unknown diff target 'nope'"):
            diff.parse_spec(f"{arts['fp']}:nope")
        r = cli("diff", arts["fp"], f"{arts['fp']}:twice", "--samples", "1", "--seqlen", "16", "--no-linears",
                "--json", tmp_path / "t.json", "-q")
        assert r.exit_code == 0, r.output
        rep = json.loads((tmp_path / "t.json").read_text())
        for row in rep["rows"]:  # y = 2x: error = x, SQNR 0 dB, cosine 1
            assert abs(row["sqnr_db"]) < 1e-9 and math.isclose(row["cosine"], 1.0, rel_tol=1e-9), row
        assert rep["first_below"] == "embed"
    finally:
        diff.TARGETS.pop("twice")


def test_mismatched_models_and_tokenizers_are_refused(models, arts, tmp_path):
    r = cli("diff", models["qwen2"], models["llama"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "cannot diff" in r.output and "different models (model_type qwen2 vs llama)" in r.output
    other = tmp_path / "other_tok"
    shutil.copytree(arts["fp"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    r = cli("diff", arts["fp"], f"{other}:onnx")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "different tokenizers" in r.output
