"""Edge deployment pipeline: prune → fine-tune → ONNX → INT8 → TensorRT → profile → package.

Importing this package must stay light (no torch): `python -m pipeline infer` runs on a Jetson
that may have only onnxruntime or TensorRT.
"""
