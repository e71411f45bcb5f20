"""TensorRT engines for Jetson and desktop GPUs, built where they run: TensorRT 10 and 11.

What differs between the majors, and how this module copes:
- TensorRT 11 removed the precision builder flags (BuilderFlag.FP16/INT8/...), INT8 calibrators,
  platform_has_fast_fp16/int8 and NetworkDefinitionCreationFlag.EXPLICIT_BATCH. Precision comes
  from the ONNX itself (FP16 tensors, Q/DQ nodes) and every network is strongly typed. This
  module builds strongly typed networks on both majors and never touches a removed name on 11;
  `legacy_fp16_flag` (FP32 ONNX + FP16 flag, weakly typed) is a TensorRT 10 only fall-back.
- An engine runs only on the GPU architecture and TensorRT version that built it (unless built
  version- or hardware-compatible), so each engine gets a `<engine>.json` sidecar saying where it
  was built, and check_engine_compat refuses a mismatch with one line instead of a deep error.
- DLA exists on TensorRT 10 (JetPack 6) and again from TensorRT 11.4.1 (Jetson AGX Orin,
  JetPack 7.2.2+); TensorRT 11.0–11.3 have none.

Never imports torch (a Jetson runs it without); tensorrt and polygraphy are imported inside the
functions that need them. `python -m export.tensorrt build|record ...` is the device-side CLI.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from export.errors import ExportError, brief

PRECISIONS = ("fp32", "fp16", "int8")
HARDWARE_COMPATIBILITY = ("", "ampere_plus")
DLA_SINCE_TRT11 = (11, 4, 1)
SIDECAR_KEYS = ("engine_size_bytes", "engine_sha256", "tensorrt_version", "gpu_name",
                "compute_capability", "options")


@dataclass
class EngineOptions:
    """How to build one engine. `input_shape` is the input's shape without the batch dimension.

    `precision` is informational (it goes into the sidecar and reports): the precision of a
    strongly typed network is that of its ONNX (FP32, FP16 from export.fp16, INT8 from Q/DQ).
    `legacy_fp16_flag` builds an FP32 ONNX weakly typed with the FP16 builder flag: TensorRT 10
    only. `dla_core` -1 means no DLA; `gpu_fallback` lets layers DLA cannot run go to the GPU.
    `hardware_compatibility` "ampere_plus" trades speed for running on any Ampere+ desktop GPU.
    """
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    input_name: str = "input"
    input_shape: tuple = (3, 224, 224)
    workspace_mb: int = 1024
    builder_optimization_level: int = 3
    timing_cache: str | None = None
    dla_core: int = -1
    gpu_fallback: bool = True
    hardware_compatibility: str = ""
    version_compatible: bool = False
    legacy_fp16_flag: bool = False
    precision: str = "fp32"

    def __post_init__(self):
        self.input_shape = tuple(int(d) for d in self.input_shape)
        if self.timing_cache is not None:
            self.timing_cache = str(self.timing_cache)
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportError(f"EngineOptions: expected 1 ≤ min_batch ≤ opt_batch ≤ max_batch, "
                              f"got {self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if not self.input_shape or min(self.input_shape) < 1:
            raise ExportError(f"EngineOptions: input_shape must be positive dims without the "
                              f"batch, e.g. (3, 224, 224); got {self.input_shape}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"EngineOptions: precision must be one of {', '.join(PRECISIONS)}, "
                              f"got {self.precision!r}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise ExportError(f"EngineOptions: hardware_compatibility must be '' or 'ampere_plus', "
                              f"got {self.hardware_compatibility!r}")
        if self.hardware_compatibility and self.dla_core >= 0:
            raise ExportError("EngineOptions: hardware_compatibility is for desktop GPUs; "
                              "TensorRT does not support it on Jetson/DLA")
        if not 0 <= self.builder_optimization_level <= 5:
            raise ExportError(f"EngineOptions: builder_optimization_level must be 0–5, "
                              f"got {self.builder_optimization_level}")
        if self.workspace_mb < 1:
            raise ExportError(f"EngineOptions: workspace_mb must be ≥ 1, got {self.workspace_mb}")

    def shape(self, batch: int) -> tuple:
        return (batch, *self.input_shape)


# ---------------------------------------------------------------- versions and option mapping

def trt_major(trt_module) -> int:
    return _version_tuple(trt_module.__version__)[0]


def network_flags(trt_module) -> int:
    """Creation flags of a strongly typed network (TensorRT 10: opt-in; 11: always on, ignored)."""
    return 1 << int(trt_module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def create_config_kwargs(options: EngineOptions, trt_module) -> dict:
    """Keyword arguments for Polygraphy's CreateConfig for this TensorRT.

    Never passes fp16/int8 on TensorRT 11 (CreateConfig would call the removed set_flag).
    Every keyword is checked against CreateConfig's signature, so a Polygraphy that lacks one
    fails here with one line rather than deep inside a build.
    """
    from polygraphy.backend.trt import Profile

    _check_supported(options, trt_module)
    trt = trt_module
    profile = Profile().add(options.input_name, min=options.shape(options.min_batch),
                            opt=options.shape(options.opt_batch), max=options.shape(options.max_batch))
    kwargs = {
        "profiles": [profile],
        "memory_pool_limits": {trt.MemoryPoolType.WORKSPACE: options.workspace_mb << 20},
        "builder_optimization_level": options.builder_optimization_level,
    }
    if options.timing_cache:
        kwargs["load_timing_cache"] = options.timing_cache
    if options.hardware_compatibility == "ampere_plus":
        kwargs["hardware_compatibility_level"] = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if options.version_compatible:
        kwargs["version_compatible"] = True
    if options.dla_core >= 0:
        kwargs["use_dla"] = True
        kwargs["allow_gpu_fallback"] = options.gpu_fallback
    if options.legacy_fp16_flag:  # TensorRT 10 only: _check_supported refused it on 11
        kwargs["fp16"] = True
    accepted = _create_config_parameters()
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        import polygraphy
        raise ExportError(f"polygraphy {polygraphy.__version__}: CreateConfig takes no "
                          f"{', '.join(unknown)}: install a newer polygraphy")
    return kwargs


def _create_config_parameters() -> set:
    # CreateConfig.__init__ takes **kwargs and hands them to its base class: follow the MRO
    # while there are **kwargs to collect every keyword it really accepts.
    from polygraphy.backend.trt import CreateConfig

    names = set()
    for cls in CreateConfig.__mro__:
        if "__init__" not in cls.__dict__:
            continue
        params = inspect.signature(cls.__dict__["__init__"]).parameters.values()
        names |= {p.name for p in params if p.name != "self"
                  and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def _check_supported(options: EngineOptions, trt_module) -> None:
    version = _version_tuple(trt_module.__version__)
    shown = trt_module.__version__
    if version[0] < 10:
        raise ExportError(f"TensorRT {shown}: this project needs TensorRT 10 or 11")
    if options.legacy_fp16_flag and version[0] >= 11:
        raise ExportError(f"legacy_fp16_flag: TensorRT {shown} has no FP16 builder flag (removed in "
                          f"11): convert the ONNX with export.fp16.to_fp16 and build it as it is")
    if options.dla_core >= 0 and version[0] >= 11 and version[:3] < DLA_SINCE_TRT11:
        raise ExportError(f"dla_core {options.dla_core}: TensorRT {shown} has no DLA (11.0–11.3 "
                          f"dropped it; 11.4.1 has it on Jetson AGX Orin with JetPack 7.2.2+): "
                          f"use TensorRT 10 or ≥ 11.4.1, or dla_core=-1")


def _version_tuple(version) -> tuple:
    numbers = tuple(int(n) for n in re.findall(r"\d+", str(version))[:4])
    if not numbers:
        raise ExportError(f"TensorRT version {version!r} not understood (expected e.g. '10.3.0')")
    return numbers


def timing_cache_name(gpu_name: str, trt_version: str) -> str:
    """File name of the timing cache for one device and TensorRT version (caches do not travel)."""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", gpu_name).strip("-") or "gpu"
    return f"timing-cache_{gpu}_trt{trt_version}.bin"


# ---------------------------------------------------------------- building

def build_engine(onnx_path, engine_path, options: EngineOptions) -> dict:
    """Build `engine_path` from `onnx_path` on this GPU; writes `<engine>.json` beside it.

    Returns the sidecar's content. The engine and sidecar appear only when the build succeeded.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path.name}: no such file ({onnx_path})")
    trt = _import_tensorrt(onnx_path.name)
    gpu = _cuda_device()
    if gpu is None:
        raise ExportError(f"{engine_path.name}: no CUDA GPU here (libcuda missing or no device)")
    config_kwargs = create_config_kwargs(options, trt)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(engine_path)
    try:
        try:
            _polygraphy_build(onnx_path, tmp, options, config_kwargs)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"{onnx_path.name}: TensorRT build failed ({brief(e)})") from e
        import polygraphy
        meta = _metadata(onnx_path, tmp, engine_path.name, options, trt_version=trt.__version__,
                         gpu_name=gpu[0], compute_capability=gpu[1],
                         built_with=f"polygraphy {polygraphy.__version__}")
        # The engine first: a crash in between leaves an engine whose hash the old sidecar
        # does not match, which check_engine_compat reports.
        os.replace(tmp, engine_path)
        _write_json(sidecar_path(engine_path), meta)
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def _polygraphy_build(onnx_path: Path, out_path: Path, options: EngineOptions, config_kwargs: dict):
    from polygraphy.backend.trt import (CreateConfig, NetworkFromOnnxPath, PostprocessConfig,
                                        engine_from_network, save_engine)

    # Strongly typed unless the legacy FP16 flag is wanted: TensorRT 10 refuses precision flags
    # on a strongly typed network (11 has neither the flag nor weak typing).
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=not options.legacy_fp16_flag)
    config = CreateConfig(**config_kwargs)
    if options.dla_core > 0:  # Polygraphy always picks DLA core 0
        config = PostprocessConfig(config, func=lambda builder, net, cfg: setattr(
            cfg, "DLA_core", options.dla_core))
    # Deserializing the new engine here (engine_from_network) proves it loads on this device.
    engine = engine_from_network(network, config=config, save_timing_cache=options.timing_cache)
    save_engine(engine, path=str(out_path))


def _import_tensorrt(for_name: str):
    try:
        import tensorrt
    except Exception as e:  # ImportError, or OSError when its libraries are missing
        raise ExportError(f"{for_name}: TensorRT's Python API is not importable here ({brief(e)}); "
                          f"on a Jetson create the venv with --system-site-packages") from e
    return tensorrt


def _cuda_device(index: int = 0):
    """(name, "major.minor") of a CUDA GPU, from the driver library, or None.

    The CUDA driver API through ctypes works wherever a GPU driver is (desktop, Jetson) without
    torch, cuda-python or nvidia-smi (which JetPack lacks); attributes 75/76 are
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR/MINOR.
    """
    import ctypes

    for lib_name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib_name)
            break
        except OSError:
            continue
    else:
        return None
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    try:
        ok = (cuda.cuInit(0) == 0
              and cuda.cuDeviceGet(ctypes.byref(device), index) == 0
              and cuda.cuDeviceGetName(name, len(name), device) == 0
              and cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device) == 0
              and cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) == 0)
    except AttributeError:  # a library of that name without the driver API
        return None
    return (name.value.decode(errors="replace"), f"{major.value}.{minor.value}") if ok else None


def trt_version_info() -> dict | None:
    """{"version", "major", "gpu_name", "compute_capability"} if TensorRT and a GPU are here."""
    try:
        import tensorrt
    except Exception:  # ImportError, or OSError when its libraries are missing
        return None
    gpu = _cuda_device()
    if gpu is None:
        return None
    return {"version": tensorrt.__version__, "major": trt_major(tensorrt),
            "gpu_name": gpu[0], "compute_capability": gpu[1]}


# ---------------------------------------------------------------- sidecar and compatibility

def sidecar_path(engine_path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def record_engine(onnx_path, engine_path, options: EngineOptions, *, trt_version: str,
                  gpu_name: str | None = None, compute_capability=None,
                  built_with: str = "trtexec") -> dict:
    """Write the sidecar of an engine built elsewhere (trtexec); GPU read here unless given."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    for path in (onnx_path, engine_path):
        if not path.is_file():
            raise ExportError(f"{path.name}: no such file ({path})")
    if gpu_name is None or compute_capability is None:
        gpu = _cuda_device()
        if gpu is None:
            raise ExportError(f"{engine_path.name}: no CUDA GPU here to record it against")
        gpu_name, compute_capability = gpu
    # Refuse here what check_engine_compat would refuse later: a sidecar no runtime can read.
    _version_tuple(trt_version)
    meta = _metadata(onnx_path, engine_path, engine_path.name, options, trt_version=trt_version,
                     gpu_name=gpu_name, compute_capability=compute_capability, built_with=built_with)
    _write_json(sidecar_path(engine_path), meta)
    return meta


def _metadata(onnx_path: Path, engine_file: Path, engine_name: str, options: EngineOptions, *,
              trt_version, gpu_name, compute_capability, built_with) -> dict:
    return {
        "engine": engine_name,
        "engine_size_bytes": engine_file.stat().st_size,
        "engine_sha256": _sha256(engine_file),
        "onnx": onnx_path.name,
        "onnx_sha256": _sha256(onnx_path),
        "tensorrt_version": str(trt_version),
        "gpu_name": gpu_name,
        "compute_capability": "%d.%d" % _cc_tuple(compute_capability),
        "precision": options.precision,
        "strongly_typed": not options.legacy_fp16_flag,
        "profile": {"input": options.input_name,
                    "min": list(options.shape(options.min_batch)),
                    "opt": list(options.shape(options.opt_batch)),
                    "max": list(options.shape(options.max_batch))},
        "options": {**asdict(options), "input_shape": list(options.input_shape)},  # as JSON has it
        "built_with": built_with,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_engine_compat(engine_path, *, trt_version, gpu_name, compute_capability) -> dict:
    """Refuse an engine this TensorRT + GPU cannot run, in one line; returns its sidecar.

    Checked: the engine and its `<engine>.json` exist and parse; the engine's size and sha256 match
    the sidecar (a truncated copy fails here, not in TensorRT); the TensorRT version matches (or
    the engine is version-compatible and this runtime is allowed to run it); the compute
    capability matches (or the engine is ampere_plus and both GPUs are Ampere or newer).
    """
    engine = Path(engine_path)
    if not engine.is_file():
        raise ExportError(f"{engine.name}: no such file ({engine})")
    side = sidecar_path(engine)
    if not side.is_file():
        raise ExportError(f"{engine.name}: its metadata {side.name} is missing, so where it was "
                          f"built is unknown: rebuild it on this device")
    try:
        meta = _read_sidecar(side)
        built_cc = _cc_tuple(meta["compute_capability"])
        _version_tuple(meta["tensorrt_version"])
    except Exception as e:
        raise ExportError(f"{side.name}: not readable engine metadata ({brief(e)}): "
                          f"rebuild the engine on this device") from e
    size = engine.stat().st_size
    if size != meta["engine_size_bytes"] or _sha256(engine) != meta["engine_sha256"]:
        raise ExportError(f"{engine.name}: {size} bytes that do not match {side.name} "
                          f"({meta['engine_size_bytes']} bytes, sha256 "
                          f"{str(meta['engine_sha256'])[:12]}…): truncated or replaced, rebuild it")
    here_cc = _cc_tuple(compute_capability)
    options = meta["options"] or {}
    # `is True`: a sidecar saying "no" (a non-empty string) must not pass as compatible.
    version_ok = _runtime_can_run(meta["tensorrt_version"], trt_version,
                                  options.get("version_compatible") is True)
    arch_ok = built_cc == here_cc or (options.get("hardware_compatibility") == "ampere_plus"
                                      and min(built_cc, here_cc) >= (8, 0))
    if not (version_ok and arch_ok):
        raise ExportError(
            f"{engine.name}: built for TensorRT {meta['tensorrt_version']} on {_sm(built_cc)} "
            f"({meta['gpu_name']}), this is TensorRT {trt_version} on {_sm(here_cc)} "
            f"({gpu_name}): rebuild it on this device")
    return meta


_SIDECAR_TYPES = {"engine_size_bytes": int, "engine_sha256": str, "tensorrt_version": str,
                  "gpu_name": str, "compute_capability": (str, list), "options": (dict, type(None))}


def _read_sidecar(side: Path) -> dict:
    """The sidecar's JSON, its keys present with the types written by _metadata (ValueError if not).

    The sidecar travels with the engine and may be edited or come from elsewhere: a field of
    another type must be refused here, not crash (or pass) a comparison further down.
    """
    meta = json.loads(side.read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    for key, types in _SIDECAR_TYPES.items():
        value = meta[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise ValueError(f"{key} is {type(value).__name__} {value!r:.40}")
    return meta


def _runtime_can_run(built: str, runtime: str, version_compatible: bool) -> bool:
    b, r = _version_tuple(built), _version_tuple(runtime)
    n = min(len(b), len(r))  # trtexec's banner gives 10.3.0, Python's __version__ 10.3.0.30
    if b[:n] == r[:n]:
        return True
    # Version-compatible engines run on later runtimes of the same major, and TensorRT 10 ones on
    # a TensorRT 11 runtime (TensorRT 11.4.1 support matrix); nothing else crosses a major.
    return version_compatible and r > b and (r[0] == b[0] or (b[0], r[0]) == (10, 11))


def _cc_tuple(cc) -> tuple:
    try:
        if isinstance(cc, (tuple, list)):
            return int(cc[0]), int(cc[1])
        text = str(cc).strip().lower()
        text = text[3:] if text.startswith("sm_") else text
        if "." in text:
            major, minor = text.split(".", 1)
            return int(major), int(minor)
        return int(text[:-1]), int(text[-1])  # "87" → (8, 7), "100" → (10, 0)
    except (ValueError, IndexError, TypeError):
        raise ExportError(f"compute capability {cc!r} not understood (expected e.g. '8.7' or "
                          f"'sm_87')") from None


def _sm(cc: tuple) -> str:
    return f"sm_{cc[0]}{cc[1]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temp_beside(path: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    return Path(name)


def _write_json(path: Path, data: dict) -> None:
    tmp = _temp_beside(path)
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- running

class TrtEngineRunner:
    """A TensorRT engine with the OrtRunner contract: `with TrtEngineRunner(p) as r: r.infer(feed)`.

    Wraps Polygraphy's TrtRunner over EngineFromBytes, after check_engine_compat. Host↔device
    copies ARE included in infer() and in last_inference_time(): Polygraphy's runner copies the
    numpy inputs to the GPU and the outputs back inside infer. For GPU-only time use trtexec's
    "GPU Compute Time".
    """
    includes_host_device_copies = True

    def __init__(self, engine_path):
        self.path = Path(engine_path)
        here = trt_version_info()
        if here is None:
            raise ExportError(f"{self.path.name}: TensorRT's Python API or a CUDA GPU is missing here")
        self.metadata = check_engine_compat(self.path, trt_version=here["version"],
                                            gpu_name=here["gpu_name"],
                                            compute_capability=here["compute_capability"])
        self.input_names, self.output_names = [], []
        self._runner = None

    def __enter__(self):
        import tensorrt as trt
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        try:
            runner = TrtRunner(EngineFromBytes(self.path.read_bytes()))
            runner.activate()
        except Exception as e:
            raise ExportError(f"{self.path.name}: TensorRT cannot load it ({brief(e)})") from e
        engine = runner.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self._runner = runner
        return self

    def __exit__(self, *exc):
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None

    def infer(self, feed: dict) -> dict:
        import numpy as np

        if self._runner is None:
            raise ExportError(f"{self.path.name}: use TrtEngineRunner in a with-block")
        try:
            outputs = self._runner.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        except Exception as e:
            raise ExportError(f"{self.path.name}: TensorRT inference failed ({brief(e)})") from e
        # Polygraphy reuses its host output buffers on the next call: hand out copies.
        return {name: np.array(outputs[name], copy=True) for name in self.output_names}

    def last_inference_time(self) -> float:
        """Seconds of the last infer(), host↔device copies included."""
        return self._runner.last_inference_time()


# ---------------------------------------------------------------- trtexec, scripts, onnxruntime

def trtexec_command(onnx_path, engine_path, options: EngineOptions, trt_major: int) -> list:
    """The trtexec line for TensorRT `trt_major` (10 or 11).

    Both forms pass --stronglyTyped (needed on 10, always on and accepted on 11); only the
    TensorRT 10 form may carry --fp16, for legacy_fp16_flag (then weakly typed). No
    --int8/--best/--calib on either: INT8 comes from the ONNX's Q/DQ nodes.
    """
    if trt_major < 10:
        raise ExportError(f"TensorRT {trt_major}: this project needs TensorRT 10 or 11")
    if options.legacy_fp16_flag and trt_major >= 11:
        raise ExportError(f"legacy_fp16_flag: TensorRT {trt_major} has no --fp16 (removed in 11): "
                          f"convert the ONNX with export.fp16.to_fp16 and build it as it is")

    def shapes(batch):
        return f"{options.input_name}:" + "x".join(str(d) for d in options.shape(batch))

    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
           "--fp16" if options.legacy_fp16_flag else "--stronglyTyped",
           f"--minShapes={shapes(options.min_batch)}",
           f"--optShapes={shapes(options.opt_batch)}",
           f"--maxShapes={shapes(options.max_batch)}",
           # No unit suffix: trtexec reads MiB by default in every version (suffixes came later).
           f"--memPoolSize=workspace:{options.workspace_mb}",
           f"--builderOptimizationLevel={options.builder_optimization_level}"]
    if options.timing_cache:
        cmd.append(f"--timingCacheFile={options.timing_cache}")
    if options.dla_core >= 0:
        cmd.append(f"--useDLACore={options.dla_core}")
        if options.gpu_fallback:
            cmd.append("--allowGPUFallback")
    if options.hardware_compatibility == "ampere_plus":
        cmd.append("--hardwareCompatibilityLevel=ampere+")
    if options.version_compatible:
        cmd.append("--versionCompatible")
    cmd.append("--skipInference")
    return cmd


_TIMING_CACHE_PLACEHOLDER = "@TIMING_CACHE@"

_SCRIPT = """\
#!/usr/bin/env bash
# Builds {engine} from {onnx} on THIS device: a TensorRT engine runs only on the GPU and
# TensorRT version that built it. Written by export.tensorrt.build_script.
# Options: {options}
set -euo pipefail
cd "$(dirname "$0")"

# 1. TensorRT's Python API (and Polygraphy) here: build with this bundle's export package.
if python3 -c 'import tensorrt, polygraphy' >/dev/null 2>&1; then
  MAJOR=$(python3 -c 'import tensorrt; print(tensorrt.__version__.split(".")[0])')
  echo "TensorRT $MAJOR (Python API): building {engine} with export.tensorrt"
  export PYTHONPATH="$PWD${{PYTHONPATH:+:$PYTHONPATH}}"
  exec python3 -m export.tensorrt build {python_args}
fi

# 2. Otherwise trtexec, in the form of the TensorRT major it reports.
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if [ ! -x "$TRTEXEC" ]; then
  echo "error: neither TensorRT's Python API nor trtexec found (set TRTEXEC=/path/to/trtexec)" >&2
  exit 1
fi
# The banner reads "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] ..." for 10.3.0.
CODE=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p' | head -n 1 || true)
if [ -z "$CODE" ]; then
  echo "error: cannot read the TensorRT version from $TRTEXEC --help" >&2
  exit 1
fi
VERSION="$((CODE / 10000)).$((CODE / 100 % 100)).$((CODE % 100))"
TIMING_CACHE="{timing_cache_stem}.trt$VERSION.timing-cache"
echo "TensorRT $VERSION (trtexec): building {engine}"
case "$((CODE / 10000))" in
  10)
    {trtexec10} ;;
  11)
    {trtexec11} ;;
  *)
    echo "error: TensorRT $VERSION is not supported (10 or 11 expected)" >&2
    exit 1 ;;
esac
# Record where the engine was built (<engine>.json), as the Python path does.
if command -v python3 >/dev/null 2>&1; then
  PYTHONPATH="$PWD${{PYTHONPATH:+:$PYTHONPATH}}" python3 -m export.tensorrt record {record_args} --trt-version "$VERSION"
else
  echo "warning: no python3: {engine}.json not written; export.tensorrt will refuse the engine" >&2
fi
"""


def build_script(onnx_name: str, engine_name: str, options: EngineOptions) -> str:
    """Text of a deploy bundle's build_engine.sh (run next to the ONNX and the export package)."""
    io_args = ["--onnx", onnx_name, "--engine", engine_name]
    python_options = replace(options, timing_cache="auto" if options.timing_cache else None)

    def trtexec_line(major):
        if options.legacy_fp16_flag and major >= 11:
            return (f"echo 'error: legacy_fp16_flag needs TensorRT 10 (11 has no --fp16)' >&2; "
                    f"exit 1")
        timing = _TIMING_CACHE_PLACEHOLDER if options.timing_cache else None
        cmd = trtexec_command(onnx_name, engine_name, replace(options, timing_cache=timing), major)
        line = '"$TRTEXEC" ' + shlex.join(cmd[1:])
        return line.replace(_TIMING_CACHE_PLACEHOLDER, '"$TIMING_CACHE"')

    return _SCRIPT.format(
        engine=engine_name, onnx=onnx_name,
        options=json.dumps(asdict(options), sort_keys=True),
        python_args=shlex.join(io_args + _cli_args(python_options)),
        record_args=shlex.join(io_args + _cli_args(replace(options, timing_cache=None))),
        timing_cache_stem=shlex.quote(Path(engine_name).stem),
        trtexec10=trtexec_line(10), trtexec11=trtexec_line(11))


def ort_tensorrt_provider_options(trt_major: int, *, cache_dir, fp16=False, int8=False,
                                  min_batch, opt_batch, max_batch, input_name,
                                  input_shape) -> list:
    """onnxruntime providers: TensorRT EP (engine + timing cache, profile shapes), CUDA, CPU.

    trt_fp16_enable/trt_int8_enable exist for TensorRT 10 only; on 11 the precision is the
    ONNX's (FP16 tensors, Q/DQ), so asking for them there is an error rather than a silent FP32.
    Pass the result as OrtRunner(path, providers=...).
    """
    if (fp16 or int8) and trt_major >= 11:
        raise ExportError(f"TensorRT {trt_major}: precision comes from the ONNX (FP16 tensors, "
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


# ---------------------------------------------------------------- command line

def _cli_args(options: EngineOptions) -> list:
    args = ["--input-name", options.input_name,
            "--input-shape", "x".join(str(d) for d in options.input_shape),
            "--min-batch", str(options.min_batch), "--opt-batch", str(options.opt_batch),
            "--max-batch", str(options.max_batch), "--workspace-mb", str(options.workspace_mb),
            "--opt-level", str(options.builder_optimization_level),
            "--dla-core", str(options.dla_core),
            "--gpu-fallback" if options.gpu_fallback else "--no-gpu-fallback",
            "--precision", options.precision]
    if options.timing_cache:
        args += ["--timing-cache", options.timing_cache]
    if options.hardware_compatibility:
        args += ["--hardware-compatibility", options.hardware_compatibility]
    if options.version_compatible:
        args.append("--version-compatible")
    if options.legacy_fp16_flag:
        args.append("--legacy-fp16-flag")
    return args


def _parser() -> argparse.ArgumentParser:
    d = EngineOptions()
    p = argparse.ArgumentParser(prog="python -m export.tensorrt",
                                description="Build a TensorRT engine on this device, or record "
                                            "(<engine>.json) one that trtexec built.")
    p.add_argument("command", choices=("build", "record"))
    p.add_argument("--onnx", required=True)
    p.add_argument("--engine", required=True)
    p.add_argument("--trt-version", help="record: the TensorRT version that built the engine")
    p.add_argument("--input-name", default=d.input_name)
    p.add_argument("--input-shape", default="x".join(map(str, d.input_shape)),
                   help="without the batch, e.g. 3x224x224")
    p.add_argument("--min-batch", type=int, default=d.min_batch)
    p.add_argument("--opt-batch", type=int, default=d.opt_batch)
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--workspace-mb", type=int, default=d.workspace_mb)
    p.add_argument("--opt-level", type=int, default=d.builder_optimization_level)
    p.add_argument("--timing-cache", default=None,
                   help="path, or 'auto': one per GPU and TensorRT version beside the engine")
    p.add_argument("--dla-core", type=int, default=d.dla_core)
    p.add_argument("--gpu-fallback", action=argparse.BooleanOptionalAction, default=d.gpu_fallback)
    p.add_argument("--hardware-compatibility", default=d.hardware_compatibility,
                   choices=HARDWARE_COMPATIBILITY)
    p.add_argument("--version-compatible", action="store_true")
    p.add_argument("--legacy-fp16-flag", action="store_true")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS)
    return p


def _options_from_args(args) -> EngineOptions:
    try:
        shape = tuple(int(d) for d in args.input_shape.lower().split("x"))
    except ValueError:
        raise ExportError(f"--input-shape {args.input_shape!r}: expected e.g. 3x224x224") from None
    return EngineOptions(
        min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
        input_name=args.input_name, input_shape=shape, workspace_mb=args.workspace_mb,
        builder_optimization_level=args.opt_level, timing_cache=args.timing_cache,
        dla_core=args.dla_core, gpu_fallback=args.gpu_fallback,
        hardware_compatibility=args.hardware_compatibility,
        version_compatible=args.version_compatible, legacy_fp16_flag=args.legacy_fp16_flag,
        precision=args.precision)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = _options_from_args(args)
        if args.command == "record":
            if not args.trt_version:
                raise ExportError("record: --trt-version is required (the TensorRT that built it)")
            meta = record_engine(args.onnx, args.engine, options, trt_version=args.trt_version)
        else:
            if options.timing_cache == "auto":
                here = trt_version_info()
                if here is None:
                    raise ExportError(f"{Path(args.engine).name}: TensorRT's Python API or a "
                                      f"CUDA GPU is missing here")
                name = timing_cache_name(here["gpu_name"], here["version"])
                options = replace(options, timing_cache=str(Path(args.engine).parent / name))
            meta = build_engine(args.onnx, args.engine, options)
    except ExportError as e:
        print(f"FAILED | {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an unwritable folder, a full disk: one line too, not a traceback
        # A failed rename names the temporary file first: the user asked for the second one.
        print(f"FAILED | {e.filename2 or e.filename or args.engine}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"PASSED | {args.engine}: TensorRT {meta['tensorrt_version']} on "
          f"{_sm(_cc_tuple(meta['compute_capability']))} ({meta['gpu_name']}), {meta['precision']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
