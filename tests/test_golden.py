"""Behaviour is kept: the artifacts of a fixed set of pipelines on the example models have the
digests recorded in tests/data/golden.json (see tools/golden.py; re-record only on purpose)."""
import json
from pathlib import Path

import golden

DATA = Path(__file__).parent / "data" / "golden.json"


def test_artifacts_unchanged():
    expected = json.loads(DATA.read_text())
    assert set(expected) == {f"{m} {p}" for m, p in golden.PIPELINES}
    got = golden.compute()
    problems = golden.diff(expected, got)
    assert not problems, "\n".join(problems[:20])


def test_diff_reports_a_changed_tensor():
    exp = {"m p": {"a.weight": "x", "graph.json": "g"}}
    assert golden.diff(exp, {"m p": {"a.weight": "y", "graph.json": "g"}}) == ["m p: a.weight x -> y"]
    assert golden.diff(exp, {}) == ["m p: not computed"]
