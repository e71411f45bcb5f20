"""Torch → ONNX → TensorRT export: a plain library (arguments and paths, no configs).

Modules: onnx_export (torch → ONNX, checks), parity (output comparison), fp16 (FP16 ONNX),
trt_options (the engine build options and the trtexec / Polygraphy forms generated from them,
TensorRT 10 and 11; the bundle's build files), trt_build (an engine built here through
Polygraphy). The runners (onnxruntime, TensorRT), the engine sidecar and its compatibility
check live in the runtime package, edgerun (edgerun.ort, edgerun.trt). Importing the package
loads none of torch, onnxruntime or tensorrt; trt_options and trt_build never import torch.
"""
from export.errors import ExportError

MIN_OPSET = 18   # torch.onnx's dynamo exporter has no lower implementations: it writes 18 for anything below

__all__ = ["ExportError"]
