"""Calibration sets and INT8 quantization: a plain library (arguments and paths, no configs)."""
from calib.calibset import build_calibration_set, load_calibration_set
from calib.errors import CalibError
from calib.layers import LayerChoice, choose_quantized_layers
from calib.qdq import inspect_qdq, quantize_gemm_bias, rewrite_uint8_to_int8, summary, validate_qdq
from calib.quantize import quantize_onnx, quantize_onnx_with_accuracy_control, single_input_channel_convs

__all__ = ["CalibError", "build_calibration_set", "load_calibration_set", "inspect_qdq", "summary",
           "validate_qdq", "rewrite_uint8_to_int8", "quantize_gemm_bias", "quantize_onnx",
           "quantize_onnx_with_accuracy_control", "single_input_channel_convs", "choose_quantized_layers",
           "LayerChoice"]
