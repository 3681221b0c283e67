"""ONNX reference backend (onnxruntime): ``export`` (FX -> ONNX, one translation table),
``session``/``run``/``perplexity`` (onnxruntime CPU). See :mod:`ptqc.lowering.onnx.export`."""
from ptqc.lowering.onnx.emitter import INT_KERNELS, MODES, OPSET, TABLE, Lowering, lowers
from ptqc.lowering.onnx.export import ExportResult, build, export
from ptqc.lowering.onnx.runner import logits, perplexity, perplexity_of, run, session

__all__ = ["INT_KERNELS", "export", "build", "TABLE", "lowers", "Lowering", "ExportResult", "MODES", "OPSET",
           "session", "run", "logits", "perplexity", "perplexity_of"]
