"""Evaluation equals plain transformers (PPL, lm-eval scoring math); the lm-eval adapter runs
local tasks end to end (when lm-eval is installed); user errors are one line with exit 2."""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ptqc import evaluate, lm_eval_adapter as A
from ptqc.cli import main

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lmeval_task"

PROBE_PLUGIN = '''
from dataclasses import dataclass
from ptqc.pipeline import Pass, PassResult, register


@register
class CalibProbe(Pass):
    """Reads the calibration windows and does nothing else."""
    name = "calib_probe"

    @dataclass
    class Options:
        pass

    def run(self, qm, ctx):
        ids = ctx.calibration_ids(qm)
        return PassResult(changed=False, summary={"shape": list(ids.shape)})
'''


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        return cache[path]
    return get


# ---- perplexity ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
def test_ppl_equals_plain_transformers_loop(loaded, models, hf, arch):
    path, seqlen = models[arch], 64
    tok = evaluate.load_tokenizer(path)
    ids = evaluate.tokenize(tok, evaluate.read_text(path / "eval.txt"))
    r = evaluate.perplexity(loaded(arch), ids, seqlen, batch_size=3, max_windows=8)
    model, nll, n = hf(path), [], min(8, ids.numel() // seqlen)
    with torch.no_grad():
        for i in range(n):  # non-overlapping windows, the model's own shifted-label loss
            w = ids[i * seqlen: (i + 1) * seqlen][None]
            nll.append(model(w, labels=w).loss.item())
    ref = math.exp(sum(nll) / len(nll))
    assert r["windows"] == n and r["tokens"] == n * (seqlen - 1)
    assert r["ppl"] == pytest.approx(ref, rel=1e-5)


# ---- lm-eval scoring math (no lm_eval needed) ----------------------------------------------
def _hf_logprob(model, ctx, cont):
    x = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = F.log_softmax(model(x).logits[0].float(), -1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return lp[pos, torch.tensor(cont)].sum().item(), bool((lp[pos].argmax(-1) == torch.tensor(cont)).all())


def test_encode_pair_moves_spaces_and_handles_empty_context(models):
    tok = evaluate.load_tokenizer(models["qwen2"])
    ctx, cont = A.encode_pair(tok, "the quick ", "brown fox")
    assert ctx == A.encode(tok, "the quick") and ctx + cont == A.encode(tok, "the quick brown fox")
    ctx, cont = A.encode_pair(tok, "", "brown fox")
    assert ctx == [A.prefix_id(tok)] and cont == A.encode(tok, "brown fox")


def test_loglikelihood_equals_transformers(loaded, models, hf):
    path = models["llama"]
    tok, model, qm = evaluate.load_tokenizer(path), hf(path), loaded("llama")
    reqs = [("def f(x): return", " x * 2"), ("the quick brown", " fox"), ("", "import module"),
            ("class A:", " value = 1\nprint(value)"), ("while", "")]
    pairs = [A.encode_pair(tok, c, x) for c, x in reqs]
    got = A.score(qm, pairs, max_length=512, batch_size=2)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        ref = _hf_logprob(model, ctx, cont) if cont else (0.0, True)
        assert lp == pytest.approx(ref[0], abs=1e-4) and greedy == ref[1]
    # left truncation to max_length + 1 tokens, as lm-eval does
    ctx, cont = pairs[3]
    short = A.score(qm, [(ctx, cont)], max_length=len(cont) + 1)[0][0]
    assert short == pytest.approx(_hf_logprob(model, ctx[-2:], cont)[0], abs=1e-4)


def test_rolling_windows_score_every_token_once(loaded, models, hf):
    toks = list(range(10))
    pairs = A.rolling_pairs(toks, 99, 4)
    assert pairs == [([99], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]  # lm-eval's docstring example
    for n in (1, 7, 23, 64):
        for L in (1, 3, 8):
            ps = A.rolling_pairs(list(range(n)), -1, L)
            assert [t for _, c in ps for t in c] == list(range(n))
            assert all(len(c) <= L and len(x + c) - 1 <= L for x, c in ps)
    path = models["qwen2"]
    tok, model, qm = evaluate.load_tokenizer(path), hf(path), loaded("qwen2")
    text = evaluate.read_text(path / "eval.txt")[:400]
    ids = A.encode(tok, text)
    with torch.no_grad():  # one window holds the whole text: exactly log p(text | prefix)
        ref = _hf_logprob(model, [A.prefix_id(tok)], ids)[0]
    assert A.rolling_loglikelihood(qm, tok, [text], max_length=512)[0] == pytest.approx(ref, rel=1e-5)
    windowed = A.rolling_loglikelihood(qm, tok, [text], max_length=16)[0]  # many windows
    ref = sum(_hf_logprob(model, x, c)[0] for x, c in A.rolling_pairs(ids, A.prefix_id(tok), 16))
    assert windowed == pytest.approx(ref, rel=1e-5)


def test_generate_until_cuts_at_stop_strings(loaded, models):
    from ptqc import generate

    path = models["qwen2"]
    tok, qm = evaluate.load_tokenizer(path), loaded("qwen2")
    full = generate.greedy(qm, tok, ["the quick"], 10)[0]["text"]
    assert A.generate_until(qm, tok, "the quick", [], 10, 512) == full
    stop = full[3:5]
    cut = A.generate_until(qm, tok, "the quick", ["zzz", stop], 10, 512)
    assert cut == full.split(stop)[0] and stop not in cut
    three = generate.greedy(qm, tok, ["the quick"], 3)[0]["ids"]
    assert A.generate_until(qm, tok, "the quick", None, 3, 512) == tok.decode(three)


# ---- CLI errors ------------------------------------------------------------------------------
def test_tasks_without_lm_eval_is_one_line(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    r = cli("eval", models["qwen2"], "--tasks", "hellaswag", "-q")
    assert r.exit_code == 2
    assert r.output == ("error: lm-eval is not installed: pip install 'ptqc[eval]' (tasks also need their "
                        "datasets available locally; nothing is downloaded)\n")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    p = tmp_path_factory.mktemp("plugin") / "calib_probe.py"
    p.write_text(PROBE_PLUGIN)
    return p


def _calib_error(models, probe, tmp_path, calib, *extra):
    r = cli("compile", models["qwen2"], "-o", tmp_path / "out", "--plugin", probe, "--passes", "calib_probe",
            "--calib", calib, "-q", *extra)
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and not (tmp_path / "out").exists()
    return lines[0]


def _bad_calib(tmp_path, case, n_short):
    """(path, extra options, expected error line) of a bad calibration source."""
    if case == "empty":
        p = tmp_path / "empty.txt"
        p.write_text("")
        return p, [], f"error: calibration file {p} is empty; give a file with text"
    if case == "too-short":
        p = tmp_path / "short.txt"
        p.write_text("def f(x): return x")
        return p, ["--calib-seqlen", 128], (f"error: calibration text {p} has {n_short} tokens; need at least 128 "
                                            "(one window of --calib-seqlen 128); give more text or a smaller "
                                            "--calib-seqlen")
    if case == "no-column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "ds"
        p.mkdir()
        pq.write_table(pa.table({"content": ["a b c"], "id": [1]}), str(p / "train-0.parquet"))
        return p, [], (f"error: dataset {p} has no column 'text' (columns: content, id); "
                       "pass --calib-field with one of them")
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a"}\n\n{"body": "b"}\n')
    return p, [], f"error: {p} line 3 has no 'text' field (fields: body); pass --calib-field with one of them"


@pytest.mark.parametrize("case", ["empty", "too-short", "no-column", "no-field"])
def test_cli_calibration_errors(models, probe, tmp_path, monkeypatch, case):
    """What `ptqc compile --calib BAD` prints (through a plugin pass that only reads calibration data)."""
    monkeypatch.setenv("PTQC_CACHE", str(tmp_path / "cache"))
    n = evaluate.tokenize(evaluate.load_tokenizer(models["qwen2"]), "def f(x): return x").numel()
    calib, extra, expected = _bad_calib(tmp_path, case, n)
    assert _calib_error(models, probe, tmp_path, calib, *extra) == expected


# ---- lm-eval end to end (skipped without lm-eval) --------------------------------------------
def _words(text):
    return len(re.split(r"\s+", text))


def test_lm_eval_local_tasks(loaded, models, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the repository root
    path = models["qwen2"]
    r = cli("eval", path, "--tasks", "ptqc_tiny_mc,ptqc_tiny_rolling,ptqc_tiny_gen", "--include-path", TASKS,
            "--limit", 6, "--max-windows", 1, "--seqlen", 32, "--json", "-q")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["tasks"]  # lm-eval draws progress bars on stderr
    assert m["ptqc_tiny_mc/sample_len"] == 6 and 0 <= m["ptqc_tiny_mc/acc"] <= 1
    # word perplexity from the adapter's own rolling log-likelihoods
    docs = [json.loads(x)["text"] for x in (TASKS / "rolling.jsonl").read_text().splitlines()]
    tok = evaluate.load_tokenizer(path)
    ll = A.rolling_loglikelihood(loaded("qwen2"), tok, docs, max_length=512)
    assert m["ptqc_tiny_rolling/word_perplexity"] == pytest.approx(
        math.exp(-sum(ll) / sum(map(_words, docs))), rel=1e-6)
    assert 0 <= m["ptqc_tiny_gen/exact_match"] <= 1



def test_lm_eval_adapter_matches_hf_model(loaded, models, monkeypatch):
    """The same tasks through lm-eval's own HF model give the same numbers."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm-eval's HF model needs it
    monkeypatch.chdir(ROOT)
    path, names = models["qwen2"], ["ptqc_tiny_mc", "ptqc_tiny_rolling", "ptqc_tiny_gen"]
    ours = A.run_tasks(loaded("qwen2"), evaluate.load_tokenizer(path), names, include_path=[TASKS])
    from lm_eval.models.huggingface import HFLM

    hflm = HFLM(pretrained=str(path), dtype="float32", batch_size=2, device="cpu")
    ref = A.flatten(lm_eval.simple_evaluate(model=hflm, tasks=names, task_manager=A.task_manager(names, [TASKS]),
                                            log_samples=False, bootstrap_iters=1000))
    assert ours.keys() == ref.keys()
    for k in ours:
        assert ours[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
