"""ptqc: a post-training quantization compiler for LLMs, with Ascend and ONNX backends."""
import os as _os

# A torch_npu installed without the CANN toolkit breaks `import torch` through device-backend
# autoloading; ptqc imports torch_npu explicitly (ptqc.device) when --device npu asks for it.
_os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

__version__ = "0.1.0"
