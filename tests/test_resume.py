"""Compiles are deterministic (the same command twice: the same bytes) and resumable: a compile
killed with SIGKILL after a layer checkpointed finishes with --resume, byte-identical."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import ptqc
from ptqc import resume
from ptqc.cli import main

PASSES = "gptq:bits=4,group=32,kv:k=channel,v=channel"  # two calibration loops: gptq (sequential), kv


def _args(model, out, passes=PASSES):
    return ["compile", str(model), "-o", str(out), "--passes", passes, "--calib", str(model / "eval.txt"),
            "--calib-samples", "4", "--calib-seqlen", "32", "-q"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "run.json"}


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "a"
    assert cli(*_args(models["qwen2"], out)).exit_code == 0
    return out


def test_same_command_twice_same_bytes(models, reference, tmp_path):
    assert cli(*_args(models["qwen2"], tmp_path / "b")).exit_code == 0
    a, b = files(reference), files(tmp_path / "b")
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    assert not resume.checkpoint_dir(tmp_path / "b").exists()  # removed after success
    assert (tmp_path / "b" / "run.json").is_file()


def _wait_for(path: Path, proc, timeout=600):
    t = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"compile ended ({proc.returncode}) before {path.name} was written"
        assert time.monotonic() - t < timeout
        time.sleep(0.01)


def test_activations_on_disk_same_bytes(models, reference, tmp_path):
    """--offload-mb 0: every calibration batch and pass output goes through a file; nothing changes."""
    assert cli(*_args(models["qwen2"], tmp_path / "d"), "--offload-mb", "0").exit_code == 0
    a, b = files(reference), files(tmp_path / "d")
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the offload directory is gone
    r = cli(*_args(models["qwen2"], tmp_path / "e"), "--offload-mb", "-1")
    assert r.exit_code == 2 and "--offload-mb" in r.output and not (tmp_path / "e").exists()


@pytest.mark.parametrize("extra", [[], ["--offload-mb", "0"]], ids=["memory", "offloaded"])
def test_kill_then_resume_is_byte_identical(models, reference, tmp_path, monkeypatch, extra):
    model, out = models["qwen2"], tmp_path / "c"
    cmd = [sys.executable, "-c", "from ptqc.cli import main; main()", *_args(model, out), *extra]
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    proc = subprocess.Popen(cmd, env=env)
    ck = resume.checkpoint_dir(out)
    _wait_for(ck / "c0-L0.acts.pt", proc)  # gptq's layer 0 checkpointed: kill mid-loop
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not out.exists() and (ck / "c0-L0.stats.pt").exists()

    r = cli(*_args(model, out, PASSES.replace("bits=4", "bits=3")), "--resume")  # other options: refused
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "cannot resume" in r.output and "gptq:bits=4" in r.output and not out.exists()
    monkeypatch.setattr(ptqc, "__version__", "0.0.0-other")
    r = cli(*_args(model, out), "--resume")
    assert r.exit_code == 2 and "ptqc_version" in r.output
    monkeypatch.undo()

    done = subprocess.run([c for c in cmd if c != "-q"] + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and f"resuming from {ck}" in done.stderr
    a, b = files(reference), files(out)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    assert not ck.exists()
