"""Backends a ptqc graph is lowered to (ONNX, Ascend, compressed-tensors...), found by name.

The core never imports a backend. It asks this registry, which loads the objects named in the
``ptqc.backends`` entry-point group (``name = "module:OBJECT"``) when first asked, one at a time.
A backend object subclasses :class:`Backend` and overrides what it offers.
"""
from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

from ptqc.errors import PtqcError

GROUP = "ptqc.backends"
# This package's backends, as in pyproject.toml; also here so that an install made before they
# were declared (editable installs are not re-run on update) still finds them.
SHIPPED = {"ascend": "ptqc.lowering.ascend.backend:BACKEND",
           "compressed-tensors": "ptqc.lowering.compressed_tensors_backend:BACKEND",
           "onnx": "ptqc.lowering.onnx.backend:BACKEND"}
CORE_NAMESPACES = frozenset({"aten", "prims", "ptqc"})  # torch op namespaces of unlowered graphs

_loaded: dict[str, "Backend"] = {}


class Backend:
    """What the core may ask of a backend. What it offers is named in ``targets``, ``eval_targets``
    and ``formats`` (each named after the backend: ``<name>`` or ``<name>-<variant>``), with the
    methods that go with them:

    * ``probes(qm)``: the ``ptqc diff`` probes (:class:`ptqc.probes.Probe`) of a graph lowered in
      place to its kernels (whose torch op namespace is ``op_namespace``);
    * ``perplexity(qm, ids, seqlen, *, target, batch_size, max_windows, device, progress, log)``:
      ``ptqc eval --target``, as :func:`ptqc.evaluate.perplexity`; ``log(msg)`` takes remarks;
    * ``check_output(out, fmt, force)`` (before the model is loaded) and ``export(qm, out, fmt, *,
      force, **options) -> (summary, "<path> (<facts>)")``: ``ptqc export --format``;
    * ``is_export(path)`` and ``check(path, trust_remote_code=False) -> [problems]``: ``ptqc check-export``
      (custom model code is run only when trusted);
    * ``load(path, dtype, trust_remote_code=False) -> QModel``: an export directory read back into a
      fake-quant graph (``ptqc eval`` / ``diff`` / ``inspect`` of it), where the backend has a reader;
    * ``kernel_report(qm) -> [rows]``: kernels per decoder layer (``ptqc inspect --ops``).
    """

    name = "?"
    title = "?"  # its name in messages
    op_namespace: str | None = None
    targets: dict[str, type] = {}  # ``ptqc diff PATH:<name>``: ptqc.diff_targets.Target classes
    eval_targets: tuple[str, ...] = ()  # ``ptqc eval --target <name>``
    formats: tuple[str, ...] = ()  # ``ptqc export --format <name>``
    export_missing = ""  # ``ptqc check-export``: what a directory that is not its export lacks

    def check_output(self, out: Path, fmt: str, force: bool) -> None:
        from ptqc.artifact import check_output

        check_output(out, force)  # a new directory

    def is_export(self, path: Path) -> bool:
        return False

    load = None  # no reader of its export directories


@functools.cache
def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    eps = {n: importlib.metadata.EntryPoint(n, v, GROUP) for n, v in SHIPPED.items()}
    eps.update({ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)})
    return eps


def names() -> list[str]:
    return sorted(_entry_points())


def get(name: str) -> Backend:
    """The backend registered as ``name`` (loaded on first use)."""
    if name not in _loaded:
        ep = _entry_points().get(name)
        if ep is None:
            raise PtqcError(f"no backend {name!r}; backends: {', '.join(names())}")
        try:
            _loaded[name] = ep.load()
        except Exception as e:  # noqa: BLE001
            raise PtqcError(f"cannot load backend {name!r} ({ep.value}): {e}") from None
    return _loaded[name]


def offering(kind: str, name: str) -> Backend | None:
    """The backend with ``name`` among its ``kind`` (targets, eval_targets or formats), or None.
    Only a backend named like it is loaded: ``onnx`` for ``onnx`` or ``onnx-int``."""
    for n in names():
        if (name == n or name.startswith(f"{n}-")) and name in getattr(get(n), kind):
            return get(n)
    return None


def provider(kind: str, name: str) -> Backend:
    """:func:`offering`, or a one-line error."""
    b = offering(kind, name)
    if b is None:
        raise PtqcError(f"no backend offers {kind.replace('_', ' ')[:-1]} {name!r}")
    return b


def lowered_by(qm) -> Backend | None:
    """The backend whose kernels ``qm``'s graph runs (lowered in place), or None. Loads backends
    only for a graph with ops outside the core's namespaces."""
    spaces = {getattr(n.target, "namespace", None) for n in qm.graph.nodes if n.op == "call_function"}
    spaces -= CORE_NAMESPACES | {None}
    if not spaces:
        return None
    return next((get(n) for n in names() if get(n).op_namespace in spaces), None)


def export_dir_kind(path) -> Backend | None:
    """The backend whose export directory ``path`` is (``ptqc check-export``), or None."""
    return next((get(n) for n in names() if get(n).is_export(Path(path))), None)


def check_written(backend: Backend, out) -> None:
    """An export directory must pass its own check right after writing (its model's custom code, if
    any, was trusted to load the model it was written from)."""
    problems = backend.check(out, trust_remote_code=True)
    if problems:
        raise PtqcError(f"the export in {out} does not pass its own check: {problems[0]}")
