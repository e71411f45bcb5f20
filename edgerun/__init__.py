"""edgerun: what runs on the target, and the only code a deploy bundle ships.

Readers, onnxruntime and TensorRT runners, engine compatibility, the static TensorRT pre-flight,
`infer` and `benchmark`. It imports neither torch nor the pipeline, so a Jetson needs only numpy,
onnx/onnxruntime or TensorRT. The other packages (pipeline/, export/, calib/) build on it.
"""
from edgerun.errors import EdgeError

__version__ = "0.2.0"
__all__ = ["EdgeError", "__version__"]
