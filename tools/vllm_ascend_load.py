#!/usr/bin/env python
"""Load Ascend export directories with vllm-ascend's real loader on the CPU and report what
every parameter received.

Runs in the peer venv made by ``tools/vllm_ascend_env.py`` (vllm-ascend 0.23.0, vllm 0.23.0's
source on PYTHONPATH, CPU torch), not in ptqc's:

    $(python3 tools/vllm_ascend_env.py --print python) tools/vllm_ascend_load.py \
        EXPORT_DIR [EXPORT_DIR ...] [--dtype config|float16|bfloat16] [--json OUT.json]

Each directory is built as vLLM builds it (``EngineArgs(quantization="ascend")``, the model class
of its config, the Ascend linear / C8 methods of its ``quant_model_description.json``), loaded
and post-processed (``process_weights_after_loading``). Every parameter's ``weight_loader`` is
wrapped to record each tensor it receives (checkpoint name, shard id, dtype, shape). The report,
one JSON object per directory (``{"dirs": {DIR: report}}``):

    ok              true when it loaded (else ``error``: the exception's last line)
    dtype           the dtype it was built in: ``--dtype``, or (``config``, the default) its
                    config.json's ``torch_dtype``, which ``ptqc export --dtype`` sets
    params          parameter -> {"dtype", "shape" as created, "calls": [{"shard", "dtype", "shape",
                    "param_dtype", "sha256"} of each tensor its weight_loader received]}
    unfilled        parameters no tensor reached (vLLM lets these pass for post-processed layers)
    refilled        parameters a shard (or the whole tensor) reached more than once
    casts           parameter <- tensor of another dtype (vLLM casts silently)
    loaded          quantization tensors (int8 weights, scales, offsets, deq_scale, quant_bias, C8
                    scales, W4A8's second-level scales and scale_bias) after loading -> {"dtype",
                    "shape", "sha256"} (fused layers: qkv_proj, gate_up_proj, MoE experts'
                    w13_* [E, 2I, ...] / w2_* [E, H, ...], shard "<expert>.<w1|w3|w2>");
                    ``processed``: the same after process_weights_after_loading;
                    ``--save PREFIX`` also writes both as safetensors (``saved``)

MLA models (DeepSeek-V2/V3) load with vllm-ascend's MLA modules; their post-processing absorbs
``kv_b_proj`` with NPU kernels, so it stops there and the report says so in ``process_error``.

Setup (CPU, no NPU): a stub ``torch_npu`` (``Tensor.npu()`` returns the tensor: W4A8's
post-processing moves its scale there; ``npu_format_cast`` to NZ returns it), ``VLLM_PLUGINS=none``,
vLLM's CPU platform, the Ascend config, no NZ format, a gloo world of one process on loopback.
MoE blocks are vllm-ascend's ``AscendFusedMoE`` (registered for vLLM's ``FusedMoE`` as on the NPU)
with an MC2 group placeholder (its HCCL all-to-all is NPU-only).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import traceback
import types

os.environ["VLLM_PLUGINS"] = "none"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
QUANT_SUFFIXES = ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "deq_scale",
                  "quant_bias", "k_cache_scale", "k_cache_offset", "v_cache_scale", "v_cache_offset",
                  "weight_scale_second", "weight_offset_second", "scale_bias", "weight_packed", "left_trans",
                  "right_trans", "clip_ratio")
MOE_SUFFIXES = tuple(f"{w}_{s}" for w in ("w13", "w2") for s in ("weight", "weight_scale", "weight_offset",
                     "weight_scale_second", "weight_offset_second", "scale_bias", "weight_packed",
                     "weight_shape"))  # fused-MoE parameters (the last two: MoE W4A16)


def install_torch_npu_stub() -> None:
    """A ``torch_npu`` with only what vllm-ascend's imports touch (no NPU: nothing runs)."""
    import torch

    class _Placeholder:
        def __init__(self, *a, **k):
            pass

    npu = types.ModuleType("torch.npu")
    for name in ("Stream", "Event", "ExternalEvent", "NPUGraph"):
        setattr(npu, name, type(name, (_Placeholder,), {}))
    npu.is_available = lambda: False
    npu.device_count = lambda: 0
    pkg = types.ModuleType("torch_npu")
    pkg.__path__ = []
    pkg.npu = npu
    pkg.__version__ = "0.0.0+stub"
    c = types.ModuleType("torch_npu._C")
    c._NPUTaskGroupHandle = type("_NPUTaskGroupHandle", (_Placeholder,), {})
    pkg._C = c
    for name in ("float4_e2m1fn_x2", "float8_e8m0fnu", "hifloat8"):
        setattr(pkg, name, getattr(torch, name, torch.uint8))
    pkg.npu_convert_weight_to_int4pack = _int4pack
    for name in ("npu_dynamic_mx_quant", "npu_quant_matmul", "npu_kronecker_quant"):  # the MX / W4A4 schemes
        setattr(pkg, name, _npu_only(name))  # check these names exist; their forward is NPU-only
    for m in (pkg, npu, c):
        m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
    sys.modules.update({"torch_npu": pkg, "torch_npu.npu": npu, "torch_npu._C": c, "torch.npu": npu})
    torch.npu = npu
    torch.Tensor.npu = lambda self, *a, **k: self  # the device move (W4A8 post-processing): stays on the CPU
    pkg.npu_format_cast = lambda t, fmt: t  # the NZ storage format (W8A8_DYNAMIC MoE): same values, CPU layout


def _int4pack(weight, inner_k_tiles=None):
    """npu_convert_weight_to_int4pack on the CPU (W4A4 post-processing): int32 codes in [-8, 7]
    [r, c] -> int32 [r, c / 8], element j of each 8 in bits [4j, 4j + 4)."""
    import torch

    c = weight.to(torch.int64).reshape(*weight.shape[:-1], -1, 8) & 0xF
    word = (c << (4 * torch.arange(8))).sum(-1)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def _npu_only(name):
    def run(*a, **k):
        raise NotImplementedError(f"torch_npu.{name} runs on an NPU only")
    return run


def setup_cpu() -> None:
    """vLLM's CPU platform, the Ascend quantization config registered, NZ off, the C8 patch."""
    install_torch_npu_stub()
    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms._current_platform = CpuPlatform()
    from vllm_ascend.quantization import AscendModelSlimConfig  # noqa: F401  (registers quantization="ascend")
    import vllm_ascend.utils

    vllm_ascend.utils._should_trans_nz = lambda *a, **k: False
    _load_c8_patch()
    _use_ascend_fused_moe()
    _mla_on_cpu()


def _mla_on_cpu() -> None:
    """Build MLA attention (DeepSeek-V2/V3) as on the NPU: vLLM's CPU platform refuses MLA, so its
    attention backend is vllm-ascend's ``AscendMLABackend`` (constructed, never run) and the MLA
    wrapper vllm-ascend's ``AscendMultiHeadLatentAttention``; vLLM's flash-attn prefill backend gets
    a placeholder kernel (construction only); vllm-ascend's DeepSeek weight-name patch maps
    ``<attn>.fa_k.scale`` to ``<attn>.mla_attn.mla_attn.fa_k.scale``. Modules the MLA backend imports
    but never uses here (structured output, scipy) are stubbed when absent."""
    from vllm.platforms.cpu import CpuPlatform

    for name in ("llguidance", "llguidance.hf", "llguidance.torch", "xgrammar", "scipy"):
        if name.split(".")[0] not in sys.modules and importlib.util.find_spec(name.split(".")[0]) is None:
            stub = types.ModuleType(name)
            stub.__getattr__ = lambda attr: type(attr, (), {})
            sys.modules[name] = stub
    cpu_backend = CpuPlatform.get_attn_backend_cls.__func__

    def backend(cls, selected_backend, attn_selector_config, num_heads=None):
        if attn_selector_config.use_mla and not attn_selector_config.use_sparse:
            return "vllm_ascend.attention.mla_v1.AscendMLABackend"
        return cpu_backend(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(backend)
    import vllm.v1.attention.backends.mla.prefill.flash_attn as prefill
    from vllm.model_executor.custom_op import CustomOp
    from vllm_ascend.ops.mla import AscendMultiHeadLatentAttention

    prefill.flash_attn_varlen_func = _npu_only("flash_attn_varlen_func")
    CustomOp.register_oot(_decorated_op_cls=AscendMultiHeadLatentAttention, name="MultiHeadLatentAttentionWrapper")
    import vllm.model_executor.models.deepseek_v2  # noqa: F401  (the patch below edits it)
    import vllm_ascend

    path = os.path.join(os.path.dirname(vllm_ascend.__file__), "patch", "worker", "patch_weight_utils.py")
    spec = importlib.util.spec_from_file_location("vllm_ascend_patch_weight_utils", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.ImportPatchDecorator.apply_patches()


def _use_ascend_fused_moe() -> None:
    """Build MoE blocks as on the NPU: vLLM's ``FusedMoE`` replaced by vllm-ascend's
    ``AscendFusedMoE`` (only this one of its custom ops; the rest stay vLLM's CPU layers), and an
    MC2 group placeholder without a device group: the MoE schemes then take their own
    no-HCCL fallback (an empty all-to-all group name), the MC2 communication being NPU-only."""
    from vllm.model_executor.custom_op import CustomOp
    import vllm_ascend.distributed.parallel_state as ps
    from vllm_ascend.ops.fused_moe.fused_moe import AscendFusedMoE

    CustomOp.register_oot(_decorated_op_cls=AscendFusedMoE, name="FusedMoE")
    ps._MC2 = types.SimpleNamespace(name="mc2 (CPU placeholder)")


def _load_c8_patch() -> None:
    """vllm-ascend's C8 load_weights patch (Qwen3 / Glm4Moe / MiniMaxM2), by file: importing
    the ``patch.worker`` package pulls in torchvision."""
    import vllm_ascend

    path = os.path.join(os.path.dirname(vllm_ascend.__file__), "patch", "worker", "patch_gqa_c8.py")
    spec = importlib.util.spec_from_file_location("vllm_ascend_patch_gqa_c8", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def init_world() -> None:
    """A gloo process group of one on loopback, model parallel of one."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    port = _free_port()
    init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                 local_rank=0, backend="gloo")
    initialize_model_parallel(1, 1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """Wraps every parameter's weight_loader; ``calls[name]`` lists what reached it, ``made[name]``
    is the parameter's (dtype, shape) as the quant method created it."""

    def __init__(self, model):
        self.calls: dict[str, list[dict]] = {}
        self.params = dict(model.named_parameters())
        self.made = {n: (_dt(p.dtype), list(p.shape)) for n, p in self.params.items()}
        for name, p in self.params.items():
            self._wrap(name, p)

    def _wrap(self, name, p):
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        inner = getattr(p, "weight_loader", default_weight_loader)
        calls = self.calls.setdefault(name, [])

        def loader(param, loaded, *args, **kwargs):
            if "expert_id" in kwargs:  # FusedMoE.weight_loader(param, w, name, shard_id=, expert_id=)
                shard = f"{kwargs['expert_id']}.{kwargs['shard_id']}"
            else:
                shard = args[0] if args else kwargs.get("loaded_shard_id")
            calls.append({"shard": shard if isinstance(shard, (int, str)) or shard is None else str(shard),
                          "dtype": _dt(loaded.dtype), "shape": list(loaded.shape), "param_dtype": _dt(param.dtype),
                          "sha256": _digest(loaded)["sha256"]})
            return inner(param, loaded, *args, **kwargs)

        try:
            p.weight_loader = loader
        except AttributeError:  # vLLM's BasevLLMParameter keeps it in _weight_loader
            p._weight_loader = loader


def _dt(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _digest(t) -> dict:
    import torch

    t = t.detach().cpu().contiguous()
    return {"dtype": _dt(t.dtype), "shape": list(t.shape),
            "sha256": hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()}


def quant_state(model) -> dict:
    """The quantization tensors of ``model`` (int8 weights, scales, offsets, deq_scale, quant_bias,
    C8 scales), cloned."""
    import torch

    out = {}
    for n, t in model.state_dict().items():
        suffix = n.rsplit(".", 1)[-1]
        weight = suffix in ("weight", "w13_weight", "w2_weight")
        if suffix in QUANT_SUFFIXES + MOE_SUFFIXES and (not weight or t.dtype not in (torch.float16, torch.bfloat16,
                                                                                     torch.float32)):
            out[n] = t.detach().clone().contiguous()
    return out


def summarize(rec: Recorder) -> dict:
    """params / unfilled / refilled / casts from the recorded calls."""
    params, unfilled, refilled, casts = {}, [], [], []
    for name, calls in rec.calls.items():
        dtype, shape = rec.made[name]
        params[name] = {"dtype": dtype, "shape": shape, "calls": calls}
        if not calls:
            unfilled.append(name)
        shards = [str(c["shard"]) for c in calls]
        if len(shards) != len(set(shards)):
            refilled.append(name)
        casts += [f"{name}[{c['shard']}]: {c['dtype']} -> {c['param_dtype']}" for c in calls
                  if c["dtype"] != c["param_dtype"]]
    return {"ok": True, "params": params, "unfilled": unfilled, "refilled": refilled, "casts": casts}


def load_one(path: str, dtype: str, save: str | None = None) -> dict:
    """Build, load and post-process one export directory with the recorder on."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.utils.torch_utils import set_default_torch_dtype
    from vllm_ascend.ascend_config import init_ascend_config

    args = EngineArgs(model=path, quantization="ascend", dtype=dtype, enforce_eager=True,
                      max_model_len=64, skip_tokenizer_init=True)
    cfg = args.create_engine_config()
    init_ascend_config(cfg)
    loader = get_model_loader(cfg.load_config)
    with set_current_vllm_config(cfg), set_default_torch_dtype(getattr(torch, dtype)), torch.device("cpu"):
        from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading

        model = initialize_model(vllm_config=cfg, model_config=cfg.model_config)
        rec = Recorder(model)
        loader.load_weights(model, cfg.model_config)
        loaded = quant_state(model)
        try:
            process_weights_after_loading(model, cfg.model_config, torch.device("cpu"))
            process_error = None
        except (AttributeError, NotImplementedError) as e:
            if not cfg.model_config.use_mla:
                raise
            process_error = f"{type(e).__name__}: {e}"  # MLA absorbs kv_b_proj with NPU kernels
        processed = quant_state(model)
    out = summarize(rec) | ({"process_error": process_error} if process_error else {})
    if save:
        from safetensors.torch import save_file

        save_file(loaded, f"{save}.loaded.safetensors")
        save_file(processed, f"{save}.processed.safetensors")
        out["saved"] = {"loaded": f"{save}.loaded.safetensors", "processed": f"{save}.processed.safetensors"}
    out["loaded"] = {n: _digest(t) for n, t in loaded.items()}
    out["processed"] = {n: _digest(t) for n, t in processed.items()}
    return out


def config_dtype(path: str) -> str:
    """The ``torch_dtype`` (or ``dtype``) of a directory's config.json."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("torch_dtype") or cfg["dtype"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--dtype", default="config", choices=["config", "float16", "bfloat16"],
                    help="Model dtype (default: each directory's config.json torch_dtype).")
    ap.add_argument("--json", help="Write the report here (default: stdout).")
    ap.add_argument("--save", help="Also write the quantization tensors as loaded (before and after "
                                   "process_weights_after_loading) to SAVE<i>.{loaded,processed}.safetensors.")
    a = ap.parse_args(argv)
    setup_cpu()
    report = {"dtype": a.dtype, "dirs": {}}
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig("cpu"))):
        init_world()
    for i, d in enumerate(a.dirs):
        try:
            dtype = config_dtype(d) if a.dtype == "config" else a.dtype
            report["dirs"][d] = {"dtype": dtype} | load_one(d, dtype, f"{a.save}{i}" if a.save else None)
        except Exception as e:  # noqa: BLE001  (the report says which directory failed, and why)
            last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            report["dirs"][d] = {"ok": False, "error": f"{type(e).__name__}: {last}",
                                 "trace": traceback.format_exc()[-4000:]}
    text = json.dumps(report, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
