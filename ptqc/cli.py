"""The ``ptqc`` command line.

    ptqc compile --passes rtn:bits=4 MODEL -o OUT   trace, run passes, write an artifact
    ptqc inspect OUT                               the transformed graph
    ptqc passes [NAME]                             available passes and their options
    ptqc eval OUT                                  perplexity (--generate, --tasks t1,t2 with lm-eval)
    ptqc generate OUT                              greedy continuations and collapse signals
    ptqc diagnose MODEL OUT -o DIR                 per-layer / per-linear error vs the float model

Errors a user can cause print one line (``error: ...``) and exit with status 2.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import click

from ptqc.errors import PtqcError


def _fail(msg: str, code: int = 2):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def friendly(fn):
    """Turn PtqcError (and Ctrl-C) into one line and a non-zero exit code."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except PtqcError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
    return wrapper


def quiet_option(fn):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines.")(fn)


def _log(quiet: bool, msg: str):
    if not quiet:
        click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ptqc")
def main():
    """ptqc: post-training quantization compiler for LLMs (Ascend and ONNX backends)."""
    from ptqc.model import steady_malloc

    steady_malloc()


def _load_plugins(plugins):
    from ptqc import pipeline

    pipeline.load_builtin_passes()
    for p in plugins:
        pipeline.load_plugin(p)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output artifact directory.")
@click.option("--passes", "pipeline_str", default=None, help="Pipeline, e.g. 'rtn:bits=4,group=128'.")
@click.option("--recipe", type=click.Path(path_type=Path), default=None,
              help="YAML recipe with a 'passes:' list, or the name of a shipped recipe (`ptqc recipes`).")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path), help="Python file defining passes.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or npu (calibration device).")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code shipped with the model.")
@click.option("--dump-after", multiple=True, help="Dump the graph after this pass (or 'all') into OUT/dumps/.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--no-pack", is_flag=True, help="Keep one weight code per byte (no int4 packing pass at the end).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration data: text file, JSONL, or Parquet/Arrow dataset dir (default: MODEL/calib.txt).")
@click.option("--calib-samples", type=int, default=None, help="Number of calibration windows [128].")
@click.option("--calib-seqlen", type=int, default=None, help="Tokens per calibration window [512].")
@click.option("--calib-seed", type=int, default=None, help="Seed of the window sampling [0].")
@click.option("--calib-field", default=None, help="Text field/column of JSONL or dataset data [text].")
@click.option("--calib-batch-size", type=int, default=None, help="Windows per forward batch [8].")
@click.option("--offload-mb", type=int, default=None,
              help="Keep at most this many MB of pass outputs in memory; the rest goes to a temporary file "
                   "[5% of the model, 16..1024].")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Also compare the result with the float model on the calibration data and write the "
                   "diagnostics (as `ptqc diagnose`) into this directory.")
@click.option("--target", type=click.Choice(["torch", "ascend"]), default="torch", show_default=True,
              help="ascend: end the pipeline with the `ascend` lowering pass (torch_npu kernels, CPU-emulated "
                   "without an NPU); give `ascend:OPTIONS` in --passes instead to set its options.")
@quiet_option
@friendly
def compile(model, out, pipeline_str, recipe, plugins, dtype, device, trust_remote_code, dump_after, force,
            no_pack, calib, calib_samples, calib_seqlen, calib_seed, calib_field, calib_batch_size, offload_mb,
            quiet, report=None, target="torch"):
    """Trace MODEL (a Hugging Face directory), run the passes, write the artifact OUT."""
    import shutil
    import tempfile

    from ptqc import artifact, device as devices, frontend, inspect, pipeline

    t0 = time.perf_counter()
    artifact.check_output(out, force)
    if report is not None:
        artifact.check_output(report, force)
    _load_plugins(plugins)
    if pipeline_str and recipe:
        raise PtqcError("give either --passes or --recipe, not both")
    settings = {}
    if recipe:
        passes, settings = pipeline.load_recipe(recipe)
        dtype = settings.get("dtype", dtype)
    else:
        passes = pipeline.parse_pipeline(pipeline_str) if pipeline_str else []
    if target == "ascend" and "ascend" not in {p.name for p in passes}:
        passes.append(pipeline.get_pass("ascend")())
    if not no_pack and any("weight_quant" in p.provides for p in passes) and "pack" not in {p.name for p in passes}:
        at = next((i for i, p in enumerate(passes) if "lowered" in p.provides), len(passes))
        passes.insert(at, pipeline.get_pass("pack")())  # real storage: <= 4-bit codes two per byte, before lowering
    pipeline.check_order(passes, {"canonical"})
    dev = devices.resolve(device)
    dumps: dict[str, str] = {}

    def dump(i, p, qm):
        dumps[f"{i + 1:02d}-{p.name}.txt"] = inspect.render(qm)

    pm = pipeline.PassManager(passes, dump_after=dump_after, dump=dump)
    _log(quiet, f"tracing {model} ({dtype})")
    t1 = time.perf_counter()
    qm = frontend.load(model, dtype, trust_remote_code, progress=not quiet, isolate="auto")
    trace_s = time.perf_counter() - t1
    if "canonical" in dump_after or "all" in dump_after:
        dumps["00-canonical.txt"] = inspect.render(qm)
    cfg = pipeline.calib_config(settings.get("calib", {}), path=calib, samples=calib_samples, seqlen=calib_seqlen,
                                seed=calib_seed, field=calib_field, batch_size=calib_batch_size)
    ctx = pipeline.PassContext(device=dev, quiet=quiet, calib=cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    qm.store.offload_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.offload-", dir=out.parent))
    model_bytes = sum(f.stat().st_size for f in set(qm.store.files.values()))
    qm.store.offload_bytes = (offload_mb << 20) if offload_mb is not None else \
        min(max(model_bytes // 20, 16 << 20), 1 << 30)
    try:
        for rec in pm.run(qm, ctx):
            _log(quiet, f"  {rec['pass']:10s} {rec['seconds']:8.2f}s  {json.dumps(rec['summary'])}")
        artifact.save(qm, out, force=force, dumps=dumps,
                      extra={"timing": {"trace_s": round(trace_s, 3), "total_s": round(time.perf_counter() - t0, 3)},
                             "pipeline": [repr(p) for p in passes], "recipe": str(recipe) if recipe else None,
                             "calibration": dataclasses.asdict(cfg) if ctx._ids is not None else None})
        if report is not None:
            _write_diagnostics(model, qm, ctx, cfg, report, dtype, dev, trust_remote_code, force, quiet)
    finally:
        shutil.rmtree(qm.store.offload_dir, ignore_errors=True)
    _log(quiet, f"wrote {out} in {time.perf_counter() - t0:.1f}s")


def _write_diagnostics(model, qm, ctx, cfg, report_dir, dtype, dev, trust_remote_code, force, quiet):
    """compile --report: the float model (traced again from MODEL) against the compiled one."""
    from tqdm.auto import tqdm

    from ptqc import diagnose, frontend

    t = time.perf_counter()
    fp = frontend.load(model, dtype, trust_remote_code, isolate="auto")
    ids = ctx.calibration_ids(qm)  # the data the passes calibrated on (tokenized now if none did)
    rep = diagnose.compare(fp, qm, ids, batch_size=cfg.batch_size, device=None if dev == "cpu" else dev,
                           progress=lambda it, **kw: tqdm(it, disable=quiet, leave=False, **kw))
    diagnose.write_report(rep, report_dir, force=force)
    _log(quiet, f"diagnostics: {report_dir} ({time.perf_counter() - t:.1f}s); sensitive layers: "
                f"{', '.join(map(str, rep['sensitive_layers'])) or 'none'}")


@main.command()
@click.argument("fp_model", type=click.Path(path_type=Path))
@click.argument("quantized", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output directory: diagnostics.json and one PNG per metric.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Text file, JSONL, or Parquet/Arrow dataset dir (default: FP_MODEL/calib.txt or eval.txt).")
@click.option("--calib-samples", type=int, default=32, show_default=True, help="Number of windows.")
@click.option("--calib-seqlen", type=int, default=256, show_default=True, help="Tokens per window.")
@click.option("--calib-seed", type=int, default=0, show_default=True, help="Seed of the window sampling.")
@click.option("--calib-field", default=None, help="Text field/column of JSONL or dataset data [text].")
@click.option("--calib-batch-size", type=int, default=8, show_default=True, help="Windows per forward batch.")
@click.option("--k", "k", type=float, default=3.0, show_default=True,
              help="Sensitive: local error above median + k x 1.4826 x MAD over the layers.")
@click.option("--metric", type=click.Choice(["rel_error", "mse", "sqnr_db"]), default="rel_error",
              show_default=True, help="The local metric the sensitivity rule ranks by.")
@click.option("--top", type=int, default=5, show_default=True, help="Length of the worst-first rankings.")
@click.option("--dtype", default="float32", show_default=True, help="For a Hugging Face directory.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--trust-remote-code", is_flag=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
@quiet_option
@friendly
def diagnose(fp_model, quantized, out, calib, calib_samples, calib_seqlen, calib_seed, calib_field,
             calib_batch_size, k, metric, top, dtype, device, trust_remote_code, force, as_json, quiet):
    """Per-layer and per-linear error of QUANTIZED (an artifact) against FP_MODEL, its float model.

    Both models run layer by layer on the same calibration windows (FP_MODEL's tokenizer; by
    default 32 windows x 256 tokens of FP_MODEL/calib.txt). "local": the quantized layer on the
    float layer's inputs (its own error); "accumulated": on the quantized model's own inputs.
    Layers whose local error is an outlier (median + k x MAD) are reported as sensitive."""
    from tqdm.auto import tqdm

    from ptqc import artifact, device as devices, diagnose as diag, pipeline

    artifact.check_output(out, force)
    if k <= 0 or top < 1:
        raise PtqcError("--k must be positive and --top at least 1")
    dev = devices.resolve(device)
    for p in (fp_model, quantized):
        if not p.is_dir():
            raise PtqcError(f"{p} is not a directory (give a model directory or a ptqc artifact)")
    fp = artifact.load_any(fp_model, dtype, trust_remote_code)
    q = artifact.load_any(quantized, dtype, trust_remote_code)
    cfg = pipeline.calib_config(path=calib, samples=calib_samples, seqlen=calib_seqlen, seed=calib_seed,
                                field=calib_field, batch_size=calib_batch_size)
    ids = pipeline.PassContext(calib=cfg).calibration_ids(fp)
    rep = diag.compare(fp, q, ids, batch_size=cfg.batch_size, device=None if dev == "cpu" else dev,
                       progress=lambda it, **kw: tqdm(it, disable=quiet, leave=False, **kw),
                       k=k, metric=metric, top=top)
    diag.write_report(rep, out, force=force)
    if as_json:
        click.echo(json.dumps(rep, allow_nan=False))
    else:
        click.echo(diag.format_table(rep))
        _log(quiet, f"wrote {out}/diagnostics.json and {', '.join(m + '.png' for m in diag.METRICS)}")


@main.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--layer", type=int, default=None, help="Only nodes of this decoder layer.")
@click.option("--op", default=None, help="Only ops whose name contains this (e.g. linear).")
@click.option("--role", default=None, help="Only nodes with this role (q, k, v, o, gate, up, down, ...).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "dot"]), default="text", show_default=True)
@click.option("--counts", is_flag=True, help="Only per-op counts (per decoder layer with --per-layer).")
@click.option("--per-layer", is_flag=True, help="With --counts: counts per decoder layer.")
@click.option("--ops", "kernel_ops", is_flag=True,
              help="Ascend quantization kernels per decoder layer: naive, shared, fused (or as lowered).")
@click.option("--dtype", default="float32", show_default=True, help="For a Hugging Face directory.")
@click.option("--trust-remote-code", is_flag=True)
@friendly
def inspect_cmd(path, layer, op, role, fmt, counts, per_layer, kernel_ops, dtype, trust_remote_code):
    """Show the graph of an artifact (or of a model directory, canonicalized)."""
    from ptqc import artifact, inspect

    qm = artifact.load_any(path, dtype, trust_remote_code)
    if kernel_ops:
        from ptqc.lowering.ascend.lower import kernel_report

        rows = kernel_report(qm)
        if fmt == "json":
            click.echo(json.dumps(rows, indent=1))
            return
        cols = [c for c in ("layer", "naive", "shared", "fused", "fused_kernels", "quant_matmul", "cache_quant",
                            "attention", "float_transform") if rows and c in rows[0]]
        click.echo("standalone quantization kernels per decoder layer (naive: one per linear; shared: one per "
                   "quantized input; fused: after add+RMSNorm+quant and SwiGLU+quant fusion), then what the fused "
                   "lowering runs: fused norm/activation+quant kernels, quantized matmuls, KV cache writes, "
                   "attention kernels, float rotation matmuls")
        click.echo("  ".join(f"{c:>15s}" for c in cols))
        for r in rows:
            click.echo("  ".join(f"{r[c]:>15}" for c in cols))
        return
    if counts:
        c = inspect.op_counts(qm, per_layer)
        if fmt == "json":
            click.echo(json.dumps({str(k): dict(v) if per_layer else v for k, v in c.items()}, indent=1))
        elif per_layer:
            for k, v in c.items():
                click.echo(f"layer {k}: " + ", ".join(f"{o}={n}" for o, n in sorted(v.items())))
        else:
            click.echo("\n".join(f"{k:24s} {v}" for k, v in c.items()))
        return
    click.echo(inspect.render(qm, fmt, layer, op, role))


@main.command("passes")
@click.argument("name", required=False)
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path))
@friendly
def passes_cmd(name, plugins):
    """List the passes (or describe one): options with defaults, requirements, documentation."""
    from ptqc import pipeline

    _load_plugins(plugins)
    names = [name] if name else sorted(pipeline.PASSES)
    for n in names:
        cls = pipeline.get_pass(n)
        doc = cls.doc()
        if name:
            click.echo(f"{cls.name}\n\n{doc}\n")
            click.echo(f"options:  {pipeline.describe_options(cls)}")
            click.echo(f"requires: {', '.join(sorted(cls.requires)) or '-'}")
            click.echo(f"provides: {', '.join(sorted(cls.provides)) or '-'}")
            if cls.forbids:
                click.echo(f"must run before passes providing: {', '.join(sorted(cls.forbids))}")
        else:
            click.echo(f"{cls.name:12s} {doc.splitlines()[0] if doc else ''}")
            click.echo(f"{'':12s} options: {pipeline.describe_options(cls)}")


@main.command("recipes")
@friendly
def recipes_cmd():
    """List the shipped recipes (use one with `ptqc compile --recipe NAME`)."""
    from ptqc import recipes

    for n in recipes.names():
        click.echo(f"{n:22s} {recipes.describe(n)}")


@main.command("eval")
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
def eval_cmd(path, text, seqlen, batch_size, max_windows, dtype, device, trust_remote_code, as_json, gen,
             max_new_tokens, tasks, limit, include_path, quiet, target="torch"):
    """Perplexity of an artifact or a model on a text (non-overlapping windows)."""
    from ptqc import artifact, device as devices, evaluate
    from ptqc.errors import CollapseError

    dev = devices.resolve(device)
    if tasks:
        from ptqc import lm_eval_adapter

        lm_eval_adapter.require()  # before loading anything
    qm = artifact.load_any(path, dtype, trust_remote_code)
    text_path = text or evaluate.default_text(path, qm)
    tok = evaluate.load_tokenizer(path)
    ids = evaluate.tokenize(tok, evaluate.read_text(text_path))
    from tqdm.auto import tqdm

    def progress(it=None, **kw):
        return tqdm(it, disable=quiet, leave=False, **kw)

    if target != "torch" and (gen or tasks):
        raise PtqcError(f"--target {target} computes perplexity only; drop --generate/--tasks")
    if target == "ascend":
        if not any(str(n.target).startswith("ptqc_npu.") for n in qm.graph.nodes if n.op == "call_function"):
            from ptqc.lowering.ascend.lower import lower

            # an in-memory copy of the artifact's graph; the artifact is not changed. What the kernels
            # cannot take (e.g. a dynamic per-token KV cache in a prompt) stays a float op, said here.
            res = lower(qm, fallback=True, seqlen=seqlen)
            for why in res["refused"]:
                _log(quiet, f"ascend: kept as a float op: {why}")
        target = "torch"
    try:
        if target != "torch":
            from ptqc.lowering.onnx import perplexity_of

            r = perplexity_of(qm, ids, seqlen, mode="integer" if target == "onnx-int" else "fake",
                              batch_size=batch_size, max_windows=max_windows, progress=progress)
        else:
            r = evaluate.perplexity(qm, ids, seqlen, batch_size=batch_size, device=None if dev == "cpu" else dev,
                                    max_windows=max_windows, progress=progress)
    except CollapseError as e:
        if as_json:
            click.echo(json.dumps({"collapse": str(e), "text": str(text_path)}))
        _fail(str(e), 3)
    r["text"] = str(text_path)
    if not as_json:
        click.echo(f"ppl {r['ppl']:.4f}  ({r['windows']} windows x {seqlen} tokens of {text_path})")
    if gen:
        from ptqc import generate

        outs = generate.greedy(qm, tok, list(generate.DEFAULT_PROMPTS), max_new_tokens,
                               device=None if dev == "cpu" else dev, model_dir=path)
        r["generate"] = generate.collapse_signals(outs, tok, generate.vocabulary(evaluate.read_text(text_path)))
        if not as_json:
            click.echo(f"generate: {generate.describe(r['generate'])}")
        if r["generate"]["collapsed"]:
            if as_json:
                click.echo(json.dumps(r))
            _fail("collapse: " + "; ".join(r["generate"]["reasons"]), 3)
    if tasks:
        try:
            r["tasks"] = lm_eval_adapter.run_tasks(qm, tok, tasks, limit, batch_size=batch_size,
                                                   device=None if dev == "cpu" else dev, model_dir=path,
                                                   include_path=[include_path] if include_path else None)
        except CollapseError as e:
            _fail(str(e), 3)
        if not as_json:
            for k, v in r["tasks"].items():
                click.echo(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")
    if as_json:
        click.echo(json.dumps(r))


@main.command("generate")
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
        _fail("collapse: " + "; ".join(s["reasons"]), 3)


@main.command("export")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output file if it ends in .onnx, else a directory getting model.onnx (+ model.onnx.data).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "ascend", "compressed-tensors"]), default="onnx",
              show_default=True,
              help="onnx: ONNX model; ascend: msModelSlim / vllm-ascend directory (quant_model_description.json "
                   "+ quant_model_weights-*.safetensors); compressed-tensors: Hugging Face directory as "
                   "llm-compressor saves it (vLLM --quantization compressed-tensors). Directories are checked "
                   "after writing.")
@click.option("--mode", type=click.Choice(["fake", "integer"]), default="fake", show_default=True,
              help="fake: faithful reference (Q/DQ arithmetic of ptqc.quant); integer: MatMulInteger W8A8 and "
                   "MatMulNBits weight-only kernels where they apply.")
@click.option("--external-data/--no-external-data", "external", default=None,
              help="Weights in a separate OUT.data file (always above 2 GB; default: only then).")
@click.option("--no-int4", is_flag=True, help="Keep packed int4 codes as int8 bytes unpacked in the graph.")
@click.option("--int-kernel", type=click.Choice(["s8s8", "u8u8", "u8s8"]), default="s8s8", show_default=True,
              help="With --mode integer: MatMulInteger operands (s8s8 exact everywhere; u8u8 exact everywhere and "
                   "faster in onnxruntime; u8s8 fastest, exact only with VNNI).")
@click.option("--output", "outputs", multiple=True, help="Also expose this FX node (by name) as a graph output.")
@click.option("--dtype", default="float32", show_default=True, help="For a Hugging Face directory.")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as JSON.")
@quiet_option
@friendly
def export_cmd(path, out, fmt, mode, external, no_int4, int_kernel, outputs, dtype, trust_remote_code, force, as_json,
               quiet):
    """Lower an artifact (or a model directory) to ONNX, checked with onnx.checker.

    Node names keep the ptqc graph's FX node names; input_ids [batch, seq] and the logits have
    symbolic batch and sequence dimensions. Every op goes through one translation table
    (ptqc.lowering.onnx.TABLE); an op without a translation is an error naming op and node."""
    from ptqc import artifact
    from ptqc.lowering.onnx import export

    t0 = time.perf_counter()
    if not path.is_dir():
        raise PtqcError(f"{path} is not a directory (give a ptqc artifact or a model directory)")
    if fmt in ("ascend", "compressed-tensors"):  # directory formats, checked after writing
        if fmt == "ascend":
            from ptqc.lowering.ascend import export as exporter
        else:
            from ptqc.lowering import compressed_tensors as exporter

        artifact.check_output(out, force)
        res = exporter.export(artifact.load_any(path, dtype, trust_remote_code), out, force=force)
        problems = exporter.check(out)
        if problems:
            raise PtqcError(f"the export in {out} does not pass its own check: {problems[0]}")
        if as_json:
            click.echo(json.dumps(res))
        else:
            kind = res["model_quant_type"] if fmt == "ascend" else \
                f"{res['format']}, {res['quantized_linears']} quantized linears"
            _log(quiet, f"wrote {out} ({fmt}, {kind}, {res['tensors']} tensors, checked) "
                        f"in {time.perf_counter() - t0:.1f}s")
        return
    target = out if out.suffix == ".onnx" else out / "model.onnx"
    if target.parent.exists() and not target.parent.is_dir():
        raise PtqcError(f"{target.parent} exists and is not a directory")
    if target.exists() and not force:
        raise PtqcError(f"{target} already exists; pass --force to overwrite it")
    qm = artifact.load_any(path, dtype, trust_remote_code)
    res = export(qm, target, mode, outputs=list(outputs), external_data=external, int4=not no_int4,
                 int_kernel=int_kernel)
    if as_json:
        click.echo(json.dumps(res.summary()))
    else:
        _log(quiet, f"wrote {res.path}" + (f" + {res.data_path.name}" if res.data_path else "") +
             f" ({fmt}, mode {mode}, {res.nodes} nodes, {res.weight_bytes / 2**20:.1f} MiB of weights, "
             f"{len(res.integer_linears)} MatMulInteger / {len(res.nbits_linears)} MatMulNBits linears) "
             f"in {time.perf_counter() - t0:.1f}s")


@main.command("check-export")
@click.argument("path", type=click.Path(path_type=Path))
@friendly
def check_export_cmd(path):
    """Validate an export directory: Ascend (quant_model_description.json + weights) or
    compressed-tensors (config.json with a compressed-tensors quantization_config), detected from
    its files. Every quantized linear has its scale tensors with the right dtypes and shapes, and
    the description matches the files. Exit 1 listing the problems, 0 if valid."""
    from ptqc.lowering import compressed_tensors as ct_export
    from ptqc.lowering.ascend import export as ascend_export

    if not Path(path).is_dir():
        raise PtqcError(f"{path} is not a directory; give the directory `ptqc export` wrote")
    if (Path(path) / ascend_export.DESCRIPTION).is_file():
        check, name = ascend_export.check, "Ascend"
    elif ct_export.is_export(path):
        check, name = ct_export.check, "compressed-tensors"
    else:
        click.echo(f"{path}: not an export: {ascend_export.DESCRIPTION} (Ascend) is missing and config.json has "
                   "no compressed-tensors quantization_config")
        raise SystemExit(1)
    problems = check(path)
    for p in problems:
        click.echo(p)
    if problems:
        raise SystemExit(1)
    click.echo(f"{path}: valid {name} export")


@main.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="Compare on the first windows of this text (default: random windows of A's calibration data).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration data to draw windows from (default: A's calib.txt, else eval.txt).")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True, help="Number of windows.")
@click.option("--seqlen", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per window.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the window sampling.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--threshold", type=float, default=40.0, show_default=True,
              help="Report the first probe (in depth order) whose SQNR is below this many dB.")
@click.option("--fail-under", "fail_under", type=float, default=None,
              help="Exit with status 1 if any probe's SQNR is below this many dB.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report as JSON.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None,
              help="Write a PNG of SQNR along depth.")
@click.option("--no-linears", is_flag=True, help="Only decoder layer outputs, embedding and logits.")
@click.option("--dtype", default="float32", show_default=True, help="For a Hugging Face directory.")
@click.option("--trust-remote-code", is_flag=True)
@quiet_option
@friendly
def diff_cmd(a, b, text, calib, samples, seqlen, seed, batch_size, threshold, fail_under, json_out, plot_out,
             no_linears, dtype, trust_remote_code, quiet):
    """Compare B against A on the same tokens: every decoder layer output and matching linear.

    A and B are each a model directory (float, torch), an artifact (its fake-quant graph, torch),
    or PATH:TARGET with TARGET one of the registered backends: onnx (the ONNX export run by
    onnxruntime, no graph optimization), onnx-int (integer kernels), ascend (the Ascend lowering,
    CPU-emulated without an NPU; options after it: `out/:ascend,truncate=false,device=npu:0`),
    e.g. `ptqc diff out/ out/:onnx`, `ptqc diff out/ out/:ascend`.
    Metrics per probe: max abs, max rel, SQNR dB, cosine (A is the reference)."""
    from tqdm.auto import tqdm

    from ptqc import diff as d

    d.check_same_model(a, b, trust_remote_code)  # before loading anything
    ta = d.open_target(a, dtype, trust_remote_code)
    tb = d.open_target(b, dtype, trust_remote_code)
    try:
        ids, source = d.input_windows(ta, text=text, samples=samples, seqlen=seqlen, seed=seed, calib=calib)
        rep = d.diff(ta, tb, ids, threshold=threshold, batch_size=batch_size, linears=not no_linears,
                     progress=lambda it, **kw: tqdm(it, disable=quiet, leave=False, **kw))
    finally:
        ta.close()
        tb.close()
    rep["input"] = source
    click.echo(d.format_table(rep))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rep, indent=1, allow_nan=False))
    if plot_out is not None:
        plot_out.parent.mkdir(parents=True, exist_ok=True)
        d.plot(rep, plot_out)
    if fail_under is not None:
        bad = d.fails_under(rep, fail_under)
        if bad:
            _fail(f"SQNR below {fail_under:g} dB at {len(bad)} probe(s), first {bad[0]}", 1)


if __name__ == "__main__":
    main()
