"""The Ascend deployment layout (msModelSlim / vllm-ascend 0.23.0 ``--quantization ascend``): file
names, types, and the tensors each linear type needs with their dtypes and shapes (data for the
writer :mod:`export`, the checker :mod:`export_check` and the reader :mod:`export_load`)."""
from __future__ import annotations

import re

DESCRIPTION = "quant_model_description.json"
WEIGHTS = "quant_model_weights-00001-of-00001.safetensors"
INDEX = "quant_model_weights.safetensors.index.json"
SERVING_DTYPES = ("float16", "bfloat16")
TYPES = ("W8A8", "W8A8_DYNAMIC", "W8A16", "W4A8_DYNAMIC", "W4A16", "C8", "FAQuant", "FLOAT", "W8A8_MIX", "W4A4_DYNAMIC",
         "W4A4_FLATQUANT_DYNAMIC", "W8A8_MXFP8", "W4A4_MXFP4")  # the last five: export_types
W4A8_GROUP = 256  # vllm-ascend's group_size when the description has none
ROW_PARALLEL = (".o_proj", ".down_proj")  # vLLM RowParallelLinear: W4A8 scale_bias [out, 16], else [out, 1]
SCALE_BIAS_CHUNKS = 16
MOE_TYPES = ("W8A8_DYNAMIC", "W4A8_DYNAMIC", "W4A16")  # the fused-MoE schemes ptqc writes
MOE_W4A16_GROUP = 32  # vllm-ascend's MoE W4A16 group_size when the description has none
# vllm-ascend 0.23.0's fused-MoE schemes among TYPES (its registry: W8A8 static and W8A16 are linear-only)
MOE_LOADABLE = ("W8A8_DYNAMIC", "W4A8_DYNAMIC", "W4A16", "FLOAT")
# block prefix, expert index, projection of an expert's weight (MoE W4A16: llm-compressor's packed int32 weight)
EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)\.weight(?:_packed)?$")
EXPERT_DOWN = ("down_proj", "w2")  # row-parallel expert projections (scale_bias [out, 16])
ROUTERS = (".mlp.gate.weight", ".block_sparse_moe.gate.weight", ".shared_expert_gate.weight")  # FLOAT in vllm-ascend
C8_MODEL_TYPES = ("qwen3", "glm4_moe", "minimax_m2")  # vllm-ascend 0.23.0 patches their load_weights for C8
C8_SUFFIXES = ("kv_cache_scale", "kv_cache_offset")
FA_SUFFIXES = ("fa_k.scale", "fa_k.offset", "fa_v.scale", "fa_v.offset")  # FAKQuant (MLA), per attention: [1, 1]
META_KEYS = ("model_quant_type", "version", "group_size", "kv_cache_type", "kv_quant_type", "fa_quant_type", "metadata",
             "optional")
# suffixes every linear of a type must have (besides .weight): the parameters vllm-ascend 0.23.0's scheme of
# that type creates and reads (methods/<type>.py: get_weight / get_*_param, apply, process_weights_after_loading)
REQUIRED = {
    "W8A8": ("input_scale", "input_offset", "deq_scale", "quant_bias"),
    "W8A8_DYNAMIC": ("weight_scale", "weight_offset"),
    "W8A16": ("weight_scale", "weight_offset"),
    "W4A16": ("weight_scale", "weight_offset"),
    "W4A8_DYNAMIC": ("weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second", "scale_bias"),
    "W8A8_MIX": ("input_scale", "input_offset", "deq_scale", "quant_bias", "weight_scale", "weight_offset"),
    "W4A4_DYNAMIC": ("weight_scale", "weight_offset"),
}  # W4A4_FLATQUANT_DYNAMIC and the MX types: export_types.RULES
# created but never read (checked when present): static W8A8 quantizes with input_scale / input_offset and
# dequantizes with deq_scale; msModelSlim's iter_smooth exports write no weight_scale / weight_offset
OPTIONAL = {"W8A8": ("weight_scale", "weight_offset")}
# vllm-ascend 0.23.0 registers W4A16 for MoE experts only: a dense W4A16 linear raises NotImplementedError
MOE_ONLY = ("W4A16",)
FLOATS = ("F32", "F16", "BF16")
# suffix -> (dtypes, shapes for a linear's geometry g = {out, cols (weight_scale columns), groups
# (W4A8 second-level columns), bias_cols (W4A8 scale_bias columns)}, what is expected)
SUFFIX_RULES = {
    "weight_scale": (("F32",), lambda g: ((g["out"], g["cols"]),), "float32 [{out}, {cols}]"),
    "weight_offset": (("F32",), lambda g: ((g["out"], g["cols"]),), "float32 [{out}, {cols}]"),
    "input_scale": (("F32",), lambda g: ((1,), ()), "float32 [1]"),
    "input_offset": (("I8", "F32"), lambda g: ((1,), ()), "int8 (or float32) [1]"),
    "deq_scale": (("I64", "F32"), lambda g: ((g["out"],),), "int64 (or float32 for bf16 models) [{out}]"),
    "deq_scale@float16": (("I64",), lambda g: ((g["out"],),), "int64 [{out}] (a float16 model: vllm-ascend "
                          "creates deq_scale int64 and would cast float bits)"),
    "deq_scale@bfloat16": (("F32",), lambda g: ((g["out"],),), "float32 [{out}] (a bfloat16 model: vllm-ascend "
                           "creates deq_scale float32 and would cast the int64 bits)"),
    "quant_bias": (("I32",), lambda g: ((g["out"],),), "int32 [{out}]"),
    "weight_scale_second": (FLOATS, lambda g: ((g["out"], g["groups"]),), "float [{out}, {groups}]"),
    "weight_offset_second": (FLOATS + ("I64",), lambda g: ((g["out"], g["groups"]),),  # int64: as vllm-ascend
                             "float or int64 [{out}, {groups}]"),  # documents it (never read: cast on load)
    "scale_bias": (("F32",), lambda g: ((g["out"], g["bias_cols"]),), "float32 [{out}, {bias_cols}] "
                   "(16 columns for the row-parallel o_proj / down_proj)"),
}


def row_parallel(base: str) -> bool:
    """Whether vLLM builds linear ``base`` row-parallel (W4A8 scale_bias in 16 input chunks):
    o_proj / down_proj, and the experts' down projections."""
    m = EXPERT.match(base + ".weight")
    return base.endswith(ROW_PARALLEL) or (m is not None and m[3] in EXPERT_DOWN)


def kv_shape(qm) -> tuple[int, int]:
    """(KV heads, head_dim) from the model config."""
    cfg = qm.config
    heads = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return hkv, d
