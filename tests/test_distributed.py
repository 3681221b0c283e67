"""compile --nproc 2 (two gloo ranks on CPU): the artifact equals the single-process one, byte for
byte on max/min statistics, GPTQ within the float-reduction order of the summed Hessians."""
import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from ptqc import distributed
from ptqc.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _compile(model, out, passes, *extra):
    r = cli("compile", model, "-o", out, "--passes", passes, "--calib", model / "eval.txt", "--calib-samples", 4,
            "--calib-seqlen", 32, "--calib-batch-size", 1, "-q", *extra)
    assert r.exit_code == 0, r.output
    return out


def files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "run.json"}


def test_pack_longest_first_to_least_loaded():
    assert distributed.pack([5, 4, 3, 3, 1], 2) == [0, 1, 1, 0, 1]
    assert distributed.pack([1, 1, 1], 1) == [0, 0, 0]


def test_static_int8_on_two_ranks_is_byte_identical(models, tmp_path):
    model = models["qwen2"]
    one = _compile(model, tmp_path / "one", "smooth,int8:static=true")
    two = _compile(model, tmp_path / "two", "smooth,int8:static=true", "--nproc", 2)
    a, b = files(one), files(two)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []


def test_gptq_on_two_ranks_within_reduction_order(models, tmp_path):
    model = models["qwen2"]
    one = _compile(model, tmp_path / "one", "gptq:bits=4,group=32")
    two = _compile(model, tmp_path / "two", "gptq:bits=4,group=32", "--nproc", 2)
    assert (one / "graph.json").read_bytes() == (two / "graph.json").read_bytes()
    qa, qb = (json.loads((d / "ptqc.json").read_text())["quant"] for d in (one, two))
    assert qa.keys() == qb.keys()
    for m in qa:  # the relative output error of every linear: the same up to float summation order
        ea, eb = qa[m]["weight"]["err_gptq"], qb[m]["weight"]["err_gptq"]
        assert eb == pytest.approx(ea, rel=0.05, abs=1e-7), m
    ta, tb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        if k.endswith("weight_scale"):
            assert (ta[k] - tb[k]).abs().max() <= 0.1 * ta[k].abs().max(), k
        elif ta[k].is_floating_point():  # float tensors GPTQ does not touch
            assert ta[k].equal(tb[k]), k


def test_resume_with_nproc_refused(models, tmp_path):
    r = cli("compile", models["qwen2"], "-o", tmp_path / "x", "--passes", "rtn", "--nproc", 2, "--resume", "-q")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--resume does not work with --nproc" in r.output


def test_spawned_ranks_share_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert distributed.rank_threads(2) == 4 and distributed.rank_threads(16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert distributed.rank_threads(2) is None
