"""The graph interpreter (hooks, freeing, values computed once) and the core's independence of the
backends: `import ptqc.ir` imports none, and a lowered graph names its ops' namespace, which the
`ptqc.ops` entry points resolve."""
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
import torch.fx as fx

from ptqc.errors import PtqcError
from ptqc.graph_json import graph_from_json, graph_to_json
from ptqc.interpreter import Interpreter, execute

ROOT = Path(__file__).resolve().parents[1]


def _graph():
    """y = (x @ w.t()) * (w.sum() + 1): one weight, one weight-only node, one input."""
    g = fx.Graph()
    x, w = g.placeholder("input_ids"), g.get_attr("w")
    s = g.call_function(torch.add, (g.call_function(torch.sum, (w,)), 1))
    g.output(g.call_function(torch.mul, (g.call_function(torch.matmul, (x, g.call_function(torch.t, (w,)))), s)))
    return g


class _Counting(Interpreter):
    def __init__(self, nodes, **kw):
        super().__init__(nodes, **kw)
        self.calls, self.seen = [], []

    def fetch_attr(self, n):
        self.calls.append(n.name)
        return torch.full((3, 4), 0.5)

    def call_function(self, n, args, kwargs):
        self.calls.append(n.name)
        return super().call_function(n, args, kwargs)

    def after_node(self, n, args, y):
        self.seen.append(n.name)


def test_hooks_freeing_and_values_computed_once():
    g = _graph()
    x = torch.randn(2, 4)
    ref = (x @ torch.full((3, 4), 0.5).t()) * 7.0
    same = lambda a: torch.allclose(a, ref, rtol=1e-6, atol=1e-6)  # noqa: E731 - MKL's path may vary with alignment
    assert same(execute(g, {"w": torch.full((3, 4), 0.5)}, {"input_ids": x}))
    calls = [n for n in g.nodes if n.op == "call_function"]
    const = {calls[0].name, calls[1].name}  # sum, add: from the weight only
    it = _Counting(calls + [next(iter(g.find_nodes(op="output")))], const=const)
    for _ in range(2):
        env = {"input_ids": x}
        assert same(it.run(env))
        assert list(env) == [calls[-1].name]  # the rest was freed after its last use, the input included
    # the weight and the weight-only nodes ran once; the others once per run, each seen by after_node
    assert it.calls == ["w", calls[0].name, calls[1].name] + [n.name for n in calls[2:]] * 2
    assert it.seen == [n.name for n in calls] + [n.name for n in calls[2:]]
    env = {"input_ids": x}
    _Counting(calls, keep={"input_ids"}).run(env, calls[:3])  # sum, add, t: add and t are read later
    assert set(env) == {"input_ids", calls[1].name, calls[2].name}
    with pytest.raises(PtqcError, match="graph input 'input_ids' was not given"):
        execute(g, {"w": torch.ones(3, 4)}, {})


def test_import_ptqc_ir_imports_no_backend():
    code = "import sys, ptqc.ir, ptqc.calib, ptqc.artifact; print([m for m in sys.modules if 'lowering' in m])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_lowered_graph_loads_through_the_ops_entry_point(loaded, ids, tmp_path):
    """A fresh process reads a lowered graph without importing the backend first: the namespace
    is looked up in the `ptqc.ops` entry points (the ones pyproject.toml declares, installed
    here as a stand-in distribution so the check does not depend on a reinstall)."""
    from ascend_helpers import run

    qm = loaded("qwen2").clone()
    run(qm, "smooth,int8,ascend", ids(4, 16))
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(graph_to_json(qm.graph)))
    npu = sorted({str(n.target) for n in qm.graph.nodes if str(n.target).startswith("ptqc_npu.")})
    assert npu
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["ptqc.ops"]
    dist = tmp_path / "site" / "ptqc_ops_stand_in-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ptqc-ops-stand-in\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[ptqc.ops]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(dist.parent)!r})
        from ptqc.ir import graph_from_json
        assert not [m for m in sys.modules if 'lowering' in m]
        g = graph_from_json(json.load(open({str(path)!r})))
        print(json.dumps(sorted({{str(n.target) for n in g.nodes if str(n.target).startswith("ptqc_npu.")}})))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == npu


def test_an_unknown_op_namespace_is_a_one_line_error():
    data = graph_to_json(_graph())
    call = next(r for r in data["nodes"] if r["op"] == "call_function")
    call["target"] = "op:no_such_namespace.frob.default"
    with pytest.raises(PtqcError) as e:
        graph_from_json(data)
    assert "no_such_namespace" in str(e.value) and "ptqc.ops" in str(e.value) and "\n" not in str(e.value)
