"""Export to the compressed-tensors format (vLLM ``--quantization compressed-tensors``, what
llm-compressor saves; :mod:`.writer`), its checker (:mod:`.checker`) and its loader (:mod:`.loader`).

An export is a Hugging Face model directory::

    OUT/config.json          the source config + "quantization_config" (below)
    OUT/model.safetensors    every tensor, under the Hugging Face names
    OUT/tokenizer files ...  copied

``quantization_config`` (compressed-tensors 0.19 field names)::

    {"quant_method": "compressed-tensors", "quantization_status": "compressed",
     "format": "int-quantized" | "pack-quantized" | "mixed-precision",
     "config_groups": {"group_0": {"targets": ["Linear"], "format": ...,
                                   "weights": QuantizationArgs, "input_activations": QuantizationArgs | null,
                                   "output_activations": null}},
     "ignore": ["lm_head", <every other linear left in float>], "kv_cache_scheme": null, ...}
    QuantizationArgs = {"num_bits", "type": "int", "symmetric", "strategy", "group_size",
                        "dynamic", "observer", "zp_dtype" ("torch.int8" when asymmetric), ...}

One config group per distinct scheme; when linears differ (recipes, precision plans) each group
targets its linears by name. A module is quantized by the first group whose targets match it
(exact name, ``re:`` regex, or class name such as ``Linear``) unless ``ignore`` matches it.

Scheme of a ptqc linear -> QuantizationArgs::

    weights      group 0 -> strategy "channel", g > 0 -> "group" (group_size g), -1 -> "tensor"
    activations  dynamic per token (ptqc group 0) -> "token", dynamic=true; dynamic group g ->
                 "group"; dynamic per tensor -> "tensor"; static per tensor -> "tensor",
                 dynamic=false, observer "minmax"

Tensors of a quantized linear ``<m>`` (``out`` x ``in``, ``G`` scale columns: 1 for channel,
``in / g`` for group; a tensor-strategy scale is ``[1]``)::

    int-quantized (weights + activations; as llm-compressor picks it for W8A8, W4A8):
        <m>.weight              int8  [out, in]        the codes
    pack-quantized (weight-only: W8A16, W4A16, ...):
        <m>.weight_packed       int32 [out, ceil(in * b / 32)]  codes + 2^(b-1) as a dense
                                bit stream, element i at bits [i*b, (i+1)*b), 32-bit words
                                little-endian (8 int4 codes a word, low nibble first)
        <m>.weight_shape        int64 [2]              [out, in]
    both:
        <m>.weight_scale        float [out, G] (the model dtype)
        <m>.weight_zero_point   asymmetric only: int8 [out, G] (int-quantized); int32
                                [ceil(out * b / 32), G] packed the same way along the output
                                dimension (pack-quantized, channel/group strategy)
        <m>.input_scale         static activations: float [1] (the model dtype)
        <m>.input_zero_point    static asymmetric activations: int8 [1]
        <m>.bias                float, unchanged

Scales are stored in the model dtype, as llm-compressor writes them and as transformers
(compressed-tensors) holds them: exact for a float32 artifact; the float32 scales of a bfloat16 /
float16 artifact are rounded (the export then computes slightly other numbers than the artifact,
and :func:`load` reads those).

Numbers are ptqc's (:mod:`ptqc.quant`): ``w = (q - zero_point) * scale`` and static activations
``clamp(round(x / scale) + zero_point)`` are what compressed-tensors computes too, so a
float32 weight-only or static export reproduces the artifact (bit for bit in transformers, see
tools/check_compressed_tensors.py). One known difference: compressed-tensors' dynamic int scale
is ``amax / ((qmax - qmin) / 2)`` (``amax / 127.5`` for int8) where ptqc uses ``amax / qmax``
(Ascend's npu_dynamic_quant rule), so transformers' fake-quant forward of a dynamic export differs
slightly from ptqc's; what an int8 serving kernel does is its own choice.

KV cache: static per-tensor symmetric K and V quantizers (``kv:k=tensor,v=tensor``) export as
``kv_cache_scheme`` (QuantizationArgs, strategy "tensor") with ``<attn>.k_scale`` / ``.v_scale``
float [1] per attention module (compressed-tensors quantizes K after RoPE, where ptqc does).

Not expressible (a one-line PtqcError): other KV quantizers (per-channel K, dynamic per-token V,
asymmetric), online transforms (rotate's online Hadamard, flatquant), clipped dynamic
activations, per-channel static activations, lowered graphs.
"""
from ptqc.lowering.compressed_tensors.checker import check
from ptqc.lowering.compressed_tensors.config import CONFIG, FORMATS, QUANT_METHOD, VERSION, WEIGHTS, is_export, \
    read_quant_config, scheme_of
from ptqc.lowering.compressed_tensors.loader import load
from ptqc.lowering.compressed_tensors.packing import pack_int32, unpack_int32
from ptqc.lowering.compressed_tensors.writer import export

__all__ = ["export", "check", "load", "is_export", "read_quant_config", "scheme_of", "pack_int32", "unpack_int32",
           "CONFIG", "WEIGHTS", "QUANT_METHOD", "FORMATS", "VERSION"]
