"""Ascend (msModelSlim / vllm-ascend) export: tensor names, dtypes and shapes per type; the
checker accepts it and catches each kind of broken export."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ptqc import pipeline, quant
from ptqc.lowering import checkpoint
from ptqc.cli import main
from ptqc.errors import PtqcError
from ptqc.lowering.ascend import export as ax
from ptqc.lowering.ascend import ops as npu
from ptqc.weights import dequantized_weight


def _compile(qm, text, calib):
    pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True, calib=calib))
    return qm


def _tensors(d):
    out = {}
    for f in d.glob("quant_model_weight*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


@pytest.fixture(scope="module")
def exports(loaded, tmp_path_factory):
    torch.manual_seed(0)
    calib = torch.randint(0, 300, (4, 16))
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, text in (("dyn", "int8"), ("static", "int8:static=true"), ("w8a16", "w8a16"), ("w4a8", "w4a8:w_group=64")):
        qm = _compile(loaded("qwen2", "float16"), text, calib)
        ax.export(qm, root / name)  # served in the artifact's dtype
        out[name] = (root / name, qm)
    return out


def test_dynamic_w8a8_tensors_and_description(exports):
    d, qm = exports["dyn"]
    desc = json.loads((d / ax.DESCRIPTION).read_text())
    t = _tensors(d)
    base = "model.layers.0.self_attn.q_proj"
    assert desc["model_quant_type"] == "W8A8_DYNAMIC" and desc[f"{base}.weight"] == "W8A8_DYNAMIC"
    assert t[f"{base}.weight"].dtype == torch.int8 and t[f"{base}.weight_scale"].shape == (t[f"{base}.weight"].shape[0], 1)
    assert torch.equal(t[f"{base}.weight_offset"], torch.zeros_like(t[f"{base}.weight_scale"]))
    assert desc[f"{base}.bias"] == "FLOAT" and desc["model.norm.weight"] == "FLOAT" and desc["lm_head.weight"] == "FLOAT"
    lin = next(n for n in qm.linears() if n.meta["ptqc"]["module"] == base)
    w = t[f"{base}.weight"].float() * t[f"{base}.weight_scale"]
    assert torch.equal(w.to(qm.dtype), dequantized_weight(qm, lin))  # the exported numbers are the artifact's
    assert not (d / "config.json").read_text().count("quantization_config")
    assert ax.check(d) == []


def test_static_w8a8_deq_scale_and_quant_bias(exports):
    d, qm = exports["static"]
    t = _tensors(d)
    base = "model.layers.0.self_attn.q_proj"
    assert t[f"{base}.deq_scale"].dtype == torch.int64 and t[f"{base}.quant_bias"].dtype == torch.int32
    deq = t[f"{base}.input_scale"] * t[f"{base}.weight_scale"].reshape(-1)
    assert torch.equal(t[f"{base}.deq_scale"], deq.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)  # float bits
    qb = torch.round(t[f"{base}.bias"].float() / npu.deq_scale_value(t[f"{base}.deq_scale"]))
    assert torch.equal(t[f"{base}.quant_bias"], qb.to(torch.int32))  # symmetric: no offset term
    assert ax.check(d) == []


def _broken(src, tmp_path, edit):
    d = tmp_path / "b"
    shutil.copytree(src, d)
    edit(d)
    return ax.check(d)


def _edit_tensors(d, fn):
    f = d / ax.WEIGHTS
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))


def test_w4a8_dynamic_packs_int4_pairs_along_the_output_dimension(exports):
    d, qm = exports["w4a8"]
    desc, t = json.loads((d / ax.DESCRIPTION).read_text()), _tensors(d)
    assert desc["model_quant_type"] == "W4A8_DYNAMIC" and desc["version"] == "1.0.0" and desc["group_size"] == 64
    for lin in qm.linears():
        base = lin.meta["ptqc"]["module"]
        if base == "lm_head":
            continue
        codes = checkpoint.weight_codes(qm, lin.args[1])
        out, k = codes.shape
        w = t[f"{base}.weight"]
        assert w.dtype == torch.int8 and w.shape == (out // 2, k)
        lo, hi = (w << 4) >> 4, w >> 4  # sign-extended nibbles: even rows low, odd rows high
        assert torch.equal(lo, codes[0::2]) and torch.equal(hi, codes[1::2]), base
        assert torch.equal(t[f"{base}.weight_scale"], torch.ones(out, 1))  # grouped: the scale is all second-level
        assert torch.equal(t[f"{base}.weight_scale_second"], qm.store[lin.args[1].args[1].target].float())
        assert not t[f"{base}.weight_offset_second"].any() and not t[f"{base}.weight_offset"].any()
        row = base.endswith(("o_proj", "down_proj"))
        assert t[f"{base}.scale_bias"].shape == (out, 16 if row else 1) and t[f"{base}.scale_bias"].dtype == torch.float32
    assert ax.check(d) == []


def test_w4a8_per_channel_and_refusals(loaded, tmp_path):
    qm = _compile(loaded("qwen2", "float16"), "w4a8", torch.randint(0, 300, (2, 16)))
    res = ax.export(qm, tmp_path / "pc")
    t = _tensors(tmp_path / "pc")
    base = "model.layers.0.mlp.down_proj"
    assert res["group_size"] == 128  # per channel: gcd(256, every input dimension: 128, 256)
    assert torch.equal(t[f"{base}.weight_scale_second"], torch.ones(128, 2))
    x = torch.randint(0, 300, (2, 12))
    assert torch.equal(ax.load(tmp_path / "pc", "float16")(x), qm(x))
    asym = _compile(loaded("qwen2", "float16"), "w4a8:w_sym=false", torch.randint(0, 300, (2, 16)))
    with pytest.raises(PtqcError, match="W4A8_DYNAMIC needs symmetric int4 weights"):
        ax.export(asym, tmp_path / "x")
    odd = _compile(loaded("qwen2", "float16"), "w4a8:w_group=16", torch.randint(0, 300, (2, 16)))
    with pytest.raises(PtqcError, match="group_size 16 is not a multiple of 32"):
        ax.export(odd, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case, expect", [
    ("no_description", "quant_model_description.json is missing"),
    ("missing_scale", "needs model.layers.0.self_attn.q_proj.weight_scale, which is missing"),
    ("float_weight", "weight must be int8"),
    ("scale_shape", "expected float32"),
    ("undescribed", "is in the weight files but not in"),
    ("unknown_type", "unknown quantization type 'W9A9'"),
    ("deq_dtype", "deq_scale: expected int64"),
    ("w4a8_unpacked", "packs two int4 per byte along the output dimension: expected int8 [64, 128], found [128, 128]"),
    ("w4a8_no_scale_bias", "needs model.layers.0.self_attn.q_proj.scale_bias, which is missing"),
    ("w4a8_row_bias", "o_proj.scale_bias: expected float32 [128, 16]"),
    ("w4a8_group", "input dimension 128 is not a multiple of group_size 96"),
])
def test_checker_catches_each_broken_export(exports, tmp_path, case, expect):
    base = "model.layers.0.self_attn.q_proj"
    src = exports["static" if case == "deq_dtype" else "w4a8" if case.startswith("w4a8") else "dyn"][0]

    def edit(d):
        desc_f = d / ax.DESCRIPTION
        desc = json.loads(desc_f.read_text())
        if case == "no_description":
            desc_f.unlink()
        elif case == "missing_scale":
            _edit_tensors(d, lambda t: t.pop(f"{base}.weight_scale"))
            desc.pop(f"{base}.weight_scale")
        elif case == "float_weight":
            _edit_tensors(d, lambda t: t.__setitem__(f"{base}.weight", t[f"{base}.weight"].float()))
        elif case == "scale_shape":
            _edit_tensors(d, lambda t: t.__setitem__(f"{base}.weight_scale", t[f"{base}.weight_scale"].reshape(-1)))
        elif case == "undescribed":
            desc.pop("model.norm.weight")
        elif case == "unknown_type":
            desc[f"{base}.weight"] = "W9A9"
        elif case == "w4a8_unpacked":
            _edit_tensors(d, lambda t: t.__setitem__(f"{base}.weight", torch.zeros(128, 128, dtype=torch.int8)))
        elif case == "w4a8_no_scale_bias":
            _edit_tensors(d, lambda t: t.pop(f"{base}.scale_bias"))
            desc.pop(f"{base}.scale_bias")
        elif case == "w4a8_row_bias":
            o = "model.layers.0.self_attn.o_proj.scale_bias"
            _edit_tensors(d, lambda t: t.__setitem__(o, t[o].sum(1, keepdim=True)))
        elif case == "w4a8_group":
            desc["group_size"] = 96
        elif case == "deq_dtype":
            _edit_tensors(d, lambda t: t.__setitem__(f"{base}.deq_scale", t[f"{base}.deq_scale"].to(torch.int32)))
        if desc_f.exists():
            desc_f.write_text(json.dumps(desc))
    problems = _broken(src, tmp_path, edit)
    assert any(expect in p for p in problems), problems


def test_check_export_cli_exit_codes(exports, tmp_path):
    d = exports["dyn"][0]
    r = CliRunner().invoke(main, ["check-export", str(d)])
    assert r.exit_code == 0 and "valid Ascend export" in r.output
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / ax.DESCRIPTION).unlink()
    r = CliRunner().invoke(main, ["check-export", str(bad)])
    assert r.exit_code == 1 and "missing" in r.output


def test_w4a4_exports_per_channel_only(loaded, tmp_path):  # W4A4_DYNAMIC (tests/test_ascend_types.py)
    qm = _compile(loaded("qwen2"), "w4a4:w_group=32", torch.randint(0, 300, (2, 16)))
    with pytest.raises(PtqcError, match="W4A4 exports as W4A4_DYNAMIC .* per-channel weights"):
        ax.export(qm, tmp_path / "x", dtype="float16")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["dyn", "static", "w8a16", "w4a8"])
def test_loader_reproduces_the_artifact_outputs(exports, name):
    d, qm = exports[name]
    back = ax.load(d, "float16")
    x = torch.randint(0, 300, (2, 12))
    assert torch.allclose(back(x).float(), qm(x).float(), atol=1e-5, rtol=1e-5)


def test_float32_artifact_needs_the_serving_dtype(loaded, tmp_path):
    qm = _compile(loaded("qwen2"), "int8:static=true", torch.randint(0, 300, (2, 16)))
    for dtype in (None, "float32"):
        with pytest.raises(PtqcError, match="float16 or .*bfloat16") as e:
            ax.export(qm, tmp_path / "x", dtype=dtype)
        assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
    res = ax.export(qm, tmp_path / "bf16", dtype="bfloat16")
    assert res["metadata"]["dtype"] == "bfloat16" and ax.check(tmp_path / "bf16") == []
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg.get("dtype", "bfloat16") == "bfloat16"
    t = _tensors(tmp_path / "bf16")
    base = "model.layers.0.self_attn.q_proj"
    assert t[f"{base}.deq_scale"].dtype == torch.float32  # bf16 serving: float32 deq_scale, not int64 bits
    assert t["model.norm.weight"].dtype == t[f"{base}.bias"].dtype == torch.bfloat16  # floats as served
    assert t[f"{base}.weight_scale"].dtype == torch.float32
    assert torch.equal(t["model.norm.weight"], qm.store["model.norm.weight"].to(torch.bfloat16))
    ax.export(qm, tmp_path / "fp16", dtype="float16")
    assert _tensors(tmp_path / "fp16")[f"{base}.deq_scale"].dtype == torch.int64


def test_cli_export_format_ascend(models, tmp_path):
    art, out = tmp_path / "art", tmp_path / "exp"
    r = CliRunner().invoke(main, ["compile", str(models["llama"]), "-o", str(art), "--passes", "smooth,int8",
                                  "--calib-samples", "2", "--calib-seqlen", "16", "--dtype", "float16", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["export", str(art), "--format", "ascend", "-o", str(out), "--dtype", "float32"])
    assert r.exit_code == 2 and "vllm-ascend serves float16 or bfloat16" in r.output and not out.exists()
    r = CliRunner().invoke(main, ["export", str(art), "--format", "ascend", "-o", str(out), "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["model_quant_type"] == "W8A8_DYNAMIC" and res["metadata"]["dtype"] == "float16"  # the artifact's
    x = torch.randint(0, 300, (1, 10))
    from ptqc import artifact
    assert torch.allclose(ax.load(out, "float16")(x).float(), artifact.load(art)(x).float(), atol=1e-5, rtol=1e-5)
    r = CliRunner().invoke(main, ["export", str(art), "--format", "ascend", "-o", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output


MSMS = Path(__file__).parent / "data" / "msmodelslim-w8a8-qwen2"


def test_real_msmodelslim_export_passes_the_checker_and_matches_our_formulas():
    """tests/data/msmodelslim-w8a8-qwen2: msModelSlim (msmodelslim quant --device cpu --model_type
    Qwen2-7B --quant_type w8a8) on a random 28-layer Qwen2 of width 32 (see its README)."""
    assert ax.check(MSMS) == []
    t = _tensors(MSMS)
    n = 0
    for k in t:
        if not k.endswith(".deq_scale"):
            continue
        b = k.removesuffix(".deq_scale")
        deq = (t[f"{b}.input_scale"] * t[f"{b}.weight_scale"].reshape(-1)).float()
        assert torch.equal(t[k], deq.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)
        bias = t.get(f"{b}.bias", torch.zeros(deq.shape))
        qb = torch.round(bias.float() / deq) - t[f"{b}.weight"].float().sum(1) * t[f"{b}.input_offset"]
        assert torch.equal(t[f"{b}.quant_bias"], qb.to(torch.int32))
        n += 1
    assert n > 100


def test_loader_reads_a_real_msmodelslim_export_and_lowers_it():
    qm = ax.load(MSMS)
    assert {v["input"]["method"] for v in qm.quant.values() if "input" in v} == {"static-export"}
    x = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    y = qm(x)
    assert torch.isfinite(y).all()
    low = qm.clone()
    pipeline.PassManager(pipeline.parse_pipeline("ascend:truncate=false,int_bias=false")).run(
        low, pipeline.PassContext(quiet=True))
    assert ((low(x) - y).norm() / y.norm()) < 1e-3  # only offset-before-rounding ties may differ
