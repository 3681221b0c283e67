"""The ``quantization_config`` of a compressed-tensors export: QuantizationArgs <-> ptqc quantizers,
reading it, and which config group quantizes a module."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from ptqc import quant
from ptqc.errors import PtqcError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
QUANT_METHOD = "compressed-tensors"
FORMATS = ("int-quantized", "pack-quantized", "naive-quantized")
VERSION = "0.19.0"  # the compressed-tensors version whose layout this follows
FLOAT_DTYPES = ("F32", "BF16", "F16")


def quant_args(bits: int, group: int, sym: bool, *, dynamic: bool, activation: bool) -> dict:
    """QuantizationArgs (as compressed-tensors serializes them) of a ptqc quantizer."""
    if group > 0:
        strategy = "group"
    elif group == -1:
        strategy = "tensor"
    else:
        strategy = "token" if activation else "channel"
    return {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": group if group > 0 else None,
            "strategy": strategy, "block_structure": None, "dynamic": dynamic, "actorder": None,
            "scale_dtype": None, "zp_dtype": None if sym else "torch.int8",
            "observer": None if dynamic else ("memoryless_minmax" if not activation else "minmax"),
            "observer_kwargs": {}}


def spec_of(args: dict) -> quant.QuantSpec:
    """The ptqc quantizer of QuantizationArgs."""
    group = {"group": args.get("group_size") or 0, "tensor": -1}.get(args["strategy"], 0)
    return quant.QuantSpec(args["num_bits"], group, bool(args.get("symmetric", True)))


def without_quant(config):
    """A copy of a transformers config without quantization_config (only the structure is read)."""
    c = copy.deepcopy(config)
    if getattr(c, "quantization_config", None) is not None:
        c.quantization_config = None
    return c


def read_quant_config(path) -> dict:
    """The ``quantization_config`` of a compressed-tensors export (PtqcError if there is none)."""
    f = Path(path) / CONFIG
    try:
        q = json.loads(f.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError) as e:
        raise PtqcError(f"cannot read {f}: {e}") from None
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise PtqcError(f"{f} has no quantization_config with quant_method {QUANT_METHOD!r}")
    return q


def is_export(path) -> bool:
    try:
        read_quant_config(path)
        return True
    except PtqcError:
        return False


def _match(name: str, classes: tuple[str, ...], targets) -> bool:
    for t in targets or ():
        if t.startswith("re:"):
            if re.match(t[3:], name):
                return True
        elif t == name or t in classes:
            return True
    return False


def scheme_of(name: str, classes: tuple[str, ...], qcfg: dict) -> dict | None:
    """The config group quantizing module ``name`` (None: float)."""
    if _match(name, classes, qcfg.get("ignore")):
        return None
    for g in (qcfg.get("config_groups") or {}).values():
        if _match(name, classes, g.get("targets")):
            return g
    return None
