"""Backends a ptqc graph is lowered to: ``ascend`` (torch_npu ops with CPU emulation) and
``onnx`` (onnxruntime reference). Imported as ``ptqc.lowering``."""
