"""Greedy generation equals transformers' greedy decoding; collapse signals flag a model forced
to loop (or to stop, or to produce NaN) and pass the shipped example model."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ptqc import artifact, evaluate, frontend, generate
from ptqc.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-qwen2"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def force_loop(qm, tok):
    """Final norm keeps one hidden unit; lm_head maps its sign to ' the' or ' ': a 2-token alphabet."""
    w, W = qm.store["model.norm.weight"], qm.store["lm_head.weight"]
    t, u = tok(" the").input_ids[0], tok(" ").input_ids[0]
    nw, nW = torch.zeros_like(w), torch.zeros_like(W)
    nw[0] = 1
    nW[t, 0], nW[u, 0] = 1, -1
    qm.store["model.norm.weight"] = nw
    qm.store["lm_head.weight"] = nW
    return qm


def out(ids, eos=False, finite=True):
    return {"ids": ids, "reached_eos": eos, "finite": finite}


def test_longest_loop():
    assert generate.longest_loop([1, 2, 3, 1, 2, 3, 1, 2, 3, 4]) == {"period": 3, "repeats": 3, "tokens": 9, "start": 0}
    assert generate.longest_loop([9, 5, 5, 5, 5, 5, 5, 7]) == {"period": 1, "repeats": 6, "tokens": 6, "start": 1}
    assert generate.longest_loop([1, 2, 1, 2, 3])["tokens"] == 0  # two repeats are not a loop
    assert generate.longest_loop([])["tokens"] == 0
    # the repeat covering most tokens wins, not the shortest period
    lp = generate.longest_loop([7, 7, 7, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4])
    assert (lp["period"], lp["repeats"], lp["start"]) == (4, 3, 3)


def test_collapse_rules():
    varied = [list(range(i, i + 30)) for i in range(0, 120, 30)]
    s = generate.collapse_signals([out(v) for v in varied])
    assert not s["collapsed"] and s["distinct_1"] == 1.0 and s["distinct_2"] == 1.0 and s["eos_rate"] == 0
    looped = [v[:10] + [1, 2] * 10 for v in varied]  # 20 of 30 tokens in a loop, in every output
    s = generate.collapse_signals([out(v) for v in looped])
    assert s["collapsed"] and s["looping"] == 1.0 and s["loop"]["period"] == 2 and s["loop"]["repeats"] == 10
    s = generate.collapse_signals([out(looped[0]), out(looped[1])] + [out(v) for v in varied[2:]])
    assert not s["collapsed"]  # half the outputs looping is not more than half
    few = [[1, 2, 1, 1, 2, 3, 2, 1, 1, 3, 3, 2][: 8 + i] for i in range(3)]  # no strict period, 3 tokens
    s = generate.collapse_signals([out(f) for f in few])
    assert s["looping"] == 0 and s["degenerate"] == 1 and s["collapsed"] and "degenerate" in s["reasons"][0]
    assert not generate.collapse_signals([out(f[:7]) for f in few])["collapsed"]  # too short to judge
    s = generate.collapse_signals([out(varied[0]), out(varied[1], finite=False)])
    assert s["collapsed"] and "non-finite" in s["reasons"][0]
    s = generate.collapse_signals([out([], eos=True), out([], eos=True)])
    assert s["collapsed"] and s["eos_rate"] == 1.0 and "empty" in s["reasons"][0]
    few = [[1, 2, 3, 4] * 8 + [1, 2, 3]]  # distinct-2 = 4/34
    s = generate.collapse_signals([out(few[0])])
    assert s["collapsed"] and s["distinct_2"] == pytest.approx(4 / 34)


def test_greedy_equals_transformers(loaded, models):
    from transformers import AutoModelForCausalLM

    qm, path = loaded("qwen2"), models["qwen2"]
    tok = evaluate.load_tokenizer(path)
    prompts = ["def f(x): return", "the quick brown fox", "import", "class A:"]
    outs = generate.greedy(qm, tok, prompts, 12, model_dir=path)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for p, o in zip(prompts, outs):
        x = tok(p, return_tensors="pt").input_ids
        ref = hf.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0, x.shape[1]:]
        ref = ref.tolist()
        ref = ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
        assert o["ids"] == ref and o["prompt"] == p and o["text"] == tok.decode(ref)
        assert o["reached_eos"] == (len(ref) < 12)
    # a batch of equal-length prompts gives what one prompt at a time gives
    assert [generate.greedy(qm, tok, [p], 4)[0]["ids"] for p in prompts] == [o["ids"][:4] for o in outs]


def test_eos_and_nonfinite_stop_generation(loaded, models, tmp_path):
    tok = evaluate.load_tokenizer(models["qwen2"])
    qm = loaded("qwen2")
    qm.store["lm_head.weight"] = torch.zeros_like(qm.store["lm_head.weight"])  # argmax = id 0 = EOS
    o = generate.greedy(qm, tok, ["import", "class A:"], 8)
    assert all(x["reached_eos"] and x["ids"] == [] for x in o)
    assert generate.collapse_signals(o)["collapsed"]
    qm = loaded("qwen2")
    qm.store["model.norm.weight"] = torch.full_like(qm.store["model.norm.weight"], float("nan"))
    o = generate.greedy(qm, tok, ["import"], 8)
    assert o[0]["finite"] is False and o[0]["ids"] == []
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert generate.eos_ids(tok, [tmp_path, None]) == {tok.eos_token_id, 5, 7}


@pytest.fixture(scope="module")
def example():
    return frontend.load(EXAMPLE, "float32"), evaluate.load_tokenizer(EXAMPLE)


def test_example_passes_and_forced_loop_collapses(example):
    qm, tok = example
    prompts = list(generate.DEFAULT_PROMPTS)
    ok = generate.collapse_signals(generate.greedy(qm, tok, prompts, 32, model_dir=EXAMPLE), tok)
    assert not ok["collapsed"], ok
    assert ok["distinct_2"] > 2 * generate.MIN_DISTINCT_2 and ok["looping"] == 0
    looped = force_loop(qm.clone(), tok)
    bad = generate.collapse_signals(generate.greedy(looped, tok, prompts[:3], 32), tok)
    assert bad["collapsed"] and bad["looping"] > generate.DEGENERATE_OUTPUTS, bad
    assert bad["distinct_2"] < generate.MIN_DISTINCT_2 and bad["eos_rate"] == 0
    assert "the" in bad["loop"]["text"]
    one = generate.collapse_signals(generate.greedy(looped, tok, prompts[:1], 16), tok)
    assert one["collapsed"] and one["degenerate"] == 1  # ' the   the the ...': 2 tokens, no strict period


def test_cli_generate(models, tmp_path):
    path = models["llama"]
    r = cli("generate", path, "--prompt", "def f(x):", "--prompt", "import", "--max-new-tokens", 5)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("1. 'def f(x):' -> ") and "\n2. 'import' -> " in r.output
    assert "distinct-2" in r.output.splitlines()[-1]
    (tmp_path / "p.txt").write_text("the quick\n\nclass A:\n")
    r = cli("generate", path, "--prompts", tmp_path / "p.txt", "--max-new-tokens", 4, "--json")
    j = json.loads(r.stdout)
    assert [o["prompt"] for o in j["outputs"]] == ["the quick", "class A:"]
    assert all(len(o["ids"]) <= 4 for o in j["outputs"]) and "collapsed" in j["signals"]
    (tmp_path / "e.txt").write_text("\n")
    r = cli("generate", path, "--prompts", tmp_path / "e.txt")
    assert r.exit_code == 2
    assert r.output == f"error: prompts file {tmp_path / 'e.txt'} has no prompts; write one prompt per line\n"
    r = cli("generate", path, "--max-new-tokens", 0)
    assert r.exit_code == 2 and "Invalid value for '--max-new-tokens'" in r.output


def test_cli_eval_generate_exits_3_on_collapse(loaded, models, tmp_path):
    tok = evaluate.load_tokenizer(models["qwen2"])
    # the shipped trained example writes words of its text; a random model writes gibberish (collapse)
    ok = cli("eval", EXAMPLE, "--generate", "--max-new-tokens", 24, "--max-windows", 1, "--seqlen", 32, "-q")
    assert ok.exit_code == 0, ok.output
    assert "known words 0.9" in ok.output or "known words 1.0" in ok.output
    rnd = cli("eval", models["qwen2"], "--generate", "--max-new-tokens", 24, "--max-windows", 1, "--seqlen", 32, "-q")
    assert rnd.exit_code == 3 and "gibberish" in rnd.output, rnd.output
    assert ok.output.splitlines()[0].startswith("ppl ") and ok.output.splitlines()[1].startswith("generate: eos")
    out = artifact.save(force_loop(loaded("qwen2"), tok), tmp_path / "loop")
    r = cli("eval", out, "--generate", "--max-new-tokens", 24, "--max-windows", 1, "--seqlen", 32, "-q", "--json")
    assert r.exit_code == 3, r.output
    assert json.loads(r.output.splitlines()[0])["generate"]["collapsed"] is True
    assert r.output.splitlines()[-1].startswith("error: collapse: ")


def test_gibberish_is_collapse_when_a_reference_text_is_given():
    ref = "Return the number of lines in the file and raise an error if there is no such object."
    vocab = generate.vocabulary(ref)
    assert "return" in vocab and "a" not in vocab  # words of 2+ letters, lower-cased
    ids = list(range(40))  # varied tokens: no loop, no degeneracy
    good = [{**out(ids), "text": "Return the number of lines in the file and raise an error if there is no object"}] * 2
    bad = [{**out(ids), "text": "thearal a ar ripuil tmdmsomd atec ullsomatess ly toize tooren to in adoing"}] * 2
    s = generate.collapse_signals(good, vocab=vocab)
    assert not s["collapsed"] and s["known_words"] == 1.0 and s["words"] == 34
    s = generate.collapse_signals(bad, vocab=vocab)
    assert s["collapsed"] and s["known_words"] == pytest.approx(2 / 24) and "gibberish" in s["reasons"][0]
    assert not generate.collapse_signals(bad[:1], vocab=vocab)["collapsed"]  # 12 words: too few to judge
    assert not generate.collapse_signals(bad)["collapsed"]  # no reference: the signal is off
    assert "known words 0.08" in generate.describe(generate.collapse_signals(bad, vocab=vocab))
