"""Ascend operators as ``ptqc_npu`` torch ops: torch_npu on an NPU, a CPU emulation elsewhere.

Every op a lowered graph calls is registered once, in a module per kind of kernel (ops_quant:
int8 and int4 quantization, scale conversion; ops_matmul; ops_norm: norms and SwiGLU;
ops_attention; ops_moe: mixture-of-experts routing, grouped matmuls, combine), and gathered here: ``from ptqc.lowering.ascend import ops as npu``. When its
first tensor lives on an NPU the op calls the torch_npu kernel (imported only then); otherwise it
runs an emulation written from the torch_npu documentation (``torch_npu/_op_plugin_docs.py``;
summary in ``shared/reference/ascend-ops.md``) that reproduces its documented numerics bit for bit
(int32 accumulation, division by the scale, half-to-even rounding with saturation, the 19-bit
``npu_trans_quant_param`` scale, one rounding to the output dtype): each op's docstring says
which, and what it chose where the documentation is silent (float32 intermediate arithmetic; the
fused add+RMSNorm+quant kernels quantize the float32 norm output; a zero token row gets scale 0).

``check_*`` functions return the reason a kernel cannot take a shape (or None); the lowering
checks them before it rewrites.
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
