"""compressed-tensors export (the format of llm-compressor / vLLM): tensor names, dtypes and shapes
per scheme, export -> load round trip, the checker accepts good exports and catches each kind of
broken one, and real llm-compressor exports (tests/data) pass the checker and load."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ptqc import artifact, pipeline, quant
from ptqc.cli import main
from ptqc.errors import PtqcError
from ptqc.lowering import compressed_tensors as ct
from ptqc.lowering.ascend import export as ax
from ptqc.weights import dequantized_weight

DATA = Path(__file__).parent / "data"
LLMC = {"w8a8": DATA / "llmcompressor-w8a8-qwen2", "w8a8-static": DATA / "llmcompressor-w8a8-static-qwen2",
        "w4a16-asym": DATA / "llmcompressor-w4a16-asym-qwen2"}
Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.0.mlp.down_proj"


def _compile(qm, text, calib):
    pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True, calib=calib))
    return qm


def _tensors(d):
    out = {}
    for f in Path(d).glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def _qcfg(d):
    return json.loads((Path(d) / "config.json").read_text())["quantization_config"]


def _lin(qm, module):
    return next(n for n in qm.linears() if n.meta["ptqc"]["module"] == module)


PIPELINES = {"dyn": "int8", "static": "int8:static=true", "w8a16": "w8a16",
             "w4a16": "w4a16:w_group=32",  # asymmetric (the preset's default), codes one per byte
             "w4a16-sym-packed": "w4a16:w_group=32,w_sym=true,pack",
             "mixed": "w4a16:w_group=32,include=*mlp*,w8a16:exclude=*mlp*|*o_proj|lm_head",
             "kv": "w8a16,kv:k=tensor,v=tensor"}


@pytest.fixture(scope="module")
def exports(loaded, tmp_path_factory):
    torch.manual_seed(0)
    calib = torch.randint(0, 300, (4, 16))
    root = tmp_path_factory.mktemp("ct-exports")
    out = {}
    for name, text in PIPELINES.items():
        qm = _compile(loaded("qwen2"), text, calib)
        ct.export(qm, root / name)
        out[name] = (root / name, qm)
    return out


def test_w8a8_dynamic_is_int_quantized_with_per_channel_scales(exports):
    d, qm = exports["dyn"]
    q = _qcfg(d)
    g = q["config_groups"]["group_0"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "int-quantized" and q["ignore"] == ["lm_head"]
    assert q["quantization_status"] == "compressed" and g["targets"] == ["Linear"]
    w, a = g["weights"], g["input_activations"]
    assert (w["num_bits"], w["type"], w["strategy"], w["symmetric"], w["dynamic"]) == \
        (8, "int", "channel", True, False)
    assert (a["num_bits"], a["strategy"], a["dynamic"], a["symmetric"]) == (8, "token", True, True)
    t = _tensors(d)
    out_f, in_f = dequantized_weight(qm, _lin(qm, Q)).shape
    assert t[f"{Q}.weight"].dtype == torch.int8 and t[f"{Q}.weight"].shape == (out_f, in_f)
    assert t[f"{Q}.weight_scale"].dtype == torch.float32 and t[f"{Q}.weight_scale"].shape == (out_f, 1)
    assert f"{Q}.weight_zero_point" not in t and f"{Q}.input_scale" not in t  # symmetric, dynamic
    assert t["lm_head.weight"].dtype == torch.float32 and "model.rotary_emb.inv_freq" not in t
    w = t[f"{Q}.weight"].float() * t[f"{Q}.weight_scale"]
    assert torch.equal(w, dequantized_weight(qm, _lin(qm, Q)).float())  # the exported numbers are the artifact's
    assert ct.check(d) == []


def test_w8a8_static_has_one_input_scale_per_linear(exports):
    d, qm = exports["static"]
    a = _qcfg(d)["config_groups"]["group_0"]["input_activations"]
    assert (a["strategy"], a["dynamic"], a["observer"]) == ("tensor", False, "minmax")
    t = _tensors(d)
    k, v = Q.replace("q_proj", "k_proj"), Q.replace("q_proj", "v_proj")
    s = qm.store[f"{Q}.input_scale"]  # ptqc stores q/k/v's shared scale once; the format has one per linear
    for m in (Q, k, v):
        assert t[f"{m}.input_scale"].dtype == torch.float32 and torch.equal(t[f"{m}.input_scale"], s.reshape(1))
    assert ct.check(d) == []


def test_w4a16_asymmetric_packs_codes_and_zero_points_in_int32(exports):
    d, qm = exports["w4a16"]
    g = _qcfg(d)["config_groups"]["group_0"]
    assert _qcfg(d)["format"] == "pack-quantized" and g["input_activations"] is None
    w = g["weights"]
    assert (w["num_bits"], w["strategy"], w["group_size"], w["symmetric"], w["zp_dtype"]) == \
        (4, "group", 32, False, "torch.int8")
    t = _tensors(d)
    lin = _lin(qm, DOWN)
    out_f, in_f = dequantized_weight(qm, lin).shape
    assert t[f"{DOWN}.weight_packed"].dtype == torch.int32 and t[f"{DOWN}.weight_packed"].shape == (out_f, in_f // 8)
    assert t[f"{DOWN}.weight_shape"].tolist() == [out_f, in_f] and t[f"{DOWN}.weight_shape"].dtype == torch.int64
    assert t[f"{DOWN}.weight_scale"].shape == (out_f, in_f // 32)
    assert t[f"{DOWN}.weight_zero_point"].dtype == torch.int32 and t[f"{DOWN}.weight_zero_point"].shape == \
        (out_f // 8, in_f // 32)  # packed along the output dimension
    assert f"{DOWN}.weight" not in t
    codes = ct.unpack_int32(t[f"{DOWN}.weight_packed"], 4, (out_f, in_f))
    zp = ct.unpack_int32(t[f"{DOWN}.weight_zero_point"], 4, (out_f, in_f // 32), dim=0)
    assert torch.equal(zp, qm.store[f"{DOWN}.weight_zero_point"])
    wq = quant.dequantize(codes, t[f"{DOWN}.weight_scale"], zp, 32)
    assert torch.equal(wq, dequantized_weight(qm, lin).float())
    assert ct.check(d) == []


def test_ptqc_packed_int4_and_symmetric_weights(exports):
    d, qm = exports["w4a16-sym-packed"]
    t = _tensors(d)
    assert f"{DOWN}.weight_zero_point" not in t
    assert _qcfg(d)["config_groups"]["group_0"]["weights"]["zp_dtype"] is None
    codes = ct.unpack_int32(t[f"{DOWN}.weight_packed"], 4, t[f"{DOWN}.weight_shape"].tolist())
    assert torch.equal(codes, quant.unpack_int4(qm.store[f"{DOWN}.weight"]))  # ptqc's int4x2 -> int32 words


def test_mixed_schemes_target_linears_by_name_and_ignore_float_ones(exports):
    d, qm = exports["mixed"]
    q = _qcfg(d)
    groups = list(q["config_groups"].values())
    assert q["format"] == "pack-quantized" and len(groups) == 2
    by_bits = {g["weights"]["num_bits"]: g for g in groups}
    assert DOWN in by_bits[4]["targets"] and Q in by_bits[8]["targets"] and "Linear" not in by_bits[4]["targets"]
    assert q["ignore"] == ["lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    t = _tensors(d)
    assert t["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float32
    assert ct.check(d) == []


def test_static_per_tensor_kv_cache_is_the_kv_cache_scheme(exports):
    d, qm = exports["kv"]
    kv = _qcfg(d)["kv_cache_scheme"]
    assert (kv["num_bits"], kv["type"], kv["strategy"], kv["dynamic"], kv["symmetric"]) == \
        (8, "int", "tensor", False, True)
    t = _tensors(d)
    attn = "model.layers.1.self_attn"
    for which in ("k", "v"):
        assert torch.equal(t[f"{attn}.{which}_scale"], qm.store[f"{attn}.{which}_scale"].reshape(1))
    assert ct.check(d) == []


def test_pack_int32_layout_matches_the_format():
    """8 int4 codes per word, element i at bits 4i..4i+3, stored as code + 8; 3-bit codes cross words."""
    codes = torch.tensor([[-8, -7, 0, 1, 2, 3, 7, -1]], dtype=torch.int8)
    word = sum((int(c) + 8) << (4 * i) for i, c in enumerate(codes[0]))
    assert ct.pack_int32(codes, 4).tolist() == [[word - (1 << 32) if word >= 1 << 31 else word]]
    torch.manual_seed(0)
    for bits in (2, 3, 4, 5, 8):
        c = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 40), dtype=torch.int8)
        p = ct.pack_int32(c, bits)
        assert p.shape == (6, -(-40 * bits // 32)) and torch.equal(ct.unpack_int32(p, bits, c.shape), c)
        p0 = ct.pack_int32(c, bits, dim=0)
        assert p0.shape == (-(-6 * bits // 32), 40) and torch.equal(ct.unpack_int32(p0, bits, c.shape, dim=0), c)
    with pytest.raises(PtqcError, match="4-bit range"):
        ct.pack_int32(torch.tensor([[8]], dtype=torch.int8), 4)


@pytest.mark.parametrize("name", ["dyn", "static", "w4a16", "mixed", "kv"])  # each load traces (~3 s)
def test_loader_reproduces_the_artifact_outputs(exports, name):
    d, qm = exports[name]
    back = ct.load(d)
    x = torch.randint(0, 300, (2, 12))
    assert torch.allclose(back(x), qm(x), atol=1e-5, rtol=1e-5)


def _broken(src, tmp_path, edit):
    d = tmp_path / "b"
    shutil.copytree(src, d)
    edit(d)
    return ct.check(d)


def _edit_tensors(d, fn):
    f = d / ct.WEIGHTS
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


def _edit_config(d, fn):
    f = d / "config.json"
    c = json.loads(f.read_text())
    fn(c)
    f.write_text(json.dumps(c))


def _set(name, fn):
    return lambda t: t.__setitem__(name, fn(t[name]))


BROKEN = {  # case: (export, edit of the tensors or None, edit of config.json or None, expected problem)
    "no_config": ("dyn", None, None, "config.json is missing"),
    "no_quant_config": ("dyn", None, lambda c: c.pop("quantization_config"), "has no quantization_config"),
    "quant_method": ("dyn", None, lambda c: c["quantization_config"].update(quant_method="gptq"),
                     "expected 'compressed-tensors'"),
    "bad_strategy": ("dyn", None, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
                     .update(strategy="block"), "weights strategy 'block' is not one of"),
    "missing_scale": ("dyn", lambda t: t.pop(f"{Q}.weight_scale"), None,
                      f"{Q}.weight_scale: int-quantized channel W8 needs it"),
    "float_weight": ("dyn", _set(f"{Q}.weight", lambda w: w.float()), None, f"{Q}.weight: expected I8"),
    "scale_shape": ("dyn", _set(f"{Q}.weight_scale", lambda s: s.reshape(-1)), None,
                    f"{Q}.weight_scale: expected F32/BF16/F16"),
    "packed_shape": ("w4a16", _set(f"{DOWN}.weight_packed", lambda p: p[:, :-1].contiguous()), None,
                     f"{DOWN}.weight_packed: expected I32"),
    "stray_tensor": ("dyn", lambda t: t.__setitem__(f"{Q}.weight_zero_point", torch.zeros(1, dtype=torch.int8)),
                     None, f"{Q}.weight_zero_point is in the weight files but no module or scheme"),
    "config_lists_missing": ("dyn", None, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
                             .update(symmetric=False), f"{Q}.weight_zero_point: int-quantized channel W8 asymmetric"),
    "static_without_scale": ("static", lambda t: t.pop(f"{Q}.input_scale"), None,
                             f"{Q}.input_scale: static input_activations needs it"),
    "float_param_missing": ("dyn", lambda t: t.pop("model.norm.weight"), None,
                            "model.norm.weight: the model needs it"),
    "kv_scale_missing": ("kv", lambda t: t.pop("model.layers.0.self_attn.v_scale"), None,
                         "model.layers.0.self_attn.v_scale: kv_cache_scheme needs it"),
    "nothing_matches": ("dyn", None, lambda c: c["quantization_config"]["config_groups"]["group_0"]
                        .update(targets=["Conv2d"]), "no Linear module of the model matches"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_checker_catches_each_broken_export(exports, tmp_path, case):
    src, edit_t, edit_c, expect = BROKEN[case]

    def edit(d):
        if case == "no_config":
            (d / "config.json").unlink()
        if edit_t:
            _edit_tensors(d, edit_t)
        if edit_c:
            _edit_config(d, edit_c)
    problems = _broken(exports[src][0], tmp_path, edit)
    assert any(expect in p for p in problems), problems
    if case != "no_config":
        with pytest.raises(PtqcError, match="not a valid compressed-tensors export"):
            ct.load(tmp_path / "b")


def test_unexpressible_artifacts_fail_with_one_line(loaded, tmp_path):
    qm = _compile(loaded("qwen2"), "int8,kv:k=head", torch.randint(0, 300, (2, 16)))  # dynamic K and V
    with pytest.raises(PtqcError, match="only static per-tensor symmetric KV-cache quantizers") as e:
        ct.export(qm, tmp_path / "x")
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
    with pytest.raises(PtqcError, match="no quantized linear"):
        ct.export(loaded("qwen2"), tmp_path / "y")


# ---- the real format: llm-compressor exports in tests/data ----------------------------------------
@pytest.fixture(scope="module")
def llmc():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = ct.load(LLMC[name])
        return cache[name].clone()
    return get


@pytest.mark.parametrize("name", list(LLMC))
def test_real_llmcompressor_export_passes_the_checker_and_loads(llmc, name):
    d = LLMC[name]
    assert ct.check(d) == []
    qm = llmc(name)
    ref = torch.load(d / "llmc_logits.pt")
    y = qm(ref["ids"])
    if name == "w8a8":  # dynamic: compressed-tensors' scale is amax / 127.5, ptqc's amax / 127
        assert ((y - ref["logits"]).norm() / ref["logits"].norm()) < 0.2
    else:  # weight-only and static: transformers + compressed-tensors computes exactly ptqc's numbers
        assert torch.allclose(y, ref["logits"], atol=1e-5, rtol=1e-5)


def test_real_dynamic_w8a8_is_exact_with_compressed_tensors_dynamic_scale(llmc, monkeypatch):
    """The one difference on the dynamic W8A8 export is the dynamic scale convention."""
    d = LLMC["w8a8"]
    qm = llmc("w8a8")
    ref = torch.load(d / "llmc_logits.pt")
    orig = quant.fake_quant_act

    def ct_dynamic(x, scale, zero_point, spec):
        if scale is not None:
            return orig(x, scale, zero_point, spec)
        s = x.float().abs().amax(-1, keepdim=True) / 127.5
        return torch.clamp(torch.round(x.float() / s), -128, 127) * s

    monkeypatch.setattr(quant, "fake_quant_act", ct_dynamic)
    assert torch.allclose(qm(ref["ids"]), ref["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(LLMC))
def test_reexport_of_a_real_export_gives_back_its_tensors(llmc, name, tmp_path):
    """load + export is the identity on llm-compressor's files: same names, dtypes and bits."""
    d = LLMC[name]
    ct.export(llmc(name), tmp_path / "re")
    a, b = _tensors(d), _tensors(tmp_path / "re")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    keys = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")
    ga, gb = _qcfg(d)["config_groups"]["group_0"], _qcfg(tmp_path / "re")["config_groups"]["group_0"]
    for role in ("weights", "input_activations"):
        assert (ga[role] is None) == (gb[role] is None)
        if ga[role] is not None:
            assert {k: ga[role][k] for k in keys} == {k: gb[role][k] for k in keys}
    qa, qb = _qcfg(d), _qcfg(tmp_path / "re")
    assert (qa["format"], qa["ignore"]) == (qb["format"], qb["ignore"])


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_export_and_check_export_on_both_formats(exports, tmp_path):
    d, qm = exports["static"]
    art, out = tmp_path / "art", tmp_path / "ct"
    artifact.save(qm, art)
    r = CliRunner().invoke(main, ["export", str(art), "--format", "compressed-tensors", "-o", str(out), "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["format"] == "int-quantized"
    assert torch.equal(_tensors(out)[f"{Q}.input_scale"], _tensors(d)[f"{Q}.input_scale"])  # same export
    r = CliRunner().invoke(main, ["export", str(art), "--format", "compressed-tensors", "-o", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(main, ["check-export", str(out)])
    assert r.exit_code == 0 and "valid compressed-tensors export" in r.output
    r = CliRunner().invoke(main, ["check-export", str(LLMC["w4a16-asym"])])
    assert r.exit_code == 0 and "valid compressed-tensors export" in r.output
    ax.export(qm, tmp_path / "asc", dtype="float16")
    r = CliRunner().invoke(main, ["check-export", str(tmp_path / "asc")])
    assert r.exit_code == 0 and "valid Ascend export" in r.output
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    _edit_tensors(bad, lambda t: t.pop(f"{Q}.input_scale"))
    r = CliRunner().invoke(main, ["check-export", str(bad)])
    assert r.exit_code == 1 and f"{Q}.input_scale" in r.output
    r = CliRunner().invoke(main, ["check-export", str(art)])  # an artifact is neither format
    assert r.exit_code == 1 and "not an export" in r.output
    r = CliRunner().invoke(main, ["check-export", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "is not a directory" in r.output
