"""Compiled artifacts: a directory a user can evaluate, inspect, diff and export.

    OUT/config.json, tokenizer files, ...   copied from the input model (never modified)
    OUT/model.safetensors                   every tensor the graph reads, under its HF name
                                            (quantized: int8 codes + .weight_scale/.weight_zero_point);
                                            MoE expert stacks one tensor per expert, as checkpoints
                                            hold them (ptqc.moe)
                                            sharded with an index above --shard-size;
                                            a float tensor no pass wrote keeps its checkpoint
                                            dtype (bf16 embeddings stay bf16: half the bytes),
                                            listed in the manifest and widened again on load
    OUT/graph.json                          the ptqc graph (see ptqc.ir.graph_to_json)
    OUT/ptqc.json                           the manifest: versions, source, passes and options,
                                            per-module quantization parameters
    OUT/run.json                            what differs between runs: creation time, timing
                                            (every other file is byte-identical for the same
                                            command and inputs)
    OUT/dumps/                              graph dumps requested with --dump-after

Writes go to a temporary sibling directory that is renamed into place at the end, so a failed
compile never leaves a half-written OUT.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ptqc import moe
from ptqc.errors import PtqcError
from ptqc.ir import QModel, graph_from_json, graph_to_json
from ptqc.model import WeightStore, other_files, parse_dtype, weight_files, write_safetensors

MANIFEST = "ptqc.json"
RUN = "run.json"
GRAPH = "graph.json"
FORMAT_VERSION = 2  # 2: untouched float tensors in their checkpoint dtype (weights.as_checkpoint)


def is_artifact(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_apart(out, inputs) -> None:
    """Refuse an output inside (or holding) an input directory: inputs are never modified."""
    for inp in inputs:
        o, i = Path(out).resolve(), Path(inp).resolve()
        if o == i or i in o.parents or o in i.parents:
            where = "is" if o == i else "contains" if o in i.parents else "is inside"
            raise PtqcError(f"output {out} {where} the input {inp}, which is never modified; choose another -o")


def check_output(out, force: bool, inputs=()) -> None:
    """Refuse an existing output directory unless --force, and one inside (or holding) an input
    directory (before any work is done)."""
    out = Path(out)
    check_apart(out, inputs)
    if out.exists() and not force:
        raise PtqcError(f"output directory {out} already exists; pass --force to overwrite it or choose another -o")
    if out.exists() and not out.is_dir():
        raise PtqcError(f"output path {out} exists and is not a directory")


def default_output(model, pipeline: str | None = None, recipe=None, target: str = "torch") -> Path:
    """Where ``compile`` writes without ``-o``: beside the model, named after it and the pipeline
    (or the recipe, and a target other than torch): ``model/`` + ``smooth,int8`` -> ``model-smooth-int8/``."""
    model = Path(model)
    if model.name in ("", ".", ".."):
        model = model.resolve()
    what = Path(recipe).stem if recipe else (pipeline or "ptqc").replace("=", "")
    if target != "torch" and target not in what:
        what += f"-{target}"
    tag = re.sub(r"[^A-Za-z0-9._+]+", "-", what)[:80].strip("-.") or "ptqc"
    return model.with_name(f"{model.name}-{tag}")


class AtomicDir:
    """Context manager giving a temp dir that replaces ``out`` on success and vanishes on failure."""

    def __init__(self, out, force: bool = False, inputs=()):
        self.out = Path(out)
        self.force = force
        self.inputs = inputs

    def __enter__(self) -> Path:
        check_output(self.out, self.force, self.inputs)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the artifact is an ordinary directory
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _entries(qm: QModel) -> dict[str, tuple[str, int | None]]:
    """{saved name: (store name, expert index or None)}: the weights the graph reads, tied ones
    once, expert stacks [E, ...] split into E tensors under the checkpoint's per-expert names."""
    used = set(qm.weight_names())
    aliases = {n: qm.store.aliases[n] for n in used if n in qm.store.aliases}  # tied: save once
    stacked = moe.stacked_weights(qm.graph)
    out: dict[str, tuple[str, int | None]] = {}
    for n in sorted((used - set(aliases)) | set(aliases.values())):
        if n in stacked:
            out.update({moe.expert_name(n, e): (n, e) for e in range(qm.store.spec(n)[0][0])})
        else:
            out[n] = (n, None)
    return out


def _save_weights(qm: QModel, tmp: Path, shard_bytes: int) -> dict:
    """Write the weights the graph reads, one tensor at a time (never the whole model)."""
    aliases = {n: qm.store.aliases[n] for n in qm.weight_names() if n in qm.store.aliases}
    entries = _entries(qm)
    order = sorted(entries, key=lambda o: (entries[o][0], entries[o][1] or 0))  # a stack's experts in a row
    held: dict[str, torch.Tensor] = {}  # the stack being split

    narrow = {src: dt for src in {s for s, _ in entries.values()} if (dt := qm.store.checkpoint_dtype(src))}

    def spec(out):
        src, e = entries[out]
        shape, dtype = qm.store.spec(src)
        return (shape if e is None else shape[1:]), narrow.get(src, dtype)

    def get(out):
        src, e = entries[out]
        if src not in held:
            held.clear()
            t = qm.store[src]
            held[src] = t.to(narrow[src]) if src in narrow else t  # back to the checkpoint's dtype: exact
            if src not in qm.store.overlay:
                qm.store.release([src])
        return held[src] if e is None else held[src][e]

    shards: list[list[str]] = [[]]
    size = 0
    for n in order:
        shape, dtype = spec(n)
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    files, weight_map, total = [], {}, 0
    for i, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(tmp / fname, group, spec, get, metadata={"format": "pt", "producer": "ptqc"})
        held.clear()
        files.append(fname)
        weight_map.update({n: fname for n in group})
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    as_checkpoint = sorted(o for o, (src, _) in entries.items() if src in narrow)  # widened again on load
    return {"files": files, "tensors": len(entries), "bytes": total, "aliases": aliases, "as_checkpoint": as_checkpoint}


def save(qm: QModel, out, *, force: bool = False, extra: dict | None = None, dumps: dict | None = None,
         shard_bytes: int = 2 << 30) -> Path:
    """Write ``qm`` as an artifact directory (atomically)."""
    from ptqc import __version__

    src = Path(qm.source) if qm.source else None
    with AtomicDir(out, force, inputs=[src] if src is not None and src.is_dir() else []) as tmp:
        if src is not None and src.is_dir():
            shutil.copy2(src / "config.json", tmp / "config.json")
            for f in other_files(src):
                if f.name not in (MANIFEST, GRAPH, RUN):
                    shutil.copy2(f, tmp / f.name)
        else:
            qm.config.to_json_file(str(tmp / "config.json"))
        weights = _save_weights(qm, tmp, shard_bytes)
        (tmp / GRAPH).write_text(json.dumps(graph_to_json(qm.graph)))
        manifest = {
            "ptqc_version": __version__,
            "format_version": FORMAT_VERSION,
            "source": {"path": qm.source, "model_type": getattr(qm.config, "model_type", None),
                       "architectures": getattr(qm.config, "architectures", None)},
            "dtype": str(qm.dtype).removeprefix("torch."),
            "properties": sorted(qm.properties),
            "passes": qm.history,
            "quant": qm.quant,
            "plan": qm.plan,
            "weights": weights,
            "torch_version": torch.__version__,
            **(extra or {}),
        }
        run = _run_record(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        (tmp / RUN).write_text(json.dumps(run, indent=1, default=str))
        if dumps:
            (tmp / "dumps").mkdir()
            for name, text in dumps.items():
                (tmp / "dumps" / name).write_text(text)
    return Path(out)


def _run_record(manifest: dict) -> dict:
    """Take what differs between two runs of the same command out of ``manifest`` (``timing``, each
    pass's ``seconds`` and its summary's; qm.history is not changed): the run record, with the
    creation time."""
    def timeless(d):
        return {k: v for k, v in d.items() if k != "seconds"}

    recs = manifest.get("passes", [])
    manifest["passes"] = [{**timeless(r), **({"summary": timeless(r["summary"])}
                                           if isinstance(r.get("summary"), dict) else {})} for r in recs]
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timing": manifest.pop("timing", None),
            "passes": [{"pass": r.get("pass"), "seconds": r.get("seconds"),
                        **({"summary_seconds": r["summary"]["seconds"]} if "seconds" in (r.get("summary") or {})
                           else {})} for r in recs]}


def read_manifest(path) -> dict:
    p = Path(path) / MANIFEST
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PtqcError(f"cannot read artifact manifest {p}: {e}") from None


def load(path, trust_remote_code: bool = False) -> QModel:
    """Load an artifact back into a QModel (weights read lazily)."""
    from ptqc.model import load_config

    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise PtqcError(f"{path} was written by a newer ptqc (format {manifest['format_version']}); upgrade ptqc")
    config = load_config(path, trust_remote_code)
    try:
        graph = graph_from_json(json.loads((path / GRAPH).read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise PtqcError(f"cannot read {path / GRAPH}: {e}") from None
    dtype = parse_dtype(manifest["dtype"])
    store = WeightStore(weight_files(path), dtype=dtype)
    store.cast = False  # artifact tensors are stored exactly as compiled, ...
    store.widen = set(manifest.get("weights", {}).get("as_checkpoint", ()))  # ... or as in the checkpoint
    store.aliases.update(manifest.get("weights", {}).get("aliases", {}))
    moe.register_stacks(graph, store)
    return QModel(graph=graph, store=store, config=config, dtype=dtype, source=str(path.resolve()),
                  properties=set(manifest.get("properties", [])), history=list(manifest.get("passes", [])),
                  quant=dict(manifest.get("quant", {})), plan=dict(manifest.get("plan", {})))


def load_any(path, dtype: str = "float32", trust_remote_code: bool = False) -> QModel:
    """An artifact directory (has ptqc.json), an export directory a backend reads back (Ascend,
    compressed-tensors) or a Hugging Face model directory."""
    from ptqc import backends, frontend

    if is_artifact(path):
        return load(path, trust_remote_code)
    if Path(path).is_dir() and _may_be_export(Path(path)):
        backend = backends.export_dir_kind(path)
        if backend is not None:
            if backend.load is None:
                raise PtqcError(f"{path} is a {backend.title} export, which ptqc cannot read back; "
                                "give the artifact it was exported from")
            return backend.load(path, dtype, trust_remote_code)
    return frontend.load(path, dtype, trust_remote_code)


def _may_be_export(path: Path) -> bool:
    """Cheap test before asking the backends: a quantization description or a quantization_config."""
    if any(path.glob("quant_model_description*.json")):
        return True
    try:
        return "quantization_config" in json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
