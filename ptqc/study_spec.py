"""The study file of ``ptqc study``: what to compile, with which seeds, and how to measure it.

A study is a YAML mapping (paths relative to the file)::

    models:                        # Hugging Face directories, or {name: N, path: P}
      - ../examples/tiny-qwen2
    pipelines:
      - name: FP                   # neither passes nor recipe: the float model (once per model)
      - name: RTN W{bits}          # a list of bits expands into one pipeline per entry
        method: RTN                # label of the plots' series (default: the name)
        passes: rtn:bits={bits},group=128
        bits: [8, 4, 3, 2]
      - {name: AWQ W4, method: AWQ, recipe: w4a16-awq, bits: 4}
    seeds: [0, 1, 2]               # calibration seeds (the window sampling)
    calibration: {samples: 32, seqlen: 256}   # path (default MODEL/calib.txt), field, batch_size
    evaluation:
      ppl: {seqlen: 256, max_windows: 40}     # texts: [FILE, ...] (default MODEL/eval.txt)
      collapse: {max_new_tokens: 32}          # greedy-generation collapse check, or false
      tasks: {names: [t1, t2], limit: 50, include_path: DIR}   # offline lm-eval (ptqc[eval])
      diagnose: false              # true: per-layer error vs the float model on the calibration windows
    dtype: float32
    plugins: []                    # pass plugin files

One protocol for every cell: a seed draws the same calibration windows for every pipeline of a
model (recipes' own ``calib:`` settings are ignored), and every cell of a model is measured on
the same evaluation windows. :func:`load` checks everything it can before anything runs and
raises :class:`PtqcError` with one line naming the bad entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ptqc.errors import PtqcError

TOP = {"models", "pipelines", "seeds", "calibration", "evaluation", "dtype", "plugins", "name"}
PIPELINE = {"name", "method", "passes", "recipe", "bits"}
CALIB = {"path": None, "samples": 32, "seqlen": 256, "field": "text", "batch_size": 8}
PPL = {"texts": None, "seqlen": 256, "max_windows": None, "batch_size": 8}
COLLAPSE = {"max_new_tokens": 32}
TASKS = {"names": None, "limit": None, "include_path": None, "batch_size": 8, "num_fewshot": None}
DIAGNOSE = {"samples": 8}
EVALUATION = {"ppl": PPL, "collapse": COLLAPSE, "tasks": TASKS, "diagnose": DIAGNOSE}
EVAL_DEFAULT_ON = {"ppl", "collapse"}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Pipeline:
    name: str
    method: str
    passes: str | None = None
    recipe: str | None = None
    bits: int | float | str | None = None

    @property
    def is_float(self) -> bool:
        return self.passes is None and self.recipe is None


@dataclass
class Study:
    path: Path
    name: str
    models: dict[str, Path]
    pipelines: list[Pipeline]
    seeds: list[int]
    calibration: dict
    evaluation: dict
    dtype: str = "float32"
    plugins: list[Path] = field(default_factory=list)


def _where(path, what: str) -> str:
    return f"study {path}: {what}"


def _mapping(value, defaults: dict, where: str) -> dict:
    """``value`` (a mapping or None) over ``defaults``; unknown keys raise."""
    if value is None or value is True:
        value = {}
    if not isinstance(value, dict):
        raise PtqcError(f"{where} must be a mapping ({', '.join(defaults)}), not {value!r}")
    bad = sorted(set(value) - set(defaults))
    if bad:
        raise PtqcError(f"{where}: unknown key {bad[0]!r}; valid: {', '.join(defaults)}")
    return {**defaults, **value}


def _positive(d: dict, keys, where: str, allow_none=()) -> None:
    for k in keys:
        v = d[k]
        if v is None and k in allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PtqcError(f"{where}: {k}={v!r} must be a positive integer")


def _file(base: Path, p, where: str, *, directory: bool = False) -> Path:
    q = (base / str(p)).resolve()
    ok = q.is_dir() if directory else q.exists()
    if not ok:
        raise PtqcError(f"{where}: {q} does not exist")
    return q


def _models(raw, base: Path, where) -> dict[str, Path]:
    if not isinstance(raw, list) or not raw:
        raise PtqcError(f"{where('models')} must be a non-empty list of model directories")
    out: dict[str, Path] = {}
    for i, m in enumerate(raw):
        w = where(f"models[{i}]")
        if isinstance(m, str):
            name, path = Path(m).name, m
        elif isinstance(m, dict) and set(m) <= {"name", "path"} and "path" in m:
            path = m["path"]
            name = str(m.get("name") or Path(path).name)
        else:
            raise PtqcError(f"{w} must be a directory or {{name: N, path: P}}, not {m!r}")
        p = _file(base, path, w, directory=True)
        if not (p / "config.json").is_file():
            raise PtqcError(f"{w}: {p} has no config.json (not a Hugging Face model directory)")
        if name in out:
            raise PtqcError(f"{w}: model name {name!r} is used twice; give {{name: N, path: P}}")
        out[name] = p
    return out


def _expand(i: int, item, where) -> list[Pipeline]:
    w = where(f"pipelines[{i}]")
    if isinstance(item, str):
        item = {"name": item, "passes": item}
    if not isinstance(item, dict) or "name" not in item:
        raise PtqcError(f"{w} must be a mapping with a name (and passes or recipe), not {item!r}")
    bad = sorted(set(item) - PIPELINE)
    if bad:
        raise PtqcError(f"{w}: unknown key {bad[0]!r}; valid: {', '.join(sorted(PIPELINE))}")
    if item.get("passes") and item.get("recipe"):
        raise PtqcError(f"{w}: give passes or recipe, not both")
    bits = item.get("bits")
    many = isinstance(bits, list)
    if many and "{bits}" not in str(item["name"]):
        raise PtqcError(f"{w}: a list of bits needs '{{bits}}' in the name, e.g. 'RTN W{{bits}}'")
    out = []
    for b in (bits if many else [bits]):
        name = str(item["name"]).replace("{bits}", str(b))
        passes = item.get("passes")
        out.append(Pipeline(name, str(item.get("method") or name),
                            None if passes is None else str(passes).replace("{bits}", str(b)),
                            None if item.get("recipe") is None else str(item["recipe"]), b))
    return out


def _pipelines(raw, where) -> list[Pipeline]:
    if not isinstance(raw, list) or not raw:
        raise PtqcError(f"{where('pipelines')} must be a non-empty list")
    out = [p for i, item in enumerate(raw) for p in _expand(i, item, where)]
    seen = set()
    for p in out:
        if p.name in seen:
            raise PtqcError(f"{where('pipelines')}: pipeline name {p.name!r} is used twice")
        seen.add(p.name)
    return out


def _seeds(raw, where) -> list[int]:
    raw = [0] if raw is None else raw
    if (not isinstance(raw, list) or not raw or len(set(raw)) != len(raw)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw)):
        raise PtqcError(f"{where('seeds')} must be a non-empty list of distinct integers, not {raw!r}")
    return list(raw)


def _evaluation(raw, base: Path, where) -> dict:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise PtqcError(f"{where('evaluation')} must be a mapping ({', '.join(EVALUATION)})")
    bad = sorted(set(raw) - set(EVALUATION))
    if bad:
        raise PtqcError(f"{where('evaluation')}: unknown key {bad[0]!r}; valid: {', '.join(EVALUATION)}")
    out = {}
    for k, defaults in EVALUATION.items():
        v = raw.get(k, k in EVAL_DEFAULT_ON)
        out[k] = None if v is False or v is None else _mapping(v, defaults, where(f"evaluation.{k}"))
    if out["ppl"] is None and out["tasks"] is None:
        raise PtqcError(f"{where('evaluation')}: measures nothing; keep ppl or give tasks")
    if out["ppl"]:
        _positive(out["ppl"], ("seqlen", "batch_size", "max_windows"), where("evaluation.ppl"), ("max_windows",))
        texts = out["ppl"]["texts"]
        if texts is not None:
            if not isinstance(texts, list) or not texts:
                raise PtqcError(f"{where('evaluation.ppl.texts')} must be a list of text files")
            out["ppl"]["texts"] = [str(_file(base, t, where("evaluation.ppl.texts"))) for t in texts]
    if out["collapse"]:
        _positive(out["collapse"], ("max_new_tokens",), where("evaluation.collapse"))
    if out["diagnose"]:
        _positive(out["diagnose"], ("samples",), where("evaluation.diagnose"))
    if out["tasks"]:
        _tasks(out["tasks"], base, where)
    return out


def _tasks(t: dict, base: Path, where) -> None:
    names = t["names"]
    names = [s.strip() for s in names.split(",")] if isinstance(names, str) else names
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise PtqcError(f"{where('evaluation.tasks.names')} must list lm-eval task names")
    t["names"] = names
    _positive(t, ("limit", "batch_size"), where("evaluation.tasks"), ("limit",))
    if t["include_path"] is not None:
        t["include_path"] = str(_file(base, t["include_path"], where("evaluation.tasks.include_path"),
                                      directory=True))


def _calibration(raw, base: Path, where) -> dict:
    c = _mapping(raw, CALIB, where("calibration"))
    _positive(c, ("samples", "seqlen", "batch_size"), where("calibration"))
    if c["seqlen"] < 2:
        raise PtqcError(f"{where('calibration')}: seqlen must be at least 2")
    if c["path"] is not None:
        c["path"] = str(_file(base, c["path"], where("calibration.path")))
    return c


def read(path) -> dict:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PtqcError(f"study file {p} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PtqcError(f"cannot read study {p}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(data, dict):
        raise PtqcError(f"study {p} must be a YAML mapping with models: and pipelines:")
    bad = sorted(set(data) - TOP)
    if bad:
        raise PtqcError(f"study {p}: unknown key {bad[0]!r}; valid: {', '.join(sorted(TOP))}")
    return data


def load(path) -> Study:
    """Read and check a study file (see the module docstring)."""
    p = Path(path).resolve()
    data = read(p)
    base = p.parent

    def where(what):
        return _where(p, what)

    dtype = data.get("dtype", "float32")
    if dtype not in DTYPES:
        raise PtqcError(f"{where('dtype')} {dtype!r} is not one of {', '.join(DTYPES)}")
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list):
        raise PtqcError(f"{where('plugins')} must be a list of plugin files")
    return Study(p, str(data.get("name") or p.stem), _models(data.get("models"), base, where),
                 _pipelines(data.get("pipelines"), where), _seeds(data.get("seeds"), where),
                 _calibration(data.get("calibration"), base, where), _evaluation(data.get("evaluation"), base, where),
                 dtype, [_file(base, x, where("plugins")) for x in plugins])
