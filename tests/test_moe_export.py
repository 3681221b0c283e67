"""MoE exports: Ascend W8A8_DYNAMIC / W4A8_DYNAMIC experts per expert (values equal the artifact's,
W4A8 packing and scale_bias by vllm-ascend's layout), routers FLOAT, what cannot be served refused in
one line; check-export catches broken MoE exports (each built by editing a good one)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from make_tiny_model import make_model
from ptqc import frontend, moe, ops, quant
from ptqc.errors import PtqcError
from ptqc.lowering import checkpoint
from ptqc.lowering.ascend import export as ax
from ptqc.pipeline import PassContext, PassManager, parse_pipeline

RECIPES = {"W8A8_DYNAMIC": "int8", "W4A8_DYNAMIC": "w4a8",
           "W4A8_DYNAMIC-experts": "int8:exclude=lm_head|router|shared_expert_gate|experts,w4a8:include=experts",
           "W4A16": "rtn:bits=4,group=32,sym=true,include=experts"}
BLOCK = "model.layers.0.mlp.experts"
E, H, I = 8, 64, 32


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    src = make_model(tmp_path_factory.mktemp("m") / "qwen3_moe", "qwen3_moe", layers=1, hidden=H, intermediate=4 * I,
                     dtype="bfloat16")
    return frontend.load(src, "bfloat16")


def _compile(base, text):
    qm = base.clone()
    PassManager(parse_pipeline(text)).run(qm, PassContext(quiet=True, calib=torch.randint(0, 300, (2, 16))))
    return qm


@pytest.fixture(scope="module")
def exports(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for kind, text in RECIPES.items():
        qm = _compile(base, text)
        ax.export(qm, root / kind)
        out[kind] = (root / kind, qm)
    return out


def _files(d):
    return load_file(str(d / ax.WEIGHTS)), json.loads((d / ax.DESCRIPTION).read_text())


def _stack(qm, proj):
    """(codes [E, out, in], scale [E, out, 1]) of the artifact's ``proj`` stack."""
    (node,) = qm.nodes(ops.MOE_EXPERTS)
    dq = node.args[3 + ("gate", "up", "down").index(proj)]
    return checkpoint.weight_codes(qm, dq), qm.store[dq.args[1].target].float()


def test_w8a8_dynamic_experts_are_the_artifacts_codes_and_scales_per_expert(exports):
    d, qm = exports["W8A8_DYNAMIC"]
    t, desc = _files(d)
    assert ax.check(d) == []
    assert desc["model_quant_type"] == "W8A8_DYNAMIC" and desc["metadata"]["moe_blocks"] == {"W8A8_DYNAMIC": 1}
    router = "model.layers.0.mlp.gate.weight"
    assert desc[router] == "FLOAT" and t[router].dtype == torch.bfloat16
    assert desc[f"{BLOCK}.weight"] == "W8A8_DYNAMIC" and f"{BLOCK}.weight" not in t  # the block's own entry
    for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
        codes, scale = _stack(qm, proj)
        for e in range(E):
            base = f"{BLOCK}.{e}.{proj}_proj"
            assert t[f"{base}.weight"].dtype == torch.int8 and t[f"{base}.weight"].shape == shape
            assert torch.equal(t[f"{base}.weight"], codes[e].to(torch.int8))
            assert torch.equal(t[f"{base}.weight_scale"], scale[e].reshape(shape[0], 1))
            assert torch.equal(t[f"{base}.weight_offset"], torch.zeros(shape[0], 1))
            assert {desc[f"{base}.{s}"] for s in ("weight", "weight_scale", "weight_offset")} == {"W8A8_DYNAMIC"}
    assert not any(".experts.gate_proj" in n or ".experts.down_proj" in n for n in t)  # no stacked names


@pytest.mark.parametrize("kind,group", [("W4A8_DYNAMIC", 32), ("W4A8_DYNAMIC-experts", 0)])
def test_w4a8_experts_pack_along_out_with_scale_bias(exports, kind, group):
    d, qm = exports[kind]
    t, desc = _files(d)
    assert ax.check(d) == [] and desc["version"] == "1.0.0" and desc["group_size"] == group
    for proj, (out, k), chunks in (("gate", (I, H), 1), ("up", (I, H), 1), ("down", (H, I), 16)):
        codes, scale = _stack(qm, proj)
        for e in range(E):
            base = f"{BLOCK}.{e}.{proj}_proj"
            w = t[f"{base}.weight"]
            assert w.dtype == torch.int8 and w.shape == (out // 2, k)
            assert torch.equal(w[0] & 0xF, codes[e][0].to(torch.int8) & 0xF)  # even row: low nibble
            assert torch.equal(quant.unpack_int4(w.t().contiguous()).t(), codes[e].to(torch.int8))
            assert torch.equal(t[f"{base}.weight_scale"], scale[e].reshape(out, 1))
            want = 8 * (codes[e].float() * scale[e].reshape(out, 1)).reshape(out, chunks, k // chunks).sum(-1)
            assert t[f"{base}.scale_bias"].shape == (out, chunks)
            torch.testing.assert_close(t[f"{base}.scale_bias"], want, rtol=1e-6, atol=1e-5)
            second = f"{base}.weight_scale_second"
            assert (second in t) == bool(group)  # per-channel MoE layout (group_size 0): no second level
            if group:
                assert torch.equal(t[second], torch.ones(out, k // group))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert desc[q] == ("W4A8_DYNAMIC" if group else "W8A8_DYNAMIC")


def test_w4a16_experts_are_llm_compressor_packed_with_the_description_group(exports):
    """MoE W4A16 (vllm-ascend reads llm-compressor's layout): weight_packed int32 [out, in / 8] holding
    code + 8 per nibble, weight_scale [out, in / 32] in the model dtype, zero weight_offset, weight_shape."""
    from ptqc.lowering.compressed_tensors import unpack_int32

    d, qm = exports["W4A16"]
    t, desc = _files(d)
    assert ax.check(d) == [] and desc["group_size"] == 32 and desc["model_quant_type"] == "W4A16"
    assert desc[f"{BLOCK}.weight"] == "W4A16"
    for proj, (out, k) in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
        codes, scale = _stack(qm, proj)
        for e in range(E):
            base = f"{BLOCK}.{e}.{proj}_proj"
            p = t[f"{base}.weight_packed"]
            assert p.dtype == torch.int32 and p.shape == (out, k // 8) and f"{base}.weight" not in t
            assert torch.equal(unpack_int32(p, 4, [out, k]), codes[e].to(torch.int8))
            assert torch.equal((p[:, 0] & 0xF) - 8, codes[e][:, 0].to(torch.int32))  # element 0 in the low nibble
            assert torch.equal(t[f"{base}.weight_scale"], scale[e].reshape(out, k // 32).to(torch.bfloat16))
            assert torch.equal(t[f"{base}.weight_offset"], torch.zeros(out, k // 32, dtype=torch.bfloat16))
            assert t[f"{base}.weight_shape"].tolist() == [out, k]
            assert {desc[f"{base}.{s}"] for s in ("weight_packed", "weight_scale", "weight_shape")} == {"W4A16"}


@pytest.mark.parametrize("edit,problem", [
    (lambda t: t.__setitem__(f"{BLOCK}.1.up_proj.weight_scale", torch.ones(I, 1, dtype=torch.bfloat16)),
     f"{BLOCK}.1.up_proj.weight_scale: expected F16/BF16/F32 [{I}, {H // 32}], found BF16 [{I}, 1]"),
    (lambda t: t.pop(f"{BLOCK}.2.down_proj.weight_shape"),
     f"{BLOCK}.2.down_proj: MoE W4A16 needs {BLOCK}.2.down_proj.weight_shape, which is missing"),
    (lambda t: t.__setitem__(f"{BLOCK}.0.gate_proj.weight_packed", torch.zeros(I, H // 2, dtype=torch.int8)),
     f"{BLOCK}.0.gate_proj.weight_packed: expected I32 [out, in / 8], found I8 [{I}, {H // 2}]"),
])
def test_check_export_catches_broken_w4a16_experts(exports, tmp_path, edit, problem):
    def apply(t, desc):
        edit(t)
        desc.update({n: "W4A16" for n in t if n.startswith(BLOCK)})
        for n in [n for n in desc if n.startswith(f"{BLOCK}.") and n not in t and n != f"{BLOCK}.weight"]:
            del desc[n]
    assert problem in _broken(exports, "W4A16", tmp_path, apply)


def test_float_experts_are_written_per_expert_in_the_serving_dtype(base, tmp_path):
    qm = _compile(base, "int8:exclude=lm_head|router|shared_expert_gate|experts")
    ax.export(qm, tmp_path / "x", dtype="float16")
    t, desc = _files(tmp_path / "x")
    assert ax.check(tmp_path / "x") == []
    stack = qm.store[f"{BLOCK}.down_proj.weight"]
    for e in range(E):
        name = moe.expert_name(f"{BLOCK}.down_proj.weight", e)
        assert desc[name] == "FLOAT" and torch.equal(t[name], stack[e].to(torch.float16))


@pytest.mark.parametrize("text,match", [
    ("int8:exclude=lm_head", r"model\.layers\.0\.mlp\.gate: the MoE router is quantized, but vllm-ascend loads "
                                    r"routers float"),
    ("w8a16", r"mlp\.experts: W8A16 experts have no vllm-ascend MoE scheme ptqc writes \(W8A8_DYNAMIC, "
              r"W4A8_DYNAMIC, W4A16: .*compile int8, w4a8 or rtn:bits=4,group=G for them"),
    ("rtn:bits=4,group=32,include=experts", r"mlp\.experts: W4A16 experts need symmetric per-group weights"),
    ("rtn:bits=4,group=32,sym=true,include=experts|q_proj", r"q_proj: W4A16g32 has no dense linear in vllm-ascend"),
    ("w4a8:w_group=64,exclude=experts|lm_head|router|shared_expert_gate,rtn:bits=4,group=32,sym=true,include=experts",
     r"^the description has one group_size: W4A8 uses 64, the W4A16 experts 32; compile them with one group$"),
])
def test_unservable_moe_is_refused_in_one_line(base, tmp_path, text, match):
    qm = _compile(base, text)
    with pytest.raises(PtqcError, match=match) as e:
        ax.export(qm, tmp_path / "x")
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def _broken(exports, kind, tmp_path, edit):
    """A copy of a good export with ``edit(tensors, description)`` applied; its check-export problems."""
    d = tmp_path / "broken"
    shutil.copytree(exports[kind][0], d)
    t, desc = _files(d)
    edit(t, desc)
    save_file(t, str(d / ax.WEIGHTS), metadata={"format": "pt"})
    (d / ax.DESCRIPTION).write_text(json.dumps(desc))
    return ax.check(d)


def test_check_export_catches_a_missing_expert_scale(exports, tmp_path):
    def edit(t, desc):
        del t[f"{BLOCK}.3.down_proj.weight_scale"], desc[f"{BLOCK}.3.down_proj.weight_scale"]
    assert _broken(exports, "W8A8_DYNAMIC", tmp_path, edit) == [
        f"{BLOCK}.3.down_proj: W8A8_DYNAMIC needs {BLOCK}.3.down_proj.weight_scale, which is missing"]


def test_check_export_catches_a_wrong_packing_shape(exports, tmp_path):
    def edit(t, desc):  # int4 codes one per byte: the version-0 shape under a version-1.0.0 description
        w = t[f"{BLOCK}.2.up_proj.weight"]
        t[f"{BLOCK}.2.up_proj.weight"] = quant.unpack_int4(w.t().contiguous()).t().contiguous()
    assert _broken(exports, "W4A8_DYNAMIC-experts", tmp_path, edit) == [
        f"{BLOCK}.2.up_proj.weight: W4A8_DYNAMIC version 1.0.0 packs two int4 per byte along the output dimension: "
        f"expected int8 [{I // 2}, {H}], found [{I}, {H}]"]


def test_check_export_catches_a_router_marked_quantized(exports, tmp_path):
    def edit(t, desc):
        desc["model.layers.0.mlp.gate.weight"] = "W8A8_DYNAMIC"
    problems = _broken(exports, "W8A8_DYNAMIC", tmp_path, edit)
    assert "model.layers.0.mlp.gate.weight: MoE routers load float in vllm-ascend (FLOAT in " \
           "quant_model_description.json), found W8A8_DYNAMIC" in problems
    assert "model.layers.0.mlp.gate.weight: W8A8_DYNAMIC weight must be int8, found BF16" in problems


def test_check_export_catches_a_block_entry_that_disagrees_with_its_experts(exports, tmp_path):
    def edit(t, desc):  # vllm-ascend builds Mixtral / Qwen2-MoE blocks from this entry alone
        desc[f"{BLOCK}.weight"] = "FLOAT"
    assert _broken(exports, "W8A8_DYNAMIC", tmp_path, edit) == [
        f"{BLOCK}.weight: the block's own entry says FLOAT, its experts are W8A8_DYNAMIC"]


def test_check_export_catches_mixed_expert_types_and_a_missing_expert(exports, tmp_path):
    def edit(t, desc):
        desc[f"{BLOCK}.5.gate_proj.weight"] = "W8A16"
        for s in ("weight", "weight_scale", "weight_offset"):
            del t[f"{BLOCK}.6.up_proj.{s}"], desc[f"{BLOCK}.6.up_proj.{s}"]
    problems = _broken(exports, "W8A8_DYNAMIC", tmp_path, edit)
    assert f"{BLOCK}: the experts of a block share one type (vllm-ascend reads expert 0's), found W8A16, " \
           "W8A8_DYNAMIC" in problems
    assert f"{BLOCK}: W8A16 experts have no fused-MoE scheme in vllm-ascend 0.23 (MoE types: W8A8_DYNAMIC, " \
           "W4A8_DYNAMIC, W4A16, FLOAT)" in problems
    assert f"{BLOCK}.6: expert 6 has no up_proj weight" in problems


def test_every_expert_type_reads_back(exports, ids):
    """W8A8_DYNAMIC / W4A8_DYNAMIC: the artifact's logits exactly. W4A16 (scales written in the
    serving dtype, as vllm-ascend reads them): the artifact's logits with its expert scales so rounded."""
    x = ids(2, 9)
    for kind in ("W8A8_DYNAMIC", "W4A8_DYNAMIC", "W4A8_DYNAMIC-experts", "W4A16"):
        d, qm = exports[kind]
        if kind == "W4A16":
            qm = qm.clone()
            (node,) = qm.nodes(ops.MOE_EXPERTS)
            for dq in node.args[3:6]:
                s = qm.store[dq.args[1].target]
                qm.store.overlay[dq.args[1].target] = s.bfloat16().to(s.dtype)
        assert torch.equal(ax.load(d)(x), qm(x)), kind


@pytest.mark.parametrize("text,fmt", [("int8", "int-quantized"), ("rtn:bits=4,group=32", "pack-quantized")])
def test_compressed_tensors_moe_export_per_expert_with_the_router_ignored(base, exports, tmp_path, text, fmt):
    from ptqc.lowering import compressed_tensors as ct

    qm = exports["W8A8_DYNAMIC"][1] if text == "int8" else _compile(base, text)
    res = ct.export(qm, tmp_path / "ct")
    assert res["quantized_experts"] == 3 * E and ct.check(tmp_path / "ct") == []
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert q["format"] == fmt and "model.layers.0.mlp.gate" in q["ignore"]
    t = load_file(str(tmp_path / "ct" / ct.WEIGHTS))
    assert not any(".experts.gate_proj" in n or "gate_up_proj" in n for n in t)
    for proj in ("gate", "up", "down"):
        codes, scale = _stack(qm, proj)
        for e in range(E):
            base_ = f"{BLOCK}.{e}.{proj}_proj"
            got = t[f"{base_}.weight"] if fmt == "int-quantized" else \
                ct.unpack_int32(t[f"{base_}.weight_packed"], 4, t[f"{base_}.weight_shape"].tolist())
            assert torch.equal(got.to(torch.int8), codes[e].to(torch.int8)), base_
            assert torch.equal(t[f"{base_}.weight_scale"], scale[e].to(torch.bfloat16)), base_
    with pytest.raises(PtqcError, match=r"reading quantized MoE experts back from a compressed-tensors export"):
        ct.load(tmp_path / "ct")


def test_compressed_tensors_check_catches_a_quantized_router_and_a_missing_expert_scale(exports, tmp_path):
    from ptqc.lowering import compressed_tensors as ct

    ct.export(exports["W8A8_DYNAMIC"][1], tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["lm_head"]  # the router no longer ignored: "Linear" quantizes it
    (tmp_path / "ct" / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(tmp_path / "ct" / ct.WEIGHTS))
    del t[f"{BLOCK}.4.down_proj.weight_scale"]
    save_file(t, str(tmp_path / "ct" / ct.WEIGHTS), metadata={"format": "pt"})
    problems = ct.check(tmp_path / "ct")
    assert "model.layers.0.mlp.gate.weight: expected I8 [8, 64], found BF16 [8, 64]" in problems
    assert f"{BLOCK}.4.down_proj.weight_scale: int-quantized channel W8 needs it, but it is in no weight file" \
        in problems


def test_a_stack_with_experts_kept_wider_exports_at_its_widest_bits_or_says_why(base, ids, tmp_path):
    """sensitive:unit=expert keeps an expert at int8: W4A8 experts become a W8A8_DYNAMIC block, exactly
    (the int4 codes fit int8 with their own scales); grouped W4A16 ones have no W8 scheme: refused, saying why."""
    qm = _compile(base, "sensitive:unit=expert,top=1,keep=8,w_group=32,w4a8")
    assert any(q.get("weight", {}).get("expert_bits") for q in qm.quant.values())  # one expert kept at int8
    ax.export(qm, tmp_path / "w8")
    t, desc = _files(tmp_path / "w8")
    assert desc[f"{BLOCK}.weight"] == "W8A8_DYNAMIC" and ax.check(tmp_path / "w8") == []
    x = ids(2, 9)
    assert torch.equal(ax.load(tmp_path / "w8")(x), qm(x))
    qm = _compile(base, "sensitive:unit=expert,top=1,keep=8,w_group=32,rtn:bits=4,group=32,sym=true,include=experts")
    with pytest.raises(PtqcError, match=r"^[^\n]*W8g32A16 experts \(the widest of a stack of int4 experts where "
                                        r"sensitive:unit=expert kept \d+: int8\) have no vllm-ascend MoE scheme"):
        ax.export(qm, tmp_path / "w4")
    assert not (tmp_path / "w4").exists()


def test_compressed_tensors_writes_a_stack_with_experts_kept_wider_at_its_widest_bits(base, tmp_path):
    from ptqc.lowering import compressed_tensors as ct

    qm = _compile(base, "sensitive:unit=expert,top=1,keep=8,w_group=32,rtn:bits=4,group=32,sym=true,include=experts")
    ct.export(qm, tmp_path / "ct")
    assert ct.check(tmp_path / "ct") == []
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["num_bits"] for g in q["config_groups"].values()} == {8}  # int4 codes fit 8 bits
    t = load_file(str(tmp_path / "ct" / ct.WEIGHTS))
    for proj in ("gate", "up", "down"):
        codes, scale = _stack(qm, proj)
        for e in range(E):
            base_ = f"{BLOCK}.{e}.{proj}_proj"
            got = ct.unpack_int32(t[f"{base_}.weight_packed"], 8, t[f"{base_}.weight_shape"].tolist())
            assert torch.equal(got, codes[e].to(torch.int8)), base_
            assert torch.equal(t[f"{base_}.weight_scale"], scale[e].to(torch.bfloat16)), base_
