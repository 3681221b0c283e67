"""ptqc's Ascend exports load in vllm-ascend 0.23.0's real loader (on the CPU, in the peer venv of
tools/vllm_ascend_env.py, through tools/vllm_ascend_load.py): every export type served in fp16
and in bf16 on Qwen3, and the richest type (static W8A8: fused per-tensor input scales,
deq_scale, quant_bias) on Qwen2 and Llama too, one decoder layer each; artifacts in bf16, fp16
and float32, exported for their own dtype or another (``export --dtype``). A recorder on every
parameter's weight_loader proves each parameter got each checkpoint tensor exactly once,
unchanged, with its dtype and shape; the int8 weights and scales vLLM holds equal the artifact's;
deq_scale is int64 for fp16 and float32 for bf16. A tiny Qwen3-MoE adds W8A8_DYNAMIC and
W4A8_DYNAMIC experts (vllm-ascend's AscendFusedMoE: each expert's tensors in w13_* / w2_* once,
equal to the artifact's; W4A8's post-processed scales and scale_bias). What the loader cannot
take, ptqc refuses to export (one line). Skipped only when PyPI cannot be reached to make the peer venv."""
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ptqc import frontend, ops, pipeline, quant
from ptqc.errors import PtqcError
from ptqc.lowering import checkpoint
from ptqc.lowering.ascend import export as ax
from ptqc.lowering.ascend.ops_quant import unpack_int4x8
from ptqc.weights import dequantized_weight

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_tiny_model import make_model  # noqa: E402

FAMILIES = {"qwen2": {}, "qwen3": {}, "llama": {"kv_heads": 4}, "qwen3_moe": {}, "mixtral": {}, "qwen2_moe": {}}
MOE = "qwen3_moe"
# MoE model types vllm-ascend has no packed-modules mapping for: a block's type comes from its own X.experts.weight entry
OTHER_MOE = ("mixtral", "qwen2_moe")
C8 = ",kv:k=channel,v=channel"
RECIPES = {"W8A8": "smooth,int8:static=true", "W8A8-asym": "int8:static=true,a_sym=false",
           "W8A8_DYNAMIC": "int8", "W8A16": "w8a16", "W4A8_DYNAMIC": "w4a8", "W4A8_DYNAMIC-g64": "w4a8:w_group=64"}
DTYPES = ("float16", "bfloat16")
# MoE experts (8 experts, fused by vllm-ascend into w13_* / w2_*): W8A8_DYNAMIC, W4A8_DYNAMIC under the
# dense linears' group_size, and msModelSlim's per-channel layout (group_size 0, dense W8A8_DYNAMIC)
MOE_RECIPES = {"W8A8_DYNAMIC": "int8", "W4A8_DYNAMIC": "w4a8",
               "W4A8_DYNAMIC-experts": "int8:exclude=lm_head|router|shared_expert_gate|experts,w4a8:include=experts",
               "W4A16": "rtn:bits=4,group=32,sym=true,include=experts"}  # llm-compressor's packed experts
MOE_SERVINGS = {"W8A8_DYNAMIC": (None, "float16"), "W4A8_DYNAMIC": (None,), "W4A8_DYNAMIC-experts": ("float16",),
                "W4A16": (None, "float16")}
# family -> (artifact dtype, recipes, serving dtypes: None = the artifact's): every type on Qwen3 in
# both serving dtypes; Qwen2 and Llama add their model classes (Qwen2's q/k/v bias, Llama's MHA) on
# static W8A8; the float32 artifact is served only through --dtype
CASES = {"qwen3": ("bfloat16", tuple(RECIPES), (None, "float16")),
         "qwen2": ("float16", ("W8A8",), (None, "bfloat16")),
         "llama": ("float32", ("W8A8",), ("float16", "bfloat16")),
         MOE: ("bfloat16", tuple(MOE_RECIPES), (None, "float16")),
         **{f: ("bfloat16", ("W8A8_DYNAMIC",), (None,)) for f in OTHER_MOE}}
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
SCALES = ("weight_scale", "weight_offset", "input_scale", "k_cache_scale", "k_cache_offset", "v_cache_scale",
          "v_cache_offset", "weight_scale_second", "weight_offset_second")


def _recipe(family, kind):
    if family in (MOE, *OTHER_MOE):
        return MOE_RECIPES[kind]
    return RECIPES[kind] + (C8 if family == "qwen3" and kind == "W8A8" else "")  # C8 loads for Qwen3 only


@pytest.fixture(scope="module")
def peer():
    """The peer venv (made once, cached in .cache/vllm-ascend/)."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "vllm_ascend_env.py")], capture_output=True, text=True)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """(family, dtype) -> the traced one-layer model (traced once: tracing dominates the time)."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(family, dtype):
        if (family, dtype) not in cache:
            src = make_model(root / f"{family}-{dtype}", family, layers=1, hidden=64, intermediate=128, dtype=dtype,
                             seed=list(FAMILIES).index(family), **FAMILIES[family])
            cache[family, dtype] = frontend.load(src, dtype)
        return cache[family, dtype].clone()
    return get


def _build(root: Path, bases) -> dict:
    """(family, kind, serving dtype) -> (export dir, artifact QModel) of every case, compiled and exported here."""
    torch.manual_seed(0)
    calib = torch.randint(0, 300, (2, 16))
    out = {}
    for family, (dtype, kinds, servings) in CASES.items():
        base = bases(family, dtype)
        for kind in kinds:
            qm = base.clone()
            pipeline.PassManager(pipeline.parse_pipeline(_recipe(family, kind))).run(
                qm, pipeline.PassContext(quiet=True, calib=calib))
            for serving in MOE_SERVINGS[kind] if family == MOE else servings:
                d = root / f"{family}-{kind}-{serving or 'own'}"
                res = ax.export(qm, d, dtype=serving)
                out[family, kind, res["metadata"]["dtype"]] = (d, qm)
    return out


def _load(peer, root: Path, exports: dict) -> dict:
    """Run the loader once over every export {key: (dir, qm)}: {key: (dir, qm, its report)}."""
    cmd = [peer["python"], str(ROOT / "tools" / "vllm_ascend_load.py"), *(str(d) for d, _ in exports.values()),
           "--json", str(root / "report.json"), "--save", str(root / "state")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={"PYTHONPATH": peer["pythonpath"],
                       "PATH": "/usr/bin:/bin", "HOME": str(root)})
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((root / "report.json").read_text())["dirs"]
    return {k: (d, qm, report[str(d)]) for k, (d, qm) in exports.items()}


@pytest.fixture(scope="module")
def loaded_all(peer, bases, tmp_path_factory):
    """One loader process over every export (dense and MoE), each built in its config.json's dtype."""
    root = tmp_path_factory.mktemp("vllm")
    exports = _build(root, bases)
    return _load(peer, root, exports)


@pytest.fixture(scope="module")
def run(loaded_all):
    """The dense cases."""
    return {k: v for k, v in loaded_all.items() if k[0] not in (MOE, *OTHER_MOE)}


@pytest.fixture(scope="module")
def moe_run(loaded_all):
    """The MoE cases."""
    return {k: v for k, v in loaded_all.items() if k[0] == MOE}


def test_the_cases_cover_every_type_in_both_dtypes_and_every_family(run):
    assert {(k, dt) for _, k, dt in run} == {(k, dt) for k in RECIPES for dt in DTYPES}
    assert {f for f, _, _ in run} == set(FAMILIES) - {MOE, *OTHER_MOE}
    assert {dtype for dtype, _, _ in CASES.values()} == {"float32", *DTYPES}
    assert all(rep["dtype"] == dt for (_, _, dt), (_, _, rep) in run.items())  # built as config.json says


def _tensors(d: Path) -> dict:
    out = {}
    for f in d.glob("quant_model_weight*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _in_vllm(loaded: dict, name: str, tensors: dict) -> torch.Tensor:
    """The part of vLLM's (fused) parameter that checkpoint tensor ``name`` was loaded into."""
    mod, suffix = name.rsplit(".", 1)
    parent, proj = mod.rsplit(".", 1)
    if suffix.startswith("kv_cache_"):
        return loaded[f"{parent}.attn.{proj[0]}_cache_{suffix.removeprefix('kv_cache_')}"]
    if proj not in FUSED:
        return loaded[name]
    fused, i = FUSED[proj]
    full = loaded[f"{parent}.{fused}.{suffix}"]
    if full.numel() == 1:  # per-tensor input_scale / input_offset: one for the fused layer
        return full
    shards = sorted((p for p, (f, _) in FUSED.items() if f == fused), key=lambda p: FUSED[p][1])
    start = sum(tensors[f"{parent}.{s}.{suffix}"].shape[0] for s in shards[:i])
    return full[start:start + tensors[name].shape[0]]


def test_every_export_loads_with_every_parameter_filled_once(loaded_all):
    assert len(loaded_all) == sum(len(kinds) * len(servings) for f, (_, kinds, servings) in CASES.items()
                                  if f != MOE) + sum(map(len, MOE_SERVINGS.values()))
    for (family, kind, dtype), (d, qm, rep) in loaded_all.items():
        where = f"{family} {kind} {dtype}"
        assert rep["ok"], f"{where}: {rep.get('error')}"
        assert rep["unfilled"] == [] and rep["refilled"] == [], where
        calls = [c | {"param": p} for p, v in rep["params"].items() for c in v["calls"]]
        casts = [c for c in calls if c["dtype"] != c["param_dtype"]]
        # the only conversion: float32 scales into the model-dtype parameters vLLM creates for them
        assert all(c["dtype"] == "float32" and c["param_dtype"] == dtype and c["param"].endswith(SCALES)
                   for c in casts), f"{where}: {casts[:3]}"
        tensors = _tensors(d)
        assert sorted(c["sha256"] for c in calls) == sorted(_sha(t) for t in tensors.values()), where  # each once
        shapes = sorted((c["dtype"], tuple(c["shape"])) for c in calls)
        assert shapes == sorted((str(t.dtype)[6:], tuple(t.shape)) for t in tensors.values()), where


def test_loaded_int8_weights_and_scales_equal_the_artifact(run):
    for (family, kind, dtype), (d, qm, rep) in run.items():
        loaded = load_file(rep["saved"]["loaded"])
        processed = load_file(rep["saved"]["processed"])
        tensors = _tensors(d)
        qnames = [n for n in tensors if n.endswith((".weight",) + SCALES + (".input_offset", ".deq_scale", ".quant_bias",
                                                                             ".kv_cache_scale", ".kv_cache_offset",
                                                                             ".scale_bias"))
                 and (not n.endswith(".weight") or tensors[n].dtype == torch.int8)]
        assert len(qnames) > 10
        for n in qnames:
            got = _in_vllm(loaded, n, tensors)
            want = tensors[n].to(got.dtype)
            assert torch.equal(got, want), f"{family} {kind} {dtype}: {n}"
        for lin in qm.linears():
            dq, mod = lin.args[1], lin.meta["ptqc"]["module"]
            if f"{mod}.weight_scale" not in tensors:
                continue
            codes = checkpoint.weight_codes(qm, dq)  # the artifact's integers and scales, bit for bit
            w = _in_vllm(loaded, f"{mod}.weight", tensors)
            scale = qm.store[dq.args[1].target].to(getattr(torch, dtype))
            got = _in_vllm(loaded, f"{mod}.weight_scale", tensors)
            if kind.startswith("W4A8"):  # int4 pairs along the output dim; scale = weight_scale x scale_second
                w = quant.unpack_int4(w.t().contiguous()).t()
                got = (got.float() * _in_vllm(loaded, f"{mod}.weight_scale_second", tensors).float()).to(got.dtype)
                scale = scale.reshape(got.shape[0], -1).expand_as(got)
            assert torch.equal(w, codes.to(torch.int8)), mod
            assert torch.equal(got, scale.reshape(got.shape)), mod
        for n, w in loaded.items():  # post-processing: the int8 weight transposed (W4A8: as int32), the rest as loaded
            if n.endswith(".weight") and w.dtype == torch.int8:
                want = w.t().contiguous().view(torch.int32) if kind.startswith("W4A8") else w.t()
                assert torch.equal(processed[n], want), n


def test_w4a8_served_weight_equals_the_artifacts_and_scale_bias_follows_the_formula(run):
    """After vllm-ascend's post-processing, what npu_weight_quant_batchmatmul gets (int32 [in, out / 8]
    int4 weight, antiquant_scale = weight_scale x weight_scale_second as [in / group, out]) decodes
    to the artifact's codes times its scales rounded to the model dtype (vLLM's scale parameters
    are in the model dtype: the same rounding every Ascend type has)."""
    n = 0
    for (family, kind, dtype), (d, qm, rep) in run.items():
        if not kind.startswith("W4A8"):
            continue
        dt, processed, tensors = getattr(torch, dtype), load_file(rep["saved"]["processed"]), _tensors(d)
        group = json.loads((d / ax.DESCRIPTION).read_text())["group_size"]
        for lin in qm.linears():
            mod = lin.meta["ptqc"]["module"]
            if f"{mod}.weight_scale" not in tensors:  # lm_head: FLOAT
                continue
            proj = mod.rsplit(".", 1)[1]
            fused = f"{mod.rsplit('.', 1)[0]}.{FUSED[proj][0]}" if proj in FUSED else mod
            codes = unpack_int4x8(processed[f"{fused}.weight"])  # [in, out]
            aq = processed[f"{fused}.weight_scale_second"].to(dt).float().repeat_interleave(group, 0)
            served = {f"{fused}.weight_scale": (codes.float() * aq).to(dt).t()}  # [out, in], as one fused tensor
            rows = _in_vllm(served, f"{mod}.weight_scale", tensors)  # this linear's rows of it
            out, k = rows.shape
            c = checkpoint.weight_codes(qm, lin.args[1]).float()
            s = qm.store[lin.args[1].args[1].target].reshape(out, -1).to(dt).float()  # vLLM's scales: model dtype
            assert torch.equal(rows, (c * s.repeat_interleave(k // s.shape[1], 1)).to(dt)), f"{kind} {dtype} {mod}"
            assert torch.allclose(rows.float(), dequantized_weight(qm, lin).float(), rtol=2 ** -7, atol=0)
            chunks = 16 if proj in ("o_proj", "down_proj") else 1
            w = checkpoint.weight_codes(qm, lin.args[1]).float() * (tensors[f"{mod}.weight_scale"] *
                                                                   tensors[f"{mod}.weight_scale_second"]).repeat_interleave(group, 1)
            bias = 8 * w.reshape(out, chunks, k // chunks).sum(-1)
            assert torch.allclose(tensors[f"{mod}.scale_bias"], bias, rtol=1e-6, atol=1e-6), mod
            assert torch.equal(_in_vllm(load_file(rep["saved"]["loaded"]), f"{mod}.scale_bias", tensors),
                               tensors[f"{mod}.scale_bias"]), mod
            n += 1
    assert n == 2 * 2 * 7  # 2 recipes (per channel, g64) x 2 dtypes x 7 linears


def test_deq_scale_is_int64_for_fp16_and_float32_for_bf16_through_the_loader(run):
    n = 0
    for (family, kind, dtype), (d, qm, rep) in run.items():
        want = torch.int64 if dtype == "float16" else torch.float32
        processed = load_file(rep["saved"]["processed"])
        tensors = _tensors(d)
        for name, t in processed.items():
            if not name.endswith(".deq_scale"):
                continue
            assert t.dtype == want, name
            base = name.removesuffix(".deq_scale")
            parts = ("q_proj", "k_proj", "v_proj") if base.endswith("qkv_proj") else \
                ("gate_proj", "up_proj") if base.endswith("gate_up_proj") else (base.rsplit(".", 1)[1],)
            parent = base.rsplit(".", 1)[0]
            deq = torch.cat([(tensors[f"{parent}.{p}.input_scale"] * tensors[f"{parent}.{p}.weight_scale"].reshape(-1))
                             for p in parts]).float()
            expect = deq.view(torch.int32).to(torch.int64) & 0xFFFFFFFF if dtype == "float16" else deq
            assert torch.equal(t, expect), name  # float32 bits of input_scale * weight_scale
            n += 1
    static = sum(k.split("-")[0] == "W8A8" for _, k, _ in run)
    assert n == static * 4  # one layer, 4 linear groups (qkv, o, gate_up, down)


def test_input_offset_is_int8_as_vllm_ascend_creates_it(run):
    d, qm, rep = run["qwen3", "W8A8-asym", "float16"]
    t = _tensors(d)
    offs = [v for k, v in t.items() if k.endswith(".input_offset")]
    assert offs and all(v.dtype == torch.int8 for v in offs) and any(v.item() != 0 for v in offs)
    assert ax.check(d) == []


@pytest.mark.parametrize("text", ["w4a16:w_group=32", "w4a16:w_group=32,pack", "rtn:bits=4,group=0"])
def test_dense_w4a16_is_refused_with_the_alternative(bases, tmp_path, text):
    qm = bases("qwen2", CASES["qwen2"][0])
    pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True))
    with pytest.raises(PtqcError, match=r"has no dense linear in vllm-ascend 0.23 .*compile w8a16") as e:
        ax.export(qm, tmp_path / "x", dtype="float16")
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_c8_is_refused_where_the_model_class_cannot_load_it(bases, tmp_path, family):
    qm = bases(family, CASES[family][0])  # traced for the loader cases already
    pipeline.PassManager(pipeline.parse_pipeline("int8" + C8)).run(
        qm, pipeline.PassContext(quiet=True, calib=torch.randint(0, 300, (2, 16))))
    with pytest.raises(PtqcError, match=f"C8 .* does not load for model_type '{family}' in vllm-ascend") as e:
        ax.export(qm, tmp_path / "x", dtype="float16")
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def _expert_rows(loaded: dict, name: str, tensors: dict) -> torch.Tensor:
    """The rows of vLLM's fused expert parameter (w13_* [E, 2I or I, ...]: gate then up; w2_*) that
    per-expert tensor ``name`` (``X.experts.e.{gate,up,down}_proj.suffix``) was loaded into."""
    block, e, proj, suffix = re.match(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.(\w+)$", name).groups()
    full = loaded[f"{block}.{'w2' if proj == 'down' else 'w13'}_{suffix}"][int(e)]
    rows = tensors[name].shape[0]
    return full[rows if proj == "up" else 0:][:rows]


def _stacks(qm):
    """{proj: (codes [E, out, in], scale [E, out, 1])} of the artifact's one MoE block."""
    (node,) = qm.nodes(ops.MOE_EXPERTS)
    return {p: (checkpoint.weight_codes(qm, dq), qm.store[dq.args[1].target].float())
            for p, dq in zip(("gate", "up", "down"), node.args[3:6])}


def test_moe_experts_load_once_each_with_the_artifacts_codes_and_scales(moe_run):
    assert {(k.split("-")[0], dt) for _, k, dt in moe_run} == {(k, dt) for k in MOE_SERVINGS for dt in DTYPES
                                                                 if "-" not in k}  # each type in fp16 and bf16
    for (family, kind, dtype), (d, qm, rep) in moe_run.items():
        if kind == "W4A16":  # its own parameters: test_moe_w4a16_experts_load_as_packed_int4_with_their_scales
            continue
        where = f"{kind} {dtype}"
        params, tensors, loaded = rep["params"], _tensors(d), load_file(rep["saved"]["loaded"])
        block = "model.layers.0.mlp.experts"
        assert sorted(c["shard"] for c in params[f"{block}.w13_weight"]["calls"]) == \
            sorted(f"{e}.{w}" for e in range(8) for w in ("w1", "w3")), where
        assert sorted(c["shard"] for c in params[f"{block}.w2_weight"]["calls"]) == [f"{e}.w2" for e in range(8)]
        w4 = kind.startswith("W4A8")
        assert params[f"{block}.w13_weight"]["shape"] == [8, 32 if w4 else 64, 64], where  # packed along out
        assert params[f"{block}.w13_weight_scale"]["dtype"] == ("float32" if w4 else dtype), where
        gate = params["model.layers.0.mlp.gate.weight"]  # the router: float, loaded once, unquantized
        assert gate["dtype"] == dtype and [c["dtype"] for c in gate["calls"]] == [dtype], where
        experts = [n for n in tensors if ".experts." in n]
        assert len(experts) == 8 * 3 * (4 if w4 and kind.endswith("experts") else 6 if w4 else 3), where
        for n in experts:  # every per-expert tensor where vLLM put it, bit for bit
            got = _expert_rows(loaded, n, tensors)
            assert torch.equal(got, tensors[n].to(got.dtype)), f"{where}: {n}"
        for proj, (codes, scale) in _stacks(qm).items():  # and those are the artifact's integers and scales
            for e in range(8):
                name = f"{block}.{e}.{proj}_proj"
                w = _expert_rows(loaded, f"{name}.weight", tensors)
                w = quant.unpack_int4(w.t().contiguous()).t() if w4 else w
                assert torch.equal(w, codes[e].to(torch.int8)), f"{where}: {name}"
                got = _expert_rows(loaded, f"{name}.weight_scale", tensors)
                assert torch.equal(got, scale[e].reshape(got.shape).to(got.dtype)), f"{where}: {name}"


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words [..., n] -> the signed int4 codes [..., 8n], code j of a word in bits [4j, 4j + 4)."""
    u = (words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> (4 * torch.arange(8))
    c = (u & 0xF).reshape(*words.shape[:-1], -1)
    return torch.where(c >= 8, c - 16, c)


def test_moe_w4a16_experts_load_as_packed_int4_with_their_scales(moe_run):
    """vllm-ascend's MoE W4A16 (llm-compressor's layout): w13/w2 weight_packed, weight_scale, weight_shape and
    the zero weight_offset filled once per expert shard; the packed words unpack (code + 8) to the artifact's
    codes, the scales are the artifact's in the serving dtype; after process_weights_after_loading the
    weights are the codes transposed [E, in, out] in int4 pairs."""
    cases = {k: v for k, v in moe_run.items() if k[1] == "W4A16"}
    assert {dt for _, _, dt in cases} == set(DTYPES)
    for (family, kind, dtype), (d, qm, rep) in cases.items():
        params, loaded = rep["params"], load_file(rep["saved"]["loaded"])
        processed, block, st = load_file(rep["saved"]["processed"]), "model.layers.0.mlp.experts", _stacks(qm)
        assert not rep["unfilled"] and not rep["refilled"], (dtype, rep["unfilled"], rep["refilled"])
        for w, projs in (("w13", ("gate", "up")), ("w2", ("down",))):
            for suffix in ("weight_packed", "weight_scale", "weight_shape", "weight_offset"):
                assert len(params[f"{block}.{w}_{suffix}"]["calls"]) == 8 * len(projs), (dtype, w, suffix)
            codes = torch.cat([st[p][0] for p in projs], 1).to(torch.int8)  # [E, out, in]
            got = _nibbles(loaded[f"{block}.{w}_weight_packed"]) % 16 - 8  # stored as code + 8
            assert torch.equal(got.to(torch.int8), codes), (dtype, w)
            scale = torch.cat([st[p][1] for p in projs], 1)
            assert torch.equal(loaded[f"{block}.{w}_weight_scale"], scale.reshape(8, codes.shape[1], -1).to(
                getattr(torch, dtype))), (dtype, w)
            assert torch.equal(_nibbles(processed[f"{block}.{w}_weight_packed"]).to(torch.int8),
                               codes.transpose(1, 2)), (dtype, w)


def test_moe_w4a8_post_processing_serves_the_artifacts_scales_and_scale_bias(moe_run):
    """After process_weights_after_loading: w13/w2 int4 pairs viewed as int32 ([E, in, out / 8]), the
    scale as the int64 vllm-ascend's grouped matmul reads (float32 bits; under a group_size > 0 it
    first rounds scale x scale_second to float16), scale_bias summed over its chunks."""
    n = 0
    for (family, kind, dtype), (d, qm, rep) in moe_run.items():
        if not kind.startswith("W4A8"):
            continue
        loaded, processed = load_file(rep["saved"]["loaded"]), load_file(rep["saved"]["processed"])
        tensors, block = _tensors(d), "model.layers.0.mlp.experts"
        per_channel = json.loads((d / ax.DESCRIPTION).read_text())["group_size"] == 0
        st = _stacks(qm)
        for w, projs in (("w13", ("gate", "up")), ("w2", ("down",))):
            assert torch.equal(processed[f"{block}.{w}_weight"].view(torch.int8),
                               loaded[f"{block}.{w}_weight"].transpose(1, 2)), kind
            scale = torch.cat([st[p][1] for p in projs], 1).reshape(8, -1)  # [E, out]
            if not per_channel:
                scale = scale.to(torch.float16).float()
            bits = processed[f"{block}.{w}_weight_scale"].reshape(8, -1, scale.shape[1]) & 0xFFFFFFFF  # [E, G, out]
            assert torch.equal(bits.to(torch.int32).view(torch.float32), scale[:, None].expand(bits.shape)), \
                f"{kind} {dtype} {w}"
            bias = torch.stack([torch.cat([tensors[f"{block}.{e}.{p}_proj.scale_bias"].sum(-1) for p in projs])
                             for e in range(8)])
            got = processed[f"{block}.{w}_scale_bias"]
            torch.testing.assert_close(got, bias, rtol=1e-5, atol=1e-5)  # vLLM sums in another order
            n += 1
    assert n == 2 * 2  # 2 layouts (grouped in bf16, per channel in fp16) x (w13, w2)


# ---- the types of tests/test_ascend_types.py: one loader process, each type served in fp16 and bf16 on Qwen3 ----
NEW_RECIPES = {"W8A8_MIX": "w8a8_mix", "W4A4_DYNAMIC": "w4a4", "W4A4_FLATQUANT_DYNAMIC": "flatquant:epochs=0,k_transform=false",
               "W8A8_MXFP8": "w8a8_mxfp8", "W4A4_MXFP4": "w4a4_mxfp4"}
PER_LAYER = ("left_trans", "right_trans", "clip_ratio")  # one tensor for a fused layer, loaded from each shard


@pytest.fixture(scope="module")
def new_run(peer, bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_new")
    calib = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    exports = {}
    for kind, recipe in NEW_RECIPES.items():
        qm = bases("qwen3", "bfloat16")
        pipeline.PassManager(pipeline.parse_pipeline(recipe)).run(qm, pipeline.PassContext(quiet=True, calib=calib))
        for serving in DTYPES:
            d = root / f"{kind}-{serving}"
            assert ax.export(qm, d, dtype=serving)["model_quant_type"] == kind
            exports[kind, serving] = (d, qm)
    return _load(peer, root, exports)


def _loaded_part(loaded: dict, name: str, tensors: dict) -> torch.Tensor:
    mod, suffix = name.rsplit(".", 1)
    parent, proj = mod.rsplit(".", 1)
    if suffix in PER_LAYER and proj in FUSED:
        return loaded[f"{parent}.{FUSED[proj][0]}.{suffix}"]
    return _in_vllm(loaded, name, tensors)


def test_new_types_load_every_parameter_once_with_the_exported_values(new_run):
    assert set(new_run) == {(k, dt) for k in NEW_RECIPES for dt in DTYPES}
    for (kind, dtype), (d, qm, rep) in new_run.items():
        where = f"{kind} {dtype}"
        assert rep["ok"] and rep["dtype"] == dtype, f"{where}: {rep.get('error')}"
        assert rep["unfilled"] == [] and rep["refilled"] == [], where
        calls = [c | {"param": p} for p, v in rep["params"].items() for c in v["calls"]]
        casts = [c for c in calls if c["dtype"] != c["param_dtype"]]
        assert all(kind == "W8A8_MIX" and c["dtype"] == "float32" and c["param_dtype"] == dtype
                   and c["param"].endswith(SCALES) for c in casts), f"{where}: {casts[:3]}"
        tensors = _tensors(d)
        assert sorted(c["sha256"] for c in calls) == sorted(_sha(t) for t in tensors.values()), where
        loaded = load_file(rep["saved"]["loaded"])
        quantized = [n for n in tensors if tensors[n].dtype not in (torch.float16, torch.bfloat16)
                     or n.endswith(PER_LAYER)]
        assert len(quantized) >= 7 * 2, where
        for n in quantized:
            got = _loaded_part(loaded, n, tensors)
            assert torch.equal(got, tensors[n].to(got.dtype)), f"{where}: {n}"


def test_new_types_post_process_to_what_their_kernels_take(new_run):
    """What process_weights_after_loading leaves: W4A4 weights packed 8 int4 per int32 (the loader's stub of
    npu_convert_weight_to_int4pack, the documented order) decoding to the artifact's codes, FlatQuant's
    left_trans transposed for npu_kronecker_quant, MX weights [in, out] and E8M0 scales [in / 64, out, 2]."""
    for (kind, dtype), (d, qm, rep) in new_run.items():
        loaded, processed = load_file(rep["saved"]["loaded"]), load_file(rep["saved"]["processed"])
        layer = "model.layers.0.mlp.gate_up_proj"
        w, s = loaded[f"{layer}.weight"], loaded.get(f"{layer}.weight_scale")
        if kind == "W4A4_DYNAMIC":  # int32 [out, in / 8], transposed
            assert torch.equal(unpack_int4x8(processed[f"{layer}.weight"].t()), w), kind
        elif kind == "W4A4_FLATQUANT_DYNAMIC":  # weight replaced by weight_packed int32 [out, in / 8]
            assert f"{layer}.weight" not in processed
            assert torch.equal(unpack_int4x8(processed[f"{layer}.weight_packed"]), w), kind
        elif "MX" in kind:
            assert torch.equal(processed[f"{layer}.weight"], w.t()), kind
            assert torch.equal(processed[f"{layer}.weight_scale"], s.reshape(s.shape[0], -1, 2).transpose(0, 1)), kind
        if kind == "W4A4_FLATQUANT_DYNAMIC":
            assert torch.equal(processed[f"{layer}.left_trans"], loaded[f"{layer}.left_trans"].t())


def test_mla_fakquant_export_loads_its_latent_scales(peer, tmp_path):
    """DeepSeek-V3 (MLA) W8A8_DYNAMIC + FAKQuant: vllm-ascend's loader (its MLA modules, its DeepSeek
    fa_* name patch) puts each layer's fa_k / fa_v scale and offset into mla_attn.mla_attn.fa_*, once,
    as written; fa_q stays empty (not written: vllm-ascend quantizes the query itself or not at all).
    Post-processing stops at the NPU kernels MLA absorbs kv_b_proj with."""
    src = make_model(tmp_path / "dsv3", "deepseek_v3", layers=2, hidden=64, intermediate=128)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "topk_method": "noaux_tc"}))  # as DeepSeek-V3 ships it
    qm = frontend.load(src, "bfloat16")
    pipeline.PassManager(pipeline.parse_pipeline("int8:exclude=experts|lm_head|router,kv:k=tensor,rope_key=false")).run(
        qm, pipeline.PassContext(quiet=True, calib=torch.randint(0, 300, (2, 16))))
    out = tmp_path / "exp"
    assert ax.export(qm, out)["fa_quant_type"] == "FAKQuant"
    (_, _, rep), = _load(peer, tmp_path, {"mla": (out, qm)}).values()
    assert rep.get("ok"), rep.get("error")
    assert "npu" in rep["process_error"]
    written = load_file(str(out / "quant_model_weights-00001-of-00001.safetensors"))
    for i in range(2):
        for which in ("fa_k", "fa_v"):
            for part in ("scale", "offset"):
                calls = rep["params"][f"model.layers.{i}.self_attn.mla_attn.mla_attn.{which}.{part}"]["calls"]
                t = written[f"model.layers.{i}.self_attn.{which}.{part}"]
                assert [(c["shape"], c["sha256"]) for c in calls] == [([1, 1], hashlib.sha256(
                    t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest())]
    assert sorted(rep["unfilled"]) == sorted(f"model.layers.{i}.self_attn.mla_attn.mla_attn.fa_q.{p}"
                                             for i in range(2) for p in ("scale", "offset"))
