"""INT8 post-training quantization of ONNX models with NNCF, written as Q/DQ ONNX.

target "onnxruntime": NNCF's defaults. target "tensorrt": NNCF's PERFORMANCE preset (symmetric
weights and activations), then ``qdq.rewrite_uint8_to_int8`` turns its uint8 post-ReLU
activations into signed int8 (NNCF 3.4 cannot be told to emit signed activations itself), and
``qdq.validate_qdq`` proves the result. nncf is imported inside the functions: it takes seconds.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from calib import qdq
from calib.calibset import write_atomic
from calib.errors import CalibError

VAL_BATCH = 256  # validation batch for dynamic-batch models; small enough for any CPU


def _check_target(target: str, model_type: str | None) -> None:
    if target not in qdq.TARGETS:
        raise CalibError(f"quantization target must be one of {', '.join(qdq.TARGETS)}, got {target!r}")
    if model_type not in (None, "transformer"):
        raise CalibError(f"model_type must be None or 'transformer', got {model_type!r}")


def _model_input(model, src, input_name: str | None):
    """The one graph input fed with images: (name, dims with None for symbolic, numpy dtype)."""
    import onnx

    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not inputs:
        raise CalibError(f"{src}: ONNX model has no inputs")
    if input_name is None:
        if len(inputs) > 1:
            raise CalibError(f"{src}: ONNX model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                             "pass input_name")
        chosen = inputs[0]
    else:
        chosen = next((i for i in inputs if i.name == input_name), None)
        if chosen is None:
            raise CalibError(f"{src}: ONNX model has no input {input_name!r} "
                             f"(inputs: {', '.join(i.name for i in inputs)})")
    t = chosen.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
    except KeyError:
        raise CalibError(f"{src}: input {chosen.name!r} has no known tensor element type ({t.elem_type})") from None
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
    return chosen.name, dims, dtype


def _check_samples(x, what: str, src, name: str, dims: list, dtype) -> np.ndarray:
    """``x`` as [N, ...] in the model's input dtype, or CalibError naming the model and its input."""
    x = np.asarray(x)
    if x.ndim == 0 or len(x) == 0:
        raise CalibError(f"{what}: empty calibration/validation set for {src}")
    if np.issubdtype(dtype, np.floating) and not np.issubdtype(x.dtype, np.floating):
        raise CalibError(f"{what}: expected normalized float32 inputs for {src}, got {x.dtype} (normalize first)")
    shown = "(" + ", ".join("batch" if i == 0 and d is None else "?" if d is None else str(d)
                            for i, d in enumerate(dims)) + ")"
    if x.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims[1:], x.shape[1:])):
        raise CalibError(f"{what}: samples of shape {list(x.shape[1:])} do not fit input {name!r} {shown} of {src}")
    if dims[0] not in (None, 1):
        raise CalibError(f"{src}: input {name!r} has a fixed batch of {dims[0]}; export it with a dynamic batch")
    return np.ascontiguousarray(x, dtype=dtype)


def _nncf_options(target: str, model_type: str | None) -> dict:
    import nncf

    options = {}
    if target == "tensorrt":
        # Symmetric activations keep zero points at 0, the one form the int8 rewrite can fix.
        options["preset"] = nncf.QuantizationPreset.PERFORMANCE
    if model_type == "transformer":
        options["model_type"] = nncf.ModelType.TRANSFORMER
    return options


def _finish(model, dst, target: str) -> tuple[dict, int]:
    """Post-fix, validate, check that onnxruntime loads it, then write ``dst`` atomically."""
    import onnx
    import onnxruntime as ort

    rewritten = qdq.rewrite_uint8_to_int8(model) if target == "tensorrt" else []
    counts = qdq.validate_qdq(model, target, name=f"{dst} (not written)")
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors; the model must not be written
        raise CalibError(f"{dst}: onnxruntime cannot load the quantized model ({str(e).splitlines()[0]})") from None
    write_atomic(dst, lambda tmp: onnx.save(model, tmp))
    return counts, len(rewritten)


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, calib_inputs: np.ndarray, *,
                  target: str = "onnxruntime", model_type: str | None = None,
                  subset_size: int | None = None, input_name: str | None = None) -> dict:
    """NNCF INT8 post-training quantization of ``src`` into ``dst`` (Q/DQ ONNX).

    ``calib_inputs``: normalized float32 [N, C, H, W], fed one sample per step (NNCF collects
    per-sample statistics; a dynamic-batch model accepts [1, C, H, W]). ``subset_size`` defaults
    to all N. Returns {"path", "target", "n_calib", "qdq" (summary), "int8_rewrites", "seconds"}.
    """
    t0 = time.perf_counter()
    _check_target(target, model_type)
    model = qdq.load_onnx(src)
    name, dims, dtype = _model_input(model, src, input_name)
    calib = _check_samples(calib_inputs, "calib_inputs", src, name, dims, dtype)
    if subset_size is not None and (isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 1):
        raise CalibError(f"subset_size must be a positive integer, got {subset_size!r}")
    n = len(calib) if subset_size is None else min(subset_size, len(calib))

    import nncf

    dataset = nncf.Dataset(calib, lambda x: {name: x[None]})
    quantized = nncf.quantize(model, dataset, subset_size=n, **_nncf_options(target, model_type))
    counts, rewrites = _finish(quantized, dst, target)
    return {"path": str(dst), "target": target, "n_calib": n, "qdq": counts, "int8_rewrites": rewrites,
            "seconds": round(time.perf_counter() - t0, 3)}


def _top1_fn(name: str, batch: int, target: str):
    """NNCF's validation_fn: (model_proto, items of (x, label)) -> (top-1, per-item 0/1)."""
    import copy

    import onnxruntime as ort

    def validate(model, items):
        if target == "tensorrt":
            # Judge the model that will be deployed, i.e. after the int8 rewrite.
            model = copy.deepcopy(model)
            qdq.rewrite_uint8_to_int8(model)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        items = list(items)
        x = np.stack([item[0] for item in items])
        y = np.array([item[1] for item in items])
        pred = np.concatenate([session.run(None, {name: x[i:i + batch]})[0].argmax(axis=1)
                               for i in range(0, len(x), batch)])
        correct = (pred == y).astype(np.float64)
        # Per-item values spare NNCF from calling this once per item to rank layers.
        return float(correct.mean()), correct.tolist()

    return validate


def _quantized_ops(model) -> list[str]:
    """Names of the non-Q/DQ nodes that read at least one dequantized tensor, in graph order."""
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in model.graph.node
            if n.op_type not in qdq.QDQ_OPS and any(i in dq_out for i in n.input)]


def quantize_onnx_with_accuracy_control(src: str | os.PathLike, dst: str | os.PathLike,
                                        calib_inputs: np.ndarray, val_inputs: np.ndarray,
                                        val_labels: np.ndarray, *, target: str = "onnxruntime",
                                        max_drop: float = 0.003, model_type: str | None = None) -> dict:
    """``quantize_onnx`` plus NNCF's accuracy control: layers go back to float until top-1 on
    (``val_inputs``, ``val_labels``) drops by at most ``max_drop`` (a fraction: 0.003 = 0.3 pt).

    The model's first output must be the logits. Returns quantize_onnx's dict plus "n_val" and
    "reverted" (the ops that read a quantized tensor after plain quantization and no longer do).
    """
    t0 = time.perf_counter()
    _check_target(target, model_type)
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < 1:
        raise CalibError(f"max_drop must be a fraction in [0, 1), got {max_drop!r}")
    model = qdq.load_onnx(src)
    name, dims, dtype = _model_input(model, src, None)
    calib = _check_samples(calib_inputs, "calib_inputs", src, name, dims, dtype)
    val = _check_samples(val_inputs, "val_inputs", src, name, dims, dtype)
    labels = np.asarray(val_labels)
    if labels.shape != (len(val),) or not np.issubdtype(labels.dtype, np.integer):
        raise CalibError(f"val_labels: expected {len(val)} integer labels for {src}, got {labels.dtype} {list(labels.shape)}")

    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    calib_set = nncf.Dataset(calib, lambda x: {name: x[None]})
    val_set = nncf.Dataset(list(zip(val, labels.tolist())), lambda item: {name: item[0][None]})
    batch = 1 if dims[0] == 1 else VAL_BATCH
    with tempfile.TemporaryDirectory() as tmp:
        # NNCF saves the fully quantized model here before reverting layers: the "before" to diff against.
        restorer = AdvancedAccuracyRestorerParameters(intermediate_model_dir=tmp)
        quantized = nncf.quantize_with_accuracy_control(
            model, calib_set, val_set, _top1_fn(name, batch, target),
            max_drop=float(max_drop), drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib),
            advanced_accuracy_restorer_parameters=restorer, **_nncf_options(target, model_type))
        before = _quantized_ops(qdq.load_onnx(Path(tmp) / "intermediate_model.onnx"))
    after = set(_quantized_ops(quantized))
    counts, rewrites = _finish(quantized, dst, target)
    return {"path": str(dst), "target": target, "n_calib": len(calib), "n_val": len(val), "qdq": counts,
            "int8_rewrites": rewrites, "reverted": [op for op in before if op not in after],
            "seconds": round(time.perf_counter() - t0, 3)}
