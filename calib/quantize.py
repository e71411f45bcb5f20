"""INT8 post-training quantization of ONNX models with NNCF, written as Q/DQ ONNX.

target "onnxruntime": NNCF's defaults, then ``qdq.quantize_gemm_bias`` gives each Gemm an int32
bias so that onnxruntime fuses it into QGemm. target "tensorrt": NNCF's PERFORMANCE preset
(symmetric weights and activations), then ``qdq.rewrite_uint8_to_int8`` turns its uint8 post-ReLU
activations into signed int8 (NNCF 3.4 cannot be told to emit signed activations itself), and
``qdq.validate_qdq`` proves the result with edgerun.preflight's Q/DQ rules.

Both targets ask NNCF for per-tensor activation scales: its default quantizes some activations
per channel (ReLU6 -> depthwise conv), which TensorRT refuses and onnxruntime loads but cannot run
("QLinearConv: input zero point must be a scalar"). Weights take the full int8 range, or half of it
where this CPU's int8 kernels would saturate (``reduce_range``; calib.int8form says why and when).
Whatever the target, the result is accepted only after one real inference in onnxruntime, and
written (atomically) only then.
nncf is imported inside the functions: it takes seconds.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calib import int8form, qdq
from calib.errors import CalibError
from edgerun.errors import brief
from edgerun.io import atomic_write

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
    if x.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims[1:], x.shape[1:], strict=True)):
        raise CalibError(f"{what}: samples of shape {list(x.shape[1:])} do not fit input {name!r} {shown} of {src}")
    if dims[0] not in (None, 1):
        raise CalibError(f"{src}: input {name!r} has a fixed batch of {dims[0]}; export it with a dynamic batch")
    return np.ascontiguousarray(x, dtype=dtype)


def _nncf_options(target: str, model_type: str | None, keep_fp32: tuple[str, ...], reduce_range: bool) -> dict:
    """Keyword arguments for nncf.quantize (accuracy control names ``advanced_parameters`` differently)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    # One scale per activation tensor: TensorRT's rule, and the form onnxruntime's QLinearConv can run.
    per_tensor = QuantizationParameters(per_channel=False)
    # NNCF's overflow fix quantizes conv/Gemm/MatMul weights to |q| <= 64. Its default applies it to the
    # first conv only; here it is all weights or none, so that the record says one thing of the model.
    fix = nncf.OverflowFix.ENABLE if reduce_range else nncf.OverflowFix.DISABLE
    options = {"advanced_parameters": AdvancedQuantizationParameters(activations_quantization_params=per_tensor,
                                                                     overflow_fix=fix)}
    if target == "tensorrt":
        # Symmetric activations keep zero points at 0, the one form the int8 rewrite can fix.
        options["preset"] = nncf.QuantizationPreset.PERFORMANCE
    if model_type == "transformer":
        options["model_type"] = nncf.ModelType.TRANSFORMER
    if keep_fp32:
        options["ignored_scope"] = nncf.IgnoredScope(names=list(keep_fp32))
    return options


def _check_options(model, src, target: str, keep_fp32, int32_bias) -> tuple[tuple[str, ...], bool]:
    """(keep_fp32 as a tuple of node names that exist, whether to rewrite Gemm biases to int32)."""
    if not isinstance(keep_fp32, (tuple, list)) or not all(isinstance(n, str) for n in keep_fp32):
        raise CalibError(f"keep_fp32: expected a tuple of node names, got {keep_fp32!r}")
    names = {n.name for n in model.graph.node}
    unknown = [n for n in keep_fp32 if n not in names]
    if unknown:
        raise CalibError(f"keep_fp32: {src} has no node named {', '.join(map(repr, unknown[:4]))} "
                         f"(e.g. {', '.join(sorted(names)[:4])})")
    if int32_bias is None:
        int32_bias = target == "onnxruntime"
    elif int32_bias and target == "tensorrt":
        raise CalibError("int32_bias=True is for the onnxruntime target: TensorRT's DequantizeLinear takes no "
                         "int32 (it keeps the bias in float and fuses it itself)")
    return tuple(keep_fp32), bool(int32_bias)


def _run_once(model, dst, sample: np.ndarray, name: str) -> None:
    """One real inference: loading a model is no proof that it runs (CalibError names the node if not)."""
    from edgerun.ort import OrtError, OrtRunner, onnxruntime

    onnxruntime()   # its absence is edgerun's own line, not "cannot load the quantized model"
    where = f"{dst} (not written)"
    try:
        runner = OrtRunner(model.SerializeToString())
    except OrtError as err:  # onnxruntime's own untyped error is the cause
        raise CalibError(f"{where}: onnxruntime cannot load the quantized model "
                         f"({brief(err.__cause__ or err)})") from None
    try:
        outputs = runner.infer({name: sample})
    except OrtError as err:
        e = err.__cause__ or err
        text = str(e)
        node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
        at = f" at {node.group(1)} node '{node.group(2)}'" if node else ""
        reason = text.rsplit("was false. ", 1)[-1].strip() if "was false. " in text else brief(e)
        raise CalibError(f"{where}: onnxruntime loads the quantized model but its first inference fails{at} "
                         f"({reason.splitlines()[0][:200]})") from None
    bad = [o for o, v in outputs.items()
           if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise CalibError(f"{where}: the quantized model's first inference gives non-finite {', '.join(bad)}")


def _finish(model, dst, target: str, sample: np.ndarray, name: str, int32_bias: bool, form: dict) -> dict:
    """Post-fix, validate, run once in onnxruntime, then write ``dst`` atomically."""
    import onnx

    rewritten = qdq.rewrite_uint8_to_int8(model) if target == "tensorrt" else []
    # Before the int32 Gemm bias, which is quantized with the weight's scale.
    reduced = int8form.reduce_weight_range(model) if form["weights"] == int8form.REDUCED else []
    biased = qdq.quantize_gemm_bias(model) if int32_bias else []
    counts = qdq.validate_qdq(model, target, name=f"{dst} (not written)")
    largest = int8form.int8_weight_max(model)
    if form["weights"] == int8form.REDUCED and largest > int8form.WEIGHT_BOUND:
        raise CalibError(f"{dst} (not written): an int8 weight reaches {largest}, above the reduced range's "
                         f"{int8form.WEIGHT_BOUND} (its scale or tensor is shared, or its zero point is not 0)")
    _run_once(model, dst, sample, name)
    atomic_write(dst, lambda tmp: onnx.save(model, tmp))
    return {"qdq": counts, "int8_rewrites": len(rewritten), "int32_bias": biased,
            "int8_form": {**form, "max_abs_weight": largest, "requantized": reduced}}


def single_input_channel_convs(path_or_model) -> tuple[str, ...]:
    """Names of the Conv nodes that read one input channel (a grayscale stem): candidates for keep_fp32.

    Such a conv has few MACs and its INT8 form needs the image itself quantized; whether keeping
    it in FP32 pays is for choose_quantized_layers (or benchmarks/bench_quant.py) to measure.
    """
    model, _ = qdq._as_model(path_or_model)
    inits = {t.name: t for t in model.graph.initializer}
    return tuple(n.name for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1
                 and n.input[1] in inits and len(inits[n.input[1]].dims) > 1 and inits[n.input[1]].dims[1] == 1
                 and all(a.i == 1 for a in n.attribute if a.name == "group"))


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, calib_inputs: np.ndarray, *,
                  target: str = "onnxruntime", model_type: str | None = None,
                  subset_size: int | None = None, input_name: str | None = None,
                  keep_fp32: tuple[str, ...] = (), int32_bias: bool | None = None,
                  reduce_range: bool | None = None) -> dict:
    """NNCF INT8 post-training quantization of ``src`` into ``dst`` (Q/DQ ONNX).

    ``calib_inputs``: normalized float32 [N, C, H, W], fed one sample per step (NNCF collects
    per-sample statistics; a dynamic-batch model accepts [1, C, H, W]). ``subset_size`` defaults
    to all N. ``keep_fp32``: node names NNCF leaves in float (e.g. single_input_channel_convs).
    ``int32_bias``: rewrite Gemm biases for QGemm (default: on for onnxruntime, off for tensorrt).
    ``reduce_range``: int8 weights within +-64 (True), full range (False), or as this CPU needs (None;
    calib.int8form.weight_form). Returns {"path", "target", "n_calib", "qdq" (summary),
    "int8_rewrites", "int32_bias" (Gemm names), "int8_form" ({"weights", "reason",
    "max_abs_weight", "requantized": the weights NNCF left at full range, brought within 64}),
    "keep_fp32", "seconds"}.
    """
    t0 = time.perf_counter()
    _check_target(target, model_type)
    model = qdq.load_onnx(src)
    name, dims, dtype = _model_input(model, src, input_name)
    calib = _check_samples(calib_inputs, "calib_inputs", src, name, dims, dtype)
    keep_fp32, int32_bias = _check_options(model, src, target, keep_fp32, int32_bias)
    reduce, form = int8form.weight_form(target, reduce_range)
    bad_subset = isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 1
    if subset_size is not None and bad_subset:
        raise CalibError(f"subset_size must be a positive integer, got {subset_size!r}")
    n = len(calib) if subset_size is None else min(subset_size, len(calib))

    import nncf

    dataset = nncf.Dataset(calib, lambda x: {name: x[None]})
    quantized = nncf.quantize(model, dataset, subset_size=n, **_nncf_options(target, model_type, keep_fp32, reduce))
    done = _finish(quantized, dst, target, calib[:1], name, int32_bias, form)
    return {"path": str(dst), "target": target, "n_calib": n, **done, "keep_fp32": list(keep_fp32),
            "seconds": round(time.perf_counter() - t0, 3)}


def _score_value(value, what: str) -> float:
    """A score's return as a float, or a one-line CalibError saying what came back instead."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CalibError(f"score: expected a float for {what}, got {type(value).__name__} {str(value)[:60]!r}")
    return float(value)


def _fp32_value(value) -> float:
    """The FP32 model's score: a finite float (what every variant's drop is measured from), else one line."""
    value = _score_value(value, "the FP32 model's outputs")
    if not math.isfinite(value):
        raise CalibError(f"score: expected a finite float for the FP32 model's outputs, got {value}")
    return value


def _validation_fn(batch: int, target: str, int32_bias: bool, score, higher_is_better: bool):
    """NNCF's validation_fn: (model_proto, items of (x, row in val_inputs)) -> (metric, per-item metrics).

    NNCF's metric grows with accuracy (its drop is initial - current), so a lower-is-better score is negated.
    """
    import copy

    from edgerun.ort import run_onnx

    sign = 1.0 if higher_is_better else -1.0

    def validate(model, items):
        if target == "tensorrt" or int32_bias:
            # Judge the model that will be deployed, i.e. after the rewrites _finish makes.
            model = copy.deepcopy(model)
            if target == "tensorrt":
                qdq.rewrite_uint8_to_int8(model)
            else:
                qdq.quantize_gemm_bias(model)
        items = list(items)
        x = np.stack([item[0] for item in items])
        rows = np.array([item[1] for item in items], dtype=np.int64)
        outputs = run_onnx(model.SerializeToString(), x, batch_size=batch)
        value = sign * _score_value(score(outputs, rows), "the validation outputs")
        if len(rows) == 1:
            return value, [value]
        # Per-item values spare NNCF from calling this once per item to rank layers.
        each = [sign * _score_value(score({k: v[i:i + 1] for k, v in outputs.items()}, rows[i:i + 1]),
                                    "one sample's outputs") for i in range(len(rows))]
        return value, each

    return validate


def _fp32_score(model, val: np.ndarray, batch: int, score) -> float:
    """The FP32 model's score on the whole validation set: a finite float, or a one-line CalibError."""
    from edgerun.ort import run_onnx

    return _fp32_value(score(run_onnx(model.SerializeToString(), val, batch_size=batch), np.arange(len(val))))


def _quantized_ops(model) -> list[str]:
    """Names of the non-Q/DQ nodes that read at least one dequantized tensor, in graph order."""
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in model.graph.node
            if n.op_type not in qdq.QDQ_OPS and any(i in dq_out for i in n.input)]


def quantize_onnx_with_accuracy_control(src: str | os.PathLike, dst: str | os.PathLike,
                                        calib_inputs: np.ndarray, val_inputs: np.ndarray,
                                        score: Callable[[dict[str, np.ndarray], np.ndarray], float], *,
                                        max_drop: float, higher_is_better: bool = True,
                                        target: str = "onnxruntime", model_type: str | None = None,
                                        keep_fp32: tuple[str, ...] = (), int32_bias: bool | None = None,
                                        reduce_range: bool | None = None) -> dict:
    """``quantize_onnx`` plus NNCF's accuracy control: layers go back to float until the score on
    ``val_inputs`` is at most ``max_drop`` worse than the FP32 model's (in the score's units, plus 1e-9
    of float slack as choose_quantized_layers and the gates allow; lower is worse unless
    ``higher_is_better`` is False).

    ``score(outputs, rows)``: ``outputs`` every output of a model on ``val_inputs[rows]`` (``{name:
    array}``, concatenated by name), ``rows`` their positions in ``val_inputs`` (an int array, so that
    the caller can find their labels); it returns one float. NNCF scores subsets of the validation set
    and single samples (to rank the layers it reverts), so the score must accept any ``rows``. A
    classifier's caller passes top-1 on ``labels[rows]``, e.g. as a fraction with ``max_drop=0.003``
    (0.3 pt). The FP32 model's score on the whole set must be a finite float (checked first).
    Returns quantize_onnx's dict plus "n_val" and "reverted" (the ops that read a quantized tensor
    after plain quantization and no longer do).
    """
    t0 = time.perf_counter()
    _check_target(target, model_type)
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < math.inf:
        raise CalibError(f"max_drop must be a number >= 0 in the score's units, got {max_drop!r}")
    if not callable(score):
        raise CalibError(f"score: expected a callable on a model's outputs, got {type(score).__name__}")
    model = qdq.load_onnx(src)
    name, dims, dtype = _model_input(model, src, None)
    calib = _check_samples(calib_inputs, "calib_inputs", src, name, dims, dtype)
    val = _check_samples(val_inputs, "val_inputs", src, name, dims, dtype)
    keep_fp32, int32_bias = _check_options(model, src, target, keep_fp32, int32_bias)
    reduce, form = int8form.weight_form(target, reduce_range)
    batch = 1 if dims[0] == 1 else VAL_BATCH
    _fp32_score(model, val, batch, score)

    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    calib_set = nncf.Dataset(calib, lambda x: {name: x[None]})
    # Each item carries its row in val_inputs: NNCF validates subsets, and the score needs to know which.
    val_set = nncf.Dataset(list(zip(val, range(len(val)), strict=True)), lambda item: {name: item[0][None]})
    with tempfile.TemporaryDirectory() as tmp:
        # NNCF saves the fully quantized model here before reverting layers: the "before" to diff against.
        restorer = AdvancedAccuracyRestorerParameters(intermediate_model_dir=tmp)
        options = _nncf_options(target, model_type, keep_fp32, reduce)
        options["advanced_quantization_parameters"] = options.pop("advanced_parameters")
        quantized = nncf.quantize_with_accuracy_control(
            model, calib_set, val_set, _validation_fn(batch, target, int32_bias, score, higher_is_better),
            max_drop=float(max_drop) + 1e-9, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib),
            advanced_accuracy_restorer_parameters=restorer, **options)
        before = _quantized_ops(qdq.load_onnx(Path(tmp) / "intermediate_model.onnx"))
    after = set(_quantized_ops(quantized))
    done = _finish(quantized, dst, target, calib[:1], name, int32_bias, form)
    return {"path": str(dst), "target": target, "n_calib": len(calib), "n_val": len(val), **done,
            "keep_fp32": list(keep_fp32), "reverted": [op for op in before if op not in after],
            "seconds": round(time.perf_counter() - t0, 3)}
