"""``ptqc diagnose`` and ``ptqc diff``: compare two models (or backends) on the same tokens."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ptqc.cli_common import fail, friendly, log, quiet_option, streams_weights
from ptqc.errors import PtqcError
from ptqc.explorer_cli import web_options


@click.command()
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
@streams_weights
def diagnose(fp_model, quantized, out, calib, calib_samples, calib_seqlen, calib_seed, calib_field,
             calib_batch_size, k, metric, top, dtype, device, trust_remote_code, force, as_json, quiet):
    """Per-layer and per-linear error of QUANTIZED (an artifact) against FP_MODEL, its float model.

    Both models run layer by layer on the same calibration windows (FP_MODEL's tokenizer; by
    default 32 windows x 256 tokens of FP_MODEL/calib.txt). "local": the quantized layer on the
    float layer's inputs (its own error); "accumulated": on the quantized model's own inputs.
    Layers whose local error is an outlier (median + k x MAD) are reported as sensitive."""
    from ptqc import artifact, device as devices, diagnose as diag, pipeline, progress

    artifact.check_output(out, force, [fp_model, quantized])
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
                       progress=progress.factory(quiet), k=k, metric=metric, top=top)
    diag.write_report(rep, out, force=force)
    if as_json:
        click.echo(json.dumps(rep, allow_nan=False))
    else:
        click.echo(diag.format_table(rep))
        log(quiet, f"wrote {out}/diagnostics.json and {', '.join(m + '.png' for m in diag.METRICS)}")


@click.command("diff")
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
@web_options
@quiet_option
@friendly
@streams_weights
def diff_cmd(a, b, text, calib, samples, seqlen, seed, batch_size, threshold, fail_under, json_out, plot_out,
             no_linears, dtype, trust_remote_code, web, port, no_browser, export_dir, quiet):
    """Compare B against A on the same tokens: every decoder layer output and matching linear.

    A and B are each a model directory (float, torch), an artifact (its fake-quant graph, torch),
    or PATH:TARGET with TARGET one of the registered backends: onnx (the ONNX export run by
    onnxruntime, no graph optimization), onnx-int (integer kernels), ascend (the Ascend lowering,
    CPU-emulated without an NPU; options after it: `out/:ascend,truncate=false,device=npu:0`),
    e.g. `ptqc diff out/ out/:onnx`, `ptqc diff out/ out/:ascend`.
    Metrics per probe: max abs, max rel, SQNR dB, cosine (A is the reference). --web shows both
    graphs side by side in Model Explorer, coloured by these metrics."""
    from ptqc import diff as d, explorer_run, progress

    d.check_same_model(a, b, trust_remote_code)  # before loading anything
    ta = d.open_target(a, dtype, trust_remote_code)
    tb = d.open_target(b, dtype, trust_remote_code)
    try:
        ids, source = d.input_windows(ta, text=text, samples=samples, seqlen=seqlen, seed=seed, calib=calib)
        rep = d.diff(ta, tb, ids, threshold=threshold, batch_size=batch_size, linears=not no_linears,
                     progress=progress.factory(quiet))
        sides = explorer_run.diff_sides(ta, tb, rep) if web or export_dir else None
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
    if sides:
        explorer_run.show(sides, web=web, port=port, export_dir=export_dir, browser=not no_browser, echo=click.echo)
    if fail_under is not None:
        bad = d.fails_under(rep, fail_under)
        if bad:
            fail(f"SQNR below {fail_under:g} dB at {len(bad)} probe(s), first {bad[0]}", 1)

