"""`ptqc diff A A:ascend` (probes mapped onto the lowered graph) and tools/ascend_check.py
(node-by-node NPU vs CPU-emulation check; here CPU vs CPU and fake-quant vs lowered)."""
import json
import operator
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ascend_check  # tools/ (conftest puts it on sys.path)
from ptqc import artifact, diff, pipeline
from ptqc.cli import main
from ptqc.errors import PtqcError
from ptqc.lowering.ascend import ops as npu
from ptqc.lowering.ascend.backend import lowered_probes
from ptqc.lowering.ascend.lower import lower

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def arts(tmp_path_factory, loaded):
    """W8A8 artifacts of the tiny qwen2 (2 layers, q/k/v biases): dynamic and static."""
    root = tmp_path_factory.mktemp("ascend-diff")
    out = {}
    for name, recipe in (("dyn", "int8"), ("static", "int8:static=true")):
        qm = loaded("qwen2")
        torch.manual_seed(0)
        pipeline.PassManager(pipeline.parse_pipeline(recipe)).run(
            qm, pipeline.PassContext(quiet=True, calib=torch.randint(0, 300, (4, 16))))
        out[name] = artifact.save(qm, root / name)
    return out


@pytest.fixture(scope="module")
def windows(models):
    return lambda target: diff.input_windows(target, text=models["qwen2"] / "eval.txt", samples=2, seqlen=32)[0]


def _rows(rep):
    return {r["key"]: r for r in rep["rows"]}


def test_dynamic_artifact_against_its_ascend_lowering(arts, windows):
    a = diff.open_target(str(arts["dyn"]))
    b = diff.open_target(f"{arts['dyn']}:ascend")
    assert b.target == "ascend" and diff.is_lowered(b.qm) and not diff.is_lowered(a.qm)
    rep = diff.diff(a, b, windows(a), threshold=40)
    rows = _rows(rep)
    assert rep["unmatched"] == {"a_only": [], "b_only": []} and len(rep["rows"]) == 2 * 8 + 2
    assert [r["key"] for r in rep["rows"] if r["kind"] == "layer"] == ["layers.0", "layers.1"]
    assert rows["embed"]["exact"]
    # layer 0's q/k/v/o/gate/up see the same int8 codes: int32 sums vs float sums only
    for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj"):
        assert rows[f"model.layers.0.{k}"]["sqnr_db"] > 100, (k, rows[f"model.layers.0.{k}"])
    # everything after differs by float summation order and rare rounding flips of the fused kernels
    assert rep["first_below"] is None and rep["min_sqnr_db"] > 40 and not rep["exact"], rep["min_sqnr_db"]
    assert all(rows[k]["sqnr_db"] > 40 and not rows[k]["exact"] for k in ("layers.0", "layers.1", "logits"))
    # the probes sit on the kernels: merged gate_up split in halves, residual outputs of the fused norms
    nodes = {n.name: n for n in b.qm.graph.nodes}
    gate, up = rows["model.layers.1.mlp.gate_proj"]["node_b"], rows["model.layers.1.mlp.up_proj"]["node_b"]
    assert gate.endswith("#0/2") and up.endswith("#1/2") and gate[:-4] == up[:-4]
    gu = nodes[gate[:-4]]
    assert gu.target == npu.QUANT_MATMUL and gu.meta["ptqc"]["module"] == "model.layers.1.mlp.gate_up_proj"
    assert nodes[rows["model.layers.1.self_attn.q_proj"]["node_b"]].target == npu.QUANT_MATMUL
    l0, l1 = nodes[rows["layers.0"]["node_b"]], nodes[rows["layers.1"]["node_b"]]
    assert l0.target is operator.getitem and l0.args[0].target == npu.ADD_RMS_NORM_DYNAMIC_QUANT
    assert l0.args[1] == 1 and l0.args[0].meta["ptqc"]["module"] == "model.layers.1.input_layernorm"
    # the final norm's residual output was dead code after lowering: a getitem is added for the probe
    assert l1.target is operator.getitem and l1.args == (l1.args[0], 2) and l1.args[0].target == npu.ADD_RMS_NORM
    assert not any(kk.endswith("gate_up_proj") for kk in rows)


def test_static_lowering_shows_the_deq_scale_truncation(arts, windows):
    a = diff.open_target(str(arts["static"]))
    trunc = diff.open_target(f"{arts['static']}:ascend,int_bias=false")
    exact = diff.open_target(f"{arts['static']}:ascend,int_bias=false,truncate=false")
    assert trunc.options == {"int_bias": False} and exact.options == {"int_bias": False, "truncate": False}
    ids = windows(a)
    rt, re_ = _rows(diff.diff(a, trunc, ids)), _rows(diff.diff(a, exact, ids))
    q = "model.layers.0.self_attn.q_proj"  # same codes on both sides: only the deq_scale differs
    assert re_[q]["sqnr_db"] > 100
    assert not rt[q]["exact"] and 50 < rt[q]["sqnr_db"] < 90, rt[q]  # 10 mantissa bits kept: ~2^-11 relative
    assert rt["logits"]["sqnr_db"] < re_["logits"]["sqnr_db"]
    st = trunc.qm.store[f"{q}.deq_scale"]
    assert st.dtype == torch.int64 and exact.qm.store[f"{q}.deq_scale"].dtype == torch.float32


def test_a_probe_per_layer_fallback_and_unmatched(loaded, arts, windows):
    low = artifact.load(arts["dyn"])
    lower(low, fuse=False)  # unfused: the residual adds stay in their layers
    probes = lowered_probes(low)
    assert [p.key for p in probes if p.kind == "layer"] == [f"layers.{i}" for i in range(low.num_layers)]
    assert sum(p.kind == "linear" for p in probes) == 7 * low.num_layers
    assert all(next(n for n in low.graph.nodes if n.name == p.node).target == torch.ops.aten.add.Tensor
               for p in probes if p.kind == "layer")
    qm = loaded("qwen2")  # W4A16 group 16: the kernel refuses, fallback keeps fake-quant linears
    pipeline.PassManager(pipeline.parse_pipeline("w4a16:w_group=16")).run(qm, pipeline.PassContext(quiet=True))
    lower(qm, fallback=True)
    keys = [p.key for p in lowered_probes(qm)]
    assert len(keys) == 2 * 8 + 2 and "model.layers.1.mlp.up_proj" in keys
    # a probe the lowered side lacks is reported as unmatched, not an error
    a = diff.open_target(str(arts["dyn"]))
    b = diff.open_target(f"{arts['dyn']}:ascend")
    mm = next(n for n in b.qm.graph.nodes if n.meta.get("ptqc", {}).get("module") == "model.layers.1.self_attn.o_proj"
              and n.target == npu.QUANT_MATMUL)
    mm.meta["ptqc"]["module"] = None
    b._probes = lowered_probes(b.qm)
    rep = diff.diff(a, b, windows(a), linears=True)
    assert rep["unmatched"]["a_only"] == ["model.layers.1.self_attn.o_proj"] and rep["unmatched"]["b_only"] == [mm.name]
    assert len(rep["rows"]) == 17 and "A only 1 (model.layers.1.self_attn.o_proj)" in diff.format_table(rep)


def test_cli_diff_ascend_json_and_spec_errors(arts, tmp_path):
    js = tmp_path / "d.json"
    r = cli("diff", arts["dyn"], f"{arts['dyn']}:ascend", "--samples", "2", "--seqlen", "16", "--json", js, "-q")
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    assert rep["b"]["target"] == "ascend" and rep["b"]["refused"] == [] and rep["unmatched"]["a_only"] == []
    assert {"layers.0", "layers.1", "model.layers.0.mlp.gate_proj", "logits"} <= {x["key"] for x in rep["rows"]}
    assert rep["min_sqnr_db"] > 40 and "(ascend)" in r.output
    half = diff.open_target(f"{arts['dyn']}:ascend,dtype=float16")  # fp16 kernels, scales kept float32
    mm = next(n for n in half.qm.graph.nodes if n.target == npu.QUANT_MATMUL)
    assert half.qm.dtype == torch.float16 and mm.args[6] == torch.float16
    assert half.qm.store[mm.args[2].args[0].target].dtype == torch.float32
    assert half.qm.store["model.norm.weight"].dtype == torch.float16
    assert diff.split_spec(f"{arts['dyn']}/:ascend,fuse=false,device=npu:0") == (
        arts["dyn"], "ascend", {"fuse": "false", "device": "npu:0"})
    for spec, msg in ((f"{arts['dyn']}:ascend,nope=1", "has no option 'nope'"),
                      (f"{arts['dyn']}:ascend,fuse=maybe", "fuse='maybe' is not a bool"),
                      (f"{arts['dyn']}:onnx,fuse=false", "'onnx' has no option 'fuse' (no options)"),
                      (f"{arts['dyn']}:ascend,dtype=int8", "not a float dtype"),
                      (f"{arts['dyn']}:ascend,device=npu", "torch_npu")):
        r = cli("diff", arts["dyn"], spec, "--samples", "1", "--seqlen", "16", "-q")
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and msg in r.output, r.output
    with pytest.raises(PtqcError, match="already lowered"):
        lowered = tmp_path / "lowered"
        qm = artifact.load(arts["dyn"])
        lower(qm)
        artifact.save(qm, lowered)
        diff.open_target(f"{lowered}:ascend,fuse=false")


# ---- tools/ascend_check.py -------------------------------------------------------------------------
def test_ascend_check_cpu_table_and_json(arts, models, tmp_path, capsys):
    js = tmp_path / "c.json"
    code = ascend_check.main([str(arts["dyn"]), "--device", "cpu", "--seqlen", "16", "--windows", "2", "-q",
                              "--text", str(models["qwen2"] / "eval.txt"), "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0, out
    qm = artifact.load(arts["dyn"])
    lower(qm, fallback=True)
    calls = [n.name for n in qm.graph.nodes if n.op == "call_function"]
    rep = json.loads(js.read_text())
    assert [r["node"] for r in rep["rows"]] == calls  # one row per node, in graph order
    table = out.split("\n")
    body = [ln for ln in table if ln[:4].strip().isdigit()]
    assert [ln.split()[1] for ln in body[:len(calls)]] == calls
    npu_rows = [r for r in rep["rows"] if r["npu_op"]]
    assert len(npu_rows) == sum(str(n).startswith("ptqc_npu.") for n in
                                (m.target for m in qm.graph.nodes if m.op == "call_function"))
    assert all(r["local"]["int_mismatch"] in (0, None) and r["local_fail"] is None for r in npu_rows)
    codes = next(r for r in rep["rows"] if r["op"] == "ptqc_npu.dynamic_quant")
    assert codes["int_mismatch"] == 0 and codes["int_numel"] == 2 * 16 * 128  # int8 codes compared exactly
    assert rep["summary"] == {"nodes": len(calls), "npu_ops": len(npu_rows), "first_divergence": None,
                              "local_failures": [], "failed": False}
    ref = rep["reference"]  # fake-quant vs lowered: the ptqc diff probes
    assert ref["unmatched"] == {"a_only": [], "b_only": []} and ref["min_sqnr_db"] > 40 and not ref["exact"]
    assert "result: OK" in out and "fake-quant reference (A) vs lowered graph (B)" in out


def test_ascend_check_flags_a_kernel_that_differs(arts, models):
    """A stand-in 'NPU' whose dynamic_quant flips one code and whose quant_matmul is 1% off."""
    qm = artifact.load(arts["dyn"])
    lower(qm)
    target = next(n for n in qm.graph.nodes if n.target == npu.DYNAMIC_QUANT)
    mm = [n for n in qm.graph.nodes if n.target == npu.QUANT_MATMUL][3]

    def call_a(n, args, kwargs):
        y = n.target(*args, **kwargs)
        if n is target:
            c = y[0].clone()
            c.view(-1)[5] = torch.clamp(c.view(-1)[5].int() + 1, -128, 127).to(torch.int8)
            return c, y[1]
        if n is mm:
            return y * 1.01
        return y

    ids = torch.randint(0, 300, (2, 1, 16), generator=torch.Generator().manual_seed(0))
    rows = ascend_check.lockstep(qm, list(ids), "cpu", call_a=call_a)
    s = ascend_check.summarize(rows, min_sqnr=50)
    assert s["failed"] and s["first_divergence"] == target.name
    assert [f["node"] for f in s["local_failures"]] == [target.name, mm.name]
    assert s["local_failures"][0]["why"] == "2 of 4096 integer elements differ"  # one code, two windows
    assert "SQNR 40.0" in s["local_failures"][1]["why"]  # 1% off: 40 dB
    assert ascend_check.summarize(rows, min_sqnr=30, max_mismatch=2)["failed"] is False
    ok = ascend_check.lockstep(qm, list(ids), "cpu")
    assert not ascend_check.summarize(ok, min_sqnr=50)["failed"]

    def refuse(n, args, kwargs):  # a kernel that rejects its inputs: reported, the run goes on
        if n is mm:
            raise RuntimeError("layout not supported")
        return n.target(*args, **kwargs)

    rows = ascend_check.lockstep(qm, list(ids), "cpu", call_a=refuse)
    s = ascend_check.summarize(rows)
    bad = next(r for r in rows if r["node"] == mm.name)
    assert bad["error"] == "A (cpu) raised RuntimeError: layout not supported" and s["failed"]
    assert [f["node"] for f in s["local_failures"]] == [mm.name] and rows[-1]["float_exact"] is True  # rest exact


def test_ascend_check_without_npu_exits_2_with_one_line(arts):
    import importlib.util

    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "ascend_check.py"), str(arts["dyn"]), "--device", "npu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Ascend NPU here" in lines[0] and "--device cpu" in lines[0], r.stderr
