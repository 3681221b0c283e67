"""rotate beyond separate q/k/v projections: fused qkv (Phi-3's sliced qkv_proj, GPT-NeoX's per-head
query_key_value) with the per-head V fold on the rows each head reads, MoE blocks (routers, shared
expert gates, expert stacks read and written, float32 routers kept float32), MLA's q/k Hadamard;
exact to 1e-5 of the logits' range, and refused in one line where a fold would change a result."""
import pytest
import torch

from make_tiny_model import make_model
from ptqc import frontend, ops, pipeline
from ptqc.errors import PtqcError
from ptqc.ir import info

ARCHS = ("phi3", "gpt_neox", "mixtral", "qwen2_moe", "glm4_moe", "deepseek_v3")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("rotate-families")
    paths = {a: make_model(root / a, a, layers=2, hidden=64, intermediate=128, seed=i) for i, a in enumerate(ARCHS)}
    paths["glm4_moe-bf16"] = make_model(root / "glm4_moe-bf16", "glm4_moe", layers=2, hidden=64, intermediate=128,
                                        dtype="bfloat16")
    return lambda arch, dtype="float32": frontend.load(paths[arch], dtype)


def _rotate(qm, text="rotate"):
    pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True))
    return qm.history[-1]["summary"]


def _exact(qm, text="rotate"):
    x = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    want = qm(x)
    s = _rotate(qm, text)
    assert (qm(x) - want).abs().max() <= 1e-5 * want.abs().max()
    return s


@pytest.mark.parametrize("arch", ["phi3", "gpt_neox"])
def test_fused_qkv_gets_the_per_head_v_fold(fam, arch):
    s = _exact(fam(arch))
    assert s["v_folded"] == 2 and s["transforms_inserted"] == 2 + 2 * 2  # online down + q/k, per layer
    assert s["layers"][0]["v"] == 16 and "qkv" in s["layers"][0]["readers"]


def test_phi3_fused_gate_up_reads_the_rotated_stream(fam):
    s = _exact(fam("phi3"))
    assert s["layers"][0]["readers"] == ["qkv", "gate_up"]


def test_a_reader_of_the_value_rows_refuses_the_fold(fam):
    qm = fam("phi3")
    lin = next(iter(qm.linears(role="qkv")))
    k = next(u for u in lin.users if u.args[2:4] == (64, 96))
    k.args = (lin, 2, 64, 112)  # the k slice now overlaps the value rows [96, 128)
    with pytest.raises(PtqcError, match=r"^rotate: model\.layers\.0\.self_attn \(slice\.Tensor\) reads rows of "
                                        r"model\.layers\.0\.self_attn\.qkv_proj \(ptqc\.linear\) that make the values "
                                        r"of model\.layers\.0\.self_attn \(ptqc\.attention\); use rotate:v=false$"):
        _rotate(qm)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "glm4_moe"])
def test_moe_blocks_rotate_exactly(fam, arch):
    s = _exact(fam(arch))
    moe_layer = s["layers"][1]
    assert "router" in moe_layer["readers"] and "experts" in moe_layer["readers"]
    assert "experts" in moe_layer["writers"]
    if arch == "qwen2_moe":
        assert "shared_expert_gate" in moe_layer["readers"]


def test_rotated_weights_keep_their_dtypes(fam):
    """A bfloat16 MoE model: the routers' float32 copies (kept as a checkpoint stores them) and the bfloat16
    stacks are written back in the dtype they were read in."""
    qm = fam("glm4_moe-bf16", "bfloat16")
    (router,) = [n for n in qm.linears(role="router")]
    qm.store[router.args[1].target] = qm.store[router.args[1].target].float()
    experts = next(iter(qm.nodes(ops.MOE_EXPERTS)))
    _rotate(qm)  # (exactness: the float32 tests above; in bfloat16 rounding may reroute a token)
    assert qm.store[router.args[1].target].dtype == torch.float32
    assert qm.store[experts.args[3].target].dtype == torch.bfloat16


def test_mla_rotates_with_qk_hadamards_and_names_the_odd_v_head(fam):
    """DeepSeek-V3's tiny MLA: q/k heads of 12 + 8 rotate online; its value heads of 10 have no Hadamard."""
    with pytest.raises(PtqcError, match=r"^rotate: head_dim 10 has no Hadamard factorization .*use rotate:qk=false,v=false$"):
        _rotate(fam("deepseek_v3"))
    s = _exact(fam("deepseek_v3"), "rotate:v=false")
    assert s["head_dim"] == {"20": "20*1"} and s["layers"][0]["qk"] == 20
    assert info(next(iter(fam("deepseek_v3").linears(role="kv_a"))))["role"] == "kv_a"
