"""int4 packing: bit-exact round trip, same model outputs, smaller artifacts."""
import pytest
import torch
from click.testing import CliRunner

from ptqc import artifact, ops, pipeline, quant
from ptqc.cli import main
from ptqc.errors import PtqcError


def test_pack_int4_round_trip_and_layout():
    c = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    p = quant.pack_int4(c)
    assert p.dtype == torch.int8 and p.shape == (3, 16)
    assert torch.equal(quant.unpack_int4(p), c)
    b = quant.pack_int4(torch.tensor([[3, -2]], dtype=torch.int8))  # low nibble first
    assert (int(b) & 0xFF) == (3 | (0xE << 4))
    with pytest.raises(PtqcError, match="do not fit in 4 bits"):
        quant.pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(PtqcError, match="must be even"):
        quant.pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def _run(qm, text):
    return pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_pass_is_exact_and_skips_8_bit(loaded, ids, tmp_path, bits):
    qm = loaded("qwen2")
    _run(qm, f"rtn:bits={bits},group=32")
    x = ids(2, 13)
    before = qm(x)
    unpacked = artifact.save(qm, tmp_path / "u")
    rec = _run(qm, "pack")
    assert torch.equal(qm(x), before)
    n_unpack = sum(1 for _ in qm.nodes(ops.UNPACK_INT4))
    assert n_unpack == (0 if bits == 8 else 14) == rec[0]["summary"]["packed"]
    back = artifact.load(artifact.save(qm, tmp_path / "p"))
    assert torch.equal(back(x), before)
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    if bits <= 4:
        assert size(tmp_path / "p") < 0.8 * size(unpacked)
        assert back.quant["model.layers.0.mlp.down_proj"]["weight"]["packed"] == "int4x2"


def test_compile_packs_by_default(models, tmp_path):
    r = CliRunner().invoke(main, ["compile", str(models["llama"]), "-o", str(tmp_path / "a"), "-q",
                                  "--passes", "rtn:bits=4,group=32"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["compile", str(models["llama"]), "-o", str(tmp_path / "b"), "-q",
                                  "--passes", "rtn:bits=4,group=32", "--no-pack"])
    assert r.exit_code == 0, r.output
    a, b = artifact.load(tmp_path / "a"), artifact.load(tmp_path / "b")
    assert [p["pass"] for p in a.history] == ["rtn", "pack"] and [p["pass"] for p in b.history] == ["rtn"]
    name = "model.layers.1.mlp.up_proj.weight"
    assert a.store[name].shape[-1] * 2 == b.store[name].shape[-1]
