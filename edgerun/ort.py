"""onnxruntime runner with the same contract as Polygraphy's: a context manager with
`infer(feed: dict[str, ndarray]) -> dict[str, ndarray]`.

Runtime code: a Jetson runs it, so it never imports torch, pipeline, export or calib;
onnxruntime itself is imported inside the functions that need it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edgerun.errors import EdgeError, brief


class OrtError(EdgeError):
    """A model onnxruntime cannot load or run here, a missing provider, or a bad feed."""


def onnxruntime():
    """The onnxruntime module; its absence on the target (or a wheel that cannot load) is one line."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise OrtError(f"onnxruntime cannot be imported by {sys.executable} ({brief(e)}): install it "
                       f"(pip install onnxruntime; onnxruntime-gpu or the JetPack wheel on a Jetson)") from None
    return ort


def available_ort_providers() -> list[str]:
    return list(onnxruntime().get_available_providers())


def model_name(model) -> str:
    """How errors name a model: its file name, or "the in-memory model" for serialized bytes."""
    return "the in-memory model" if isinstance(model, (bytes, bytearray)) else Path(model).name


class OrtRunner:
    """An onnxruntime session on ``model``: a path, or a serialized ONNX model (bytes).

    `providers` is passed to onnxruntime as given: names, or (name, options) pairs such as those
    of ort_tensorrt_provider_options. A provider missing from this onnxruntime build is an error,
    not a silent fall back to the CPU (which would make every timing lie). `threads` = 0 lets
    onnxruntime choose; `provider_options` is onnxruntime's list of option dicts, one per
    provider name. `inter_threads`: onnxruntime's inter-op pool (0: its choice). `graph_optimization`
    False runs the graph as written, no fusion at all (ORT_DISABLE_ALL: the unfused Q/DQ arithmetic
    ONNX defines); True is onnxruntime's default, every optimisation (ORT_ENABLE_ALL).
    A model that cannot load raises OrtError from onnxruntime's own exception (its __cause__).
    """

    def __init__(self, model, providers=("CPUExecutionProvider",), threads=0, provider_options=None, *,
                 inter_threads=0, graph_optimization=True):
        ort = onnxruntime()
        in_memory = isinstance(model, (bytes, bytearray))
        self.path = None if in_memory else Path(model)
        self.name = name = model_name(model)
        if not in_memory and not self.path.is_file():
            raise OrtError(f"{name}: no such file ({self.path})")
        providers = list(providers)
        wanted = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            raise OrtError(f"{name}: onnxruntime here has no {', '.join(missing)} "
                           f"(available: {', '.join(available)})")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = int(inter_threads)
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if graph_optimization
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        try:
            self.session = ort.InferenceSession(bytes(model) if in_memory else str(self.path), sess_options=options,
                                                providers=providers,
                                                provider_options=provider_options)
        except Exception as e:
            raise OrtError(f"{name}: onnxruntime cannot load it ({brief(e)})") from e
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.session = None

    def infer(self, feed: dict) -> dict:
        if self.session is None:
            raise OrtError(f"{self.name}: this runner was closed")
        if set(feed) != set(self.input_names):
            raise OrtError(f"{self.name}: expected inputs {self.input_names}, "
                           f"got {sorted(feed)}")
        try:
            outputs = self.session.run(self.output_names, {k: np.asarray(v) for k, v in feed.items()})
        except Exception as e:
            raise OrtError(f"{self.name}: onnxruntime failed ({brief(e)})") from e
        return dict(zip(self.output_names, outputs, strict=True))


def run_onnx(model, inputs: np.ndarray, batch_size=256, **runner_kwargs) -> dict:
    """Run a single-input model (a path or serialized bytes) over `inputs` in batches; outputs
    concatenated along axis 0. `runner_kwargs` go to OrtRunner (threads, graph_optimization, ...)."""
    inputs = np.asarray(inputs)
    name = model_name(model)
    if len(inputs) == 0 or batch_size < 1:
        raise OrtError(f"{name}: run_onnx needs at least one input row and "
                       f"batch_size ≥ 1 (got {len(inputs)} rows, batch_size {batch_size})")
    with OrtRunner(model, **runner_kwargs) as runner:
        if len(runner.input_names) != 1:
            raise OrtError(f"{name}: run_onnx needs a single-input model, "
                           f"this one has {runner.input_names}")
        return infer_batched(runner, inputs, batch_size)


def infer_batched(runner: OrtRunner, inputs: np.ndarray, batch_size: int) -> dict:
    """Every output of an open single-input ``runner`` over ``inputs`` in batches, concatenated by name."""
    (input_name,) = runner.input_names
    chunks = [runner.infer({input_name: inputs[i:i + batch_size]}) for i in range(0, len(inputs), batch_size)]
    return {key: np.concatenate([c[key] for c in chunks]) for key in runner.output_names}


def ort_tensorrt_provider_options(trt_major: int, *, cache_dir, fp16=False, int8=False,
                                  min_batch, opt_batch, max_batch, input_name,
                                  input_shape) -> list:
    """onnxruntime providers: TensorRT EP (engine + timing cache, profile shapes), CUDA, CPU.

    trt_fp16_enable/trt_int8_enable exist for TensorRT 10 only; on 11 the precision is the
    ONNX's (FP16 tensors, Q/DQ), so asking for them there is an error rather than a silent FP32.
    Pass the result as OrtRunner(path, providers=...). Not executed on hardware here (no GPU):
    the option names are onnxruntime's documented TensorRT EP options.
    """
    if (fp16 or int8) and trt_major >= 11:
        raise OrtError(f"TensorRT {trt_major}: precision comes from the ONNX (FP16 tensors, "
                       f"Q/DQ nodes), not from trt_fp16_enable/trt_int8_enable: pass "
                       f"fp16=False, int8=False with an FP16 or Q/DQ ONNX")

    def shapes(batch):
        return f"{input_name}:" + "x".join(str(d) for d in (batch, *input_shape))

    cache_dir = str(cache_dir)
    trt_options = {
        "device_id": 0,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache_dir,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache_dir,
        "trt_profile_min_shapes": shapes(min_batch),
        "trt_profile_opt_shapes": shapes(opt_batch),
        "trt_profile_max_shapes": shapes(max_batch),
    }
    if fp16:
        trt_options["trt_fp16_enable"] = True
    if int8:
        trt_options["trt_int8_enable"] = True
    return [("TensorrtExecutionProvider", trt_options),
            ("CUDAExecutionProvider", {"device_id": 0}),
            ("CPUExecutionProvider", {})]
