"""Per-module overrides in recipes and the sensitivity-driven precision plan."""
import pytest
import torch

from ptqc import artifact, pipeline
from ptqc.errors import PtqcError
from ptqc.weights import is_quantized


def run(qm, passes, calib=None):
    return pipeline.PassManager(passes).run(qm, pipeline.PassContext(quiet=True, calib=calib))


def bits_of(qm):
    return {m: q["weight"]["bits"] for m, q in qm.quant.items()}


def test_recipe_overrides_set_per_module_options(loaded, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
passes:
  - rtn:
      bits: 4
      group: 32
      overrides:
        "layers.0.*": {bits: 8}
        down_proj: {group: 64}
        layers.1.self_attn.o_proj: skip
""")
    passes, _ = pipeline.load_recipe(recipe)
    qm = loaded("qwen2")
    rec = run(qm, passes)
    b = bits_of(qm)
    assert b["model.layers.0.self_attn.q_proj"] == 8 and b["model.layers.1.self_attn.q_proj"] == 4
    assert qm.quant["model.layers.0.mlp.down_proj"]["weight"]["group"] == 64  # last match wins, both apply
    assert qm.quant["model.layers.0.mlp.down_proj"]["weight"]["bits"] == 8
    assert qm.quant["model.layers.1.mlp.down_proj"]["weight"]["group"] == 64
    assert "model.layers.1.self_attn.o_proj" not in qm.quant
    assert not is_quantized(qm.linears(role="o", layer=1)[0])
    assert rec[0]["overrides"][2] == ["layers.1.self_attn.o_proj", "skip"]


@pytest.mark.parametrize("raw, msg", [
    ({"layers.0.*": {"bits": 9}}, "bits=9 is outside 2..8"),
    ({"layers.0.*": {"bitz": 3}}, "unknown option 'bitz'"),
    ({"layers.0.*": 3}, "must map to options or 'skip'"),
    ([{"bits": 3}], "needs 'match: PATTERN'"),
    ("x", "give a mapping"),
])
def test_bad_overrides_are_one_line_errors(raw, msg):
    pipeline.load_builtin_passes()
    with pytest.raises(PtqcError, match=msg):
        pipeline.get_pass("rtn")(bits=4, overrides=raw)


def _spoil_layer(qm, layer):
    """Give `layer` outlier input channels the way real models have them, without changing
    the function: scale two norm channels by 64 and the matching weight columns by 1/64
    (powers of two: exact). Per-token 4-bit activations then lose everything else in it."""
    for norm_role, roles in (("input_norm", ("q", "k", "v")), ("post_attention_norm", ("gate", "up"))):
        norm = next(qm.nodes(role=norm_role, layer=layer)).args[1].target
        g = qm.store[norm].clone()
        g[[3, 17]] *= 64
        qm.store[norm] = g
        for n in qm.linears(role=roles, layer=layer):
            name = n.args[1].target
            w = qm.store[name].clone()
            w[:, [3, 17]] /= 64
            qm.store[name] = w


@pytest.mark.parametrize("unit", ["layer", "linear"])
def test_sensitive_keeps_the_spoiled_layer_in_float(models, ids, unit, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import make_model

    from ptqc import frontend

    qm = frontend.load(make_model(tmp_path / "m", "llama", layers=4, seed=3))
    x = ids(1, 9)
    before = qm(x)
    _spoil_layer(qm, 2)
    assert torch.allclose(qm(x), before, atol=1e-5)  # the function is unchanged
    top = 1 if unit == "layer" else 5
    rec = run(qm, pipeline.parse_pipeline(f"sensitive:top={top},unit={unit},w_bits=4,w_group=32,a_bits=4,"
                                          "rtn:bits=3,group=32"), calib=ids(4, 16))
    scores = rec[0]["summary"]["scores"]
    if unit == "layer":
        assert rec[0]["summary"]["chosen"] == [2]
        assert max(scores, key=scores.get) == "2"
    else:  # exactly the five linears reading the outlier channels
        assert sorted(rec[0]["summary"]["chosen"]) == sorted(
            n.meta["ptqc"]["module"] for n in qm.linears(role=("q", "k", "v", "gate", "up"), layer=2))
    for i in range(4):
        for n in qm.linears(layer=i):
            spoiled = i == 2 and (unit == "layer" or n.meta["ptqc"]["role"] not in ("o", "down"))
            assert is_quantized(n) == (not spoiled), (i, n.meta["ptqc"]["module"])
    assert qm.plan["model.layers.2.mlp.up_proj"] == {"skip": True}
    back = artifact.load(artifact.save(qm, tmp_path / "a"))
    assert back.plan == qm.plan
    assert torch.equal(back(x), qm(x))


def test_sensitive_keep_bits_and_mad_rule(tmp_path, ids):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import make_model

    from ptqc import frontend

    qm = frontend.load(make_model(tmp_path / "m", "llama", layers=6, seed=4))
    _spoil_layer(qm, 4)
    rec = run(qm, pipeline.parse_pipeline("sensitive:top=0,k=3,keep=8,w_group=32,a_bits=4,rtn:bits=3,group=32"),
              calib=ids(4, 16))
    assert rec[0]["summary"]["chosen"] == [4]
    b = bits_of(qm)
    assert all(v == (8 if ".layers.4." in m else 3) for m, v in b.items())


def test_sensitive_must_run_before_weight_quantization():
    with pytest.raises(PtqcError, match="must run before 'rtn'"):
        pipeline.check_order(pipeline.parse_pipeline("rtn,sensitive"), {"canonical"})


def test_plan_is_what_a_pass_quantizes(loaded):
    """weights.plan: the pass's selection, minus modules kept float (precision plan, overrides),
    with each module's options and QuantSpec, shapes checked; already quantized linears are done."""
    from ptqc.ir import info
    from ptqc.quant import QuantSpec
    from ptqc.weights import plan

    qm = loaded("qwen2")
    qm.plan.update({"model.layers.0.mlp.down_proj": {"skip": True}, "model.layers.1.mlp.down_proj": {"bits": 8}})
    rtn = pipeline.get_pass("rtn")(group=32, exclude="lm_head|o_proj",
                                   overrides={"layers.1.self_attn.q_proj": "skip", "up_proj": {"group": 64}})
    todo = {info(n)["module"]: spec for n, _, spec in plan(qm, rtn)}
    assert len(todo) == 14 - 2 - 1 - 1
    assert not any(m.endswith("o_proj") for m in todo) and "model.layers.1.self_attn.q_proj" not in todo
    assert "model.layers.0.mlp.down_proj" not in todo and todo["model.layers.1.mlp.down_proj"] == QuantSpec(8, 32, False)
    assert todo["model.layers.0.mlp.up_proj"] == QuantSpec(4, 64, False)
    with pytest.raises(PtqcError, match=r"group size 48 does not divide the input dimension 128 of "
                                        r"model\.layers\.0\.self_attn\.q_proj"):
        plan(qm, pipeline.get_pass("rtn")(group=48))
    run(qm, [pipeline.get_pass("rtn")(include="layers.0.*")])
    assert {info(n)["layer"] for n, _, _ in plan(qm, rtn)} == {1}
    act = pipeline.get_pass("w4a4")(overrides={"down_proj": {"a_bits": 16}})
    specs = {info(n)["role"]: s for n, _, s in plan(qm, act, qm.linears(), spec_of=lambda mo: mo.act_spec())}
    assert specs["q"] == QuantSpec(4, 0, True) and specs["down"] is None and "lm_head" not in specs
