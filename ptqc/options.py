"""Typed pass options: the dataclasses passes declare, and how text and YAML values become them.

A pass's ``Options`` is a dataclass; pipeline strings and recipes give strings or YAML values,
which :func:`make_options` converts to the declared types (int, float, bool, str, Literal,
lists separated by ``|``, unions) and validates (``Options.validate``). Shared declarations:

    Selection       include / exclude module patterns (every pass that picks modules)
    WeightOptions   bits, group, sym + include / exclude, validated, ``weight_spec()``

:class:`CalibConfig` is the same for the calibration settings (``--calib`` and friends).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ptqc.errors import PtqcError


KEEP_FLOAT = ("lm_head", "router", "shared_expert_gate")  # default exclude: head, MoE routing gates


def modules(*patterns: str):
    """A list-of-module-patterns option defaulting to ``patterns``."""
    return field(default_factory=lambda: list(patterns))


@dataclass
class NoOptions:
    pass


@dataclass
class Selection:
    """Which modules a pass works on: patterns (full path, suffix such as ``down_proj`` or
    ``layers.0.*``, or a role such as ``lm_head``) separated by ``|``."""
    include: list[str] = modules("*")
    exclude: list[str] = modules(*KEEP_FLOAT)


@dataclass
class WeightOptions:
    """Options of a weight quantization pass: the grid, then the modules it applies to."""
    bits: int = 4
    group: int = 128  # 0 = per output channel
    sym: bool = False
    include: list[str] = modules("*")
    exclude: list[str] = modules(*KEEP_FLOAT)

    def weight_spec(self):
        """The QuantSpec of the weights under these options (None: weights stay float)."""
        from ptqc.quant import QuantSpec

        return QuantSpec(self.bits, self.group, self.sym)

    def validate(self):
        check_weight_bits(self.bits, self.group)
        self.weight_spec()


def check_weight_bits(bits: int, group: int, prefix: str = "") -> None:
    if not 2 <= bits <= 8:
        raise PtqcError(f"{prefix}bits={bits} is outside 2..8")
    if group < 0:
        raise PtqcError(f"{prefix}group={group} must be 0 (per channel) or a positive group size")


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
    known = [f.name for f in dataclasses.fields(CalibConfig)]
    if not isinstance(recipe or {}, dict):
        raise PtqcError(f"recipe 'calib:' must be a mapping ({', '.join(known)}), not {recipe!r}")
    raw = {**(recipe or {}), **{k: v for k, v in cli.items() if v is not None}}
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


# ---- conversion ------------------------------------------------------------------------------
def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])} (separate with |)"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def parse_bool(value) -> bool:
    """A bool, or a string such as true/false, yes/no, on/off, 1/0; ValueError otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError(value)


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or isinstance(value, str) and value.lower() == "none"):
            return None
        for a in args:
            if a is type(None) or value is None:
                continue
            try:
                return _coerce(value, a, where)
            except PtqcError:
                pass
        raise PtqcError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if value is None:
        raise PtqcError(f"{where}: needs a value ({_type_name(tp)})")
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
        try:
            return parse_bool(value)
        except ValueError:
            raise PtqcError(f"{where}: {value!r} is not a bool (true/false)") from None
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


def option_fields(cls) -> list[tuple[str, Any, Any]]:
    """(name, type, default) of a pass class's options."""
    hints = typing.get_type_hints(cls.Options)
    return [(f.name, hints[f.name], f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
        for f in dataclasses.fields(cls.Options)]


def describe_options(cls) -> str:
    fields = option_fields(cls)
    if not fields:
        return "(no options)"
    return ", ".join(f"{n}={'|'.join(map(str, d)) if isinstance(d, list) else d} ({_type_name(t)})"
                     for n, t, d in fields)


def make_options(p, raw: dict):
    """The typed, validated options of pass (class or instance) ``p`` from raw values."""
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


def parse_overrides(p, base: dict, raw) -> list[tuple[str, dict | None]]:
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
