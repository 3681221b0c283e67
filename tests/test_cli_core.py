"""The core reaches backends only through the registry; what a new user runs into: compile's
default -o, outputs inside the input refused, non-finite checkpoint weights, progress bars off a
terminal, the allocator fixed only for the commands that stream weights."""
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ptqc import artifact, backends, progress
from ptqc.cli import main
from ptqc.errors import PtqcError
from ptqc.model import WeightStore, weight_files

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _files(d: Path) -> dict:
    return {p.relative_to(d): p.stat().st_mtime_ns for p in d.rglob("*")}


def test_no_core_module_imports_a_backend():
    mods = sorted(f"ptqc.{p.stem}" for p in (ROOT / "ptqc").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('ptqc.lowering', 'ptqc.passes'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "ptqc.cli" in mods and "ptqc.diff" in mods and r.stdout.strip() == "[]"


def test_backend_registry():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][backends.GROUP]
    assert backends.SHIPPED == eps
    assert backends.provider("targets", "onnx-int").name == "onnx"
    assert backends.provider("formats", "compressed-tensors").name == "compressed-tensors"
    assert backends.offering("eval_targets", "nope") is None
    with pytest.raises(PtqcError, match="no backend offers format 'nope'"):
        backends.provider("formats", "nope")
    with pytest.raises(PtqcError, match="no backend 'nope'; backends: ascend, compressed-tensors, onnx"):
        backends.get("nope")


def test_default_output_names():
    assert artifact.default_output(Path("m"), "smooth,int8") == Path("m-smooth-int8")
    assert artifact.default_output(Path("a/m/"), "rtn:bits=4,group=128") == Path("a/m-rtn-bits4-group128")
    assert artifact.default_output(Path("m"), None, "recipes/w4a16.yaml") == Path("m-w4a16")
    assert artifact.default_output(Path("m"), "int8", target="ascend") == Path("m-int8-ascend")
    assert artifact.default_output(Path("m"), "*/..") == Path("m-ptqc")
    assert artifact.default_output(Path("."), "rtn") == Path.cwd().with_name(f"{Path.cwd().name}-rtn")


def test_compile_writes_beside_the_model_and_never_inside(models, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(models["qwen2"], m)
    before = _files(m)
    r = cli("compile", "--passes", "rtn:bits=4", m)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m-rtn-bits4" / "ptqc.json").is_file() and f"wrote {tmp_path / 'm-rtn-bits4'}" in r.output
    r = cli("compile", "--passes", "rtn:bits=4", m)
    assert r.exit_code == 2 and "m-rtn-bits4 already exists; pass --force" in r.output
    for args in (["-o", m / "out"], ["-o", m, "--force"], ["-o", tmp_path, "--force"],
                 ["-o", tmp_path / "x", "--report", m / "diag"]):
        r = cli("compile", "--passes", "rtn", m, *args)
        assert r.exit_code == 2 and r.output.count("\n") == 1 and "which is never modified" in r.output, r.output
    art = tmp_path / "m-rtn-bits4"
    for args in (["export", art, "-o", art / "model.onnx"], ["export", art, "--format", "ascend", "-o", art / "x"],
                 ["diagnose", m, art, "-o", m / "diag"], ["diagnose", m, art, "-o", art / "diag"]):
        r = cli(*args)
        assert r.exit_code == 2 and r.output.startswith("error: output ") and "is inside the input" in r.output
    assert _files(m) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-rtn-bits4"]


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """A 3-layer model whose checkpoint holds one NaN (layers.2.mlp.down_proj.weight[0, 0])."""
    from make_tiny_model import make_model

    root = tmp_path_factory.mktemp("nan")
    m = make_model(root / "m", "llama", layers=3)
    (m / "eval.txt").write_text("the quick brown fox def return lambda class import " * 200)
    f = m / "model.safetensors"
    d = load_file(f)
    d["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(d, f, metadata={"format": "pt"})
    return m


@pytest.mark.parametrize("args", [["compile", "--passes", "rtn"], ["compile", "--passes", "gptq"], ["eval"]])
def test_a_nonfinite_weight_stops_the_run(nan_model, tmp_path, args):
    out = tmp_path / "out"
    r = cli(*args, nan_model, *(["-o", out] if args[0] == "compile" else []), "--quiet")
    assert r.exit_code == 2, r.output
    assert r.output == ("error: weight model.layers.2.mlp.down_proj.weight has a non-finite value (nan) at [0, 0]; "
                        "fix the checkpoint\n")
    assert list(tmp_path.iterdir()) == []  # no artifact, no offload directory left


def test_weight_store_checks_once_per_read(nan_model, monkeypatch):
    import ptqc.model

    calls = []
    monkeypatch.setattr(ptqc.model, "check_finite", lambda n, t: calls.append(n))
    store = WeightStore(weight_files(nan_model))
    name = "model.layers.0.mlp.up_proj.weight"
    for _ in range(2):
        store[name]
    assert calls == [name]  # cached: checked when read, not per access
    store.release()
    store[name]
    assert calls == [name, name]


def test_configure_offload_budget(models, tmp_path):
    store = WeightStore(weight_files(models["qwen2"]))
    store.configure_offload(tmp_path / "off")
    assert store.offload_dir == tmp_path / "off" and store.offload_bytes == 16 << 20  # a tiny model: the floor
    store.configure_offload(tmp_path / "off", 3 << 20)
    assert store.offload_bytes == 3 << 20


def test_progress_bars_only_on_a_terminal(monkeypatch):
    assert not progress.shown()  # pytest captures stderr: not a terminal
    assert progress.bar(range(3)).disable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.shown() and not progress.shown(quiet=True)


def test_piped_compile_prints_log_lines_not_bars(models, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ptqc.cli", "compile", "--passes", "rtn", str(models["llama"]),
                        "-o", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "it/s" not in r.stderr and "trace:" not in r.stderr
    assert [line.split()[0] for line in r.stderr.splitlines()] == ["tracing", "rtn", "pack", "wrote"]


def test_allocator_fixed_only_for_commands_streaming_weights(models, monkeypatch):
    import ptqc.model

    calls = []
    monkeypatch.setattr(ptqc.model, "steady_malloc", lambda: calls.append(1))
    assert cli("passes").exit_code == 0 and cli("recipes").exit_code == 0 and calls == []
    assert cli("eval", models["qwen2"], "--max-windows", "1", "--seqlen", "32").exit_code == 0 and calls == [1]


def test_pass_log_line_shortens_long_lists():
    from ptqc.cli_compile import _short_summary

    line = _short_summary({"layers": 8, "scales": [{"layer": i} for i in range(32)], "skipped": []})
    assert line == '{"layers": 8, "scales": "<32 items>", "skipped": []}'
    assert len(_short_summary({"x": "y" * 500})) == 160
