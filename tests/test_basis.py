"""A rotated model's values mapped back to the float basis: ptqc diagnose and ptqc diff compare a
rotated (float-exact) model with its float model as equal, and a rotated quantized one sensibly."""
import json

import torch
from click.testing import CliRunner

from ptqc import artifact, diagnose, pipeline
from ptqc.basis import Rotation
from ptqc.cli import main


def _run(qm, text, calib=None):
    pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True, calib=calib))
    return qm


def test_rotation_is_rebuilt_from_the_history(loaded):
    assert Rotation.of(loaded("qwen2")) is None
    qm = _run(loaded("qwen2"), "rotate:seed=3")
    rot = Rotation.of(qm)
    hidden = qm.config.hidden_size
    assert rot.q.shape == (hidden, hidden) and torch.allclose(rot.q @ rot.q.t(), torch.eye(hidden, dtype=torch.float64))
    emb = "model.embed_tokens.weight"
    assert torch.allclose(rot.to_float("embed", None, qm.store[emb].float()), loaded("qwen2").store[emb].float(),
                          atol=1e-6)  # the rotated embedding, back in the float basis, is the original


def test_diagnose_sees_a_float_rotation_as_exact_and_both_modes_work(loaded, ids):
    for arch in ("qwen2", "llama"):  # GQA (v folded per KV head) and MHA
        fp = loaded(arch)
        q = _run(loaded(arch), "rotate")
        r = diagnose.compare(fp, q, ids(2, 16), batch_size=2)
        for layer in r["layers"]:
            for mode in ("local", "accumulated"):
                assert layer["output"][mode]["rel_error"] < 1e-5, (arch, layer["layer"], mode)
                for kk, m in layer["linears"].items():
                    assert m[mode]["rel_error"] < 1e-5, (arch, kk, mode)


def test_diff_maps_rotated_probes_back(loaded, tmp_path):
    fp = artifact.save(loaded("qwen2"), tmp_path / "fp")
    rot = artifact.save(_run(loaded("qwen2"), "rotate"), tmp_path / "rot")
    w4 = artifact.save(_run(loaded("qwen2"), "rotate,w4a4", torch.randint(0, 300, (4, 16))), tmp_path / "w4")
    out = {}
    for name, b in (("rot", rot), ("w4", w4)):
        r = CliRunner().invoke(main, ["diff", str(fp), str(b), "--samples", "2", "--seqlen", "16", "-q",
                                      "--json", str(tmp_path / f"{name}.json")], catch_exceptions=False)
        assert r.exit_code in (0, 1), r.output
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert out["rot"]["unrotated"] == ["b"]
    assert all(row["sqnr_db"] is None or row["sqnr_db"] > 90 for row in out["rot"]["rows"])  # float-exact
    layers = [row["sqnr_db"] for row in out["w4"]["rows"] if row["kind"] == "layer"]
    assert all(0 < s < 60 for s in layers)  # quantization noise, no longer basis noise (~0 dB)
