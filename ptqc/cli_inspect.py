"""``ptqc inspect``, ``ptqc passes``, ``ptqc recipes``: what a graph, the passes and the recipes are."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ptqc.cli_common import friendly, load_plugins
from ptqc.explorer_cli import web_options


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--layer", type=int, default=None, help="Only nodes of this decoder layer.")
@click.option("--op", default=None, help="Only ops whose name contains this (e.g. linear).")
@click.option("--role", default=None, help="Only nodes with this role (q, k, v, o, gate, up, down, ...).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "dot"]), default="text", show_default=True)
@click.option("--counts", is_flag=True, help="Only per-op counts (per decoder layer with --per-layer).")
@click.option("--per-layer", is_flag=True, help="With --counts: counts per decoder layer.")
@click.option("--ops", "kernel_ops", is_flag=True,
              help="Ascend quantization kernels per decoder layer: naive, shared, fused (or as lowered).")
@click.option("--experts", "moe_experts", is_flag=True,
              help="Only the MoE experts: routed calibration tokens and weight scheme of each expert.")
@click.option("--dtype", default="float32", show_default=True, help="For a Hugging Face directory.")
@click.option("--trust-remote-code", is_flag=True)
@web_options
@click.option("--overlay", "overlays", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="With --web/--export: node colours from a `ptqc diff --json` or diagnose diagnostics.json report.")
@friendly
def inspect_cmd(path, layer, op, role, fmt, counts, per_layer, kernel_ops, moe_experts, dtype, trust_remote_code,
                web, port, no_browser, export_dir, overlays):
    """Show the graph of an artifact (or of a model directory, canonicalized).

    --web shows it in Model Explorer (PATH:ascend: as lowered; with --ops: the Ascend kernel of each
    node; --overlay: per-node errors); PATH may also be a directory written by --export."""
    from ptqc import artifact, backends, inspect

    if web or export_dir:
        return _web(str(path), dtype, trust_remote_code, overlays, kernel_ops, web, port, no_browser, export_dir)
    qm = artifact.load_any(path, dtype, trust_remote_code)
    if kernel_ops:
        rows = backends.get("ascend").kernel_report(qm)
        click.echo(json.dumps(rows, indent=1) if fmt == "json" else inspect.kernel_table(rows))
    elif moe_experts:
        click.echo(json.dumps(inspect.experts(qm), indent=1) if fmt == "json" else
                   inspect.experts_table(qm) or "no MoE experts")
    elif counts:
        click.echo(inspect.counts_text(qm, per_layer, fmt))
    else:
        click.echo(inspect.render(qm, fmt, layer, op, role))


def _web(spec, dtype, trust_remote_code, overlays, kernel_ops, web, port, no_browser, export_dir):
    from ptqc import explorer, explorer_run

    if web and not export_dir and (Path(spec) / explorer.MANIFEST).is_file():
        return explorer_run.serve_export(Path(spec), port=port, browser=not no_browser, echo=click.echo)
    sides = explorer_run.inspect_sides(spec, dtype, trust_remote_code, overlays, kernel_ops)
    explorer_run.show(sides, web=web, port=port, export_dir=export_dir, browser=not no_browser, echo=click.echo)


@click.command("passes")
@click.argument("name", required=False)
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path))
@friendly
def passes_cmd(name, plugins):
    """List the passes (or describe one): options with defaults, requirements, documentation."""
    from ptqc import pipeline

    load_plugins(plugins)
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


@click.command("recipes")
@friendly
def recipes_cmd():
    """List the shipped recipes (use one with `ptqc compile --recipe NAME`)."""
    from ptqc import recipes

    for n in recipes.names():
        click.echo(f"{n:22s} {recipes.describe(n)}")
