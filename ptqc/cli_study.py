"""``ptqc study``: an accuracy map (models x pipelines x calibration seeds), cached cell by cell."""
from __future__ import annotations

from pathlib import Path

import click

from ptqc.cli_common import friendly, log, quiet_option, streams_weights
from ptqc.errors import PtqcError


@click.command("study")
@click.argument("spec", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Study directory: cells/ (the cache), results.json/.csv/.md, PNG plots.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cells computed in parallel processes on this machine.")
@click.option("--ray", default=None, metavar="auto|ADDRESS|local",
              help="Run the cells as Ray tasks: on the running cluster (auto), the one at ADDRESS, or a "
                   "runtime started here (local, --jobs CPUs). Needs ptqc[ray]; models must be on shared storage.")
@click.option("--select", "select", multiple=True, metavar="PATTERN",
              help="Only the cells named like MODEL/PIPELINE/SEED (shell pattern, repeatable; seed '-' for FP).")
@click.option("--compare", nargs=2, type=click.Path(path_type=Path), default=None, metavar="A B",
              help="Print what changed between two study directories (instead of running SPEC).")
@click.option("--tol", type=float, default=1e-4, show_default=True, help="With --compare: relative change reported.")
@quiet_option
@friendly
@streams_weights
def study_cmd(spec, out, jobs, ray, select, compare, tol, quiet):
    """Run the study SPEC (YAML) into OUT; cells already computed there are reused."""
    if compare:
        from ptqc import study_compare

        if spec or out:
            raise PtqcError("--compare A B takes no SPEC or -o")
        click.echo("\n".join(study_compare.compare(study_compare.load(compare[0]), study_compare.load(compare[1]), tol)))
        return
    if spec is None or out is None:
        raise PtqcError("give a study file and -o DIR (or --compare A B)")
    from ptqc import study

    res = study.run(spec, out, jobs=jobs, ray=ray, select=select, log=lambda msg: log(quiet, msg))
    failed = sum(1 for c in res["cells"] if c.get("status") != "ok")
    log(quiet, f"{res['computed']} computed, {res['cached']} cached, {failed} failed")
    if not quiet:
        click.echo(Path(out, "results.md").read_text())
