#!/usr/bin/env python
"""Make the real msModelSlim exports of ``tests/data/msmodelslim-*/`` again, with msModelSlim
26.1.0 on the CPU in its own venv (never ptqc's):

    .venv/bin/python tools/make_msmodelslim_samples.py [NAME ...] [--root DIR] [--data DIR]

For each sample: a random tiny Qwen2 (``tools/make_tiny_model.make_model``, seed 0, float32),
then ``msmodelslim quant --device cpu --model_type Qwen2-7B`` with the sample's ``--quant_type``
or with the config file kept in its directory (``--config_path``), answering ``y`` when it asks to
use a default practice; the export replaces the directory's files (its README.md and config are
kept). Each README says the command. The venv (``.cache/msmodelslim/``, ignored by git): torch
2.13.0 (CPU), transformers and msmodelslim pinned below, made once (a stamp records the pins).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PINS = ("msmodelslim==26.1.0", "torch==2.13.0", "transformers==5.24.0")
MODEL_TYPE = "Qwen2-7B"  # the presets name layers by this model's (28 layers: hence w8a8's depth)


@dataclass
class Sample:
    layers: int
    hidden: int = 32
    quant_type: str | None = None  # else the directory's config file
    config: str | None = None
    model: dict = field(default_factory=dict)

    def shape(self) -> dict:
        return {"layers": self.layers, "hidden": self.hidden, "intermediate": 2 * self.hidden, "heads": 2,
                "kv_heads": 1, "vocab": 512} | self.model


SAMPLES = {
    "msmodelslim-w8a8-qwen2": Sample(28, quant_type="w8a8"),  # Qwen2-7B's best practice: static, v0 API
    "msmodelslim-w8a8c8-qwen2": Sample(4, config="ptqc-w8a8c8-config.yaml"),
    "msmodelslim-w8a8-iter-smooth-qwen2": Sample(2, config="ptqc-w8a8-iter-smooth-config.yaml"),
    "msmodelslim-w8a8-dynamic-qwen2": Sample(2, config="ptqc-w8a8-dynamic-config.yaml"),
    "msmodelslim-w8a16-qwen2": Sample(2, quant_type="w8a16"),  # no Qwen2-7B practice: default-w8a16
    "msmodelslim-w4a16-qwen2": Sample(2, hidden=64, config="ptqc-w4a16-config.yaml"),
    "msmodelslim-w4a8-qwen2": Sample(2, hidden=64, config="ptqc-w4a8-config.yaml"),  # v0 API: per group
    "msmodelslim-w4a8-per-channel-qwen2": Sample(2, hidden=64, config="ptqc-w4a8-per-channel-config.yaml"),
}


def ensure_venv(root: Path) -> Path:
    """msModelSlim's venv under ``root`` (made once); its ``msmodelslim`` command."""
    venv, stamp = root / "venv", root / "stamp"
    exe = venv / "bin" / "msmodelslim"
    if stamp.is_file() and stamp.read_text() == repr(PINS) and exe.is_file():
        return exe
    shutil.rmtree(venv, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *PINS], check=True)
    stamp.write_text(repr(PINS))
    return exe


def make(name: str, s: Sample, exe: Path, data: Path) -> None:
    """Quantize the sample's tiny model with msModelSlim and put the export in ``data / name``."""
    from make_tiny_model import make_model

    dest = data / name
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", "qwen2", seed=0, **s.shape())
        cmd = [str(exe), "quant", "--device", "cpu", "--model_type", MODEL_TYPE, "--model_path", "model",
               "--save_path", "out", "--trust_remote_code", "False"]
        if s.config:
            shutil.copy(dest / s.config, tmp / s.config)
            cmd += ["--config_path", s.config]
        else:
            cmd += ["--quant_type", s.quant_type]
        r = subprocess.run(cmd, cwd=tmp, input="y\n", capture_output=True, text=True)
        if r.returncode or not (tmp / "out" / "quant_model_description.json").is_file():
            raise SystemExit(f"{name}: msmodelslim failed:\n{(r.stdout + r.stderr)[-3000:]}")
        keep = {"README.md", s.config}
        for f in dest.iterdir():
            if f.name not in keep:
                f.unlink()
        for f in (tmp / "out").iterdir():
            if not (s.config and f.name.endswith("_best_practice.yaml")):  # a copy of our config
                shutil.copy(f, dest / f.name)
                (dest / f.name).chmod(0o644)
    print(f"{name}: {sum(f.stat().st_size for f in dest.iterdir()) // 1024} KiB")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"samples (default: all): {', '.join(SAMPLES)}")
    ap.add_argument("--root", type=Path, default=HERE.parent / ".cache" / "msmodelslim")
    ap.add_argument("--data", type=Path, default=HERE.parent / "tests" / "data")
    a = ap.parse_args(argv)
    unknown = sorted(set(a.names) - set(SAMPLES))
    if unknown:
        raise SystemExit(f"unknown sample {unknown[0]} (known: {', '.join(SAMPLES)})")
    exe = ensure_venv(a.root)
    for name in a.names or SAMPLES:
        make(name, SAMPLES[name], exe, a.data)


if __name__ == "__main__":
    main()
