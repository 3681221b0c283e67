"""``ptqc eval`` and ``ptqc generate``: how well a model (or artifact) still does."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ptqc.cli_common import fail, friendly, log, quiet_option, streams_weights
from ptqc.errors import PtqcError


def _generate(qm, tok, path, text_path, max_new_tokens, dev, as_json, r) -> None:
    """eval --generate: collapse signals into ``r``; exit 3 if the model has collapsed."""
    from ptqc import generate

    r["generate"] = generate.default_check(qm, tok, path, text_path, max_new_tokens, device=dev)
    if not as_json:
        click.echo(f"generate: {generate.describe(r['generate'])}")
    if r["generate"]["collapsed"]:
        if as_json:
            click.echo(json.dumps(r))
        fail("collapse: " + "; ".join(r["generate"]["reasons"]), 3)


def _tasks(qm, tok, path, tasks, limit, batch_size, dev, include_path, as_json, r) -> None:
    """eval --tasks: lm-eval scores into ``r``; exit 3 on a collapse."""
    from ptqc import lm_eval_adapter
    from ptqc.errors import CollapseError

    try:
        r["tasks"] = lm_eval_adapter.run_tasks(qm, tok, tasks, limit, batch_size=batch_size, device=dev,
                                               model_dir=path, include_path=[include_path] if include_path else None)
    except CollapseError as e:
        fail(str(e), 3)
    if not as_json:
        for k, v in r["tasks"].items():
            click.echo(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")


@click.command("eval")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="Text file (default: the model's held-out eval.txt).")
@click.option("--seqlen", type=int, default=256, show_default=True, help="Window length in tokens.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--dtype", default="float32", show_default=True, help="For a Hugging Face directory.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--trust-remote-code", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--generate", "gen", is_flag=True,
              help="Also greedy-generate from built-in prompts and exit 3 if the output has collapsed.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="With --generate: tokens generated per prompt.")
@click.option("--tasks", default=None, help="lm-eval tasks, comma-separated (needs ptqc[eval], local data).")
@click.option("--limit", type=int, default=None, help="With --tasks: at most N examples per task.")
@click.option("--include-path", type=click.Path(path_type=Path), default=None,
              help="With --tasks: a directory of local lm-eval task YAMLs.")
@click.option("--target", type=click.Choice(["torch", "onnx", "onnx-int", "ascend"]), default="torch",
              show_default=True,
              help="Where the PPL is computed: the ptqc graph in torch, its ONNX export run by onnxruntime "
                   "(onnx: fake-quant reference lowering; onnx-int: integer kernels, MatMulInteger/MatMulNBits), "
                   "or its Ascend lowering (torch_npu kernels; their CPU emulation without an NPU).")
@quiet_option
@friendly
@streams_weights
def eval_cmd(path, text, seqlen, batch_size, max_windows, dtype, device, trust_remote_code, as_json, gen,
             max_new_tokens, tasks, limit, include_path, quiet, target="torch"):
    """Perplexity of an artifact or a model on a text (non-overlapping windows)."""
    from ptqc import artifact, device as devices, evaluate, progress
    from ptqc.errors import CollapseError

    dev = devices.resolve(device)
    if tasks:
        from ptqc import lm_eval_adapter

        lm_eval_adapter.require()  # before loading anything
    qm = artifact.load_any(path, dtype, trust_remote_code)
    text_path = text or evaluate.default_text(path, qm)
    tok = evaluate.load_tokenizer(path)
    ids = evaluate.tokenize(tok, evaluate.read_text(text_path))
    if target != "torch" and (gen or tasks):
        raise PtqcError(f"--target {target} computes perplexity only; drop --generate/--tasks")
    dev = None if dev == "cpu" else dev
    try:
        r = evaluate.perplexity_on(qm, ids, seqlen, target, batch_size=batch_size, device=dev,
                                   max_windows=max_windows, progress=progress.factory(quiet),
                                   log=lambda msg: log(quiet, msg))
    except CollapseError as e:
        if as_json:
            click.echo(json.dumps({"collapse": str(e), "text": str(text_path)}))
        fail(str(e), 3)
    r["text"] = str(text_path)
    if not as_json:
        click.echo(f"ppl {r['ppl']:.4f}  ({r['windows']} windows x {seqlen} tokens of {text_path})")
    if gen:
        _generate(qm, tok, path, text_path, max_new_tokens, dev, as_json, r)
    if tasks:
        _tasks(qm, tok, path, tasks, limit, batch_size, dev, include_path, as_json, r)
    if as_json:
        click.echo(json.dumps(r))


@click.command("generate")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--prompt", "prompt_texts", multiple=True, help="A prompt (repeatable; default: built-in prompts).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="A file with one prompt per line (replaces the built-in prompts).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="For a Hugging Face directory.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--trust-remote-code", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print continuations and signals as JSON.")
@friendly
@streams_weights
def generate_cmd(path, prompt_texts, prompts_file, max_new_tokens, dtype, device, trust_remote_code, as_json):
    """Greedy continuations and collapse signals (loops, distinct-n, EOS); exit 3 if collapsed.

    Every step re-runs the whole sequence (no KV cache): a check, not a server.
    """
    from ptqc import artifact, device as devices, evaluate, generate

    dev = devices.resolve(device)
    prompts = list(prompt_texts) + (generate.read_prompts(prompts_file) if prompts_file else [])
    qm = artifact.load_any(path, dtype, trust_remote_code)
    tok = evaluate.load_tokenizer(path)
    outs = generate.greedy(qm, tok, prompts or list(generate.DEFAULT_PROMPTS), max_new_tokens,
                           device=None if dev == "cpu" else dev, model_dir=path)
    s = generate.collapse_signals(outs, tok, generate.reference_vocabulary(path, qm))
    if as_json:
        keep = ("prompt", "text", "ids", "reached_eos", "finite")
        click.echo(json.dumps({"outputs": [{k: o[k] for k in keep} for o in outs], "signals": s}))
    else:
        for i, o in enumerate(outs, 1):
            click.echo(f"{i}. {o['prompt']!r} -> {o['text']!r}{'  <eos>' if o['reached_eos'] else ''}")
        click.echo(generate.describe(s))
    if s["collapsed"]:
        fail("collapse: " + "; ".join(s["reasons"]), 3)

