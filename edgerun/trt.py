"""TensorRT on the device: what is here, the engine's sidecar, compatibility, and a runner.

An engine runs only on the GPU architecture and TensorRT version that built it (unless built
version- or hardware-compatible), so every engine gets a `<engine>.json` sidecar saying where it
was built, and check_engine_compat refuses a mismatch with one line instead of a deep TensorRT
error. `python3 -m edgerun record` (add_record_parser / run_record) writes the sidecar of an
engine that trtexec built; build_engine.sh beside this file runs it (script_path()).

Runtime code: it never imports torch, pipeline, export or calib; tensorrt and polygraphy are
imported inside the functions that need them. The TensorRT paths are not executed on hardware
in this workplace (no GPU, no TensorRT); the sidecar and compatibility logic is tested on files.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from edgerun.errors import EdgeError, brief
from edgerun.io import sha256_file, write_json

BUILD_INFO_NAME = "engine_build.json"
SIDECAR_KEYS = ("engine_size_bytes", "engine_sha256", "tensorrt_version", "gpu_name",
                "compute_capability", "options")


class EngineError(EdgeError):
    """A TensorRT engine that cannot run here, a broken sidecar, or TensorRT missing."""


@dataclass(frozen=True)
class BuildInfo:
    """How an engine was asked to be built: what its sidecar records besides where it was built.

    `options` holds the build options as JSON (export.trt_options.options_json); this module
    reads only `version_compatible` and `hardware_compatibility` from it, in check_engine_compat.
    `precision` is informational: a strongly typed engine runs at the precision of its ONNX.
    """
    input_name: str
    input_shape: tuple  # without the batch
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    strongly_typed: bool
    options: dict

    def shape(self, batch: int) -> list:
        return [batch, *self.input_shape]

    @classmethod
    def load(cls, path) -> BuildInfo:
        """Read a BuildInfo written as JSON (write_build_files); one-line EngineError if bad."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            info = cls(**data)
            kinds = {"input_name": str, "precision": str, "min_batch": int, "opt_batch": int,
                     "max_batch": int, "strongly_typed": bool, "options": dict}
            for key, kind in kinds.items():
                if not isinstance(getattr(info, key), kind):
                    raise ValueError(f"{key} is {type(getattr(info, key)).__name__}")
            return cls(**{**data, "input_shape": tuple(int(d) for d in info.input_shape)})
        except (OSError, ValueError, TypeError) as e:
            raise EngineError(f"{path.name}: not a readable engine build description "
                              f"({brief(e)}): regenerate the bundle") from None


def script_path() -> Path:
    """The bundle's build script (a static resource of this package)."""
    return Path(__file__).with_name("build_engine.sh")


# ---------------------------------------------------------------- what is here

def version_tuple(version) -> tuple:
    numbers = tuple(int(n) for n in re.findall(r"\d+", str(version))[:4])
    if not numbers:
        raise EngineError(f"TensorRT version {version!r} not understood (expected e.g. '10.3.0')")
    return numbers


def cuda_device(index: int = 0):
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
    gpu = cuda_device()
    if gpu is None:
        return None
    return {"version": tensorrt.__version__, "major": version_tuple(tensorrt.__version__)[0],
            "gpu_name": gpu[0], "compute_capability": gpu[1]}


# ---------------------------------------------------------------- sidecar and compatibility

def sidecar_path(engine_path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def record_engine(onnx_path, engine_path, build: BuildInfo, *, trt_version: str,
                  gpu_name: str | None = None, compute_capability=None,
                  built_with: str = "trtexec") -> dict:
    """Write `<engine>.json` for an engine built here; the GPU is read here unless given.

    Returns the sidecar's content. Call it after the engine is in place: the sidecar holds the
    engine's hash, so a crash in between leaves a mismatch that check_engine_compat reports.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    for path in (onnx_path, engine_path):
        if not path.is_file():
            raise EngineError(f"{path.name}: no such file ({path})")
    if gpu_name is None or compute_capability is None:
        gpu = cuda_device()
        if gpu is None:
            raise EngineError(f"{engine_path.name}: no CUDA GPU here to record it against")
        gpu_name, compute_capability = gpu
    # Refuse here what check_engine_compat would refuse later: a sidecar no runtime can read.
    version_tuple(trt_version)
    meta = {
        "engine": engine_path.name,
        "engine_size_bytes": engine_path.stat().st_size,
        "engine_sha256": sha256_file(engine_path),
        "onnx": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "tensorrt_version": str(trt_version),
        "gpu_name": gpu_name,
        "compute_capability": "%d.%d" % _cc_tuple(compute_capability),
        "precision": build.precision,
        "strongly_typed": build.strongly_typed,
        "profile": {"input": build.input_name, "min": build.shape(build.min_batch),
                    "opt": build.shape(build.opt_batch), "max": build.shape(build.max_batch)},
        "options": build.options,
        "built_with": built_with,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(sidecar_path(engine_path), meta)
    return meta


def check_engine_compat(engine_path, *, trt_version, gpu_name, compute_capability) -> dict:
    """Refuse an engine this TensorRT + GPU cannot run, in one line; returns its sidecar.

    Checked: the engine and its `<engine>.json` exist and parse; the engine's size and sha256 match
    the sidecar (a truncated copy fails here, not in TensorRT); the TensorRT version matches (or
    the engine is version-compatible and this runtime is allowed to run it); the compute
    capability matches (or the engine is ampere_plus and both GPUs are Ampere or newer).
    """
    engine = Path(engine_path)
    if not engine.is_file():
        raise EngineError(f"{engine.name}: no such file ({engine})")
    side = sidecar_path(engine)
    if not side.is_file():
        raise EngineError(f"{engine.name}: its metadata {side.name} is missing, so where it was "
                          f"built is unknown: rebuild it on this device")
    try:
        meta = _read_sidecar(side)
        built_cc = _cc_tuple(meta["compute_capability"])
        version_tuple(meta["tensorrt_version"])
    except Exception as e:
        raise EngineError(f"{side.name}: not readable engine metadata ({brief(e)}): "
                          f"rebuild the engine on this device") from e
    size = engine.stat().st_size
    if size != meta["engine_size_bytes"] or sha256_file(engine) != meta["engine_sha256"]:
        raise EngineError(f"{engine.name}: {size} bytes that do not match {side.name} "
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
        raise EngineError(
            f"{engine.name}: built for TensorRT {meta['tensorrt_version']} on {_sm(built_cc)} "
            f"({meta['gpu_name']}), this is TensorRT {trt_version} on {_sm(here_cc)} "
            f"({gpu_name}): rebuild it on this device")
    return meta


_SIDECAR_TYPES = {"engine_size_bytes": int, "engine_sha256": str, "tensorrt_version": str,
                  "gpu_name": str, "compute_capability": (str, list), "options": (dict, type(None))}


def _read_sidecar(side: Path) -> dict:
    """The sidecar's JSON, its keys present with the types record_engine writes (ValueError if not).

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
    b, r = version_tuple(built), version_tuple(runtime)
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
        raise EngineError(f"compute capability {cc!r} not understood (expected e.g. '8.7' or "
                          f"'sm_87')") from None


def _sm(cc: tuple) -> str:
    return f"sm_{cc[0]}{cc[1]}"


# ---------------------------------------------------------------- running

class TrtEngineRunner:
    """A TensorRT engine with the OrtRunner contract: `with TrtEngineRunner(p) as r: r.infer(feed)`.

    Wraps Polygraphy's TrtRunner over EngineFromBytes, after check_engine_compat. Host↔device
    copies ARE included in infer() and in last_inference_time(): Polygraphy's runner copies the
    numpy inputs to the GPU and the outputs back inside infer. For GPU-only time use trtexec's
    "GPU Compute Time". Not executed on hardware in this workplace.
    """
    includes_host_device_copies = True

    def __init__(self, engine_path):
        self.path = Path(engine_path)
        here = trt_version_info()
        if here is None:
            raise EngineError(f"{self.path.name}: TensorRT's Python API or a CUDA GPU is missing here")
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
            raise EngineError(f"{self.path.name}: TensorRT cannot load it ({brief(e)})") from e
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
            raise EngineError(f"{self.path.name}: use TrtEngineRunner in a with-block")
        try:
            outputs = self._runner.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        except Exception as e:
            raise EngineError(f"{self.path.name}: TensorRT inference failed ({brief(e)})") from e
        # Polygraphy reuses its host output buffers on the next call: hand out copies.
        return {name: np.array(outputs[name], copy=True) for name in self.output_names}

    def last_inference_time(self) -> float:
        """Seconds of the last infer(), host↔device copies included."""
        return self._runner.last_inference_time()


# ---------------------------------------------------------------- `python3 -m edgerun record`

def add_record_parser(subparsers):
    """The `record` verb: write <engine>.json for an engine trtexec just built on this device."""
    p = subparsers.add_parser("record", help="write <engine>.json for an engine built here by trtexec",
                              description="Record where an engine was built (its sidecar), so a "
                                          "runtime elsewhere refuses it in one line.")
    p.add_argument("--onnx", required=True, help="the ONNX the engine was built from")
    p.add_argument("--engine", required=True, help="the engine trtexec wrote")
    p.add_argument("--trt-version", required=True, help="the TensorRT version that built it")
    p.add_argument("--build-info", default=None,
                   help=f"how it was asked to be built (default: {BUILD_INFO_NAME} beside the engine)")
    return p


def run_record(args) -> int:
    """Run `record`: write the sidecar, print one `PASSED | ...` line, return 0.

    A failure raises EngineError (edgerun.cli prints it as one `FAILED | ...` line, exit 1).
    """
    engine = Path(args.engine)
    build = BuildInfo.load(args.build_info or engine.with_name(BUILD_INFO_NAME))
    try:
        meta = record_engine(args.onnx, engine, build, trt_version=args.trt_version)
    except OSError as e:  # an unreadable engine while hashing: one line too, not a traceback
        raise EngineError(f"{e.filename or engine}: {e.strerror or e}") from None
    print(f"PASSED | {engine}: TensorRT {meta['tensorrt_version']} on "
          f"{_sm(_cc_tuple(meta['compute_capability']))} ({meta['gpu_name']}), {meta['precision']}", flush=True)
    return 0
