"""tools/bench/weight_activation.py: rows, prompts, cells, tables, targets (fake results) and one
tiny real configuration run in-process."""
import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
import weight_activation as wa  # noqa: E402


def test_rows_and_filter():
    rows = wa.build_rows()
    keys = [r["key"] for r in rows]
    assert keys[0] == "fp" and keys[-1] == wa.LLMC_KEY and len(keys) == len(wa.ROWS) + 1 == 14
    assert next(r for r in rows if r["key"] == "w8a8-static")["pipeline"] == "int8:static=true"
    assert next(r for r in rows if r["key"] == "w4a4kv4-rotate-gptq")["pipeline"] == \
        "rotate,gptq:bits=4,group=0,sym=true,w4a4,kv:bits=4,k=head,sym=false"
    sel = [r["key"] for r in wa.build_rows(["w8a8-*", "w4a4kv4-plain"], with_llmc=True)]
    assert sel == ["fp", "w8a8-static", "w8a8-dynamic", "w8a8-smooth", "w4a4kv4-plain"]  # FP always, no llmc
    assert [r["key"] for r in wa.build_rows(["llmc*"], with_llmc=False)] == ["fp"]
    with pytest.raises(SystemExit):
        wa.build_rows(["w16*"])


def test_pipelines_parse_and_name_their_passes():
    from ptqc import pipeline

    assert wa.pass_names("rotate,gptq:bits=4,group=0,sym=true,w4a4,kv:bits=4,k=head,sym=false") == \
        ["rotate", "gptq", "w4a4", "kv"]
    assert wa.pass_names("flatquant:w_bits=8,a_bits=8,kv:bits=8") == ["flatquant", "kv"]
    pipeline.load_builtin_passes()
    for _, _, text in wa.ROWS:
        if text and all(n in pipeline.PASSES for n in wa.pass_names(text)):
            pipeline.parse_pipeline(text)  # every option exists
    kv = pipeline.parse_pipeline("w4a4,kv:bits=4,k=head,sym=false")[1].options
    assert (kv.bits, kv.k, kv.sym) == (4, "head", False)


def test_eval_prompts_are_fixed_and_short():
    text = (ROOT / "examples" / "tiny-qwen2" / "eval.txt").read_text()
    p = wa.eval_prompts(text)
    assert len(p) == 4 and len(set(p)) == 4 and all(len(x.split()) == wa.PROMPT_WORDS for x in p)
    assert p == wa.eval_prompts(text) and all(x in text for x in p)
    with pytest.raises(SystemExit):
        wa.eval_prompts("Module x\n\nonly lower case here")


def test_missing_pass_is_a_cell_not_a_crash():
    res = wa.child({"pipeline": "no_such_pass_xyz,int8", "threads": 0})
    assert res == {"error": wa.MISSING, "missing": True, "missing_pass": "no_such_pass_xyz"}
    assert wa.ppl_cell(res, 16.0) == wa.MISSING


def _counts(n=56, attn=8, **kw):
    c = {"linears": n, "w_quantized": n, "a_quantized": n, "attention": attn, "kv_quantized": attn,
         "act_quantizers": 32, "down_w": 8, "down_a": 8, "down": 8}
    return {**c, **kw}


def _gen(collapsed=False, **kw):
    return {"collapsed": collapsed, "finite": True, "loop": {"period": 1, "repeats": 12, "tokens": 12},
            "distinct_2": 0.3, "reasons": [], **kw}


def test_cells():
    msg = ("collapse: non-finite logits; activations first became non-finite at node linear_12 "
           "(model.layers.3.mlp.down_proj, layer 3)")
    assert wa.ppl_cell({"ppl_error": msg, "quant_s": 1.0}, 16.0) == \
        "collapse (at node linear_12 (model.layers.3.mlp.down_proj, layer 3))"
    assert wa.ppl_cell({"ppl": float("inf"), "quant_s": 1.0}, 16.0) == "collapse (PPL overflow)"
    assert wa.ppl_cell({"ppl": float("nan"), "quant_s": 1.0}, 16.0).startswith("collapse")
    assert wa.ppl_cell({"ppl": 16.16, "quant_s": 1.0}, 16.0) == "16.160 (+1.0%)"
    assert wa.ppl_cell({"ppl": 16.0}, 16.0) == "16.000"
    assert wa.ppl_cell({"error": "PtqcError: boom"}, 16.0) == "error: PtqcError: boom"
    assert wa.gen_cell({"gen": _gen()}) == "ok"
    assert wa.gen_cell({"gen": _gen(True)}) == "loop 12x"
    assert wa.gen_cell({"gen": _gen(True, loop={"period": 3, "repeats": 5, "tokens": 15})}) == "loop 5x (period 3)"
    assert wa.gen_cell({"gen": _gen(True, finite=False)}) == "non-finite logits"
    assert wa.gen_cell({"gen": _gen(True, loop={"tokens": 0}, distinct_2=0.05)}) == "distinct-2 0.050"
    assert wa.gen_cell({"error": "x"}) == "—" and wa.gen_cell(None) == "—"
    gib = _gen(True, loop={"period": 2, "repeats": 3, "tokens": 6}, degenerate=0.0, known_words=0.19)
    assert wa.gen_cell({"gen": gib}) == "gibberish (19% known words)"  # not the short incidental loop
    assert wa.quantized_cell({"counts": _counts()}) == "56/56 / 56/56 / 8/8 (32 act q)"
    assert wa.quantized_cell({"counts": _counts(w_quantized=0, a_quantized=0, kv_quantized=0)}) == "—"
    assert wa.sqnr_cell({"sqnr_mean": None, "sqnr_layers": [1.0, float("nan")]}) == "non-finite"
    assert wa.collapse_where("no location") == "no location"


def _fake(model_rows, results):
    for r in model_rows:
        if r["key"] in results:
            r["res"] = results[r["key"]]
    return model_rows


def _res(ppl, **kw):
    return {"ppl": ppl, "quant_s": 1.0, "counts": _counts(), "gen": _gen(), "sqnr_mean": 30.0,
            "vmhwm_quant": 300 << 20, "vmhwm_exit": 500 << 20, **kw}


COLLAPSE = "collapse: non-finite logits; activations first became non-finite at node add_7 (model.layers.1, layer 1)"


def test_table_and_targets():
    outl = _fake(wa.build_rows(), {
        "fp": {"ppl": 16.0, "vmhwm_exit": 400 << 20, "gen": _gen(), "counts": _counts(0, 8, w_quantized=0,
                                                                                       a_quantized=0, kv_quantized=0)},
        "w8a8-static": _res(19.0),
        "w8a8-dynamic": _res(16.3),
        "w8a8-smooth": _res(16.1),
        "w8a8kv8-smooth": _res(16.12),
        "w8a8kv8-flatquant": {"error": wa.MISSING, "missing": True},
        "w4a4kv4-plain": {"ppl_error": COLLAPSE, "quant_s": 1.0, "counts": _counts(), "gen": _gen(True, finite=False)},
        "w4a4kv4-smooth": _res(40.0, gen=_gen(True)),
        "w4a4kv4-rotate": _res(20.0, sqnr_layers=[14.0, 12.2], sqnr_mean=13.1),
        "w4a4kv4-rotate-gptq": _res(21.0),
        "w4a4kv4-flatquant": _res(17.5),
        wa.LLMC_KEY: {"ppl": 16.24, "quant_s": 3.0, "sqnr_mean": 28.1, "vmhwm_exit": 600 << 20},
    })
    base = _fake(wa.build_rows(), {
        "fp": {"ppl": 16.0}, "w8a8-static": _res(16.2), "w8a8-smooth": _res(16.05),
        "w8a8kv8-smooth": _res(16.3, counts=_counts(a_quantized=48, down_a=0)),
        "w4a4kv4-flatquant": _res(19.0),
    })
    t = wa.format_table("examples/tiny-qwen2-outliers", outl)
    assert "| FP | — | 16.000 | ok | — | — | — | 400 |" in t
    assert "| W8A8KV8 smooth | `smooth,int8,kv:bits=8` | 16.120 (+0.8%) | ok | 56/56 / 56/56 / 8/8 (32 act q) " \
           "| 30.00 | 1.0 | 300 / 500 |" in t
    assert "| W8A8KV8 flatquant | `flatquant:w_bits=8,a_bits=8,kv:bits=8` | n/a (no such pass) | — |" in t
    assert "| W4A4KV4 plain | `w4a4,kv:bits=4` | collapse (at node add_7 (model.layers.1, layer 1)) " \
           "| non-finite logits |" in t
    assert "| W4A4KV4 smooth | `smooth,w4a4,kv:bits=4` | 40.000 (+150.0%) | loop 12x |" in t
    assert f"| {wa.LLMC_LABEL} | `{wa.LLMC_PIPELINE}` | 16.240 (+1.5%) | — | — | 28.10 | 3.0 | 600 |" in t
    assert "| W4A4KV4 rotate | `rotate,w4a4,kv:bits=4,k=head,sym=false` | 20.000 (+25.0%) | ok " \
           "| 56/56 / 56/56 / 8/8 (32 act q) | 13.10 |" in t
    assert "inf" not in t and "nan" not in t
    s = wa.targets({"examples/tiny-qwen2-outliers": outl, "examples/tiny-qwen2": base})
    lines = s.splitlines()
    one = [ln for ln in lines if ln.startswith("   - ")]
    assert "   - examples/tiny-qwen2-outliers: **yes** — PPL 16.120 vs FP 16.000 (+0.75%, within 1%)" in s
    assert any(ln.startswith("   - examples/tiny-qwen2: **no** — PPL 16.300") and "inputs 48/56" in ln for ln in one)
    # static W8A8: +18.75% on the outlier model vs +1.25% on the other, and worse than smooth
    assert any(ln.startswith("   - examples/tiny-qwen2-outliers: **yes** — static 19.000 (+18.75%); smooth 16.100")
               for ln in one)
    order = next(ln for ln in one if ln.startswith("   - examples/tiny-qwen2-outliers: ") and "pairs hold" in ln)
    assert "3 of 4 pairs hold" in order
    assert "flatquant < rotate+gptq: yes (17.500 vs 21.000)" in order
    assert "rotate+gptq < rotate: no (21.000 vs 20.000)" in order
    assert "smooth < plain: yes (40.000 < collapse)" in order
    base_order = next(ln for ln in one if ln.startswith("   - examples/tiny-qwen2: ") and "pairs hold" in ln)
    assert "rotate < smooth: n/a (rotate: not run; smooth: not run)" in base_order
    assert ": 0 of 0 pairs hold (4 n/a) — " in base_order
    assert "   - examples/tiny-qwen2-outliers: **yes** — PPL 17.500 vs FP 16.000 (+9.38%)" in s
    assert "   - examples/tiny-qwen2: **no** — PPL 19.000 vs FP 16.000 (+18.75%)" in s


def test_tiny_real_run(tmp_path):
    """One configuration end to end on a random 2-layer model: smooth,int8,kv:bits=8."""
    import torch

    from make_tiny_model import make_model

    m = make_model(tmp_path / "m", "qwen2", layers=2)
    rnd = random.Random(0)
    words = "the quick brown fox def return lambda class import value list dict".split()
    (m / "eval.txt").write_text(" ".join(rnd.choice(words) for _ in range(400)))
    paths = wa.wo.prepare(m, tmp_path / "work", 3, 32, 0, 2)
    ev = torch.load(paths["eval"])
    torch.save(ev[:4].clone(), paths["eval"])  # 4 eval windows keep it fast
    spec = {"model": str(m), **paths, "threads": 0, "pipeline": "smooth,int8,kv:bits=8",
            "prompts": ["the quick", "def f"], "gen_tokens": 6, "fp_clone": True}
    res = wa.child(spec)
    assert "error" not in res, res
    c = res["counts"]
    assert c["w_quantized"] == c["a_quantized"] == c["linears"] == 14
    assert c["down_w"] == c["down_a"] == c["down"] == 2 and c["kv_quantized"] == c["attention"] == 2
    assert c["act_quantizers"] == 8  # qkv, o, gate/up, down per layer
    assert math.isfinite(res["ppl"]) and res["quant_s"] > 0 and res["vmhwm_exit"] >= res["vmhwm_quant"] > 0
    assert [s["pass"] for s in res["summaries"]] == ["smooth", "int8", "kv"]
    assert res["gen"]["collapsed"] in (True, False) and len(res["gen"]["texts"]) == 2
    assert len(res["sqnr_layers"]) == 2 and res["sqnr_mean"] > 10
    row = {"key": "w8a8kv8-smooth", "label": "W8A8KV8 smooth", "pipeline": spec["pipeline"], "res": res}
    t = wa.format_table("tiny", [{"key": "fp", "label": "FP", "pipeline": None, "res": {"ppl": res["ppl"]}}, row])
    assert "14/14 / 14/14 / 2/2 (8 act q)" in t
