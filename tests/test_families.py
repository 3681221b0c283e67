"""Decoder families beyond Llama's layout: Gemma 2/3 (softcaps, sandwich norms, sliding/full
layers), LayerNorm families (GPT-NeoX, StableLM, Phi-2, Falcon), a remote-code model (TinyPangu);
exact against transformers, compiled, lowered, exported; unsupported constructs refused."""
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from make_remote_code_model import make_remote_code_model
from make_tiny_model import make_model
from ptqc import frontend, ops, pipeline
from ptqc.cli import main
from ptqc.errors import PtqcError
from ptqc.weights import fold_input_scale, is_quantized

aten = torch.ops.aten
FAMILIES = ("gemma2", "gemma3_text", "gpt_neox", "stablelm", "phi", "falcon")
CALIB = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    paths = {a: make_model(root / a, a, layers=2, hidden=64, intermediate=128, seed=i) for i, a in enumerate(FAMILIES)}
    paths["pangu"] = make_remote_code_model(root / "pangu")
    (paths["pangu"] / "eval.txt").write_text(" ".join(["the quick brown fox def return x"] * 60))
    cache = {}

    def get(arch, dtype="float32"):
        if (arch, dtype) not in cache:
            cache[arch, dtype] = frontend.load(paths[arch], dtype, trust_remote_code=arch == "pangu")
        return cache[arch, dtype].clone()
    get.paths = paths
    return get


def _run(qm, text):
    pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True, calib=CALIB))
    return qm


@pytest.mark.parametrize("arch", FAMILIES + ("pangu",))
def test_logits_match_transformers(fam, ids, arch):
    ref = AutoModelForCausalLM.from_pretrained(fam.paths[arch], dtype=torch.float32,
                                               trust_remote_code=arch == "pangu").eval()
    x = ids(2, 21)  # longer than Gemma's window (8)
    with torch.no_grad():
        want = ref(x).logits
    torch.testing.assert_close(fam(arch)(x), want, atol=1e-5, rtol=1e-5)


def test_gemma2_softcaps_sandwich_norms_and_windows(fam, ids):
    qm = fam("gemma2")
    att = list(qm.nodes(ops.ATTENTION))
    assert [a.kwargs["window"] for a in att] == [8, -1] and all(a.kwargs["softcap"] == 2.0 for a in att)
    roles = {n.meta["ptqc"]["role"] for n in qm.nodes(ops.RMS_NORM)}
    assert {"pre_feedforward_norm", "post_feedforward_norm", "post_attention_norm"} <= roles
    assert any(n.target == aten.tanh.default for n in qm.graph.nodes)  # final logit softcap
    x = ids(1, 21)
    y = qm(x)
    assert y.abs().max() <= 3.0  # final_logit_softcapping
    for a in att:
        a.kwargs = {**a.kwargs, "softcap": 0.0}
    assert not torch.allclose(qm(x), y, atol=1e-3)


@pytest.mark.parametrize("arch,n_norms,head", [("gpt_neox", 5, "embed_out.weight"), ("phi", 3, "lm_head.weight"),
                                                ("falcon", 3, "lm_head.weight")])
def test_layer_norm_families_are_canonical(fam, arch, n_norms, head):
    qm = fam(arch)
    assert len(list(qm.nodes(ops.LAYER_NORM))) == n_norms
    assert not any(n.target in (aten.layer_norm.default, aten.matmul.default) for n in qm.graph.nodes)
    lm = list(qm.linears(role="lm_head"))
    assert len(lm) == 1 and lm[0].args[1].target == head


@pytest.mark.parametrize("arch", ["gpt_neox", "phi", "stablelm"])
def test_smooth_folds_into_layer_norm_weight_and_bias_exactly(fam, ids, arch):
    qm = fam(arch)
    x = ids(2, 17)
    want = qm(x)
    _run(qm, "smooth")
    assert qm.history[-1]["summary"]["folds"] >= 2
    norms = [n for n in qm.nodes(ops.LAYER_NORM) if n.meta["ptqc"]["layer"] is not None]
    assert all(qm.store.written.get(n.args[2].target) for n in norms if n.args[2] is not None)
    torch.testing.assert_close(qm(x), want, atol=1e-5, rtol=1e-5)


def test_fold_helper_into_layer_norm_is_exact(fam, ids):
    """The fold smooth and awq share, with a wide random scale: weight and bias both divided."""
    qm = fam("gpt_neox")
    x = ids(2, 9)
    want = qm(x)
    norm = next(iter(qm.nodes(ops.LAYER_NORM)))
    lins = [u for u in norm.users if u.target == ops.LINEAR]
    fold_input_scale(qm, norm, lins, torch.rand(64, generator=torch.Generator().manual_seed(0)) * 4 + 0.1)
    torch.testing.assert_close(qm(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "gpt_neox", "pangu"])
def test_weight_passes_compile(fam, ids, arch):
    x = ids(2, 13)
    ref = fam(arch)(x)
    for text in ("rtn:bits=4,group=32", "gptq:bits=4,group=32", "smooth,int8"):
        qm = _run(fam(arch), text)
        assert all(is_quantized(n) for n in qm.linears() if n.meta["ptqc"]["role"] != "lm_head"), text
        y = qm(x)
        assert torch.isfinite(y).all() and not torch.equal(y, ref), text
        if text == "smooth,int8":  # 8-bit: close to the float model
            assert (y - ref).abs().max() < 0.25 * ref.abs().max(), text


def test_ascend_lowering(fam, ids):
    """LayerNorm lowers to aten.layer_norm (torch_npu's kernel); softcapped attention has no Ascend
    kernel: refused with the reason, kept float with attention=keep. Lowered = compiled numerics."""
    from ptqc.lowering.ascend.lower import lower

    x = ids(1, 9)
    neox = _run(fam("gpt_neox"), "smooth,int8")  # float32: the CPU emulation takes it
    want = neox(x)
    lower(neox)
    assert any(n.target == aten.layer_norm.default for n in neox.graph.nodes)
    assert not any(n.target == ops.LAYER_NORM for n in neox.graph.nodes)
    torch.testing.assert_close(neox(x), want, atol=1e-3 * want.abs().max().item(), rtol=0)
    gemma = _run(fam("gemma2"), "w8a16")
    want = gemma(x)
    with pytest.raises(PtqcError, match="softcapping .*attention=keep"):
        lower(gemma.clone())
    lower(gemma, attention="keep")
    assert any(n.target == ops.ATTENTION and n.kwargs["softcap"] for n in gemma.graph.nodes)
    torch.testing.assert_close(gemma(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "phi"])
def test_onnx_softcap_and_layer_norm(fam, ids, tmp_path, arch):
    import onnx

    from ptqc.lowering import onnx as lo

    qm = fam(arch)
    r = lo.export(qm, tmp_path / "m.onnx")
    x = ids(2, 21)
    ref = qm(x)
    assert (lo.logits(lo.session(r.path), x) - ref).abs().max() < 1e-4 * ref.abs().max()
    ops_used = {n.op_type for n in onnx.load(str(r.path)).graph.node}
    assert ("Tanh" if arch == "gemma2" else "LayerNormalization") in ops_used


def test_remote_code_cli_end_to_end(fam, tmp_path):
    src = fam.paths["pangu"]
    r = CliRunner().invoke(main, ["compile", str(src), "--passes", "smooth,int8", "-o", str(tmp_path / "no")])
    assert r.exit_code == 2 and "--trust-remote-code" in r.output.strip().splitlines()[-1]
    assert not (tmp_path / "no").exists()
    out = tmp_path / "art"
    r = CliRunner().invoke(main, ["compile", str(src), "--passes", "smooth,int8", "-o", str(out), "--dtype",
                                  "bfloat16", "--trust-remote-code", "--calib", str(src / "eval.txt"),
                                  "--calib-samples", "2", "--calib-seqlen", "32"])
    assert r.exit_code == 0, r.output
    assert (out / "modeling_tiny_pangu.py").is_file()
    r = CliRunner().invoke(main, ["eval", str(out), "--seqlen", "32", "--max-windows", "2", "--trust-remote-code"])
    assert r.exit_code == 0 and "ppl" in r.output, r.output
    r = CliRunner().invoke(main, ["export", str(out), "--format", "ascend", "-o", str(tmp_path / "asc"),
                                  "--trust-remote-code"])
    assert r.exit_code == 0, r.output
    desc = (tmp_path / "asc" / "quant_model_description.json").read_text()
    assert '"model.layers.0.self_attn.o_proj.bias"' in desc and "W8A8_DYNAMIC" in desc


def test_unsupported_construct_names_the_module(tmp_path):
    """Falcon-7B's multi-query split indexes with a Python list: a constant a meta trace cannot see."""
    p = make_model(tmp_path / "falcon_mq", "falcon", layers=1, hidden=64, intermediate=128)
    cfg = json.loads((p / "config.json").read_text())
    cfg["multi_query"] = True
    (p / "config.json").write_text(json.dumps(cfg))
    # torch.export lifts the list index as a constant (refused as such) or, after other Falcon exports in the
    # same process, bakes it into the graph, which then fails to type-check there: either way the module is named.
    with pytest.raises(PtqcError, match=r"^unsupported construct in transformer\.h\.0\.self_attention: "
                                        r".*(constant|does not type-check)") as e:
        frontend.load(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch,opts", [("stablelm", ""), ("phi", ""), ("gpt_neox", "")])
def test_rotate_layer_norm_families_exactly(fam, ids, arch, opts):
    """QuaRot's centering: the stream made zero-mean, each LayerNorm becomes an RMSNorm with its weight
    fused into the readers and its bias moved into their biases (made where a reader has none)."""
    qm = fam(arch)
    x = ids(2, 17)
    want = qm(x)
    n_norms = len(list(qm.nodes(ops.LAYER_NORM)))
    _run(qm, "rotate" + opts)
    assert not list(qm.nodes(ops.LAYER_NORM)) and len(list(qm.nodes(ops.RMS_NORM))) == n_norms
    assert all(torch.equal(qm.store[n.args[1].target], torch.ones(64)) for n in qm.nodes(ops.RMS_NORM))
    assert qm.history[-1]["summary"]["layers"][-1]["centered"] == 1 + 2 * 2  # embedding, o and down of 2 layers
    assert all(lin.args[2] is not None for lin in qm.linears(role="lm_head"))  # the final norm's bias
    assert (qm(x) - want).abs().max() <= 1e-5 * want.abs().max()


def test_rotate_refuses_what_centering_would_change(fam):
    qm = fam("stablelm")
    final = next(n for n in qm.nodes(ops.LAYER_NORM) if n.meta["ptqc"]["role"] == "final_norm")
    final.target, final.args = ops.RMS_NORM, (final.args[0], final.args[1], final.args[3])
    with pytest.raises(PtqcError, match=r"^rotate: model\.layers\.0\.input_layernorm \(ptqc\.layer_norm\) is a "
                                        r"LayerNorm and model\.norm \(ptqc\.rms_norm\) an RMSNorm on the same"):
        _run(qm, "rotate")
