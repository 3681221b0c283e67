"""The ``ptqc`` command line.

    ptqc compile --passes rtn:bits=4 MODEL -o OUT   trace, run passes, write an artifact
    ptqc inspect OUT                               the transformed graph
    ptqc passes [NAME]                             available passes and their options
    ptqc eval OUT                                  perplexity

Errors a user can cause print one line (``error: ...``) and exit with status 2.
"""
from __future__ import annotations

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


def _load_plugins(plugins):
    from ptqc import pipeline

    pipeline.load_builtin_passes()
    for p in plugins:
        pipeline.load_plugin(p)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output artifact directory.")
@click.option("--passes", "pipeline_str", default=None, help="Pipeline, e.g. 'rtn:bits=4,group=128'.")
@click.option("--recipe", type=click.Path(path_type=Path), default=None, help="YAML recipe with a 'passes:' list.")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path), help="Python file defining passes.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or npu (calibration device).")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code shipped with the model.")
@click.option("--dump-after", multiple=True, help="Dump the graph after this pass (or 'all') into OUT/dumps/.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@quiet_option
@friendly
def compile(model, out, pipeline_str, recipe, plugins, dtype, device, trust_remote_code, dump_after, force, quiet):
    """Trace MODEL (a Hugging Face directory), run the passes, write the artifact OUT."""
    from ptqc import artifact, device as devices, frontend, inspect, pipeline

    t0 = time.perf_counter()
    artifact.check_output(out, force)
    _load_plugins(plugins)
    if pipeline_str and recipe:
        raise PtqcError("give either --passes or --recipe, not both")
    settings = {}
    if recipe:
        passes, settings = pipeline.load_recipe(recipe)
        dtype = settings.get("dtype", dtype)
    else:
        passes = pipeline.parse_pipeline(pipeline_str) if pipeline_str else []
    pipeline.check_order(passes, {"canonical"})
    dev = devices.resolve(device)
    dumps: dict[str, str] = {}

    def dump(i, p, qm):
        dumps[f"{i + 1:02d}-{p.name}.txt"] = inspect.render(qm)

    pm = pipeline.PassManager(passes, dump_after=dump_after, dump=dump)
    _log(quiet, f"tracing {model} ({dtype})")
    t1 = time.perf_counter()
    qm = frontend.load(model, dtype, trust_remote_code, progress=not quiet)
    trace_s = time.perf_counter() - t1
    if "canonical" in dump_after or "all" in dump_after:
        dumps["00-canonical.txt"] = inspect.render(qm)
    ctx = pipeline.PassContext(device=dev, quiet=quiet)
    for rec in pm.run(qm, ctx):
        _log(quiet, f"  {rec['pass']:10s} {rec['seconds']:8.2f}s  {json.dumps(rec['summary'])}")
    artifact.save(qm, out, force=force, dumps=dumps,
                  extra={"timing": {"trace_s": round(trace_s, 3), "total_s": round(time.perf_counter() - t0, 3)},
                         "pipeline": [repr(p) for p in passes], "recipe": str(recipe) if recipe else None})
    _log(quiet, f"wrote {out} in {time.perf_counter() - t0:.1f}s")


@main.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--layer", type=int, default=None, help="Only nodes of this decoder layer.")
@click.option("--op", default=None, help="Only ops whose name contains this (e.g. linear).")
@click.option("--role", default=None, help="Only nodes with this role (q, k, v, o, gate, up, down, ...).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "dot"]), default="text", show_default=True)
@click.option("--counts", is_flag=True, help="Only per-op counts (per decoder layer with --per-layer).")
@click.option("--per-layer", is_flag=True, help="With --counts: counts per decoder layer.")
@click.option("--dtype", default="float32", show_default=True, help="For a Hugging Face directory.")
@click.option("--trust-remote-code", is_flag=True)
@friendly
def inspect_cmd(path, layer, op, role, fmt, counts, per_layer, dtype, trust_remote_code):
    """Show the graph of an artifact (or of a model directory, canonicalized)."""
    from ptqc import artifact, inspect

    qm = artifact.load_any(path, dtype, trust_remote_code)
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
@quiet_option
@friendly
def eval_cmd(path, text, seqlen, batch_size, max_windows, dtype, device, trust_remote_code, as_json, quiet):
    """Perplexity of an artifact or a model on a text (non-overlapping windows)."""
    from ptqc import artifact, device as devices, evaluate
    from ptqc.errors import CollapseError

    dev = devices.resolve(device)
    qm = artifact.load_any(path, dtype, trust_remote_code)
    text_path = text or evaluate.default_text(path, qm)
    tok = evaluate.load_tokenizer(path)
    ids = evaluate.tokenize(tok, evaluate.read_text(text_path))
    from tqdm.auto import tqdm

    def progress(it, **kw):
        return tqdm(it, disable=quiet, leave=False, **kw)

    try:
        r = evaluate.perplexity(qm, ids, seqlen, batch_size=batch_size, device=None if dev == "cpu" else dev,
                                max_windows=max_windows, progress=progress)
    except CollapseError as e:
        if as_json:
            click.echo(json.dumps({"collapse": str(e), "text": str(text_path)}))
        _fail(str(e), 3)
    r["text"] = str(text_path)
    if as_json:
        click.echo(json.dumps(r))
    else:
        click.echo(f"ppl {r['ppl']:.4f}  ({r['windows']} windows x {seqlen} tokens of {text_path})")


if __name__ == "__main__":
    main()
