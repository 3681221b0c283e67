"""Export to the compressed-tensors format (vLLM ``--quantization compressed-tensors``, what
llm-compressor saves; :mod:`.writer`), its checker (:mod:`.checker`) and its loader (:mod:`.loader`).

An export is a Hugging Face model directory: ``config.json`` (the source config plus
``quantization_config``, compressed-tensors 0.19 field names), ``model.safetensors`` (every tensor
under its Hugging Face name) and the copied tokenizer files. ``quantization_config`` has one config
group per distinct scheme (targeting ``Linear`` when all linears share one, else its modules by
name), ``ignore`` lists every linear left in float, ``format`` is ``int-quantized`` (weights +
activations, as llm-compressor picks it for W8A8 / W4A8: int8 codes in ``<m>.weight``),
``pack-quantized`` (weight-only: ``<m>.weight_packed``, codes + 2^(b-1) as a dense little-endian
bit stream in int32 words, and ``<m>.weight_shape``) or ``mixed-precision``. Strategies: weight
group 0 -> "channel", g > 0 -> "group", -1 -> "tensor"; activations dynamic per token -> "token",
static per tensor -> "tensor" (``<m>.input_scale``, ``input_zero_point`` when asymmetric). Scales
are stored in the model dtype, as llm-compressor and transformers hold them (exact for a float32
artifact). The exact tensors, dtypes and shapes are the checker's rules (``_linear_tensors``).

Numbers are ptqc's (:mod:`ptqc.quant`), which are compressed-tensors' too, so a float32
weight-only or static export reproduces the artifact bit for bit in transformers
(tools/check_compressed_tensors.py). One known difference: compressed-tensors' dynamic int scale
is ``amax / ((qmax - qmin) / 2)`` (``amax / 127.5`` for int8) where ptqc uses ``amax / qmax``
(Ascend's npu_dynamic_quant rule).

KV cache: static per-tensor symmetric K and V quantizers (``kv:k=tensor,v=tensor``) export as
``kv_cache_scheme`` with ``<attn>.k_scale`` / ``.v_scale``. Not expressible (a one-line PtqcError):
other KV quantizers, online transforms (rotate's online Hadamard, flatquant), clipped dynamic
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
