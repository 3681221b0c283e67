"""ONNX reference backend (onnxruntime). Planned in the ONNX backend issue."""
