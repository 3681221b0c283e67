"""tools/bench/arch_matrix.py in-process on a cheap subset: Gemma (offset norms; rotates since its
no-op type_as is dropped) and GPT-NeoX (LayerNorm, fused per-head qkv: V folded on its rows; embed_out
exported under its checkpoint name), without the costly gptq and flatquant columns; the cells and the
Markdown table with its numbered notes."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
import arch_matrix as am  # noqa: E402

COLUMNS = ("trace", "rtn", "smooth-int8", "rotate", "ascend", "compressed-tensors")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return am.run(("Gemma", "GPT-NeoX"), COLUMNS, root=tmp_path_factory.mktemp("arch-matrix"))


def test_cells(matrix):
    assert all(c["status"] == "pass" for c in matrix["Gemma"].values()), matrix["Gemma"]
    assert all(c["status"] == "pass" for c in matrix["GPT-NeoX"].values()), matrix["GPT-NeoX"]
    assert float(matrix["Gemma"]["rotate"]["detail"].rsplit(" ", 1)[1]) <= 1e-5
    assert float(matrix["GPT-NeoX"]["rotate"]["detail"].rsplit(" ", 1)[1]) <= 1e-5  # fused qkv, V folded per head


def test_markdown_numbers_each_reason_once(matrix):
    refused = {c: {"status": "refused", "detail": "why"} if c == "rotate" else {"status": "pass"} for c in COLUMNS}
    md = am.markdown({**matrix, "X": refused, "Y": refused})
    lines = md.splitlines()
    assert lines[0] == ("| family | trace exact | rtn | smooth,int8 | rotate exact | Ascend export | "
                        "compressed-tensors export |")
    assert lines[2] == lines[3].replace("GPT-NeoX", "Gemma") == "| Gemma | pass | pass | pass | pass | pass | pass |"
    assert lines[4] == lines[5].replace("| Y |", "| X |") == "| X | pass | pass | pass | refused [1] | pass | pass |"
    assert lines[7:] == ["[1] refused: why"]


def test_cli_refuses_unknown_names(capsys):
    with pytest.raises(SystemExit) as e:
        am.main(["--families", "Llama,NoSuchLM"])
    assert e.value.code == 2 and "unknown family or column: NoSuchLM" in capsys.readouterr().err
