"""Calibrated pipelines end to end from the command line (recipe with calib + overrides)."""
import json

from click.testing import CliRunner

from ptqc import artifact
from ptqc.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_recipe_with_calib_sensitive_and_gptq_overrides(models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
calib: {samples: 4, seqlen: 32}
passes:
  - sensitive: {top: 1, w_group: 32}
  - gptq:
      bits: 4
      group: 32
      overrides:
        "layers.0.self_attn.*": {bits: 8}
""")
    out = tmp_path / "out"
    r = cli("compile", models["qwen2"], "-o", out, "--recipe", recipe, "-q", "--calib-seed", "3")
    assert r.exit_code == 0, r.output
    m = artifact.read_manifest(out)
    assert m["calibration"]["samples"] == 4 and m["calibration"]["seed"] == 3
    kept = {k for k, v in m["plan"].items() if v == {"skip": True}}
    layer = m["passes"][0]["summary"]["chosen"][0]
    assert kept and all(f"layers.{layer}." in k for k in kept)
    for mod, q in m["quant"].items():
        assert mod not in kept
        assert q["weight"]["bits"] == (8 if "layers.0.self_attn" in mod else 4)
        assert q["weight"]["method"] == "gptq"
    r = cli("eval", out, "--seqlen", "32", "--max-windows", "4", "--json", "-q")
    assert r.exit_code == 0 and json.loads(r.output.strip().splitlines()[-1])["ppl"] > 1


def test_compile_gptq_with_report(models, tmp_path):
    out, rep = tmp_path / "out", tmp_path / "rep"
    r = cli("compile", models["llama"], "-o", out, "--passes", "gptq:bits=3,group=32", "--calib-samples", "4",
            "--calib-seqlen", "32", "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    d = json.loads((rep / "diagnostics.json").read_text())
    assert d["num_layers"] == 2 and d["layers"][1]["output"]["accumulated"]["rel_error"] > 0


def test_calibrated_pass_without_calibration_text_is_one_line(models, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(models["qwen2"], src)
    (src / "eval.txt").unlink()
    r = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "o"), "--passes", "gptq"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1].startswith("error: no --calib given")
    assert not (tmp_path / "o").exists()


import pytest  # noqa: E402


@pytest.mark.parametrize("passes", ["gptq:bits=4,group=32", "gptaq:bits=3,group=32", "awq:bits=4,group=32",
                                    "awq:quantize=false,gptq:bits=4,group=0"])
def test_weight_passes_end_to_end_from_the_cli(models, tmp_path, passes):
    out = tmp_path / "out"
    r = cli("compile", models["llama"], "-o", out, "--passes", passes, "--calib-samples", "4", "--calib-seqlen", "32",
            "-q")
    assert r.exit_code == 0, r.output
    m = artifact.read_manifest(out)
    assert m["passes"][-1]["pass"] == "pack" and len(m["quant"]) == 14
    r = cli("eval", out, "--seqlen", "32", "--max-windows", "2", "--json", "-q")
    assert r.exit_code == 0, r.output
