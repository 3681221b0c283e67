"""Exports of families whose checkpoint names differ from transformers' model names (GPT-NeoX's
``embed_out``, Mixtral's ``block_sparse_moe``, DeepSeek-style routers' persistent
``e_score_correction_bias``), of a remote-code model, and of a bfloat16 artifact: written under the
checkpoint's names, checked, and read back by ``ptqc eval`` / ``load_any`` to the artifact's logits."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from make_remote_code_model import make_remote_code_model
from make_tiny_model import make_model
from ptqc import artifact, frontend
from ptqc.cli import main
from ptqc.lowering import compressed_tensors as ct
from ptqc.lowering.ascend import export as ax
from ptqc.pipeline import PassContext, PassManager, parse_pipeline


def _compile(src, recipe, dtype="float32", trust=False):
    qm = frontend.load(src, dtype, trust)
    PassManager(parse_pipeline(recipe)).run(qm, PassContext(quiet=True, calib=torch.randint(0, 300, (2, 16))))
    return qm


def _names(d):
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("readback")


@pytest.mark.parametrize("arch,names,ignored", [
    ("gpt_neox", {"embed_out.weight", "gpt_neox.embed_in.weight", "gpt_neox.layers.0.attention.query_key_value.weight_scale"}, {"embed_out", "lm_head"}),
    ("mixtral", {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.block_sparse_moe.experts.3.w2.weight"},
     {"model.layers.0.block_sparse_moe.gate", "model.layers.0.mlp.gate"}),
    ("glm4_moe", {"model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.experts.3.down_proj.weight"},
     {"model.layers.1.mlp.gate"}),
])
def test_compressed_tensors_keeps_checkpoint_names_and_checks(root, arch, names, ignored):
    src = make_model(root / arch, arch, layers=2, hidden=64, intermediate=128)
    qm = _compile(src, "int8")
    out = root / f"{arch}-ct"
    ct.export(qm, out)
    assert ct.check(out) == []
    assert names <= _names(out)
    assert ignored <= set(json.loads((out / "config.json").read_text())["quantization_config"]["ignore"])
    if arch == "gpt_neox":  # dense: read back to the artifact's logits
        x = torch.randint(0, 300, (2, 12))
        assert torch.allclose(artifact.load_any(out)(x), qm(x), atol=1e-5, rtol=1e-5)


def test_checker_still_refuses_a_tensor_no_module_uses(root):
    src = make_model(root / "neox2", "gpt_neox", layers=1, hidden=64, intermediate=128)
    out = root / "neox2-ct"
    ct.export(_compile(src, "int8"), out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    from safetensors.torch import save_file
    save_file({**t, "embed_out.extra": torch.zeros(3)}, str(out / "model.safetensors"))
    assert ct.check(out) == ["embed_out.extra is in the weight files but no module or scheme of config.json uses it"]


def test_eval_reads_export_directories_back_in_their_dtype(root):
    """ptqc eval of an Ascend / compressed-tensors directory (a bfloat16 artifact) = the artifact's PPL
    within the scales' rounding to bfloat16 (both formats keep scales in the model dtype); the directories
    are read in bfloat16 without --dtype."""
    src = make_model(root / "qwen3", "qwen3", layers=2, hidden=64, intermediate=128)
    (src / "eval.txt").write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)))
    art = root / "qwen3-art"
    artifact.save(_compile(src, "int8", "bfloat16"), art)
    ct.export(artifact.load(art), root / "qwen3-ct")
    ax.export(artifact.load(art), root / "qwen3-as")
    assert json.loads((root / "qwen3-ct" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ppl = {}
    for d in ("qwen3-art", "qwen3-ct", "qwen3-as"):
        r = CliRunner().invoke(main, ["eval", str(root / d), "--text", str(src / "eval.txt"), "--json"])
        assert r.exit_code == 0, r.output
        ppl[d] = json.loads(r.output.strip().splitlines()[-1])["ppl"]
    assert artifact.load_any(root / "qwen3-ct").dtype == torch.bfloat16
    assert ppl["qwen3-as"] == pytest.approx(ppl["qwen3-art"], rel=5e-3)
    assert ppl["qwen3-ct"] == pytest.approx(ppl["qwen3-art"], rel=5e-3)


def test_remote_code_export_checks_only_when_trusted(root):
    src = make_remote_code_model(root / "rc")
    qm = _compile(src, "int8", trust=True)
    out = root / "rc-ct"
    ct.export(qm, out)
    assert ct.check(out, trust_remote_code=True) == []
    (problem,) = ct.check(out)
    assert problem.startswith("cannot build the model of config.json") and "--trust-remote-code" in problem
    r = CliRunner().invoke(main, ["check-export", str(out)])
    assert r.exit_code == 1 and "--trust-remote-code" in r.output
    r = CliRunner().invoke(main, ["check-export", str(out), "--trust-remote-code"])
    assert r.exit_code == 0 and "valid compressed-tensors export" in r.output
    x = torch.randint(0, 300, (2, 12))
    assert torch.allclose(artifact.load_any(out, trust_remote_code=True)(x), qm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, recipe", [("qwen3_moe", "int8"), ("mixtral", "int8"),
                                          ("mixtral", "w4a8:include=experts")])
def test_moe_ascend_export_reads_back_exactly(root, arch, recipe):
    """W8A8_DYNAMIC / W4A8_DYNAMIC experts (per expert under the checkpoint's names: Mixtral's w1/w3/w2)
    read back into stacks with their dynamic int8 inputs: the export's logits equal the artifact's."""
    src = make_model(root / f"{arch}-rb", arch, layers=2, hidden=64, intermediate=128, seed=3)
    qm = _compile(src, recipe, "bfloat16")
    out = root / f"{arch}-{recipe.split(':')[0]}-rb-as"
    ax.export(qm, out)
    back = artifact.load_any(out)
    x = torch.randint(0, 300, (2, 12))
    assert torch.equal(back(x), qm(x))
    text = root / "eval.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    r = CliRunner().invoke(main, ["eval", str(out), "--text", str(text), "--max-windows", "1", "--seqlen", "16",
                                  "--json", "-q"])
    assert r.exit_code == 0, r.output


def test_moe_w4a16_ascend_export_reads_back_as_vllm_ascend_serves_it(root):
    """W4A16 experts (llm-compressor's packed int32 layout, scales in the serving dtype) read back:
    the artifact's codes, its scales rounded to bf16 as written, and so its logits with those scales."""
    from ptqc import ops
    from ptqc.lowering import checkpoint

    src = make_model(root / "q3-w4a16", "qwen3_moe", layers=1, hidden=64, intermediate=128)
    qm = _compile(src, "rtn:bits=4,group=32,sym=true,include=experts", "bfloat16")
    out = root / "q3-w4a16-as"
    ax.export(qm, out)
    back = artifact.load_any(out)
    ((node,), (bnode,)) = qm.nodes(ops.MOE_EXPERTS), back.nodes(ops.MOE_EXPERTS)
    assert not any(n.target == ops.QUANTIZE_ACT for n in back.graph.nodes if n.op == "call_function")
    for i in range(3):
        dq, bdq = node.args[3 + i], bnode.args[3 + i]
        assert torch.equal(checkpoint.weight_codes(qm, dq), checkpoint.weight_codes(back, bdq))
        scale = qm.store[dq.args[1].target].float()
        assert torch.equal(back.store[bdq.args[1].target].float(), scale.bfloat16().float())
        qm.store.overlay[dq.args[1].target] = scale.bfloat16().to(scale.dtype)  # as the export wrote it
    x = torch.randint(0, 300, (2, 12))
    assert torch.equal(back(x), qm(x))
