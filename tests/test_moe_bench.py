"""tools/bench/moe.py's table: unsupported rows and lowerings are "n/a: <error line>" cells,
targets are judged from the numbers, expert counts come from the manifest."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
import moe as moe_bench  # noqa: E402


def rows():
    return [
        {"key": "fp", "label": "FP", "pipeline": None, "ptqc": {"ppl": 10.0}, "llmc": {"ppl": 10.0}},
        {"key": "gptq-all", "label": "GPTQ all", "pipeline": "gptq", "ptqc": {
            "ppl": 10.2, "quant_s": 10.0, "ascend_ppl": 10.2051, "experts_quantized": 96, "experts_total": 96},
         "llmc": {"ppl": 10.3, "quant_s": 30.0, "experts_quantized": 96}, "llmc_ptqc_eval": {"ppl": 10.25}},
        {"key": "w4a8", "label": "W4A8", "pipeline": "w4a8", "ptqc": {
            "ppl": 10.5, "quant_s": 1.0, "ascend_error": "PtqcError: cannot lower experts",
            "experts_quantized": 88, "experts_total": 96}},
        {"key": "w8a8", "label": "W8A8", "pipeline": "smooth,int8", "ptqc": {"error": "PtqcError: no such pass"}},
    ]


def test_table_cells_and_targets():
    table = moe_bench.format_table(rows()).splitlines()
    assert len(table) == 6
    gptq, w4a8, w8a8 = (ln.split(" | ") for ln in table[3:])
    assert gptq[2:6] == ["10.200 (+2.00%)", "10.205 (+0.050% vs fake-quant)", "96 / 96", "10.250 (+2.50%)"]
    assert w4a8[3] == "n/a: PtqcError: cannot lower experts" and w4a8[4] == "88 / 96"
    assert w8a8[2] == "n/a: PtqcError: no such pass" and w8a8[3] == "—"
    t = moe_bench.targets(rows())
    assert "GPTQ all: ptqc within 0.5% of llm-compressor: yes (-0.49%; same evaluator)" in t
    assert "calibration time llmc / ptqc = 3.00x" in t and "valid only if nothing else ran" in t
    assert "GPTQ all: emulated Ascend within 0.1% of fake-quant: yes (+0.050%)" in t
    assert "every expert quantized: no (GPTQ all: 96 / 96, W4A8: 88 / 96)" in t
