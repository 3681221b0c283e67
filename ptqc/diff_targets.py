"""The sides of ``ptqc diff``: a spec ``PATH[:TARGET[,key=value...]]`` opened as a :class:`Target`.

``torch`` (the ptqc graph run by torch) is built in; :func:`register_target` adds more, and the
backends (:mod:`ptqc.backends`) offer theirs (``onnx``, ``onnx-int``, ``ascend``). A target is a class
with ``run(batch, names) -> {name: tensor}``; one whose ``option_types()`` names options accepts
``PATH:<name>,key=value,...``. A suffix that is not a target name is part of the path.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ptqc.errors import PtqcError
from ptqc.options import parse_bool
from ptqc.probes import Probe, capture, graph_probes, wanted

TARGETS: dict[str, type] = {}


def register_target(name: str):
    """Register a target usable as ``PATH:<name>`` in ``ptqc diff`` (class decorator)."""
    def deco(cls):
        cls.target = name
        TARGETS[name] = cls
        return cls
    return deco


def target_class(name: str) -> type | None:
    """The class of target ``name``: registered here, else offered by a backend; None if unknown."""
    if name in TARGETS:
        return TARGETS[name]
    from ptqc import backends

    b = backends.offering("targets", name)
    return None if b is None else b.targets[name]


def target_names() -> list[str]:
    from ptqc import backends

    return sorted({*TARGETS, *(t for n in backends.names() for t in backends.get(n).targets)})


class Target:
    """A model (QModel) and a way to compute the values of its graph nodes on token windows."""

    target = "?"

    def __init__(self, path: Path, qm, spec: str, options: dict | None = None):
        self.path, self.qm, self.spec = path, qm, spec
        self.options = parse_options(self, options or {})

    @classmethod
    def option_types(cls) -> dict[str, type]:
        """The spec options (``PATH:TARGET,key=value``) and their types."""
        return {}

    def probes(self) -> list[Probe]:
        """The comparable points of this side (default: from its ptqc graph)."""
        return graph_probes(self.qm)

    def info(self) -> dict:
        """Extra facts about this side for the report (options, lowering summary...)."""
        return {"options": self.options} if self.options else {}

    def prepare(self, names: list[str]) -> None:
        """Called once with the FX node names that ``run`` will be asked for."""

    def run(self, batch: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.path} ({self.target})"


@register_target("torch")
class TorchTarget(Target):
    """The ptqc graph executed by torch, layer by layer (ptqc.calib.LayerRunner)."""

    device = None

    def run(self, batch, names):
        from ptqc.calib import LayerRunner

        want = wanted(names)
        got: dict[str, torch.Tensor] = {}
        runner = LayerRunner(self.qm, [batch], device=self.device, check_finite=False)

        def hook(n, args, y, b):
            if n.name in want:
                capture(want, got, n.name, y)

        def logits(b, y):
            got["logits"] = y.detach().float().cpu()

        for key in runner.freeze():
            runner.run(key, hook=hook, on_output=logits if key == "suffix" else None)
        return got


def cast_parameters(qm, dtype) -> int:
    """Run a graph in another float dtype: cast its float model parameters (``*.weight`` /
    ``*.bias``) and set ``qm.dtype`` (before lowering: the kernels' output dtype); quantization
    parameters (scales, zero points) stay as compiled (float32). Returns the number cast."""
    if isinstance(dtype, str):
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise PtqcError(f"dtype={dtype!r} is not a float dtype; use float16, bfloat16 or float32")
        dtype = dt
    n = 0
    for name in qm.weight_names():
        if name.endswith((".weight", ".bias")) and qm.store.spec(name)[1].is_floating_point \
                and qm.store.spec(name)[1] != dtype:
            qm.store[name] = qm.store[name].to(dtype)
            n += 1
    qm.dtype = dtype
    return n


def parse_options(t, options: dict) -> dict:
    """Check and convert a target's spec options (strings from the spec, or typed values)."""
    out = {}
    types = t.option_types()
    for k, v in options.items():
        if k not in types:
            have = f"options: {', '.join(types)}" if types else "no options"
            raise PtqcError(f"diff target {t.target!r} has no option {k!r} ({have})")
        typ = types[k]
        try:
            out[k] = parse_bool(v) if typ is bool and isinstance(v, str) else typ(v)
        except ValueError:
            raise PtqcError(f"diff target {t.target!r}: option {k}={v!r} is not a {typ.__name__}") from None
    return out


def split_spec(spec: str) -> tuple[Path, str, dict]:
    """``out/:ascend,fuse=false,device=npu:0`` -> (Path('out'), 'ascend', {'fuse': 'false', 'device': 'npu:0'})."""
    spec = str(spec)
    cut = len(spec)
    while (i := spec.rfind(":", 0, cut)) >= 0:
        name, _, opts = spec[i + 1:].partition(",")
        pairs = [kv.partition("=") for kv in opts.split(",")] if opts else []
        if all(k and sep for k, sep, _ in pairs) and target_class(name) is not None:
            return Path(spec[:i] or "."), name, {k: v for k, _, v in pairs}
        cut = i
    path, sep, name = spec.rpartition(":")
    if sep and path and not Path(spec).exists() and Path(path).is_dir():
        raise PtqcError(f"unknown diff target {name.partition(',')[0]!r} in {spec!r}; targets: "
                        f"{', '.join(target_names())}")
    return Path(spec), "torch", {}


def parse_spec(spec: str) -> tuple[Path, str]:
    """``out/:onnx`` -> (Path('out'), 'onnx'); a suffix that is not a target is part of the path."""
    return split_spec(spec)[:2]


def open_target(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> Target:
    from ptqc import artifact

    path, name, options = split_spec(spec)
    if not path.is_dir():
        raise PtqcError(f"{path} is not a directory (give a model directory or a ptqc artifact)")
    cls = target_class(name)
    parse_options(cls, options)  # before loading anything
    qm = artifact.load_any(path, dtype, trust_remote_code)
    return cls(path, qm, spec, options)
