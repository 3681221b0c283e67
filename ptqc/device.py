"""The one place ptqc decides where tensors live (``--device cpu|cuda|npu``; CPU by default).

Passes never name a device: they receive ``ctx.device``. torch_npu is optional and only imported
here, when the user asks for ``npu``.
"""
from __future__ import annotations

import importlib.util

import torch

from ptqc.errors import PtqcError

DEVICES = ("cpu", "cuda", "npu")


def npu_available() -> bool:
    """True if torch_npu imports and sees an NPU. Never imports torch_npu unless it is installed."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401

        return torch.npu.is_available()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a torch_npu without CANN fails in many ways
        return False


def resolve(name: str | None) -> str:
    name = (name or "cpu").lower()
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise PtqcError(f"unknown device {name!r}; use one of: {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise PtqcError("--device cuda was given but no CUDA device is available; use --device cpu")
    if kind == "npu" and not npu_available():
        raise PtqcError("--device npu was given but torch_npu (with CANN) is not installed or sees no NPU; "
                        "install ptqc[npu] on an Ascend machine or use --device cpu")
    return name


def dist_backend(name: str | None) -> str:
    """The torch.distributed backend for ranks calibrating on device ``name``: gloo on CPU, nccl on
    CUDA, hccl on an NPU (torch_npu registers it)."""
    kind = (name or "cpu").split(":")[0]
    if kind == "npu":
        import torch_npu  # noqa: F401

        return "hccl"
    return {"cpu": "gloo", "cuda": "nccl"}[kind]
