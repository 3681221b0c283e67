"""Behaviour is kept: the artifacts of a fixed set of pipelines on the example models have the
digests recorded in tests/data/golden.json (see tools/golden.py; re-record only on purpose)."""
import json
from pathlib import Path

import golden

DATA = Path(__file__).parent / "data" / "golden.json"


def test_artifacts_unchanged():
    expected = json.loads(DATA.read_text())
    assert set(expected) - {golden.MACHINE} == {f"{m} {p}" for m, p in golden.PIPELINES}
    got = golden.compute()
    how, problems = golden.check(expected, got)
    assert not problems, f"compared {how}:\n" + "\n".join(problems[:20])


def test_diff_reports_a_changed_tensor():
    exp = {"m p": {"a.weight": "x", "graph.json": "g"}}
    assert golden.diff(exp, {"m p": {"a.weight": "y", "graph.json": "g"}}) == ["m p: a.weight x -> y"]
    assert golden.diff(exp, {}) == ["m p: not computed"]


def test_another_machine_compares_by_sums_within_tolerance():
    exp = {golden.MACHINE: {"kernels": "k1"}, "m p": {"w": "torch.int8[2, 3]:aa 100 1000",
                                                   "graph.json": "g1 s1"}}
    near = {"m p": {"w": "torch.int8[2, 3]:bb 110 1001", "graph.json": "g2 s1"}}
    assert golden.check(exp, {golden.MACHINE: {"kernels": "k2"}, **near}) == ("by sums", [])
    assert golden.check(exp, {golden.MACHINE: {"kernels": "k1"}, **near})[0] == "bitwise"
    assert len(golden.check(exp, {golden.MACHINE: {"kernels": "k1"}, **near})[1]) == 2
    far = [{"m p": {"w": "torch.int8[2, 3]:bb 200 1000", "graph.json": "g1 s1"}},  # sum off by 10%
           {"m p": {"w": "torch.int8[3, 2]:aa 100 1000", "graph.json": "g1 s1"}},  # shape
           {"m p": {"w": "torch.int8[2, 3]:aa 100 1000", "graph.json": "g1 s2"}}]  # graph structure
    for got in far:
        assert golden.check(exp, {golden.MACHINE: {"kernels": "k2"}, **got})[1], got
    unsummed = {"m p": {"w": "torch.int8[6]:aa"}}  # digests of an older file: no sums to compare
    assert golden.check({golden.MACHINE: {"kernels": "k1"}, **unsummed},
                        {golden.MACHINE: {"kernels": "k2"}, "m p": {"w": "torch.int8[6]:bb"}})[1]
