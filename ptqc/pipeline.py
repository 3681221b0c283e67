"""Passes, their registry, pipeline parsing and the PassManager.

A pass is a small class::

    @register
    class MyPass(Pass):
        '''One line shown in `ptqc passes`.

        More text for `ptqc passes mine`.'''
        name = "mine"
        requires = frozenset({"canonical"})     # graph properties that must hold before
        provides = frozenset({"weight_quant"})  # properties that hold after
        forbids = frozenset()                   # properties that must NOT hold yet ("run me before X")

        @dataclass
        class Options:
            bits: int = 4                       # typed, with defaults; strings are converted
            def validate(self): ...             # optional: raise PtqcError for bad values

        def run(self, qm, ctx) -> PassResult: ...

Pipelines are strings (``smooth:alpha=0.8,int8``: a token with ``=`` is an option of the pass
before it) or recipe files (YAML, see :func:`load_recipe`). The PassManager checks the whole
pipeline's requires/provides before running anything, then runs each pass, lints the graph
after it, and records its time and what it changed.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import sys
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ptqc.errors import PtqcError

PASSES: dict[str, type["Pass"]] = {}
ENTRY_POINT_GROUP = "ptqc.passes"


@dataclass
class NoOptions:
    pass


@dataclass
class PassResult:
    changed: bool = True
    summary: dict = field(default_factory=dict)  # short facts for the manifest and the log


@dataclass
class CalibConfig:
    """Where calibration tokens come from (``--calib`` and friends)."""
    path: str | None = None  # text / JSONL / Parquet or Arrow dir; None: the model's calib.txt or eval.txt
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    field: str = "text"
    batch_size: int = 8


def calib_config(recipe: dict | None = None, **cli) -> CalibConfig:
    """Calibration settings: command-line values override the recipe's ``calib:`` section."""
    raw = dict(recipe or {})
    if not isinstance(raw, dict):
        raise PtqcError("recipe 'calib:' must be a mapping (path, samples, seqlen, seed, field, batch_size)")
    raw.update({k: v for k, v in cli.items() if v is not None})
    known = {f.name: f.type for f in dataclasses.fields(CalibConfig)}
    bad = sorted(set(raw) - set(known))
    if bad:
        raise PtqcError(f"unknown calibration setting {bad[0]!r}; valid: {', '.join(known)}")
    cfg = CalibConfig(**{k: (str(v) if k == "path" else v) for k, v in raw.items()})
    for k in ("samples", "seqlen", "batch_size"):
        if not isinstance(getattr(cfg, k), int) or getattr(cfg, k) < 1:
            raise PtqcError(f"calibration {k}={getattr(cfg, k)!r} must be a positive integer")
    if cfg.seqlen < 2:
        raise PtqcError("calibration seqlen must be at least 2")
    return cfg


@dataclass
class PassContext:
    """What a pass may use besides the graph: device, calibration data, progress settings.

    ``calib`` is a :class:`CalibConfig` or directly a ``[samples, seqlen]`` tensor of token ids."""
    device: str = "cpu"
    quiet: bool = False
    calib: Any = None
    log: list = field(default_factory=list)
    _ids: Any = None

    @property
    def calib_batch_size(self) -> int:
        return self.calib.batch_size if isinstance(self.calib, CalibConfig) else 8

    def calibration_ids(self, qm):
        """The calibration token windows [samples, seqlen] (tokenized once, cached)."""
        import torch

        if isinstance(self.calib, torch.Tensor):
            return self.calib
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
    invalidates: ClassVar[frozenset] = frozenset()

    def __init__(self, **options):
        overrides = options.pop("overrides", None)
        self.options = make_options(self, options)
        self.overrides = parse_overrides(self, options, overrides)

    def options_for(self, qm, node) -> Any:
        """This pass's options for one module: the base options, then the model's precision plan
        (``qm.plan``, e.g. from the ``sensitive`` pass), then the recipe's ``overrides`` (last
        match wins). None means: leave this module alone (``skip: true`` / kept in float)."""
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


# ---- typed options ---------------------------------------------------------------------------
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])} (separate with |)"
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() == "none") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except PtqcError:
                pass
        raise PtqcError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c or str(value) == str(c):
                return c
        raise PtqcError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1]
        items = value.split("|") if isinstance(value, str) else list(value)
        return [_coerce(v, inner, where) for v in items if v != ""]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise PtqcError(f"{where}: {value!r} is not a bool (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise PtqcError(f"{where}: {value!r} is not an int")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise PtqcError(f"{where}: {value!r} is not an int") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise PtqcError(f"{where}: {value!r} is not a number") from None
    if tp is str:
        return str(value)
    return value


def option_fields(cls: type[Pass]) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(cls.Options)
    out = []
    for f in dataclasses.fields(cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append((f.name, hints[f.name], default))
    return out


def describe_options(cls: type[Pass]) -> str:
    fields = option_fields(cls)
    if not fields:
        return "(no options)"
    return ", ".join(f"{n}={_fmt(d)} ({_type_name(t)})" for n, t, d in fields)


def _fmt(v) -> str:
    if isinstance(v, list):
        return "|".join(map(str, v))
    return str(v)


def parse_overrides(p: Pass, base: dict, raw) -> list[tuple[str, dict | None]]:
    """Per-module option overrides of a recipe entry, checked now (typed, validated)::

        overrides:                         # a mapping: pattern -> options, or "skip"
          "layers.0.*": {bits: 8}
          down_proj: {group: 64, damp: 0.1}
          lm_head: skip
        overrides:                         # or a list with "match:"
          - {match: "layers.3[12].*", lr: 1.0e-3, epochs: 20}
    """
    if raw is None:
        return []
    where = f"pass {p.name} overrides"
    items = []
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        for e in raw:
            if not isinstance(e, dict) or "match" not in e:
                raise PtqcError(f"{where}: each list entry needs 'match: PATTERN' (got {e!r})")
            e = dict(e)
            items.append((str(e.pop("match")), e))
    else:
        raise PtqcError(f"{where}: give a mapping pattern -> options (or a list of {{match: ..., ...}})")
    out = []
    for pattern, ov in items:
        if ov in ("skip", "float") or (isinstance(ov, dict) and (ov.get("skip") or ov.get("float"))):
            out.append((str(pattern), None))
            continue
        if not isinstance(ov, dict):
            raise PtqcError(f"{where}: {pattern!r} must map to options or 'skip' (got {ov!r})")
        merged = make_options(p, {**base, **ov})  # typed and validated like the pass's own options
        out.append((str(pattern), {k: getattr(merged, k) for k in ov}))
    return out


def make_options(p: Pass | type[Pass], raw: dict):
    cls = p if isinstance(p, type) else type(p)
    fields = {n: t for n, t, _ in option_fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise PtqcError(f"pass {cls.name}: unknown option {unknown[0]!r}; valid options: {describe_options(cls)}")
    values = {k: _coerce(v, fields[k], f"pass {cls.name} option {k}") for k, v in raw.items()}
    opts = cls.Options(**values)
    validate = getattr(opts, "validate", None)
    if validate is not None:
        try:
            validate()
        except PtqcError as e:
            raise PtqcError(f"pass {cls.name}: {e}") from None
    return opts


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


def load_entry_points() -> list[str]:
    names = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001
            raise PtqcError(f"cannot load pass plugin entry point {ep.name!r} ({ep.value}): {e}") from None
        if isinstance(obj, type) and issubclass(obj, Pass):
            register(obj)
        names.append(ep.name)
    return names


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


def match_module(path: str, role: str | None, patterns) -> bool:
    """Does a module match any pattern? A pattern matches the full module path, a suffix of it
    (``down_proj`` or ``layers.3.*``) or the module's role (``lm_head``, ``down``)."""
    for pat in patterns:
        if pat == role or fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(path, "*." + pat):
            return True
    return False


# ---- the pass manager ------------------------------------------------------------------------
def check_order(passes: list[Pass], initial: set[str]) -> None:
    """Check the whole pipeline's requires/provides/forbids before anything runs."""
    load_builtin_passes()
    props = set(initial)
    for i, p in enumerate(passes):
        missing = sorted(set(p.requires) - props)
        if missing:
            providers = sorted(n for n, c in PASSES.items() if missing[0] in c.provides)
            hint = f"; run one of: {', '.join(providers)} before it" if providers else ""
            raise PtqcError(f"pass {p.name!r} requires {missing[0]!r}, which no earlier pass provides{hint}")
        clash = sorted(set(p.forbids) & props)
        if clash:
            earlier = [q.name for q in passes[:i] if clash[0] in q.provides]
            who = earlier[-1] if earlier else "an earlier step"
            raise PtqcError(f"pass {p.name!r} must run before {who!r} ({who} provides {clash[0]!r}); reorder the pipeline")
        props = (props - set(p.invalidates)) | set(p.provides)


def lint(qm) -> None:
    """Structural and type checks of a QModel; raises PtqcError describing the first problem."""
    from ptqc import ops
    from ptqc.ir import propagate

    try:
        qm.graph.lint()
    except Exception as e:  # noqa: BLE001
        raise PtqcError(f"graph is malformed: {e}") from None
    for n in qm.graph.nodes:
        if n.op == "get_attr" and n.target not in qm.store:
            raise PtqcError(f"node {n.name} reads weight {n.target!r}, which is not in the weight store")
        if n.op == "call_function" and n.target == ops.LINEAR and "role" not in n.meta.get("ptqc", {}):
            raise PtqcError(f"linear {n.name} has no ptqc metadata (module/layer/role)")
    propagate(qm.graph, qm.store)


def _snapshot(qm) -> tuple[Counter, dict]:
    ops_count = Counter(_short(n.target) for n in qm.graph.nodes if n.op == "call_function")
    weights = {n.target: qm.store.written.get(n.target, 0) for n in qm.graph.nodes if n.op == "get_attr"}
    return ops_count, weights


def _short(target) -> str:
    s = str(target)
    return s.removesuffix(".default").removeprefix("aten.") if s.startswith(("aten.", "ptqc.")) else getattr(target, "__name__", s)


class PassManager:
    def __init__(self, passes: list[Pass], *, check: bool = True, dump_after=(), dump=None):
        self.passes = list(passes)
        self.check = check
        self.dump_after = set(dump_after)
        known = {p.name for p in self.passes} | {"all"}
        bad = sorted(self.dump_after - known)
        if bad:
            raise PtqcError(f"--dump-after {bad[0]!r} names no pass in the pipeline; use one of: {', '.join(sorted(known))}")
        self.dump = dump  # callable(index, pass, qm)

    def run(self, qm, ctx: PassContext | None = None) -> list[dict]:
        ctx = ctx or PassContext()
        check_order(self.passes, qm.properties)
        records = []
        for i, p in enumerate(self.passes):
            before_ops, before_w = _snapshot(qm)
            t0 = time.perf_counter()
            result = p.run(qm, ctx) or PassResult()
            seconds = time.perf_counter() - t0
            qm.properties = (qm.properties - set(p.invalidates)) | set(p.provides)
            if self.check:
                try:
                    lint(qm)
                except PtqcError as e:
                    raise PtqcError(f"after pass {p.name!r}: {e}") from None
            after_ops, after_w = _snapshot(qm)
            delta = {k: after_ops[k] - before_ops[k] for k in set(before_ops) | set(after_ops)
                     if after_ops[k] != before_ops[k]}
            rec = {
                "pass": p.name,
                "options": dataclasses.asdict(p.options),
                **({"overrides": [[k, v if v is not None else "skip"] for k, v in p.overrides]}
                   if getattr(p, "overrides", None) else {}),
                "seconds": round(seconds, 4),
                "changed": bool(result.changed),
                "ops_delta": dict(sorted(delta.items())),
                "weights_added": len(set(after_w) - set(before_w)),
                "weights_changed": sum(1 for k in set(after_w) & set(before_w) if after_w[k] != before_w[k]),
                "summary": result.summary,
            }
            qm.history.append(rec)
            records.append(rec)
            if self.dump and (p.name in self.dump_after or "all" in self.dump_after):
                self.dump(i, p, qm)
        return records
