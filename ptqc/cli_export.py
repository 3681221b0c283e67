"""``ptqc export`` and ``ptqc check-export``: write and validate what other runtimes load, through
the backends (:mod:`ptqc.backends`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ptqc.cli_common import friendly, log, quiet_option, streams_weights
from ptqc.errors import PtqcError


@click.command("export")
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
@click.option("--dtype", default=None,
              help="With --format ascend: the dtype vllm-ascend serves in (float16 or bfloat16; default the "
                   "artifact's; W8A8's deq_scale and config.json's torch_dtype follow it). A Hugging Face "
                   "directory is loaded in it (default float32).")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as JSON.")
@quiet_option
@friendly
@streams_weights
def export_cmd(path, out, fmt, mode, external, no_int4, int_kernel, outputs, dtype, trust_remote_code, force, as_json,
               quiet):
    """Lower an artifact (or a model directory) to ONNX, checked with onnx.checker.

    Node names keep the ptqc graph's FX node names; input_ids [batch, seq] and the logits have
    symbolic batch and sequence dimensions. Every op goes through one translation table
    (ptqc.lowering.onnx.TABLE); an op without a translation is an error naming op and node."""
    from ptqc import artifact, backends

    t0 = time.perf_counter()
    if not path.is_dir():
        raise PtqcError(f"{path} is not a directory (give a ptqc artifact or a model directory)")
    artifact.check_apart(out, [path])
    backend = backends.provider("formats", fmt)
    backend.check_output(out, fmt, force)
    serving = {"dtype": dtype} if fmt == "ascend" else {}
    res, what = backend.export(artifact.load_any(path, dtype or "float32", trust_remote_code), out, fmt, force=force,
                               mode=mode, outputs=outputs, external_data=external, int4=not no_int4,
                               int_kernel=int_kernel, **serving)
    if as_json:
        click.echo(json.dumps(res))
    else:
        log(quiet, f"wrote {what} in {time.perf_counter() - t0:.1f}s")


@click.command("check-export")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--trust-remote-code", is_flag=True, help="Build a model with custom code (auto_map) to check against.")
@friendly
def check_export_cmd(path, trust_remote_code):
    """Validate an export directory: Ascend (quant_model_description.json + weights) or
    compressed-tensors (config.json with a compressed-tensors quantization_config), detected from
    its files. Every quantized linear has its scale tensors with the right dtypes and shapes, and
    the description matches the files. Exit 1 listing the problems, 0 if valid."""
    from ptqc import backends

    if not Path(path).is_dir():
        raise PtqcError(f"{path} is not a directory; give the directory `ptqc export` wrote")
    backend = backends.export_dir_kind(Path(path))
    if backend is None:
        missing = [b.export_missing for b in map(backends.get, backends.names()) if b.export_missing]
        click.echo(f"{path}: not an export: {' and '.join(missing)}")
        raise SystemExit(1)
    problems = backend.check(path, trust_remote_code=trust_remote_code)
    for p in problems:
        click.echo(p)
    if problems:
        raise SystemExit(1)
    click.echo(f"{path}: valid {backend.title} export")
