"""Model Explorer files of `ptqc inspect --web/--export` and `ptqc diff --web/--export`: the graph JSON
(namespaces, edges, quantization attributes, scale summaries), the overlays (diff, diagnose, Ascend
kernels) on the right nodes, the manifest and URL, the CLI's refusals. The page itself:
tests/test_explorer_browser.py."""
import json
import math
from urllib.parse import parse_qs, urlparse

import pytest
import torch
from click.testing import CliRunner

from ptqc import artifact, explorer, explorer_graph as eg, explorer_overlays as ov, explorer_server, pipeline
from ptqc.cli import main
from ptqc.probes import graph_probes, logits_node


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def int8(loaded, tmp_path_factory):
    """The tiny qwen2 (2 layers) with W8A8 dynamic, saved."""
    qm = loaded("qwen2")
    torch.manual_seed(0)
    pipeline.PassManager(pipeline.parse_pipeline("int8")).run(
        qm, pipeline.PassContext(quiet=True, calib=torch.randint(0, 300, (2, 16))))
    return qm, artifact.save(qm, tmp_path_factory.mktemp("explorer") / "int8")


def test_namespace():
    assert eg.namespace("model.layers.12.self_attn.q_proj") == "model/layers.12/self_attn/q_proj"
    assert eg.namespace("model.layers.0.mlp.experts") == "model/layers.0/mlp/experts"
    assert eg.namespace("") == eg.namespace("_empty_nn_module_stack_from_metadata_hook") == ""


def test_graph_nodes_edges_and_quant_attrs(int8):
    qm, _ = int8
    g = eg.graph(qm, "g")
    nodes = {n["id"]: n for n in g["nodes"]}
    assert len(nodes) == len(g["nodes"]) == len(qm.graph.nodes)
    for n in g["nodes"]:  # every edge comes from a node of the graph, in argument order
        assert all(e["sourceNodeId"] in nodes for e in n["incomingEdges"])
        assert [e["targetNodeInputId"] for e in n["incomingEdges"]] == [str(i) for i in range(len(n["incomingEdges"]))]
    lin = next(n for n in qm.linears() if n.meta["ptqc"]["module"] == "model.layers.1.mlp.down_proj")
    j = nodes[lin.name]
    assert j["namespace"] == "model/layers.1/mlp/down_proj" and j["label"] == "ptqc.linear"
    attrs = {a["key"]: a["value"] for a in j["attrs"]}
    assert (attrs["role"], attrs["layer"], attrs["weight.bits"], attrs["weight.sym"]) == ("down", "1", "8", "true")
    assert attrs["quant"] == "w:int8 ch sym (int8); i:int8 tok sym (dynamic)"
    s = qm.store["model.layers.1.mlp.down_proj.weight_scale"]
    assert attrs["scale weight_scale"] == (f"[{s.shape[0]}, 1] min {s.min().item():.4g} max {s.max().item():.4g} "
                                           f"mean {s.mean().item():.4g}")
    assert {e["sourceNodeId"] for e in j["incomingEdges"]} == {a.name for a in lin.all_input_nodes}
    weight = nodes["model_layers_1_mlp_down_proj_weight"]
    assert weight["namespace"] == "model/layers.1/mlp/down_proj" and weight["label"] == "weight"
    assert "model/layers.1/mlp___group___" in eg.group_ids(g, "model/layers.1")


def _row(key, node_a, node_b, sqnr, exact=False, finite=True, max_rel=0.1, cosine=0.99):
    return {"key": key, "kind": "linear", "node_a": node_a, "node_b": node_b, "sqnr_db": sqnr, "exact": exact,
            "finite": finite, "max_rel": max_rel, "cosine": cosine}


def test_diff_overlays_map_probes_to_nodes(int8):
    qm, _ = int8
    lins = [n.name for n in qm.linears()]
    logits = logits_node(qm.graph).name
    rows = [_row("embed", "embedding", "embedding", None, exact=True, max_rel=0.0, cosine=1.0),
            _row("q", lins[0], f"{lins[0]}#0/2", 30.0, max_rel=0.5), _row("k", lins[1], f"{lins[0]}#1/2", 20.0),
            _row("bad", lins[2], lins[2], None, finite=False, max_rel=None, cosine=None),
            _row("logits", "logits", "logits", 25.0, cosine=0.9)]
    rep = {"rows": rows, "first_below": "k", "threshold_db": 28.0}
    ids = {n.name for n in qm.graph.nodes}
    va, vb = ov.diff_values(rep, "a", ids, logits), ov.diff_values(rep, "b", ids, logits)
    assert va["sqnr_db"] == {"embedding": ov.EXACT_DB, lins[0]: 30.0, lins[1]: 20.0, logits: 25.0}
    assert vb["sqnr_db"][lins[0]] == 20.0 and vb["max_rel"][lins[0]] == 0.5  # two chunks: the worst of each
    assert lins[2] not in va["sqnr_db"] and va["cosine"][logits] == 0.9
    s = explorer.side(qm, "q8")
    explorer.add_diff(s, qm, rep, "b")
    assert s.selected == lins[0] and s.expanded == ["model/layers.0/self_attn/q_proj___group___"]
    marked = next(n for n in s.graph["nodes"] if n["id"] == lins[0])
    assert marked["style"]["borderColor"] == explorer.FIRST_DIVERGENT_COLOR
    nd = s.overlays["diff-sqnr_db"]["q8"]
    assert nd["results"][lins[0]] == {"value": 20.0} and nd["gradient"][0]["bgColor"] == ov.RED_TO_GREEN[0]["bgColor"]
    assert s.overlays["diff-max_rel"]["q8"]["gradient"][0]["bgColor"] == ov.RED_TO_GREEN[-1]["bgColor"]


def test_diagnose_overlay(int8, tmp_path):
    qm, _ = int8
    probes = {p.key: p.node for p in graph_probes(qm)}
    m = {"local": {"rel_error": 0.02}, "accumulated": {"rel_error": 0.05}}
    rep = {"format": "ptqc-diagnostics", "layers": [
        {"layer": 0, "output": m, "linears": {"model.layers.0.mlp.up_proj": {"role": "up", **m}}},
        {"layer": 1, "output": {"local": {"rel_error": None}, "accumulated": {"rel_error": math.inf}}, "linears": {}}]}
    f = tmp_path / "diagnostics.json"
    f.write_text(json.dumps(rep))
    s = explorer.side(qm, "q8")
    explorer.add_report(s, qm, f)
    local = s.overlays["diagnose-rel_error-local"]["q8"]["results"]
    assert local == {probes["layers.0"]: {"value": 0.02}, probes["model.layers.0.mlp.up_proj"]: {"value": 0.02}}
    assert s.overlays["diagnose-rel_error-accumulated"]["q8"]["results"][probes["layers.0"]] == {"value": 0.05}


def test_kernel_overlay(int8):
    from ptqc.lowering.ascend.lower import lower

    qm, _ = int8
    low = qm.clone()
    lower(low, fallback=True)
    vals = ov.kernel_values(qm.graph, low.graph, "ptqc_npu")
    q = next(n for n in qm.linears() if n.meta["ptqc"]["module"] == "model.layers.0.self_attn.q_proj")
    kq = {str(n.target).removesuffix(".default") for n in low.graph.nodes if n.meta.get("ptqc", {}).get("module") ==
          "model.layers.0.self_attn.q_proj" and n.meta["ptqc"].get("role") == "q" and str(n.target).startswith("ptqc_npu")}
    assert kq and set(vals[q.name].split("+")) == kq
    own = ov.kernel_values(low.graph, low.graph, "ptqc_npu")  # a lowered graph: each kernel node itself
    assert own and all(v.startswith("ptqc_npu.") for v in own.values())
    nd = ov.label_data("g", "k", vals)["g"]["results"]
    assert len({r["bgColor"] for r in nd.values()}) == len(set(vals.values()))


def test_export_manifest_and_url(int8, tmp_path):
    qm, _ = int8
    a, b = explorer.side(qm, "A"), explorer.side(qm, "B")
    b.overlays = {"diff-sqnr_db": ov.node_data("B", "x", {"embedding": 1.0})}
    data = explorer.export([a, b], tmp_path)
    assert json.loads((tmp_path / "A.json").read_text())[0]["id"] == "A"
    man = json.loads((tmp_path / explorer.MANIFEST).read_text())
    assert man["nodeData"] == ["B.diff-sqnr_db.json"] and man["nodeDataTargets"] == ["B.json"]
    assert [p["widthFraction"] for p in man["uiState"]["paneStates"]] == [0.5, 0.5]
    assert data["models"][0]["url"] == str(tmp_path.resolve() / "A.json") == explorer.load_manifest(tmp_path)["models"][0]["url"]
    u = urlparse(explorer.url(8123, data))
    assert (u.hostname, u.port) == ("127.0.0.1", 8123) and json.loads(parse_qs(u.query)["data"][0]) == data


def test_cli_export_and_refusals(int8, tmp_path, monkeypatch):
    _, art = int8
    r = cli("inspect", art, "--export", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "e").iterdir()} == {"int8.json", explorer.MANIFEST}
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    r = cli("inspect", art, "--export", tmp_path / "f", "--overlay", bad)
    assert r.exit_code == 2 and "is not a ptqc diff (--json) or diagnose" in r.output
    monkeypatch.delenv("PTQC_EXPLORER_PYTHON", raising=False)
    monkeypatch.setattr(explorer_server, "PEER_VENV", tmp_path / "none")
    monkeypatch.setattr(explorer_server.importlib.util, "find_spec", lambda name: None)
    r = cli("inspect", tmp_path / "e", "--web", "--no-browser")
    assert r.exit_code == 2 and "Model Explorer is not installed: pip install 'ptqc[web]'" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_cli_lowered_graphs(int8, tmp_path):
    """`inspect ART:ascend --ops` (lowered in memory: each node is its kernel) and `diff ART ART:ascend`
    (two panes, B lowered, every overlay on nodes of B's graph)."""
    _, art = int8
    r = cli("inspect", f"{art}:ascend", "--ops", "--export", tmp_path / "i")
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "i" / explorer.MANIFEST).read_text())
    g = json.loads((tmp_path / "i" / "int8-ascend.json").read_text())[0]
    sel = next(n for n in g["nodes"] if n["id"] == man["uiState"]["paneStates"][0]["selectedNodeId"])
    assert sel["label"] == "ptqc_npu.quant_matmul" and sel["namespace"] == "model/layers.0/self_attn/q_proj"
    kernels = json.loads((tmp_path / "i" / "int8-ascend.kernels.json").read_text())["int8-ascend"]["results"]
    assert kernels[sel["id"]]["value"] == "ptqc_npu.quant_matmul" and len(kernels) >= 7 * 2
    r = cli("diff", art, f"{art}:ascend", "--samples", 1, "--seqlen", 8, "--export", tmp_path / "d", "-q")
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "d" / explorer.MANIFEST).read_text())
    assert [m["url"] for m in man["models"]] == ["A-int8.json", "B-int8-ascend.json"]
    b = json.loads((tmp_path / "d" / "B-int8-ascend.json").read_text())[0]
    ids = {n["id"] for n in b["nodes"]}
    sq = json.loads((tmp_path / "d" / "B-int8-ascend.diff-sqnr_db.json").read_text())["B-int8-ascend"]["results"]
    assert len(sq) >= 7 * 2 + 2 and set(sq) <= ids
    assert any(n["label"].startswith("ptqc_npu.") for n in b["nodes"] if n["id"] in sq)
