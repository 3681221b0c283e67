"""Pipeline strings, recipes, typed options, the pass manager's checks, plugins."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ptqc import pipeline
from ptqc.errors import PtqcError

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
    assert ps[0].options.exclude == ["lm_head"]  # default kept


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
