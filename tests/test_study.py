"""ptqc study: spec errors, one protocol per cell, cache keys, failed cells, resume, table math,
outputs, --compare, and the --jobs / --ray engines against the serial run."""
import importlib.util
import json
import math
import shutil
import statistics
import sys

import pytest
import yaml
from click.testing import CliRunner

from ptqc import study, study_worker
from ptqc.cli import main

PIPELINES = [{"name": "FP"},
             {"name": "RTN W{bits}", "method": "RTN", "passes": "rtn:bits={bits},group=32", "bits": [4]},
             {"name": "SQ W8A8", "method": "smooth,int8", "passes": "smooth,int8", "bits": 8}]


def write_spec(path, model, **over):
    spec = {"models": [str(model)], "pipelines": PIPELINES, "seeds": [0, 1],
            "calibration": {"samples": 4, "seqlen": 32},
            "evaluation": {"ppl": {"seqlen": 32, "max_windows": 2}, "collapse": {"max_new_tokens": 2}}}
    spec.update(over)
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def base(models, tmp_path_factory):
    """The serial run of a 5-cell study (FP, RTN W4 x 2 seeds, SmoothQuant W8A8 x 2 seeds)."""
    root = tmp_path_factory.mktemp("study")
    spec = write_spec(root / "s.yaml", models["qwen2"])
    res = study.run(spec, root / "out")
    return spec, root / "out", res


def by(res, pipeline, seed):
    return next(c for c in res["cells"] if c["pipeline"] == pipeline and c["seed"] == seed)


def entry(res, pipeline):
    return next(e for e in res["summary"] if e["pipeline"] == pipeline)


@pytest.mark.parametrize("over, msg", [
    ({"pipelines": [{"name": "RTN", "passes": "rtn:bits={bits}", "bits": [4, 3]}]}, "needs '{bits}' in the name"),
    ({"pipelines": [{"name": "X", "passes": "nosuch"}]}, "pipeline 'X': unknown pass 'nosuch'"),
    ({"pipelines": [{"name": "X", "pases": "rtn"}]}, "pipelines[0]: unknown key 'pases'"),
    ({"pipelines": [{"name": "X", "passes": "rtn:bits=9"}]}, "bits=9 is outside 2..8"),
    ({"seeds": [0, 0]}, "seeds must be a non-empty list of distinct integers"),
    ({"calibration": {"samples": 0}}, "samples=0 must be a positive integer"),
    ({"evaluation": {"ppl": False}}, "measures nothing"),
    ({"models": ["/nonexistent/model"]}, "models[0]: /nonexistent/model does not exist"),
    ({"colour": 1}, "unknown key 'colour'"),
])
def test_bad_spec_one_line_nothing_written(models, tmp_path, over, msg):
    spec = write_spec(tmp_path / "s.yaml", models["qwen2"], **over)
    r = CliRunner().invoke(main, ["study", str(spec), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.output
    assert not (tmp_path / "out").exists()


def test_tasks_without_lm_eval_one_line(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    spec = write_spec(tmp_path / "s.yaml", models["qwen2"], evaluation={"tasks": {"names": "arc_easy"}})
    r = CliRunner().invoke(main, ["study", str(spec), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.startswith("error: lm-eval is not installed") and not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed")
def test_ray_missing_one_line(models, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", models["qwen2"])
    r = CliRunner().invoke(main, ["study", str(spec), "-o", str(tmp_path / "out"), "--ray", "auto"])
    assert r.exit_code == 2 and r.output == "error: --ray needs Ray: pip install 'ptqc[ray]'\n"
    assert not (tmp_path / "out").exists()


def test_one_protocol_per_cell(base):
    _, out, res = base
    cells = res["cells"]
    assert [c["status"] for c in cells] == ["ok"] * 5 and res["computed"] == 5
    assert len({c["eval_windows"]["ppl"] for c in cells}) == 1  # every cell on the same eval windows
    for seed in (0, 1):  # a seed draws the same calibration windows for every pipeline
        assert by(res, "RTN W4", seed)["calibration_windows"] == by(res, "SQ W8A8", seed)["calibration_windows"]
    assert by(res, "SQ W8A8", 0)["calibration_windows"] != by(res, "SQ W8A8", 1)["calibration_windows"]
    assert by(res, "FP", None)["calibration_windows"] is None
    p = json.loads((out / "results.json").read_text())["protocol"]
    assert p["seeds"] == [0, 1] and p["calibration"]["samples"] == 4 and p["evaluation"]["ppl"]["max_windows"] == 2
    assert all(c["collapsed"] is False for c in cells)


def test_table_mean_std_delta_by_hand(base):
    _, out, res = base
    a, b = (by(res, "SQ W8A8", s)["ppl"]["ppl"] for s in (0, 1))
    fp = by(res, "FP", None)["ppl"]["ppl"]
    assert a != b  # SmoothQuant calibrates: the seeds differ
    e = entry(res, "SQ W8A8")["metrics"]["ppl"]
    assert e["mean"] == pytest.approx((a + b) / 2, rel=1e-12)
    assert e["std"] == pytest.approx(abs(a - b) / math.sqrt(2), rel=1e-9)
    assert entry(res, "SQ W8A8")["delta"]["ppl"] == pytest.approx(100 * ((a + b) / 2 / fp - 1), rel=1e-9)
    rtn = entry(res, "RTN W4")["metrics"]["ppl"]
    assert rtn["std"] == 0.0  # RTN reads no calibration data
    md = (out / "results.md").read_text()
    assert f"| SQ W8A8 | 8 | 2 | {(a + b) / 2:.3f} ± {statistics.stdev([a, b]):.3f} (" in md
    assert f"| FP |  | 1 | {fp:.3f} |" in md
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("model,pipeline,method,bits,seed,status")
    for png in ("ppl_vs_bits.png", "delta_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_unigram_ppl_by_hand(base):
    """The unigram PPL of windows [[5, 1, 1, 2], [7, 1, 2, 2]]: targets 1 1 2 1 2 2, p = 1/2 each."""
    import torch

    from ptqc import evaluate

    assert evaluate.unigram_perplexity(torch.tensor([[5, 1, 1, 2], [7, 1, 2, 2]])) == pytest.approx(2.0, rel=1e-12)
    w = torch.tensor([[0, 3, 3, 3, 4]])  # p(3) = 3/4, p(4) = 1/4
    assert evaluate.unigram_perplexity(w) == pytest.approx(math.exp(-(3 * math.log(0.75) + math.log(0.25)) / 4))
    _, _, res = base
    assert {by(res, "FP", None)["unigram_ppl"]["ppl"]} == {c["unigram_ppl"]["ppl"] for c in res["cells"]}  # same windows


def test_near_random_flag_by_hand():
    """FP 10, unigram 100: a seed keeps (ln 100 - ln p) / (ln 100 - ln 10) of the gain; < 0.2 is near random."""
    from ptqc import study_table

    def row(pipeline, seed, ppl):
        return {"model": "m", "pipeline": pipeline, "method": pipeline, "bits": None if pipeline == "FP" else 2,
                "seed": seed, "status": "ok", "pipeline_repr": [] if pipeline == "FP" else ["x"],
                "ppl": {"ppl": ppl}, "unigram_ppl": {"ppl": 100.0}}

    edge = 100 / 10 ** 0.2  # keeps exactly 0.2
    rows = [row("FP", None, 10.0), *(row("W2", s, p) for s, p in enumerate([edge * 1.01, edge * 0.99, math.inf]))]
    e = study_table.summarize(rows)[1]
    assert study_table.kept_gain(edge, 100.0, 10.0) == pytest.approx(0.2)
    assert e["near_random"] == 1  # the non-finite seed is counted as non-finite elsewhere, not here
    assert "near random 1/3" in study_table.flags(e) and "near random" not in study_table.flags(study_table.summarize(rows)[0])
    assert study_table.kept_gain(50.0, 10.0, 20.0) is None  # a float model worse than unigram: no verdict


def test_rerun_all_cached_and_changed_option_recomputes_its_cells(base, tmp_path):
    spec, out, first = base
    d = tmp_path / "out"
    shutil.copytree(out, d)
    again = study.run(spec, d)
    assert again["computed"] == 0 and again["cached"] == 5
    assert [c["ppl"] for c in again["cells"]] == [c["ppl"] for c in first["cells"]]
    pipes = [dict(p) for p in PIPELINES]
    pipes[1]["passes"] = "rtn:bits={bits},group=64"
    pipes[2]["name"] = "SmoothQuant W8A8"  # a label: not part of the key
    changed = study.run(_respec(spec, tmp_path, pipelines=pipes), d)
    assert changed["computed"] == 2
    assert {c["pipeline"] for c in changed["cells"] if not c["cached"]} == {"RTN W4"}


def _respec(spec, tmp_path, **over):
    data = yaml.safe_load(spec.read_text())
    data.update(over)
    p = tmp_path / "respec.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _copy_without(out, d, cells):
    """A copy of the study directory ``out`` without the cache files of ``cells``."""
    shutil.copytree(out, d)
    for c in cells:
        (d / "cells" / f"{c['key']}.json").unlink()


def test_failed_cell_recorded_study_goes_on_and_retried(base, tmp_path, monkeypatch):
    spec, out, first = base
    d = tmp_path / "out"
    _copy_without(out, d, [by(first, "SQ W8A8", 1), by(first, "RTN W4", 1)])
    real = study_worker.measure

    def flaky(cell):
        if cell["pipeline"] == "SQ W8A8" and cell["seed"] == 1:
            raise RuntimeError("boom")
        return real(cell)

    monkeypatch.setattr(study_worker, "measure", flaky)
    res = study.run(spec, d)
    bad = by(res, "SQ W8A8", 1)
    assert res["computed"] == 2 and bad["status"] == "failed" and bad["error"].startswith("RuntimeError: boom (at ")
    assert [c["status"] for c in res["cells"]].count("ok") == 4  # the study went on
    assert "failed 1/2" in (d / "results.md").read_text()
    monkeypatch.setattr(study_worker, "measure", real)
    again = study.run(spec, d)  # the failed cell is computed again, the others come from the cache
    assert again["computed"] == 1 and by(again, "SQ W8A8", 1)["ppl"] == by(first, "SQ W8A8", 1)["ppl"]


def test_interrupted_study_resumes(base, tmp_path, monkeypatch):
    spec, out, first = base
    d = tmp_path / "out"
    _copy_without(out, d, first["cells"][2:])
    real, calls = study_worker.measure, []

    def interrupted(cell):
        calls.append(cell["key"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cell)

    monkeypatch.setattr(study_worker, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.run(spec, d)
    partial = json.loads((d / "results.json").read_text())
    assert [c["status"] for c in partial["cells"]] == ["ok"] * 3 + ["missing"] * 2
    monkeypatch.setattr(study_worker, "measure", real)
    res = study.run(spec, d)
    assert (res["cached"], res["computed"]) == (3, 2)
    assert [c["ppl"] for c in res["cells"]] == [c["ppl"] for c in first["cells"]]


def test_compare_cli(base, tmp_path):
    spec, out, _ = base
    d = tmp_path / "b"
    shutil.copytree(out, d)
    res = json.loads((d / "results.json").read_text())
    res["summary"][1]["metrics"]["ppl"]["mean"] *= 1.01
    (d / "results.json").write_text(json.dumps(res))
    r = CliRunner().invoke(main, ["study", "--compare", str(out), str(d)])
    assert r.exit_code == 0, r.output
    assert "| RTN W4 | ppl |" in r.output.replace(f"| {res['summary'][1]['model']} ", "|") and "+1.00%" in r.output
    r = CliRunner().invoke(main, ["study", "--compare", str(out), str(out)])
    assert "no changes (3 rows" in r.output
    r = CliRunner().invoke(main, ["study", "--compare", str(out), str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output


def _same_numbers(a, b):
    ka = {c["key"]: c for c in a["cells"]}
    for c in b["cells"]:
        assert c["status"] == "ok", c.get("error")
        assert c["eval_windows"] == ka[c["key"]]["eval_windows"]
        assert c["calibration_windows"] == ka[c["key"]]["calibration_windows"]
        assert c["ppl"]["ppl"] == pytest.approx(ka[c["key"]]["ppl"]["ppl"], rel=1e-5)
        assert c["collapsed"] == ka[c["key"]]["collapsed"]


def test_jobs_2_equals_serial(base, tmp_path):
    spec, _, first = base
    res = study.run(_respec(spec, tmp_path, seeds=[0], pipelines=PIPELINES[:2]), tmp_path / "out", jobs=2)
    assert res["computed"] == 2
    _same_numbers(first, res)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="Ray is not installed (pip install 'ptqc[ray]'; the test extra has it)")
def test_ray_local_runtime_equals_serial(base, tmp_path):
    spec, _, first = base
    res = study.run(_respec(spec, tmp_path, seeds=[1], pipelines=PIPELINES[:2]), tmp_path / "out", ray="local", jobs=2)
    assert res["computed"] == 2
    _same_numbers(first, res)


def test_shipped_study_parses_and_select(tmp_path):
    from ptqc import study_cells, study_spec
    from conftest import ROOT

    s = study_spec.load(ROOT / "studies" / "case-study-map.yaml")
    cells = study_cells.cells(s, study_cells.Digests())
    assert len(s.pipelines) == 25 and len(cells) == 3 * (1 + 24 * 3)
    assert [c["pipeline"] for c in study.selected(cells, ["tiny-qwen2/GPTQ W*/0"])] == [
        "GPTQ W8", "GPTQ W4", "GPTQ W3", "GPTQ W2"]
    r = CliRunner().invoke(main, ["study", str(s.path), "-o", str(tmp_path / "o"), "--select", "nope"])
    assert r.exit_code == 2 and "--select nope matches no cell" in r.output and not (tmp_path / "o").exists()


def test_nonfinite_numbers_strict_json_round_trip(base, tmp_path, monkeypatch):
    """An overflowing PPL is written as "inf" (strict JSON, no Infinity token) and read back as a float."""
    spec, out, first = base
    d = tmp_path / "out"
    _copy_without(out, d, [by(first, "RTN W4", 1)])
    real = study_worker.measure

    def overflow(cell):
        res = real(cell)
        if cell["pipeline"] == "RTN W4" and cell["seed"] == 1:
            res["ppl"]["ppl"] = math.inf
        return res

    monkeypatch.setattr(study_worker, "measure", overflow)
    res = study.run(spec, d)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    on_disk = strict((d / "results.json").read_text())
    assert by(on_disk, "RTN W4", 1)["ppl"]["ppl"] == "inf"
    assert by(res, "RTN W4", 1)["ppl"]["ppl"] == math.inf
    cached = study.run(spec, d)  # from the cell store: a float again, and the mean is over the finite seed
    assert cached["computed"] == 0 and by(cached, "RTN W4", 1)["ppl"]["ppl"] == math.inf
    assert entry(cached, "RTN W4")["metrics"]["ppl"]["n"] == 1
    assert entry(cached, "RTN W4")["metrics"]["ppl"]["mean"] == by(first, "RTN W4", 0)["ppl"]["ppl"]


def test_code_digest_is_in_every_key(base, tmp_path, monkeypatch):
    """An edited ptqc (same version, other sources) recomputes every cell; the digest covers the passes."""
    from ptqc import study_cells

    dig = study_cells.Digests()
    before = study_cells.code_digest(dig)
    real = dig.file
    monkeypatch.setattr(dig, "file", lambda p: "edited" if p.name == "rtn.py" else real(p))
    edited = study_cells.code_digest(dig)
    assert edited != before
    monkeypatch.setattr(dig, "file", lambda p: "edited" if p.name in ("rtn.py", "study_plots.py") else real(p))
    assert study_cells.code_digest(dig) == edited  # the plots do not change numbers
    spec, out, first = base
    d = tmp_path / "out"
    shutil.copytree(out, d)
    monkeypatch.setattr(study_cells, "code_digest", lambda dig: "another-checkout")
    res = study.run(spec, d)
    assert res["computed"] == 5 and res["protocol"]["code"] == "another-checkout"
    assert [c["ppl"] for c in res["cells"]] == [c["ppl"] for c in first["cells"]]


def test_study_lm_eval_tasks_offline(models, loaded, tmp_path, monkeypatch):
    """Offline lm-eval tasks as a study evaluation: the float cell's numbers are the adapter's on the
    float model, and the quantized row's delta is in points."""
    pytest.importorskip("lm_eval")
    from conftest import ROOT
    from ptqc import evaluate, lm_eval_adapter

    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the repository root
    tasks = {"names": ["ptqc_tiny_mc"], "limit": 6, "include_path": str(ROOT / "tests/data/lmeval_task")}
    spec = write_spec(tmp_path / "s.yaml", models["qwen2"], seeds=[0], pipelines=PIPELINES[:2],
                      evaluation={"ppl": False, "collapse": False, "tasks": tasks})
    res = study.run(spec, tmp_path / "out")
    assert [c["status"] for c in res["cells"]] == ["ok", "ok"], res["cells"]
    ref = lm_eval_adapter.run_tasks(loaded("qwen2"), evaluate.load_tokenizer(models["qwen2"]), ["ptqc_tiny_mc"],
                                    6, include_path=[tasks["include_path"]])
    assert by(res, "FP", None)["tasks"] == pytest.approx(ref)
    acc = "ptqc_tiny_mc/acc"
    fp, rtn = entry(res, "FP")["metrics"][acc]["mean"], entry(res, "RTN W4")["metrics"][acc]["mean"]
    assert entry(res, "RTN W4")["delta"][acc] == pytest.approx(rtn - fp)
    assert "ptqc_tiny_mc/acc" in (tmp_path / "out" / "results.md").read_text()
