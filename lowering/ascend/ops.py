"""Ascend operators as ``ptqc_npu`` torch ops: torch_npu on an NPU, a CPU emulation elsewhere.

Every op a lowered graph calls is registered once, in a module per kind of kernel (ops_quant:
int8 and int4 quantization, scale conversion; ops_matmul; ops_norm: norms and SwiGLU;
ops_attention; ops_moe: mixture-of-experts routing, grouped matmuls, combine), and gathered here: ``from ptqc.lowering.ascend import ops as npu``. When its
first tensor lives on an NPU the op calls the torch_npu kernel; otherwise it runs an emulation
written from the torch_npu documentation (``torch_npu/_op_plugin_docs.py`` in the wheel; summary in
``shared/reference/ascend-ops.md``). torch_npu is imported only inside the NPU branch.

Documented numerics the emulation reproduces bit for bit:

* int8 x int8 matmuls accumulate in **int32** (``torch._int_mm``); an int32 bias is added to the
  accumulator, a float bias after scaling;
* quantization **divides** by the scale (``div_mode=True``), rounds **half to even** and
  **saturates** to [-128, 127]; static quantization adds the offset **before** rounding
  (``round(x / scale + offset)``), dynamic quantization is symmetric per token
  (``scale = rowmax|x * smooth| / 127``);
* ``npu_trans_quant_param`` keeps only the top 19 bits of a float32 scale (sign, exponent, 10
  mantissa bits): ``int64 = (bits & 0xFFFFE000) | 1 << 46``; ``npu_quant_matmul`` reads that
  truncated scale back;
* ``npu_weight_quant_batchmatmul`` **adds** ``antiquant_offset`` (= minus the zero point):
  ``x @ ((w + offset) * scale)``; the weight is dequantized in x's dtype (fp16/bf16);
* outputs are rounded to the requested dtype (fp16/bf16) once, at the end;
* int4 (W4A4): per-token ``scale = rowmax / 7`` (times ``clip_ratio`` for npu_kronecker_quant),
  half-to-even rounding saturated to [-8, 7], codes packed 8 per int32 (element j in bits
  [4j, 4j + 4): the docs only say "interleaved", this is the W4A16 byte layout read as int32);
  ``npu_quant_matmul`` on int32 operands unpacks them and accumulates exactly with ``_int_mm``.

Where the documentation is silent the choice is stated: intermediate arithmetic is float32;
the fused add+RMSNorm+quant kernels quantize the float32 norm output (the unfused sequence
quantizes the fp16/bf16-rounded ``npu_rms_norm`` output, so the two can differ in the last
code); a token row of zeros gets scale 0 and codes 0.

Shape limits the lowering must respect are checked by ``check_*`` functions that return the
reason a kernel cannot take a shape (or None).
"""
from __future__ import annotations

import torch

from ptqc.lowering.ascend.ops_attention import (  # noqa: F401
    ADD_SOFTMAX_SIZES, FIA_MASK, MAX_INT, check_dropout_with_add_softmax, check_fused_infer_attention,
    check_scaled_masked_softmax, dropout_with_add_softmax, fia_keep, fused_infer_attention_score, scaled_masked_softmax)
from ptqc.lowering.ascend.ops_matmul import (  # noqa: F401
    MAX_KN, check_quant_matmul, check_weight_quant_batchmatmul, quant_matmul, weight_quant_batchmatmul)
from ptqc.lowering.ascend.ops_moe import (  # noqa: F401
    check_grouped_matmul, check_moe_gating_top_k, check_moe_gating_top_k_softmax, check_moe_init_routing,
    grouped_matmul, moe_finalize_routing, moe_gating_top_k, moe_gating_top_k_softmax, moe_init_routing_v2, swiglu)
from ptqc.lowering.ascend.ops_norm import (  # noqa: F401
    add_rms_norm, add_rms_norm_dynamic_quant, add_rms_norm_quant, check_swiglu_quant, rms_norm, swiglu_quant)
from ptqc.lowering.ascend.ops_quant import (  # noqa: F401
    MAX_KRONECKER_TOKENS, ROTATE_QUANT_K, ROTATE_QUANT_N, check_int4_last_dim, check_kronecker_quant, check_rotate_quant,
    convert_weight_to_int4pack, deq_scale_value, dynamic_quant, dynamic_quant_int4, kronecker_quant, pack_int4x8,
    quantize, rotate_quant, trans_quant_param, truncate19, unpack_int4x8)

DYNAMIC_QUANT = torch.ops.ptqc_npu.dynamic_quant.default
QUANTIZE = torch.ops.ptqc_npu.quantize.default
QUANT_MATMUL = torch.ops.ptqc_npu.quant_matmul.default
WEIGHT_QUANT_BATCHMATMUL = torch.ops.ptqc_npu.weight_quant_batchmatmul.default
RMS_NORM = torch.ops.ptqc_npu.rms_norm.default
ADD_RMS_NORM = torch.ops.ptqc_npu.add_rms_norm.default
ADD_RMS_NORM_QUANT = torch.ops.ptqc_npu.add_rms_norm_quant.default
ADD_RMS_NORM_DYNAMIC_QUANT = torch.ops.ptqc_npu.add_rms_norm_dynamic_quant.default
SCALED_MASKED_SOFTMAX = torch.ops.ptqc_npu.scaled_masked_softmax.default
DROPOUT_WITH_ADD_SOFTMAX = torch.ops.ptqc_npu.dropout_with_add_softmax.default
FUSED_INFER_ATTENTION_SCORE = torch.ops.ptqc_npu.fused_infer_attention_score.default
SWIGLU_QUANT = torch.ops.ptqc_npu.swiglu_quant.default
DYNAMIC_QUANT_INT4 = torch.ops.ptqc_npu.dynamic_quant_int4.default
KRONECKER_QUANT = torch.ops.ptqc_npu.kronecker_quant.default
ROTATE_QUANT = torch.ops.ptqc_npu.rotate_quant.default
MOE_GATING_TOP_K_SOFTMAX = torch.ops.ptqc_npu.moe_gating_top_k_softmax.default
MOE_GATING_TOP_K = torch.ops.ptqc_npu.moe_gating_top_k.default
MOE_INIT_ROUTING_V2 = torch.ops.ptqc_npu.moe_init_routing_v2.default
GROUPED_MATMUL = torch.ops.ptqc_npu.grouped_matmul.default
SWIGLU = torch.ops.ptqc_npu.swiglu.default
MOE_FINALIZE_ROUTING = torch.ops.ptqc_npu.moe_finalize_routing.default
