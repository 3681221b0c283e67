"""``ptqc compile``: trace a model, run the passes, write an artifact."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

from ptqc.cli_common import friendly, load_plugins, log, quiet_option, streams_weights
from ptqc.errors import PtqcError
from ptqc.model import load_config


def _passes(pipeline_str, recipe, target, no_pack) -> tuple[list, dict]:
    """The passes to run (with ``ascend`` and ``pack`` added as the options say) and the recipe's settings."""
    from ptqc import pipeline

    if pipeline_str and recipe:
        raise PtqcError("give either --passes or --recipe, not both")
    settings = {}
    if recipe:
        passes, settings = pipeline.load_recipe(recipe)
    else:
        passes = pipeline.parse_pipeline(pipeline_str) if pipeline_str else []
    passes = pipeline.complete(passes, target=target, pack=not no_pack)
    pipeline.check_order(passes, {"canonical"})
    return passes, settings


def _short_summary(summary: dict, width: int = 160) -> str:
    """A pass's summary on one line: lists longer than 3 shown by their length (the manifest keeps all)."""
    short = {k: (f"<{len(v)} items>" if isinstance(v, list) and len(v) > 3 else v) for k, v in summary.items()}
    text = json.dumps(short)
    return text if len(text) <= width else text[:width - 3] + "..."


def _write_diagnostics(model, qm, ctx, cfg, report_dir, dtype, dev, trust_remote_code, force, quiet):
    """compile --report: the float model (traced again from MODEL) against the compiled one."""
    from ptqc import diagnose, frontend, progress

    t = time.perf_counter()
    fp = frontend.load(model, dtype, trust_remote_code, isolate="auto")
    ids = ctx.calibration_ids(qm)  # the data the passes calibrated on (tokenized now if none did)
    rep = diagnose.compare(fp, qm, ids, batch_size=cfg.batch_size, device=None if dev == "cpu" else dev,
                           progress=progress.factory(quiet))
    diagnose.write_report(rep, report_dir, force=force)
    log(quiet, f"diagnostics: {report_dir} ({time.perf_counter() - t:.1f}s); sensitive layers: "
               f"{', '.join(map(str, rep['sensitive_layers'])) or 'none'}")


@contextlib.contextmanager
def _offloaded(qm, out: Path, offload_mb):
    """Pass outputs and calibration activations beyond their budgets go to a temporary directory beside
    ``out``, removed at the end."""
    out.parent.mkdir(parents=True, exist_ok=True)
    qm.store.configure_offload(Path(tempfile.mkdtemp(prefix=f".{out.name}.offload-", dir=out.parent)),
                               None if offload_mb is None else offload_mb << 20)
    try:
        yield
    finally:
        shutil.rmtree(qm.store.offload_dir, ignore_errors=True)


def _checkpoints(out, model, passes, resume, quiet, **settings):
    """The per-layer checkpoints of this compile (ptqc.resume), resumed with ``--resume``."""
    from ptqc import resume as resuming

    ck = resuming.Checkpoints(out, resuming.fingerprint(model, passes, **settings), resume=resume)
    if resume:
        log(quiet, f"resuming from {ck.dir}" if ck.resumed else f"no checkpoint in {ck.dir}; starting over")
    return ck


@contextlib.contextmanager
def _kept_on_crash(ck):
    """Checkpoints are removed when the compile succeeds or stops on a PtqcError, kept otherwise."""
    try:
        yield
    except PtqcError:
        if ck is not None:
            ck.remove()
        raise
    if ck is not None:
        ck.remove()


def _spawn(nproc: int, args: dict, resume: bool) -> None:
    """compile --nproc N: run this command in N ranks (ptqc.distributed.spawn); a rank's failure is its exit code."""
    from ptqc import distributed

    if resume:
        raise PtqcError("--resume does not work with --nproc yet; resume without --nproc, or start over")
    code = distributed.spawn(nproc, _rank_compile, {**args, "nproc": 1})
    if code:
        sys.exit(code)


def _rank_compile(args: dict) -> None:
    compile.callback(**args)


def _join(dev: str, resume: bool) -> int:
    """Join the ranks' process group (launched by torchrun or --nproc); this rank's index."""
    from ptqc import distributed

    if distributed.init(dev) and resume:
        raise PtqcError("--resume does not work with several ranks yet; resume on one process, or start over")
    return distributed.world()[0]


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", default=None, type=click.Path(path_type=Path),
              help="Output artifact directory [beside MODEL, named after it and the pipeline or recipe: "
                   "MODEL-smooth-int8].")
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
@click.option("--offload-mb", type=click.IntRange(min=0), default=None,
              help="Keep at most this many MB of pass outputs, and as many of calibration activations, in "
                   "memory; the rest goes to temporary files beside OUT [outputs: 5% of the model, 16..1024; "
                   "activations: a quarter of RAM].")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Also compare the result with the float model on the calibration data and write the "
                   "diagnostics (as `ptqc diagnose`) into this directory.")
@click.option("--target", type=click.Choice(["torch", "ascend"]), default="torch", show_default=True,
              help="ascend: end the pipeline with the `ascend` lowering pass (torch_npu kernels, CPU-emulated "
                   "without an NPU); give `ascend:OPTIONS` in --passes instead to set its options.")
@click.option("--resume", is_flag=True,
              help="Continue a killed compile of the same command from its per-layer checkpoints "
                   "(.OUT.resume/ beside OUT).")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Calibrate data-parallel on N processes of this machine (torch.distributed; under "
                   "torchrun the launched ranks are used instead). Rank 0 writes OUT.")
@quiet_option
@friendly
@streams_weights
def compile(model, out, pipeline_str, recipe, plugins, dtype, device, trust_remote_code, dump_after, force,
            no_pack, calib, calib_samples, calib_seqlen, calib_seed, calib_field, calib_batch_size, offload_mb,
            quiet, report=None, target="torch", resume=False, nproc=1):
    """Trace MODEL (a Hugging Face directory), run the passes, write the artifact OUT."""
    args = dict(locals())
    from ptqc import artifact, device as devices, distributed, frontend, inspect, pipeline

    t0 = time.perf_counter()
    load_config(model, trust_remote_code)  # a wrong MODEL fails here, before anything is printed or made
    if out is None:
        out = artifact.default_output(model, pipeline_str, recipe, target)
        log(quiet, f"output: {out} (beside the model; -o chooses another)")
    for o in filter(None, (out, report)):
        artifact.check_output(o, force, [model])
    load_plugins(plugins)
    passes, settings = _passes(pipeline_str, recipe, target, no_pack)
    dtype = settings.get("dtype", dtype)
    dev = devices.resolve(device)
    if nproc > 1 and not distributed.launched():
        return _spawn(nproc, args, resume)
    rank = _join(dev, resume)
    quiet = quiet or rank > 0
    dumps: dict[str, str] = {}

    def dump(i, p, qm):
        dumps[f"{i + 1:02d}-{p.name}.txt"] = inspect.render(qm)

    pm = pipeline.PassManager(passes, dump_after=dump_after, dump=dump)
    cfg = pipeline.calib_config(settings.get("calib", {}), path=calib, samples=calib_samples, seqlen=calib_seqlen,
                                seed=calib_seed, field=calib_field, batch_size=calib_batch_size)
    ctx = pipeline.PassContext(device=dev, quiet=quiet, calib=cfg)
    ctx.checkpoints = _checkpoints(out, model, passes, resume, quiet, dtype=dtype, device=dev, target=target,
                                   calib=dataclasses.asdict(cfg)) if distributed.world()[1] == 1 else None
    log(quiet, f"tracing {model} ({dtype})")
    t1 = time.perf_counter()
    qm = frontend.load(model, dtype, trust_remote_code, progress=not quiet, isolate="auto")
    trace_s = time.perf_counter() - t1
    if "canonical" in dump_after or "all" in dump_after:
        dumps["00-canonical.txt"] = inspect.render(qm)
    with _offloaded(qm, out, offload_mb), _kept_on_crash(ctx.checkpoints):
        for rec in pm.iter_run(qm, ctx):
            log(quiet, f"  {rec['pass']:10s} {rec['seconds']:8.2f}s  {_short_summary(rec['summary'])}")
        if rank > 0:
            return distributed.finish()
        artifact.save(qm, out, force=force, dumps=dumps,
                      extra={"timing": {"trace_s": round(trace_s, 3), "total_s": round(time.perf_counter() - t0, 3)},
                             "pipeline": [repr(p) for p in passes], "recipe": str(recipe) if recipe else None,
                             "calibration": dataclasses.asdict(cfg) if ctx.calibration_used else None})
        if report is not None:
            _write_diagnostics(model, qm, ctx, cfg, report, dtype, dev, trust_remote_code, force, quiet)
    distributed.finish()
    log(quiet, f"wrote {out} in {time.perf_counter() - t0:.1f}s")
