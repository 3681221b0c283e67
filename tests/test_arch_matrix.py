"""tools/bench/arch_matrix.py in-process on a cheap subset: Gemma (offset norms; rotates since its
no-op type_as is dropped) and GPT-NeoX (LayerNorm, fused qkv), without the costly gptq and flatquant
columns; the cells, the one-line reasons and the Markdown table with its numbered notes."""
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
    neox = matrix["GPT-NeoX"]
    assert {c for c, v in neox.items() if v["status"] != "pass"} == {"rotate"}, neox
    assert neox["rotate"] == {**neox["rotate"], "status": "refused", "detail": (
        "rotate: the value input of gpt_neox.layers.0.attention (ptqc.attention) is not a v_proj output used "
        "only there; use rotate:v=false")}
    assert float(matrix["Gemma"]["rotate"]["detail"].rsplit(" ", 1)[1]) <= 1e-5


def test_markdown_numbers_each_reason_once(matrix):
    md = am.markdown({**matrix, "GPT-NeoX 2": matrix["GPT-NeoX"]})
    lines = md.splitlines()
    assert lines[0] == ("| family | trace exact | rtn | smooth,int8 | rotate exact | Ascend export | "
                        "compressed-tensors export |")
    assert lines[2] == "| Gemma | pass | pass | pass | pass | pass | pass |"
    assert lines[3] == lines[4].replace("GPT-NeoX 2", "GPT-NeoX") == (
        "| GPT-NeoX | pass | pass | pass | refused [1] | pass | pass |")
    assert lines[6].startswith("[1] refused: rotate: the value input of")
    assert len(lines) == 7


def test_cli_refuses_unknown_names(capsys):
    with pytest.raises(SystemExit) as e:
        am.main(["--families", "Llama,NoSuchLM"])
    assert e.value.code == 2 and "unknown family or column: NoSuchLM" in capsys.readouterr().err
