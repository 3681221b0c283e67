"""Passes, their registry and plugins, pipeline parsing.

A pass is a small class::

    @register
    class MyPass(Pass):
        '''One line shown in `ptqc passes`.

        More text for `ptqc passes mine`.'''
        name = "mine"
        requires = frozenset({"canonical"})     # graph properties that must hold before
        provides = frozenset({"weight_quant"})  # properties that hold after (checked, see ptqc.passmanager)
        forbids = frozenset()                   # properties that must NOT hold yet ("run me before X")

        @dataclass
        class Options:                          # or extend ptqc.options.WeightOptions / Selection
            bits: int = 4                       # typed, with defaults; strings are converted
            def validate(self): ...             # optional: raise PtqcError for bad values

        def run(self, qm, ctx) -> PassResult: ...

Pipelines are strings (``smooth:alpha=0.8,int8``: a token with ``=`` is an option of the pass
before it) or recipe files (YAML, see :func:`load_recipe`); :func:`complete` adds what
``ptqc compile`` appends (lowering, packing). Typed options live in :mod:`ptqc.options`, the
PassManager that checks and runs a pipeline in :mod:`ptqc.passmanager`.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ptqc.errors import PtqcError
from ptqc.options import (CalibConfig, NoOptions, calib_config, describe_options, make_options,  # noqa: F401
                          option_fields, parse_overrides)

PASSES: dict[str, type["Pass"]] = {}
ENTRY_POINT_GROUP = "ptqc.passes"
TARGETS = ("torch", "ascend")


@dataclass
class PassResult:
    changed: bool = True
    summary: dict = field(default_factory=dict)  # short facts for the manifest and the log


@dataclass
class PassContext:
    """What a pass may use besides the graph: device, calibration data, progress settings.

    ``calib`` is a :class:`CalibConfig` or directly a ``[samples, seqlen]`` tensor of token ids."""
    device: str = "cpu"
    quiet: bool = False
    calib: Any = None
    log: list = field(default_factory=list)
    checkpoints: Any = None  # ptqc.resume.Checkpoints: per-layer checkpoints of the calibration loops
    _ids: Any = None

    @property
    def calib_batch_size(self) -> int:
        return self.calib.batch_size if isinstance(self.calib, CalibConfig) else 8

    @property
    def calibration_used(self) -> bool:
        """Has a pass read the calibration data (:meth:`calibration_ids`)?"""
        return self._ids is not None

    def calibration_ids(self, qm):
        """The calibration token windows [samples, seqlen] (tokenized once, cached)."""
        import torch

        if self._ids is None and isinstance(self.calib, torch.Tensor):
            self._ids = self.calib
        if self._ids is None:
            from ptqc import data, evaluate

            cfg = self.calib or CalibConfig()
            path = cfg.path or data.default_calib(qm.source, qm)
            tok = evaluate.load_tokenizer(qm.source)
            self._ids = data.calibration_batches(tok, path, cfg.samples, cfg.seqlen, seed=cfg.seed,
                                                 text_field=cfg.field)
        return self._ids

    def progress(self, iterable, **kw):
        from ptqc.progress import bar

        return bar(iterable, quiet=self.quiet, **kw)

    def info(self, msg: str) -> None:
        self.log.append(msg)
        if not self.quiet:
            print(msg, file=sys.stderr)


class Pass:
    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[frozenset] = frozenset({"canonical"})
    provides: ClassVar[frozenset] = frozenset()
    forbids: ClassVar[frozenset] = frozenset()

    def __init__(self, **options):
        overrides = options.pop("overrides", None)
        self.options = make_options(self, options)
        self.overrides = parse_overrides(self, options, overrides)

    def options_for(self, qm, node) -> Any:
        """This pass's options for one module: the base options, then the model's precision plan
        (``qm.plan``, e.g. from the ``sensitive`` pass), then the recipe's ``overrides`` (last
        match wins). None means: leave this module alone (``skip: true`` / kept in float)."""
        from ptqc.patterns import match_module

        m = node.meta.get("ptqc", {}) if hasattr(node, "meta") else {"module": node}
        module, role = m.get("module", ""), m.get("role")
        fields = {f.name for f in dataclasses.fields(self.options)}
        changes: dict = {}
        plan = (getattr(qm, "plan", None) or {}).get(module)
        if plan:
            if plan.get("skip"):
                return None
            changes.update({k: v for k, v in plan.items() if k in fields})
        for pattern, ov in self.overrides:
            if match_module(module, role, [pattern]):
                if ov is None:
                    return None
                changes.update(ov)
        return dataclasses.replace(self.options, **changes) if changes else self.options

    def run(self, qm, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        opts = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(self.options).items())
        return f"{self.name}:{opts}" if opts else self.name

    @classmethod
    def doc(cls) -> str:
        return (cls.__doc__ or "").strip()


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry (plugins use it too)."""
    if not cls.name:
        raise PtqcError(f"pass class {cls.__name__} has no name")
    if not dataclasses.is_dataclass(cls.Options):
        raise PtqcError(f"pass {cls.name}: Options must be a dataclass")
    PASSES[cls.name] = cls
    return cls


# ---- registry, plugins -----------------------------------------------------------------------
_builtins_loaded = False


def load_builtin_passes() -> None:
    """Import every module of ptqc.passes, then the ptqc.passes entry-point group."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import pkgutil

    import ptqc.passes as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"ptqc.passes.{m.name}")
    load_entry_points()


def load_entry_points() -> None:
    """Register the pass classes of the ptqc.passes entry-point group (other packages' passes)."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001
            raise PtqcError(f"cannot load pass plugin entry point {ep.name!r} ({ep.value}): {e}") from None
        if isinstance(obj, type) and issubclass(obj, Pass):
            register(obj)


def load_plugin(path: str | Path) -> list[str]:
    """Import a plugin file; the passes it registers become available. Returns their names."""
    p = Path(path)
    if not p.is_file():
        raise PtqcError(f"plugin file {p} does not exist")
    before = dict(PASSES)
    mod_name = f"ptqc_plugin_{p.stem}_{abs(hash(str(p.resolve()))) % 10**8}"
    spec = importlib.util.spec_from_file_location(mod_name, p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except PtqcError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PtqcError(f"cannot load plugin {p}: {type(e).__name__}: {e}") from None
    return [n for n, c in PASSES.items() if before.get(n) is not c]


def get_pass(name: str) -> type[Pass]:
    load_builtin_passes()
    if name not in PASSES:
        raise PtqcError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


# ---- pipeline parsing ------------------------------------------------------------------------
def parse_pipeline(text: str) -> list[Pass]:
    """``"smooth:alpha=0.8,int8"`` -> [Smooth(alpha=0.8), Int8()]."""
    specs: list[tuple[str, dict]] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if ":" in tok:
            name, _, opt = tok.partition(":")
            specs.append((name.strip(), {}))
            tok = opt
        elif "=" not in tok:
            specs.append((tok, {}))
            continue
        if not specs:
            raise PtqcError(f"pipeline {text!r}: option {tok!r} comes before any pass name")
        if "=" not in tok:
            raise PtqcError(f"pipeline {text!r}: {tok!r} is not option=value")
        k, _, v = tok.partition("=")
        specs[-1][1][k.strip()] = v.strip()
    if not specs:
        raise PtqcError("empty pipeline; give --passes NAME[,NAME...] or --recipe FILE")
    return [get_pass(n)(**o) for n, o in specs]


def load_recipe(path: str | Path) -> tuple[list[Pass], dict]:
    """A YAML recipe::

        passes:
          - rtn: {bits: 4, group: 128}
          - smooth                # no options
          - name: int8            # or name + options inline
            static: true

    Returns the passes and the remaining top-level settings (e.g. dtype, calib)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        from ptqc import recipes

        shipped = recipes.path(str(path))
        if shipped is None:
            raise PtqcError(f"recipe file {p} does not exist and is not a shipped recipe "
                            f"({', '.join(recipes.names())})")
        p = shipped
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PtqcError(f"cannot read recipe {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
        raise PtqcError(f"recipe {p} needs a top-level 'passes:' list")
    passes = []
    for item in data["passes"]:
        if isinstance(item, str):
            name, opts = item, {}
        elif isinstance(item, dict) and "name" in item:
            opts = dict(item)
            name = opts.pop("name")
        elif isinstance(item, dict) and len(item) == 1:
            (name, opts), = item.items()
            opts = opts or {}
        else:
            raise PtqcError(f"recipe {p}: cannot read pass entry {item!r}")
        passes.append(get_pass(str(name))(**opts))
    rest = {k: v for k, v in data.items() if k != "passes"}
    return passes, rest


def complete(passes: list[Pass], *, target: str = "torch", pack: bool = True) -> list[Pass]:
    """The pipeline ``ptqc compile`` runs for ``passes``: the ``ascend`` lowering appended for
    target ascend (unless given), and ``pack`` (real <= 4-bit storage) before the first lowering
    pass when a pass quantizes weights (unless given, or ``pack`` is false)."""
    if target not in TARGETS:
        raise PtqcError(f"unknown target {target!r}; use one of: {', '.join(TARGETS)}")
    out = list(passes)
    if target == "ascend" and "ascend" not in {p.name for p in out}:
        out.append(get_pass("ascend")())
    if pack and any("weight_quant" in p.provides for p in out) and "pack" not in {p.name for p in out}:
        at = next((i for i, p in enumerate(out) if "lowered" in p.provides), len(out))
        out.insert(at, get_pass("pack")())
    return out


def __getattr__(name: str):
    """``pipeline.PassManager`` and friends: they live in :mod:`ptqc.passmanager`."""
    if name in ("PassManager", "check_order", "lint", "_short"):
        from ptqc import passmanager

        return getattr(passmanager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
