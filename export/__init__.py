"""Torch → ONNX → TensorRT export: a plain library (arguments and paths, no configs).

Modules: onnx_export (torch → ONNX, checks), parity (output comparison), fp16 (FP16 ONNX),
runners (onnxruntime), tensorrt (engines for TensorRT 10 and 11). Importing the package loads
none of torch, onnxruntime or tensorrt; runners and tensorrt never import torch at all.
"""
from export.errors import ExportError

__all__ = ["ExportError"]
