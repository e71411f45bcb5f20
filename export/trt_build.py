"""Build a TensorRT engine on this GPU through Polygraphy (the pipeline's path; a deploy bundle
builds with build_engine.sh and trtexec instead).

The network is strongly typed on TensorRT 10 and 11 (precision comes from the ONNX) unless
`legacy_fp16_flag` asks for TensorRT 10's weakly typed FP16 build. tensorrt and polygraphy are
imported inside the functions. Not executed on hardware in this workplace (no GPU, no
TensorRT): the tests run build_engine against faked Polygraphy loaders.
"""
from __future__ import annotations

import re
from pathlib import Path

from edgerun.errors import EdgeError, brief
from edgerun.io import atomic_write
from edgerun.trt import cuda_device, record_engine
from export.errors import ExportError
from export.trt_options import EngineOptions, build_info, create_config_kwargs


def timing_cache_name(gpu_name: str, trt_version: str) -> str:
    """File name of the timing cache for one device and TensorRT version (caches do not travel)."""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", gpu_name).strip("-") or "gpu"
    return f"timing-cache_{gpu}_trt{trt_version}.bin"


def build_engine(onnx_path, engine_path, options: EngineOptions, *, input_name, input_shape,
                 precision, timing_cache=None) -> dict:
    """Build `engine_path` from `onnx_path` on this GPU; writes `<engine>.json` beside it.

    Returns the sidecar's content. `precision` is informational (the ONNX's own precision is
    what a strongly typed engine runs at). `timing_cache` is loaded if it exists and saved
    after the build (one per GPU and TensorRT version: see timing_cache_name).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path.name}: no such file ({onnx_path})")
    info = build_info(options, input_name=input_name, input_shape=input_shape, precision=precision)
    trt = _import_tensorrt(onnx_path.name)
    gpu = cuda_device()
    if gpu is None:
        raise ExportError(f"{engine_path.name}: no CUDA GPU here (libcuda missing or no device)")
    config_kwargs = create_config_kwargs(options, trt, input_name=input_name,
                                         input_shape=info.input_shape, timing_cache=timing_cache)
    try:
        engine = _polygraphy_build(onnx_path, options, config_kwargs, timing_cache)
        from polygraphy.backend.trt import save_engine

        atomic_write(engine_path, lambda tmp: save_engine(engine, path=tmp))
    except EdgeError:
        raise
    except Exception as e:
        raise ExportError(f"{onnx_path.name}: TensorRT build failed ({brief(e)})") from e
    import polygraphy

    # The engine first, then its sidecar: a crash in between leaves an engine whose hash the old
    # sidecar does not match, which check_engine_compat reports.
    return record_engine(onnx_path, engine_path, info, trt_version=trt.__version__,
                         gpu_name=gpu[0], compute_capability=gpu[1],
                         built_with=f"polygraphy {polygraphy.__version__}")


def _polygraphy_build(onnx_path: Path, options: EngineOptions, config_kwargs: dict, timing_cache):
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, PostprocessConfig, engine_from_network

    # TensorRT 10 refuses precision flags on a strongly typed network; 11 has neither the flag
    # nor weak typing (check_supported refused legacy_fp16_flag there).
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=not options.legacy_fp16_flag)
    config = CreateConfig(**config_kwargs)
    if options.dla_core > 0:  # Polygraphy always picks DLA core 0
        config = PostprocessConfig(config, func=lambda builder, net, cfg: setattr(
            cfg, "DLA_core", options.dla_core))
    # engine_from_network deserializes the new engine, which proves it loads on this device.
    return engine_from_network(network, config=config,
                               save_timing_cache=str(timing_cache) if timing_cache else None)


def _import_tensorrt(for_name: str):
    try:
        import tensorrt
    except Exception as e:  # ImportError, or OSError when its libraries are missing
        raise ExportError(f"{for_name}: TensorRT's Python API is not importable here ({brief(e)}); "
                          f"on a Jetson create the venv with --system-site-packages") from e
    return tensorrt
