"""Artifacts round-trip exactly; the CLI's commands work and its errors are one clear line."""
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from ptqc import artifact, evaluate, frontend, pipeline
from ptqc.cli import main
from ptqc.errors import PtqcError

PLUGIN = str(Path(__file__).parent / "plugins" / "example_plugin.py")


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r


def _compile(qm, text):
    pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True))
    return qm


@pytest.mark.parametrize("shard_bytes", [2 << 30, 40_000])
def test_artifact_round_trip_is_exact(loaded, ids, tmp_path, shard_bytes):
    qm = _compile(loaded("qwen2"), "rtn:bits=3,group=64")
    out = artifact.save(qm, tmp_path / "out", shard_bytes=shard_bytes)
    back = artifact.load(out)
    assert (out / "model.safetensors.index.json").exists() == (shard_bytes < 1 << 20)
    x = ids(3, 21)
    assert torch.equal(back(x), qm(x))
    assert back.quant == json.loads(json.dumps(qm.quant))
    assert back.properties == qm.properties
    assert back.store["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8


def test_tied_float_lm_head_saved_once(loaded, ids, tmp_path):
    qm = _compile(loaded("llama"), "rtn:bits=4,group=64")  # lm_head stays float and tied
    out = artifact.save(qm, tmp_path / "o")
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    back = artifact.load(out)
    x = ids(2, 11)
    assert torch.equal(back(x), qm(x))


def test_bf16_artifact_keeps_float32_scales(loaded, ids, tmp_path):
    qm = _compile(loaded("qwen2", "bfloat16"), "rtn:bits=4,group=64")
    back = artifact.load(artifact.save(qm, tmp_path / "o"))
    assert back.store["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.float32
    x = ids(1, 9)
    assert torch.equal(back(x), qm(x))


def test_untouched_tensors_keep_the_checkpoint_dtype(tmp_path, ids):
    """A bf16 checkpoint compiled in float32: the tensors no pass wrote (embeddings, norms, the
    float lm_head) are stored in bf16, half the bytes, listed in the manifest and widened again on
    load, so the artifact computes exactly what was compiled, also after a second save; what the
    passes wrote (codes, float32 scales, smooth's folded norms) is stored as written."""
    from safetensors import safe_open
    from make_tiny_model import make_model  # tools/ (conftest puts it on sys.path)

    src = make_model(tmp_path / "m", "qwen2", layers=2, dtype="bfloat16")
    (src / "calib.txt").write_text(" ".join(f"w{i * 7 % 97}" for i in range(2000)))
    qm = _compile(frontend.load(src, "float32"), "smooth,rtn:bits=4,group=64")
    out = artifact.save(qm, tmp_path / "o")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    kept = set(artifact.read_manifest(out)["weights"]["as_checkpoint"])
    assert kept == {k for k, d in dtypes.items() if d == "BF16"}
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept
    assert "model.layers.0.input_layernorm.weight" not in kept  # smooth folded its scales into it
    assert dtypes["model.layers.0.input_layernorm.weight"] == "F32"
    assert dtypes["model.layers.0.mlp.up_proj.weight_scale"] == "F32"
    x = ids(2, 13)
    back = artifact.load(out)
    assert back.store["model.embed_tokens.weight"].dtype == torch.float32
    assert torch.equal(back(x), qm(x))
    again = artifact.save(back, tmp_path / "o2")
    assert artifact.read_manifest(again)["weights"]["as_checkpoint"] == sorted(kept)
    assert torch.equal(artifact.load(again)(x), qm(x))


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with artifact.AtomicDir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("fail")
    assert list(tmp_path.iterdir()) == []


def test_cli_compile_inspect_eval(models, tmp_path):
    out = tmp_path / "out"
    r = cli("compile", "--passes", "rtn:bits=4,group=64", models["qwen2"], "-o", out, "--dump-after", "rtn", "-q")
    assert r.exit_code == 0, r.output
    for f in ("config.json", "tokenizer.json", "graph.json", "ptqc.json", "model.safetensors", "dumps/01-rtn.txt", "eval.txt"):
        assert (out / f).exists(), f
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary directory, not mkdtemp's 0700
    man = json.loads((out / "ptqc.json").read_text())
    assert man["passes"][0]["pass"] == "rtn" and man["passes"][0]["options"]["bits"] == 4
    assert man["source"]["model_type"] == "qwen2" and "timing" not in man
    assert json.loads((out / "run.json").read_text())["timing"]["total_s"] > 0
    assert man["quant"]["model.layers.0.self_attn.q_proj"]["weight"]["group"] == 64

    r = cli("inspect", out)
    assert r.exit_code == 0
    assert "w:int4 g64 asym (rtn)" in r.output and "model.layers.1.mlp.down_proj" in r.output
    assert "quantized modules:" in r.output and '"scale_shape": [128, 4]' in r.output
    r = cli("inspect", out, "--layer", "1", "--op", "linear", "--format", "json")
    nodes = json.loads(r.output)["nodes"]
    assert len(nodes) == 7 and all(n["layer"] == 1 and n["op"] == "ptqc.linear" for n in nodes)
    assert nodes[0]["quant"]["weight"]["bits"] == 4
    r = cli("inspect", out, "--format", "dot", "--role", "q")
    assert r.output.startswith("digraph ptqc") and "q_proj" in r.output
    r = cli("inspect", out, "--counts", "--per-layer")
    assert "layer 0:" in r.output and "ptqc.linear=7" in r.output

    r = cli("eval", out, "--seqlen", "64", "--json", "-q")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["windows"] > 5 and math.isfinite(res["ppl"])
    r = cli("passes", "rtn")
    assert "requires: canonical" in r.output and "bits=4 (int)" in r.output


def test_cli_plugin_and_recipe(models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - rtn: {bits: 8, group: 0}\n  - head8\n")
    r = cli("compile", "--plugin", PLUGIN, "--recipe", recipe, models["llama"], "-o", tmp_path / "o", "-q")
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "o" / "ptqc.json").read_text())
    assert [p["pass"] for p in man["passes"]] == ["rtn", "head8", "pack"]  # pack is appended after weight quantization
    assert man["quant"]["lm_head"]["weight"]["method"] == "head8"


def test_force_overwrites(models, tmp_path):
    out = tmp_path / "o"
    assert cli("compile", models["qwen2"], "-o", out, "-q").exit_code == 0
    r = cli("compile", "--passes", "rtn", models["qwen2"], "-o", out, "-q")
    assert r.exit_code == 2 and "already exists; pass --force" in r.output
    assert cli("compile", "--passes", "rtn:group=64", models["qwen2"], "-o", out, "-q", "--force").exit_code == 0
    assert json.loads((out / "ptqc.json").read_text())["passes"][0]["pass"] == "rtn"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp dirs left behind


def _bad_models(tmp_path, models):
    empty = tmp_path / "empty"
    empty.mkdir()
    noconf = tmp_path / "noconf"
    noconf.mkdir()
    (noconf / "x.txt").write_text("x")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "florp", "architectures": ["FlorpLM"]}))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "florp", "auto_map": {"AutoModelForCausalLM": "m.F"},
                                                    "architectures": ["FlorpLM"]}))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((models["qwen2"] / "config.json").read_text())
    return {"missing": tmp_path / "nope", "empty": empty, "noconf": noconf, "unknown": unknown, "remote": remote,
            "noweights": noweights}


@pytest.mark.parametrize("case,extra,msg", [
    ("missing", [], r"model directory .*nope does not exist"),
    ("empty", [], r"model directory .*empty is empty"),
    ("noconf", [], r"has no config.json; pass a Hugging Face model directory"),
    ("unknown", [], r"unsupported architecture: model_type 'florp'"),
    ("remote", [], r"uses custom \(remote\) code .*rerun with --trust-remote-code"),
    ("noweights", [], r"no \*.safetensors weights in"),
    ("good", ["--passes", "nope"], r"unknown pass 'nope'; known passes: .*rtn"),
    ("good", ["--passes", "rtn:bitz=3"], r"unknown option 'bitz'; valid options: bits=4"),
    ("good", ["--passes", "rtn:bits=x"], r"'x' is not an int"),
    ("good", ["--plugin", PLUGIN, "--passes", "needs_mark"], r"requires 'marked'.*run one of: mark before it"),
    ("good", ["--plugin", PLUGIN, "--passes", "rtn,early"], r"'early' must run before 'rtn'"),
    ("good", ["--plugin", PLUGIN, "--passes", "boom"], r"^error: boom failed on purpose$"),
    ("good", ["--plugin", "/no/such/plugin.py"], r"plugin file /no/such/plugin.py does not exist"),
    ("good", ["--passes", "rtn:group=96"], r"group size 96 does not divide the input dimension 128"),
    ("good", ["--recipe", "/no/recipe.yaml"], r"recipe file /no/recipe.yaml does not exist"),
])
def test_compile_bad_input_one_line_nothing_written(models, tmp_path, case, extra, msg):
    model = models["qwen2"] if case == "good" else _bad_models(tmp_path, models)[case]
    out = tmp_path / "out"
    r = cli("compile", *extra, model, "-o", out, "-q")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    import re
    assert re.search(msg, lines[0]), lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_remote_code_with_flag_passes_the_check(tmp_path, models):
    remote = _bad_models(tmp_path, models)["remote"]
    r = cli("compile", "--trust-remote-code", remote, "-o", tmp_path / "o", "-q")
    assert r.exit_code == 2 and "trust-remote-code" not in r.output  # fails later (no code), not on the flag


@pytest.mark.parametrize("args,msg", [
    (["--text", "/no/such.txt"], "text file /no/such.txt does not exist"),
    (["--seqlen", "100000"], "fewer than one window of 100000; give at least 100000 tokens"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_eval_bad_input(models, args, msg):
    r = cli("eval", models["qwen2"], *args, "-q")
    assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_eval_empty_text(models, tmp_path):
    t = tmp_path / "e.txt"
    t.write_text("  \n")
    r = cli("eval", models["qwen2"], "--text", t)
    assert r.exit_code == 2 and "is empty" in r.output


def test_eval_without_default_text(tmp_path, models):
    import shutil
    m = tmp_path / "m"
    shutil.copytree(models["qwen2"], m)
    (m / "eval.txt").unlink()
    r = cli("eval", m)
    assert r.exit_code == 2 and "pass --text FILE" in r.output


def test_ppl_matches_a_plain_transformers_loop(models, loaded):
    """Same windows, same NLL: the protocol of GPTQ / llm-compressor."""
    path = models["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    ids = evaluate.tokenize(tok, (path / "eval.txt").read_text())[:6 * 64 + 17]  # 6 windows and a dropped tail
    got = evaluate.perplexity(loaded("llama"), ids, 64, batch_size=4)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nlls = []
    n = ids.numel() // 64
    with torch.no_grad():
        for i in range(n):
            w = ids[i * 64:(i + 1) * 64][None]
            nlls.append(ref(w, labels=w).loss.float() * 63)
    want = torch.exp(torch.stack(nlls).sum() / (n * 63)).item()
    assert got["windows"] == n and got["tokens"] == n * 63
    assert got["ppl"] == pytest.approx(want, rel=1e-5)


def test_nonfinite_logits_are_a_collapse_naming_the_node(loaded):
    from ptqc.errors import CollapseError

    qm = loaded("qwen2")
    name = "model.layers.1.mlp.up_proj.weight"
    w = qm.store[name].clone()
    w[0, 0] = float("inf")
    qm.store[name] = w
    with pytest.raises(CollapseError, match=r"non-finite at node linear_default_12 \(model.layers.1.mlp.up_proj, layer 1\)"):
        evaluate.perplexity(qm, torch.randint(0, 300, (256,)), 64)
