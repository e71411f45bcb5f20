"""Model files opened once on a backend, with one `run(batch)` contract: what the timer times.

Shared by the timing protocol's worker processes, the benchmark verb and the profile stage. GPU
branches (onnxruntime CUDA/TensorRT, TensorRT engines) follow the documented APIs and have NOT been
executed on hardware in this project.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgerun.errors import EdgeError
from edgerun.machine import physical_cores

ORT_BACKENDS = {"onnxruntime-cpu": "CPUExecutionProvider", "onnxruntime-cuda": "CUDAExecutionProvider",
                "onnxruntime-tensorrt": "TensorrtExecutionProvider"}
GPU_BACKENDS = ("torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")


class BenchmarkError(EdgeError):
    """A bundle that cannot be benchmarked, or a backend that cannot open a file."""


@dataclass(frozen=True)
class Session:
    """One model file opened on one backend: ``run(batch)``; ``close()`` frees it."""
    run: Callable[[np.ndarray], object]
    close: Callable[[], None]
    backend: str
    threads: int | None = None
    sync: Callable[[], object] | None = None          # inside the timed region (asynchronous GPU work)
    batch_range: tuple[int, int] | None = None        # engines: the optimisation profile's min/max batch
    notes: tuple[str, ...] = ()
    gpu_peak_mb: Callable[[], float | None] | None = None


def trt_here() -> dict | None:
    """TensorRT's version and the GPU when both are here (edgerun.trt), else None."""
    with contextlib.suppress(Exception):
        from edgerun.trt import trt_version_info
        return trt_version_info()
    return None


def backends_for(kind: str) -> list[str]:
    """The backends present on this machine that run a file of this kind (onnx | engine)."""
    if kind == "onnx":
        try:
            from edgerun.ort import available_ort_providers
            have = available_ort_providers()
        except (ImportError, EdgeError):   # no onnxruntime here: nothing runs an ONNX file
            return []
        out = [b for b, p in ORT_BACKENDS.items() if p in have]
        if "onnxruntime-tensorrt" in out and trt_here() is None:
            out.remove("onnxruntime-tensorrt")
        return out
    if kind == "engine":
        return ["tensorrt"] if trt_here() is not None else []
    return []


# The backend registry: name -> opener(path, backend, threads=, batches=, input_shape=) -> Session. Every caller
# (the timing worker, the benchmark verb, the profile, the pruning search) opens files through open_session, so a
# new runtime is one opener registered here (docs/architecture.md, "How to add a runtime").
OPENERS: dict[str, Callable[..., "Session"]] = {}


def register_backend(name: str, opener: Callable[..., "Session"]) -> None:
    OPENERS[name] = opener


def open_session(path, backend: str, *, threads: int = 0, batches=(1,), input_shape=None) -> Session:
    """``path`` opened once on ``backend``. GPU branches follow the documented APIs (not run here)."""
    path = Path(path)
    opener = OPENERS.get(backend)
    if opener is None:
        raise BenchmarkError(f"{path.name}: unknown backend {backend!r} (expected one of {', '.join(OPENERS)})")
    return opener(path, backend, threads=threads, batches=batches, input_shape=input_shape)


def _open_ort(path: Path, backend: str, *, threads: int, batches, input_shape) -> Session:
    from edgerun.ort import OrtRunner
    notes, cleanup = [], []
    if backend == "onnxruntime-cpu":
        providers = ["CPUExecutionProvider"]
    elif backend == "onnxruntime-cuda":
        providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        notes.append("includes host<->device copies (numpy in, numpy out)")
    else:
        providers = _ort_tensorrt_providers(path, batches, input_shape, cleanup)
        notes.append("TensorRT EP engine built on first use (in warm-up); includes host<->device copies")
    try:
        runner = OrtRunner(path, providers=providers, threads=threads)
    except BaseException:
        for c in cleanup:
            c()
        raise
    if runner.providers[0] != ORT_BACKENDS[backend]:  # a silent CPU fall-back would time the wrong thing
        for c in cleanup:
            c()
        raise BenchmarkError(f"{path.name}: onnxruntime placed the session on {runner.providers[0]}, "
                             f"not {ORT_BACKENDS[backend]}")
    name = runner.input_names[0]

    def close():
        runner.__exit__(None, None, None)
        for c in cleanup:
            c()
    # onnxruntime's default intra-op pool: one thread per physical core
    return Session(run=lambda x: runner.infer({name: x}), close=close, backend=backend,
                   threads=threads or physical_cores(), notes=tuple(notes))


def _ort_tensorrt_providers(path: Path, batches, input_shape, cleanup: list) -> list:
    from edgerun.ort import ort_tensorrt_provider_options
    trt = trt_here()
    if trt is None:
        raise BenchmarkError(f"{path.name}: onnxruntime-tensorrt needs TensorRT and a CUDA GPU here")
    if input_shape is None:
        raise BenchmarkError(f"{path.name}: onnxruntime-tensorrt needs the input shape for its profile")
    cache = tempfile.mkdtemp(prefix="ort_trt_cache_")
    cleanup.append(lambda: shutil.rmtree(cache, ignore_errors=True))
    batches = sorted(batches)
    # Precision comes from the ONNX itself (FP16 tensors, Q/DQ): no trt_fp16/int8 flags.
    return ort_tensorrt_provider_options(trt["major"], cache_dir=cache, min_batch=batches[0],
                                         opt_batch=batches[len(batches) // 2], max_batch=batches[-1],
                                         input_name=_onnx_input_name(path), input_shape=tuple(input_shape))


def _onnx_input_name(path: Path) -> str:
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


def _open_engine(path: Path, backend: str = "tensorrt", **_) -> Session:
    from edgerun.trt import TrtEngineRunner
    runner = TrtEngineRunner(path).__enter__()
    name = runner.input_names[0]
    prof = (runner.metadata or {}).get("profile") or {}
    rng = (int(prof["min"][0]), int(prof["max"][0])) if prof.get("min") and prof.get("max") else None
    return Session(run=lambda x: runner.infer({name: x}), close=lambda: runner.__exit__(None, None, None),
                   backend="tensorrt", batch_range=rng, notes=("includes host<->device copies (Polygraphy TrtRunner)",))


for _name in ORT_BACKENDS:
    register_backend(_name, _open_ort)
register_backend("tensorrt", _open_engine)
