"""Multi-head latent attention (DeepSeek-V2/V3): traced exactly against transformers (q LoRA or a
plain q_proj, decoupled rope, qk head dim != v head dim, DeepSeek-V3's MoE layer), weight passes on
its linears, smooth/awq folds into its norms, the Ascend lowering keeping its attention float, and
one-line refusals of what ptqc does not take."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from ascend_helpers import rel, run
from make_tiny_model import make_model
from ptqc import experts, frontend, ops
from ptqc.errors import PtqcError
from ptqc.lowering.ascend import ops as npu
from ptqc.weights import is_quantized

aten = torch.ops.aten
ARCHS = ("deepseek_v3", "deepseek_v3_q_proj", "deepseek_v2")
MLA_ROLES = ("q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "kv_b")


@pytest.fixture(scope="module")
def mla_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mla")
    layers = {"deepseek_v3_q_proj": 1}  # q_proj is all it shows: one dense layer
    return {a: make_model(root / a, a, layers=layers.get(a, 2), hidden=64, intermediate=128, seed=i)
            for i, a in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def mla_loaded(mla_models):
    cache = {}

    def get(arch="deepseek_v3"):
        if arch not in cache:
            cache[arch] = frontend.load(mla_models[arch])
        return cache[arch].clone()
    return get


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(mla_models, mla_loaded, ids, arch):
    ref = AutoModelForCausalLM.from_pretrained(mla_models[arch]).eval()
    qm = mla_loaded(arch)
    if arch == "deepseek_v2":  # greedy routing ignores the config's 2 expert groups
        assert [n.kwargs["n_group"] for n in qm.nodes(ops.MOE_ROUTE)] == [1]
    for shape in [(1, 7), (3, 33)]:
        x = ids(*shape)
        with torch.no_grad():
            want = ref(x).logits
        torch.testing.assert_close(qm(x), want, atol=1e-5, rtol=1e-5)


def test_canonical_mla_graph(mla_loaded):
    """Roles on every MLA module; the key is cat(k_nope, rope key), not slice copies into a buffer;
    attention takes q/k of 12 + 8 and v of 10 per head; layer 1 is DeepSeek-V3's MoE."""
    qm = mla_loaded()
    for role in MLA_ROLES:
        assert len([n for n in qm.graph.nodes if n.meta.get("ptqc", {}).get("role") == role]) == 2, role
    targets = {n.target for n in qm.graph.nodes if n.op == "call_function"}
    assert not targets & {aten.new_empty.default, aten.slice_scatter.default, aten.copy.default}
    atts = list(qm.nodes(ops.ATTENTION))
    assert len(atts) == 2
    for att in atts:
        q, k, v = (a.meta["shape"] for a in att.args[:3])
        assert (q[1], q[3], k[3], v[1], v[3]) == (4, 20, 20, 4, 10)
        assert att.args[1].target == aten.cat.default
    assert [n.meta["ptqc"]["layer"] for n in qm.nodes(ops.MOE_EXPERTS)] == [1]
    route = next(qm.nodes(ops.MOE_ROUTE))
    assert route.kwargs["scoring"] == "sigmoid" and route.kwargs["n_group"] == 2 and route.kwargs["scale"] == 2.5


def _edited_copy(src, dst, **config):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


@pytest.mark.parametrize("arch, config, match", [
    ("deepseek_v3", {"num_key_value_heads": 2},
     r"^MLA attention model\.layers\.0\.self_attn has num_key_value_heads != num_attention_heads"),
    ("deepseek_v2", {"topk_method": "group_limited_greedy"},
     r"^MoE router model\.layers\.1\.mlp\.gate uses topk_method='group_limited_greedy'"),
])
def test_unsupported_constructs_are_one_line_errors(mla_models, tmp_path, arch, config, match):
    path = _edited_copy(mla_models[arch], tmp_path / "m", **config)
    with pytest.raises(PtqcError, match=match) as e:
        frontend.load(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("pipeline", ["rtn:bits=4,group=8", "gptq:bits=4,group=8", "int8"])
def test_weight_passes_quantize_every_mla_linear(mla_loaded, calib, ids, pipeline):
    qm = mla_loaded()
    stacks = experts.sites(qm)
    run(qm, pipeline, calib)
    y = qm(ids(2, 16))
    assert torch.isfinite(y).all()
    quantized = {n.meta["ptqc"]["module"] for n in qm.linears() if is_quantized(n)}
    assert len(quantized) == 16  # all but lm_head and the router
    assert {m.rsplit(".", 1)[1] for m in quantized} >= {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}
    assert len(stacks) == 3 and all(is_quantized(s) for s in stacks)  # layer 1's expert stacks


def test_rtn_on_no_q_lora_q_proj(mla_loaded, ids):
    qm = mla_loaded("deepseek_v3_q_proj")
    run(qm, "rtn:bits=4,group=4")
    assert sum(is_quantized(n) for n in qm.linears(role="q")) == 1
    assert torch.isfinite(qm(ids(1, 9))).all()


def _fold_targets(scales):
    return {(r["into"].rsplit(".", 1)[1], tuple(r["linears"])) for r in scales}


MLA_FOLDS = {("input_layernorm", ("q_a", "kv_a")), ("q_a_layernorm", ("q_b",)), ("kv_a_layernorm", ("kv_b",))}


def test_smooth_folds_into_the_mla_norms_exactly(mla_loaded, calib, ids):
    qm = mla_loaded()
    x = ids(2, 19)
    ref = qm(x)
    s = run(qm, "smooth", calib)[0]["summary"]
    assert MLA_FOLDS <= _fold_targets(s["scales"])
    assert sum(t[0] in ("q_a_layernorm", "kv_a_layernorm") for t in _fold_targets(s["scales"])) == 2
    assert [r["into"] for r in s["scales"] if r["into"].endswith("kv_a_layernorm")] == \
        ["model.layers.0.self_attn.kv_a_layernorm", "model.layers.1.self_attn.kv_a_layernorm"]
    assert (qm(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_awq_folds_into_the_mla_norms_exactly(mla_loaded, calib, ids):
    qm = mla_loaded()
    x = ids(2, 19)
    ref = qm(x)
    s = run(qm, "awq:quantize=false,clip=false,group=8,grid=4,exclude=experts|lm_head|router", calib)[0]["summary"]
    assert MLA_FOLDS <= _fold_targets(s["scales"])
    assert (qm(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_rotate_residual_is_exact_and_per_head_parts_refused(mla_loaded, ids):
    """The residual rotation is exact (kv_a_proj_with_mqa and q_proj read the rotated stream); the
    per-head v Hadamard is refused in one line (v heads of 10 have none)."""
    with pytest.raises(PtqcError, match=r"^rotate: head_dim 10 has no Hadamard .*use rotate:qk=false,v=false$"):
        run(mla_loaded("deepseek_v3_q_proj"), "rotate")
    qm = mla_loaded("deepseek_v3_q_proj")
    x = ids(2, 19)
    ref = qm(x)
    s = run(qm, "rotate:qk=false,v=false")[0]["summary"]
    assert s["layers"][0]["readers"] == ["q", "kv_a", "gate", "up"]
    assert (qm(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_ascend_lowers_linears_and_keeps_mla_attention_float(mla_loaded, calib, ids):
    qm = mla_loaded()
    run(qm, "int8:exclude=experts|lm_head|router", calib)
    x = ids(2, 16)
    ref = qm(x)
    low = qm.clone()
    s = run(low, "ascend", calib)[-1]["summary"]
    assert [k.split(":")[0] for k in s["kept"]] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "MLA attention (qk head dim 20 != v head dim 10) stays float" in s["kept"][0]
    assert not s["refused"]
    targets = [n.target for n in low.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.ATTENTION) == 2 and npu.FUSED_INFER_ATTENTION_SCORE not in targets
    assert targets.count(npu.QUANT_MATMUL) >= 14  # q_a/kv_a, q_b, kv_b, o, mlp (gate|up fused)...
    assert rel(low(x), ref) < 5e-3  # integer kernels vs fake-quant: rounding-flip noise only


def _hf_with_cache_quantizers(path, qm, rope_key: bool):
    """transformers' model with ptqc's stored cache quantizers applied where transformers writes its MLA
    cache (``cache.update(kv_nope, k_rot)``): after kv_a_layernorm, and after the rope of the key."""
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as hf

    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    layer = [0]

    def fq(which, x):
        i = layer[0]
        base = f"model.layers.{i}.self_attn.{which}"
        s = qm.store[f"{base}_scale"] if f"{base}_scale" in qm.store else None
        return ops.QUANTIZE_ACT(x, s, None, 8, 0, True, 1.0)

    for i, block in enumerate(ref.model.layers):
        def pre(mod, args, i=i):
            layer[0] = i
        block.self_attn.register_forward_pre_hook(pre)
        block.self_attn.kv_a_layernorm.register_forward_hook(lambda mod, args, out: fq("latent", out))
    def quantized(rope):
        def apply(q, k, cos, sin, **kw):
            q, k = rope(q, k, cos, sin, **kw)
            return q, (fq("rope_key", k) if rope_key else k)
        return apply
    return ref, {name: quantized(getattr(hf, name)) for name in ("apply_rotary_pos_emb",
                                                                 "apply_rotary_pos_emb_interleave")}


@pytest.mark.parametrize("k, rope_key", [("tensor", False), ("channel", True), ("head", True)])
def test_kv_quantizes_what_mla_caches(mla_models, mla_loaded, calib, ids, monkeypatch, k, rope_key):
    """kv on MLA quantizes the latent and the rope key (what transformers and vLLM cache), not the
    decompressed K/V: the graph equals transformers with the same quantizers at its cache.update."""
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as hf

    qm = mla_loaded()
    rec = run(qm, f"kv:bits=8,k={k},rope_key={str(rope_key).lower()}", calib)[0]["summary"]
    assert rec["mla_attention_ops"] == 2
    roles = [n.meta["ptqc"]["role"] for n in qm.nodes(ops.QUANTIZE_ACT)]
    assert roles == ["latent_cache_quant", *(["rope_key_cache_quant"] if rope_key else [])] * 2
    for att in qm.nodes(ops.ATTENTION):  # K and V themselves stay float
        assert not any(a.target == ops.QUANTIZE_ACT for a in att.args[1:3])
    shapes = {"tensor": [1], "channel": [16], "head": None}
    assert qm.quant["model.layers.0.self_attn"]["latent_cache"].get("scale_shape") == shapes[k]
    ref, ropes = _hf_with_cache_quantizers(mla_models["deepseek_v3"], qm, rope_key)
    for name, fn in ropes.items():
        monkeypatch.setattr(hf, name, fn)
    x = ids(2, 17)
    with torch.no_grad():
        want = ref(x).logits
    torch.testing.assert_close(qm(x), want, atol=1e-5, rtol=1e-5)
    assert run(qm, "kv", calib)[0]["summary"]["attention_ops"] == 0  # already quantized: nothing to do


def test_mla_latent_scale_is_the_calibrated_absmax(mla_models, mla_loaded, calib):
    """Layer 0's per-tensor latent scale is max|kv_a_layernorm output| / 127 over the calibration windows."""
    qm = mla_loaded()
    run(qm, "kv:k=tensor,rope_key=false", calib)
    ref = AutoModelForCausalLM.from_pretrained(mla_models["deepseek_v3"]).eval()
    seen = []
    ref.model.layers[0].self_attn.kv_a_layernorm.register_forward_hook(lambda m, a, out: seen.append(out.abs().max()))
    with torch.no_grad():
        for row in calib:
            ref(row[None])
    scale = qm.store["model.layers.0.self_attn.latent_scale"]
    torch.testing.assert_close(scale, (max(seen) / 127).reshape(1), rtol=1e-6, atol=0)


def _fa_export(mla_models, calib, tmp_path, kv):
    from ptqc.lowering.ascend import export as ax

    qm = frontend.load(mla_models["deepseek_v3"], "bfloat16")
    run(qm, f"int8:exclude=experts|lm_head|router,{kv}", calib)
    out = tmp_path / "exp"
    head = ax.export(qm, out)
    return qm, out, head, json.loads((out / "quant_model_description.json").read_text())


def test_fakquant_export_writes_checks_and_reads_back(mla_models, calib, ids, tmp_path):
    """kv:k=tensor,rope_key=false exports as vllm-ascend's FAKQuant: fa_k/fa_v .scale [1, 1] = the latent
    scale and int8 zero offsets per MLA attention, fa_quant_type, typed FAQuant; it checks, and reads back
    to a graph with the same latent quantizers and the artifact's logits."""
    from safetensors import safe_open

    from ptqc import artifact
    from ptqc.lowering.ascend import export as ax

    qm, out, head, desc = _fa_export(mla_models, calib, tmp_path, "kv:k=tensor,rope_key=false")
    assert head["fa_quant_type"] == "FAKQuant" and head["optional"]["kv_cache"] == "FAKQuant"
    assert ax.check(out) == []
    with safe_open(str(out / "quant_model_weights-00001-of-00001.safetensors"), "pt") as f:
        names = set(f.keys())
        for i in range(2):
            base = f"model.layers.{i}.self_attn"
            latent = qm.store[f"{base}.latent_scale"].float()
            for which in ("fa_k", "fa_v"):
                assert desc[f"{base}.{which}.scale"] == desc[f"{base}.{which}.offset"] == "FAQuant"
                assert f.get_tensor(f"{base}.{which}.scale").tolist() == [[latent.item()]]
                assert f.get_tensor(f"{base}.{which}.offset").dtype == torch.int8
    assert not any(n.endswith(("latent_scale", "rope_key_scale")) for n in names)  # never as FLOAT tensors
    back = artifact.load_any(out)
    assert [n.meta["ptqc"]["role"] for n in back.nodes(ops.QUANTIZE_ACT)].count("latent_cache_quant") == 2
    x = ids(2, 12)
    assert rel(back(x).float(), qm(x).float()) < 2e-2  # bf16 scales and weights as written


@pytest.mark.parametrize("kv, why", [
    ("kv:k=tensor", "keeps the rope key in the model dtype (compile kv:rope_key=false)"),
    ("kv:k=channel,rope_key=false", "one static symmetric int8 latent scale per layer"),
])
def test_fakquant_not_exported_says_why_and_writes_no_cache_scales(mla_models, calib, tmp_path, kv, why):
    from ptqc.lowering.ascend import export as ax

    _, out, head, desc = _fa_export(mla_models, calib, tmp_path, kv)
    assert "fa_quant_type" not in head and why in head["optional"]["kv_cache"]
    assert head["optional"]["kv_cache"].startswith("not exported (model.layers.0.self_attn: FAKQuant")
    assert not any("latent" in n or "rope_key" in n or ".fa_" in n for n in desc)
    assert ax.check(out) == []


def test_fakquant_checker_names_what_is_wrong(mla_models, calib, tmp_path):
    from ptqc.lowering.ascend import export as ax

    _, out, _, desc = _fa_export(mla_models, calib, tmp_path, "kv:k=tensor,rope_key=false")
    d = dict(desc)
    del d["fa_quant_type"]
    (out / "quant_model_description.json").write_text(json.dumps(d))
    assert ax.check(out) == ['model.layers.0.self_attn.fa_k.offset is FAQuant but quant_model_description.json '
                             'has no fa_quant_type "FAKQuant"']


@pytest.mark.parametrize("kv", ["kv:k=tensor,rope_key=false", "kv:k=channel", "kv:k=head"])
def test_ascend_lowers_with_mla_cache_quantizers(mla_loaded, calib, ids, kv):
    """With MLA attention kept float, its cache quantizers stay as they are (the fake-quant op), the
    linears around them lower, and the graph stays within int8 rounding-flip noise of the fake-quant one."""
    qm = mla_loaded()
    run(qm, f"int8:exclude=experts|lm_head|router,{kv}", calib)
    x = ids(2, 16)
    ref = qm(x)
    s = run(qm, "ascend", calib)[-1]["summary"]
    assert not s["refused"]
    kept = [n.meta["ptqc"]["role"] for n in qm.nodes(ops.QUANTIZE_ACT)]
    assert kept == ["latent_cache_quant", *([] if "rope_key=false" in kv else ["rope_key_cache_quant"])] * 2
    assert sum(c["quant_matmul"] for c in s["kernels"].values()) == 14
    assert rel(qm(x), ref) < 5e-3


def test_compressed_tensors_refuses_mla_cache_quantizers_naming_the_ascend_form(mla_loaded, calib, tmp_path):
    from ptqc.lowering import compressed_tensors as ct

    qm = mla_loaded()
    run(qm, "int8:exclude=experts|lm_head|router,kv:k=tensor,rope_key=false", calib)
    with pytest.raises(PtqcError, match=r"^model\.layers\.0\.self_attn: MLA's cache quantizers \(latent, rope key\) have no "
                                        r"compressed-tensors form .*export --format ascend \(FAKQuant") as e:
        ct.export(qm, tmp_path / "ct")
    assert "\n" not in str(e.value) and not (tmp_path / "ct").exists()
