"""tools/bench/weight_only.py: rows, configs, tables, and the 'no such pass' cell (fast, no model run)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
import weight_only as wo  # noqa: E402


def test_parse_config():
    assert wo.parse_config("w4g128") == (4, 128)
    assert wo.parse_config("W3ch") == (3, 0)
    assert wo.parse_config("w4g0") == (4, 0)
    assert wo.config_label("w4ch") == "W4 per-channel"
    with pytest.raises(SystemExit):
        wo.parse_config("int4")


def test_rows_order_and_fixed_budget_rows():
    rows = wo.build_rows(["rtn", "gptq", "billm", "slim"], ["w4g128", "w3ch"])
    labels = [(r["label"], r["config"]) for r in rows]
    assert labels == [("FP", ""), ("RTN", "W4g128"), ("GPTQ", "W4g128"), ("RTN", "W3 per-channel"),
                      ("GPTQ", "W3 per-channel"), ("BiLLM", ""), ("SliM-LLM 2-bit", ""), ("SliM-LLM 3-bit", "")]
    assert rows[3]["options"] == {"bits": 3, "group": 0}
    assert rows[-1]["pass"] == "slim" and rows[-1]["options"] == {"bits": 3}


def test_missing_pass_is_a_cell_not_a_crash():
    res = wo.child({"pass": "no_such_pass_xyz", "options": {}, "threads": 0})
    assert res == {"error": wo.MISSING, "missing": True}


def test_tables():
    rows = wo.build_rows(["rtn", "gptq", "gptaq", "awq"], ["w4g128"])
    rows[0].update(ptqc={"ppl": 16.0, "vmhwm_exit": 500 << 20}, llmc={"ppl": 16.0, "vmhwm_exit": 400 << 20})
    rows[1].update(ptqc={"ppl": 16.2, "quant_s": 0.1, "sqnr_mean": 26.5, "vmhwm_quant": 300 << 20,
                         "vmhwm_exit": 500 << 20},
                   llmc={"ppl": 16.2, "quant_s": 0.1, "sqnr_mean": 26.5, "vmhwm_exit": 400 << 20})
    rows[2].update(ptqc={"ppl": 16.05, "quant_s": 2.0, "sqnr_mean": 35.0}, llmc={"ppl": 16.06, "quant_s": 8.0})
    rows[3].update(ptqc={"error": wo.MISSING, "missing": True})
    rows[4].update(ptqc={"ppl": 16.1, "quant_s": 3.0}, llmc={"error": "RuntimeError: no accelerator"})
    t = wo.format_table("m", rows, with_llmc=True)
    assert "| GPTQ | W4g128 | 16.050 (+0.3%) | 16.060 (+0.4%) | 35.00 | — | 2.0 | 8.0 |" in t
    assert "| GPTAQ | W4g128 | n/a (no such pass) | — |" in t
    assert "error: RuntimeError: no accelerator" in t
    assert "| FP | — | 16.000 | 16.000 |" in t and "300 / 500" in t
    s = wo.gptq_summary(rows, with_llmc=True)
    assert "| W4g128 | 16.0500 | 16.0600 | -0.06% | 16.2000 | yes | 0.25 |" in s


@pytest.mark.parametrize("script, spec", [
    ("weight_only.py", {"pass": "no_such_pass_xyz", "options": {}, "threads": 0}),
    ("weight_activation.py", {"pipeline": "no_such_pass_xyz,int8", "threads": 0}),
])
def test_child_process_protocol(script, spec):
    """The parent starts `SCRIPT --child SPEC` and reads its last `RESULT {json}` line (both benches)."""
    import json
    import subprocess

    r = subprocess.run([sys.executable, str(Path(wo.__file__).parent / script), "--child", json.dumps(spec)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    assert res["missing"] is True and res["error"] == "n/a (no such pass)"
