"""Pipeline strings, recipes, typed options, the pass manager's checks, plugins."""
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

from ptqc import pipeline
from ptqc.errors import PtqcError
from ptqc.quant import QuantSpec

PLUGIN = Path(__file__).parent / "plugins" / "example_plugin.py"


@pytest.fixture(scope="module", autouse=True)
def plugin():
    pipeline.load_builtin_passes()
    return pipeline.load_plugin(PLUGIN)


def test_plugin_file_registers_passes(plugin):
    assert {"head8", "mark", "needs_mark", "early", "boom"} <= set(plugin)
    assert pipeline.get_pass("head8").doc().startswith("Quantize lm_head")


def test_parse_pipeline_options_follow_their_pass():
    ps = pipeline.parse_pipeline("rtn:bits=3,group=64,sym=true,head8:bits=6, mark")
    assert [p.name for p in ps] == ["rtn", "head8", "mark"]
    assert (ps[0].options.bits, ps[0].options.group, ps[0].options.sym) == (3, 64, True)
    assert ps[1].options.bits == 6
    assert ps[0].options.exclude == ["lm_head", "router", "shared_expert_gate"]  # default kept


def test_list_options_split_on_bar():
    (p,) = pipeline.parse_pipeline("rtn:exclude=lm_head|down_proj")
    assert p.options.exclude == ["lm_head", "down_proj"]


@pytest.mark.parametrize("text,msg", [
    ("nope", r"unknown pass 'nope'; known passes: .*rtn"),
    ("rtn:bitz=4", r"unknown option 'bitz'; valid options: bits=4 \(int\), group=128 \(int\)"),
    ("rtn:bits=four", r"option bits: 'four' is not an int"),
    ("rtn:sym=maybe", r"'maybe' is not a bool"),
    ("rtn:bits=9", r"bits=9 is outside 2..8"),
    ("bits=4", r"comes before any pass name"),
    ("", r"empty pipeline"),
])
def test_bad_pipelines(text, msg):
    with pytest.raises(PtqcError, match=msg):
        pipeline.parse_pipeline(text)


def test_recipe(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(textwrap.dedent("""\
        dtype: bfloat16
        passes:
          - mark
          - rtn: {bits: 3, group: 64}
          - name: head8
            bits: 8
    """))
    ps, rest = pipeline.load_recipe(r)
    assert [p.name for p in ps] == ["mark", "rtn", "head8"]
    assert ps[1].options.bits == 3 and rest == {"dtype": "bfloat16"}
    r.write_text("passes: [{rtn: {bits: x}}]")
    with pytest.raises(PtqcError, match="not an int"):
        pipeline.load_recipe(r)
    r.write_text("foo: 1")
    with pytest.raises(PtqcError, match="needs a top-level 'passes:' list"):
        pipeline.load_recipe(r)


def test_requirements_name_the_providing_pass():
    with pytest.raises(PtqcError, match=r"pass 'needs_mark' requires 'marked', which no earlier pass provides; run one of: mark before it"):
        pipeline.check_order(pipeline.parse_pipeline("needs_mark"), {"canonical"})
    pipeline.check_order(pipeline.parse_pipeline("mark,needs_mark"), {"canonical"})


def test_forbidden_order_is_rejected():
    with pytest.raises(PtqcError, match=r"pass 'early' must run before 'rtn'"):
        pipeline.check_order(pipeline.parse_pipeline("rtn,early"), {"canonical"})
    pipeline.check_order(pipeline.parse_pipeline("early,rtn"), {"canonical"})


def test_pass_manager_records_and_dumps(loaded):
    qm = loaded("qwen2")
    dumped = []
    pm = pipeline.PassManager(pipeline.parse_pipeline("mark,rtn:group=64,head8"), dump_after=["rtn"],
                              dump=lambda i, p, q: dumped.append((i, p.name)))
    recs = pm.run(qm, pipeline.PassContext(quiet=True))
    assert [r["pass"] for r in recs] == ["mark", "rtn", "head8"]
    assert recs[0]["changed"] is False and recs[0]["ops_delta"] == {}
    assert recs[1]["ops_delta"] == {"ptqc.dequantize_weight": 14}
    assert recs[1]["weights_added"] == 14 * 2 and recs[1]["weights_changed"] == 14
    assert recs[2]["ops_delta"] == {"ptqc.dequantize_weight": 1}
    assert all(r["seconds"] >= 0 for r in recs)
    assert dumped == [(1, "rtn")]
    assert {"canonical", "marked", "weight_quant"} <= qm.properties
    assert qm.history == recs


def test_dump_after_unknown_pass():
    with pytest.raises(PtqcError, match="--dump-after 'gptq' names no pass"):
        pipeline.PassManager(pipeline.parse_pipeline("rtn"), dump_after=["gptq"])


def test_lint_catches_a_broken_pass(loaded):
    from ptqc.pipeline import Pass, PassResult

    class Breaks(Pass):
        name = "breaks"

        def run(self, qm, ctx):
            lin = qm.linears()[0]
            qm.store._cache.clear()
            del qm.store[lin.args[1].target]
            return PassResult()

    with pytest.raises(PtqcError, match="after pass 'breaks': node .* reads weight .*q_proj.weight"):
        pipeline.PassManager([Breaks()]).run(loaded("qwen2"), pipeline.PassContext(quiet=True))


def test_entry_point_plugin(tmp_path):
    """A pass registered by an installed package's `ptqc.passes` entry point shows up."""
    (tmp_path / "ep_plugin_mod.py").write_text(textwrap.dedent('''\
        from ptqc.pipeline import Pass, PassResult

        class EpPass(Pass):
            """Pass from an entry point."""
            name = "from_entry_point"

            def run(self, qm, ctx):
                return PassResult(changed=False)
    '''))
    dist = tmp_path / "ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ptqc.passes]\nfrom_entry_point = ep_plugin_mod:EpPass\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "ptqc.cli", "passes"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "from_entry_point" in out.stdout and "Pass from an entry point." in out.stdout


@pytest.mark.parametrize("t", [int | None, typing.Optional[int]])
def test_none_only_for_optional_options(t):
    from ptqc.options import _coerce

    assert _coerce(None, t, "x") is None and _coerce("none", t, "x") is None and _coerce("3", t, "x") == 3
    for union in (int | str, typing.Union[int, float]):
        with pytest.raises(PtqcError, match="x: None is not a int or"):
            _coerce(None, union, "x")
    assert _coerce("none", int | str, "x") == "none"
    for plain in (int, str, bool, list[str]):
        with pytest.raises(PtqcError, match="x: needs a value"):
            _coerce(None, plain, "x")


def test_optional_option_in_a_pass():
    from dataclasses import dataclass

    from ptqc.pipeline import Pass

    class Opt(Pass):
        name = "opt"

        @dataclass
        class Options:
            limit: int | None = None

    assert Opt(limit="7").options.limit == 7 and Opt(limit="none").options.limit is None
    with pytest.raises(PtqcError, match="option limit: 'x' is not a int or NoneType"):
        Opt(limit="x")


def test_weight_options_share_validation():
    pipeline.load_builtin_passes()
    for text, msg in [("gptq:group=-1", "pass gptq: group=-1 must be 0"), ("rtn:clip=0", "pass rtn: clip_ratio=0.0"),
                      ("slim:bits=5", "bits=5 is outside 2..4"), ("w4a16:w_group=-2", "w_group=-2 must be 0"),
                      ("int8:w_bits=1", "pass int8: w_bits=1 is outside 2..8")]:
        with pytest.raises(PtqcError, match=msg):
            pipeline.parse_pipeline(text)
    rtn, = pipeline.parse_pipeline("rtn:bits=3,clip=0.9")
    assert rtn.options.weight_spec() == QuantSpec(3, 128, False, 0.9)
    assert [p.provides for p in pipeline.parse_pipeline("int8,int8:a_bits=16,w8a16")] == [
        {"weight_quant", "act_quant"}, {"weight_quant"}, {"weight_quant"}]


def test_complete_appends_lowering_and_pack():
    def names(text, **kw):
        return [p.name for p in pipeline.complete(pipeline.parse_pipeline(text), **kw)]

    assert names("rtn") == ["rtn", "pack"]
    assert names("rtn", pack=False) == ["rtn"]
    assert names("smooth") == ["smooth"]  # no weight quantization: nothing to pack
    assert names("rtn,pack,mark") == ["rtn", "pack", "mark"]
    assert names("rtn", target="ascend") == ["rtn", "pack", "ascend"]
    assert names("smooth,int8,ascend,mark", target="ascend") == ["smooth", "int8", "pack", "ascend", "mark"]
    assert names("int8:a_bits=16", target="ascend", pack=False) == ["int8", "ascend"]
    given = pipeline.parse_pipeline("rtn")
    pipeline.complete(given, target="ascend")
    assert [p.name for p in given] == ["rtn"]  # a new list
    with pytest.raises(PtqcError, match="unknown target 'npu'; use one of: torch, ascend"):
        pipeline.complete(given, target="npu")


def test_iter_run_yields_each_record_when_its_pass_is_done(loaded):
    qm = loaded("qwen2")
    pm = pipeline.PassManager(pipeline.parse_pipeline("rtn,head8"))
    seen = []
    for rec in pm.iter_run(qm, pipeline.PassContext(quiet=True)):
        seen.append((rec["pass"], sorted(q["weight"]["method"] for q in qm.quant.values())))
    assert seen == [("rtn", ["rtn"] * 14), ("head8", ["head8"] + ["rtn"] * 14)]
    assert [r["pass"] for r in qm.history] == ["rtn", "head8"]


def _claiming(name, claims, options_of):
    """A pass that provides ``claims`` with ``options_of``'s options but changes nothing."""
    from ptqc.pipeline import Pass, PassResult

    return type(name, (Pass,), {"name": name, "provides": frozenset({claims}),
                                "Options": pipeline.get_pass(options_of).Options,
                                "run": lambda self, qm, ctx: PassResult(changed=False)})


@pytest.mark.parametrize("claims, options_of, what", [
    ("weight_quant", "rtn", r"model\.layers\.0\.self_attn\.q_proj still reads a float weight \(and 13 more\)"),
    ("weight_quant", "int8", r"model\.layers\.0\.self_attn\.q_proj still reads a float weight"),
    ("act_quant", "act_quant", r"model\.layers\.0\.self_attn\.q_proj reads an unquantized input \(and 13 more\)"),
    ("kv_quant", "kv", r"model\.layers\.0\.self_attn reads an unquantized K or V \(and 1 more\)"),
])
def test_provided_properties_are_checked_after_the_pass(loaded, claims, options_of, what):
    liar = _claiming("liar", claims, options_of)
    with pytest.raises(PtqcError, match=rf"after pass 'liar': it provides '{claims}', but {what}"):
        pipeline.PassManager([liar()]).run(loaded("qwen2"), pipeline.PassContext(quiet=True))
    pipeline.PassManager([liar()], check=False).run(loaded("qwen2"), pipeline.PassContext(quiet=True))
    pipeline.PassManager([liar(exclude="*")]).run(loaded("qwen2"), pipeline.PassContext(quiet=True))  # selects nothing


def test_properties_hold_after_the_builtin_passes(loaded):
    """The checks accept what the passes do, including modules kept float by overrides."""
    qm = loaded("qwen2")
    p = pipeline.get_pass("w4a8")(overrides={"layers.1.*": "skip", "down_proj": {"a_bits": 16}})
    head = pipeline.get_pass("rtn")(include="lm_head", exclude="", group=32)
    pipeline.PassManager([p, pipeline.get_pass("kv")(k="head"), head]).run(qm, pipeline.PassContext(quiet=True))
    assert {"weight_quant", "act_quant", "kv_quant"} <= qm.properties
    assert "model.layers.1.mlp.down_proj" not in qm.quant and qm.quant["lm_head"]["weight"]["method"] == "rtn"
