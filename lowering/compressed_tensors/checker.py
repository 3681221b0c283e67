"""Checking a compressed-tensors export directory: its quantization_config, then every tensor its
model and config groups need (dtype and shape, from the safetensors headers), and no other."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ptqc import families
from ptqc.errors import PtqcError
from ptqc.lowering.compressed_tensors.config import CONFIG, FLOAT_DTYPES, FORMATS, QUANT_METHOD, scheme_of, \
    without_quant
from ptqc.model import build_meta_model, load_config, tensor_specs, weight_files

STRATEGIES = {"weights": ("channel", "group", "tensor"), "input_activations": ("token", "group", "tensor")}
ARGS_RULES = (  # (problem of the QuantizationArgs ``a`` of ``role``, message)
    (lambda role, a: a.get("type", "int") != "int", "{role} type {type!r} is not supported (ptqc reads int)"),
    (lambda role, a: not isinstance(a.get("num_bits"), int) or not 1 <= a["num_bits"] <= 8,
     "{role} num_bits {num_bits!r} is outside 1..8"),
    (lambda role, a: a.get("strategy") not in STRATEGIES[role], "{role} strategy {strategy!r} is not one of {allowed}"),
    (lambda role, a: a.get("strategy") == "group" and not (isinstance(a.get("group_size"), int)
                                                          and a["group_size"] > 0),
     "{role} strategy group needs a positive group_size, found {group_size!r}"),
    (lambda role, a: role == "weights" and a.get("dynamic"), "weights cannot be dynamic"),
    (lambda role, a: a.get("strategy") == "token" and not a.get("dynamic"),
     "input_activations strategy token must be dynamic"),
)


def _group_problems(gname: str, g, top_format) -> list[str]:
    if not isinstance(g, dict):
        return [f"config group {gname} is not an object"]
    p = []
    if not isinstance(g.get("targets"), list) or not g["targets"]:
        p.append(f"config group {gname} has no targets list")
    fmt = g.get("format") or top_format
    if fmt not in FORMATS:
        p.append(f"config group {gname}: format {fmt!r} is not checked by ptqc (supported: {', '.join(FORMATS)})")
    if g.get("weights") is None:
        p.append(f"config group {gname} has no weights arguments")
    for role in STRATEGIES:
        a = g.get(role)
        if a is not None and not isinstance(a, dict):
            p.append(f"config group {gname}: {role} is not an object")
        elif a is not None:
            fields = {"role": role, "type": a.get("type"), "num_bits": a.get("num_bits"), "strategy": a.get("strategy"),
                      "group_size": a.get("group_size"), "allowed": ", ".join(STRATEGIES[role])}
            p += [f"config group {gname}: {msg.format(**fields)}" for bad, msg in ARGS_RULES if bad(role, a)]
    return p


def _config(path: Path) -> tuple[dict, list[str]]:
    """The config of an export and the problems of its quantization_config (nothing else is checked then)."""
    if not (path / CONFIG).is_file():
        return {}, [f"{CONFIG} is missing"]
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        return {}, [f"{CONFIG} is not valid JSON: {e}"]
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return config, [f"{CONFIG} has no quantization_config"]
    if q.get("quant_method") != QUANT_METHOD:
        return config, [f"quantization_config.quant_method is {q.get('quant_method')!r}, expected {QUANT_METHOD!r}"]
    problems: list[str] = []
    if q.get("quantization_status", "compressed") != "compressed":
        problems.append(f"quantization_status is {q.get('quantization_status')!r}; ptqc checks compressed "
                        "exports (saved with save_compressed=True)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return config, problems + ["quantization_config has no config_groups"]
    for gname, g in groups.items():
        problems += _group_problems(gname, g, q.get("format"))
    return config, problems


def _modules(path: Path, trust_remote_code: bool = False):
    """(module name -> (class names, in, out, has bias) of every Linear, parameter name -> shape)
    from the meta model of ``path``'s config."""
    model = build_meta_model(without_quant(load_config(path, trust_remote_code)), torch.float32, trust_remote_code)
    linears = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            linears[name] = (tuple(c.__name__ for c in type(m).__mro__), m.in_features, m.out_features,
                             m.bias is not None)
    params = {n: tuple(p.shape) for n, p in model.state_dict(keep_vars=True).items()}  # persistent buffers too
    _expert_linears(linears, params)
    return linears, params


def _expert_linears(linears: dict, params: dict) -> None:
    """transformers' fused MoE experts (``X.experts.gate_up_proj`` [E, 2I, H], ``X.experts.down_proj``
    [E, H, I]) as the per-expert Linears llm-compressor quantizes and saves (``X.experts.e.gate_proj``...),
    and their router ``X.gate`` (a Linear there: ``ignore`` keeps it float under a ``Linear`` target)."""
    for pname in [n for n in params if n.endswith(".experts.gate_up_proj")]:
        prefix = pname.removesuffix(".gate_up_proj")
        router = f"{prefix.removesuffix('.experts')}.gate"
        if len(params.get(f"{router}.weight", ())) == 2:
            linears[router] = (("Linear",), params[f"{router}.weight"][1], params[f"{router}.weight"][0], False)
        e_count, two_i, h = params.pop(pname)
        down = params.pop(f"{prefix}.down_proj")
        for e in range(e_count):
            for proj, k, n_out in (("gate_proj", h, two_i // 2), ("up_proj", h, two_i // 2),
                                   ("down_proj", down[2], down[1])):
                linears[f"{prefix}.{e}.{proj}"] = (("Linear",), k, n_out, False)
                params[f"{prefix}.{e}.{proj}.weight"] = (n_out, k)


def _linear_tensors(name: str, g: dict, fmt: str, k: int, n_out: int, bias: bool) -> list[tuple]:
    """The tensors of a quantized linear: (name, dtypes (None: must be absent), shapes, why)."""
    w, a = g["weights"], g.get("input_activations")
    bits, strategy = w["num_bits"], w["strategy"]
    why = f"{fmt} {strategy} W{bits}"
    cols = 1 if strategy == "channel" else -(-k // w["group_size"]) if strategy == "group" else None
    scale = ((n_out, cols),) if cols else ((1,), ())
    packed, asym = fmt == "pack-quantized", not w.get("symmetric", True)
    static = a is not None and not a.get("dynamic")
    rules = (  # (applies, suffix, dtypes, shapes, why)
        (packed, "weight_packed", ("I32",), ((n_out, -(-k * bits // 32)),), why),
        (packed, "weight_shape", ("I64", "I32"), ((2,),), why),
        (packed, "weight", None, None, why),
        (not packed, "weight", ("I8",), ((n_out, k),), why),
        (True, "weight_scale", FLOAT_DTYPES, scale, why),
        (asym and packed and cols, "weight_zero_point", ("I32",), ((-(-n_out * bits // 32), cols),),
         f"{why} asymmetric"),
        (asym and not (packed and cols), "weight_zero_point", ("I8",), scale, f"{why} asymmetric"),
        (bias, "bias", FLOAT_DTYPES, ((n_out,),), "the linear's bias"),
        (static, "input_scale", FLOAT_DTYPES, ((1,), ()), "static input_activations"),
        (static and not a.get("symmetric", True), "input_zero_point", ("I8",), ((1,), ()),
         "static asymmetric input_activations"),
    )
    return [(f"{name}.{suffix}", *rest) for applies, suffix, *rest in rules if applies]


class _Expected:
    """The tensors an export needs (name -> why), checked against the files' ``meta`` under the model's
    names (``to_model``: file name -> model name where they differ); messages use the files' names."""

    def __init__(self, meta: dict, to_model: dict, problems: list[str]):
        self.meta = {to_model.get(n, n): v for n, v in meta.items()}
        self.shown = {to_model[n]: n for n in meta if n in to_model}
        self.why, self.problems = {}, problems

    def want(self, model_name: str, dtypes, shapes, why: str) -> None:
        self.why[model_name] = why
        name = self.shown.get(model_name, model_name)
        if dtypes is None:
            if model_name in self.meta:
                self.problems.append(f"{name}: a pack-quantized linear stores weight_packed, not weight")
            return
        if model_name not in self.meta:
            self.problems.append(f"{name}: {why} needs it, but it is in no weight file")
            return
        s, dt = self.meta[model_name]
        if dt not in dtypes or (shapes is not None and s not in shapes):
            exp = " or ".join(str(list(x)) for x in shapes) if shapes is not None else "any shape"
            self.problems.append(f"{name}: expected {'/'.join(dtypes)} {exp}, found {dt} {list(s)}")


def _want_kv(ex: _Expected, kv, params: dict) -> None:
    if kv and (not isinstance(kv, dict) or kv.get("strategy") != "tensor" or kv.get("type", "int") != "int"
               or not kv.get("symmetric", True) or kv.get("dynamic")):
        ex.problems.append(f"kv_cache_scheme {kv!r} is not checked by ptqc (it reads static per-tensor symmetric int)")
    elif kv:
        attn = sorted({n.rpartition(".")[0] for n in params if n.endswith(("k_proj.weight", "k_proj.bias"))})
        for m in attn:
            for s in ("k_scale", "v_scale"):
                ex.want(f"{m.rpartition('.')[0]}.{s}", FLOAT_DTYPES, ((1,), ()), "kv_cache_scheme")


def check(path, trust_remote_code: bool = False) -> list[str]:
    """Problems of a compressed-tensors export directory (empty list: valid). Each is one line. A model
    with custom code (``auto_map``) is built only with ``trust_remote_code``."""
    path = Path(path)
    config, problems = _config(path)
    if problems:
        return problems
    q = config["quantization_config"]
    try:
        files = weight_files(path)
    except PtqcError as e:
        return [str(e)]
    meta = tensor_specs(sorted(set(files.values())))
    missing = [f"{n} is in the index but in no weight file" for n in sorted(set(files) - set(meta))]
    try:
        to_model = families.model_names(meta, load_config(path, trust_remote_code))  # checkpoint names -> the model's
        linears, params = _modules(path, trust_remote_code)
    except PtqcError as e:
        return missing + [f"cannot build the model of {CONFIG}: {e}"]
    ex = _Expected(meta, to_model, missing)
    schemes = {name: scheme_of(name, m[0], q) for name, m in linears.items()}
    quantized = {name: g for name, g in schemes.items() if g is not None}
    for name, g in quantized.items():
        for tensor in _linear_tensors(name, g, g.get("format") or q.get("format"), *linears[name][1:]):
            ex.want(*tensor)
    if not quantized:
        ex.problems.append("no Linear module of the model matches the targets of any config group")
    for pname, shape in params.items():
        mod, _, leaf = pname.rpartition(".")
        if pname not in ex.why and not (leaf in ("weight", "bias") and mod in quantized):
            ex.want(pname, FLOAT_DTYPES, (shape,), "the model")
    _want_kv(ex, q.get("kv_cache_scheme"), params)
    tied = config.get("tie_word_embeddings", False)
    ex.problems += [f"{ex.shown.get(n, n)} is in the weight files but no module or scheme of {CONFIG} uses it"
                    for n in sorted(set(ex.meta) - set(ex.why)) if not (tied and n == "lm_head.weight")]
    return ex.problems
