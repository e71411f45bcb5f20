"""The user-facing TensorRT build options, and the trtexec / Polygraphy forms generated from them.

Each field of EngineOptions carries its own mapping in `field(metadata=...)`: the trtexec flags
it becomes (per TensorRT major), the Polygraphy `CreateConfig` keywords it becomes, and when a
TensorRT version must refuse it. trtexec_args and create_config_kwargs only walk the fields, so
a new engine option is one new field here and nothing else (the pipeline config subclasses
EngineOptions, the sidecar records every field, the bundle's args files are generated).

TensorRT 10 vs 11 (see /work/shared/docs/api-facts.md): 11 removed the precision builder flags,
INT8 calibrators and EXPLICIT_BATCH, and every network is strongly typed. So both majors build
strongly typed networks and never pass --fp16/--int8/--best/--calib or fp16=/int8=; precision
comes from the ONNX (FP16 tensors, Q/DQ nodes). `legacy_fp16_flag` is a TensorRT 10 only
fall-back. DLA exists on TensorRT 10 and from 11.4.1. None of this is executed on hardware here
(no GPU, no TensorRT in this workplace): tests run it against fake `tensorrt` modules.
"""
from __future__ import annotations

import inspect
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edgerun.io import atomic_write, write_json
from edgerun.trt import BUILD_INFO_NAME, BuildInfo, version_tuple
from export.errors import ExportError

MAJORS = (10, 11)
PRECISIONS = ("fp32", "fp16", "int8")
HARDWARE_COMPATIBILITY = ("", "ampere_plus")
DLA_SINCE_TRT11 = (11, 4, 1)
# The script substitutes this with a per-device timing cache name: the TensorRT version that
# names the cache is known only on the device.
TIMING_CACHE_PLACEHOLDER = "@TIMING_CACHE@"
ENV_NAME = "engine.env"


@dataclass(frozen=True)
class Facts:
    """Build-time facts the option mappings need that are not user options."""
    input_name: str
    input_shape: tuple  # without the batch
    trt_major: int
    trt: object = None  # the tensorrt module (Polygraphy mappings only)

    def shapes(self, batch: int) -> str:
        return f"{self.input_name}:" + "x".join(str(d) for d in (batch, *self.input_shape))


def _option(default, help, *, trtexec, polygraphy, refuse=None):
    """A build option: its default, what it means, and how it maps to each tool.

    trtexec(value, options, facts) -> list of flags for TensorRT facts.trt_major;
    polygraphy(value, options, facts) -> dict of CreateConfig keywords (facts.trt is set);
    refuse(value, options, version tuple) -> a one-line reason, or None if that TensorRT can
    build it. `version` may be only (major,) when just the major is known.
    """
    return field(default=default, metadata={"help": help, "trtexec": trtexec,
                                            "polygraphy": polygraphy, "refuse": refuse})


def _no_kwargs(value, options, facts):
    return {}


def _refuse_legacy_fp16(value, options, version):
    if value and version[0] >= 11:
        return ("legacy_fp16_flag: TensorRT 11 has no FP16 builder flag or --fp16 (removed): "
                "convert the ONNX with export.fp16.to_fp16 and build it as it is")
    return None


def _refuse_dla(value, options, version):
    if value >= 0 and version[0] >= 11 and len(version) >= 3 and version[:3] < DLA_SINCE_TRT11:
        return (f"dla_core {value}: TensorRT {'.'.join(map(str, version))} has no DLA (11.0–11.3 "
                f"dropped it; 11.4.1 has it on Jetson AGX Orin with JetPack 7.2.2+): use "
                f"TensorRT 10 or ≥ 11.4.1, or dla_core=-1")
    return None


@dataclass(frozen=True)
class EngineOptions:
    """How to build one engine (user-facing options only; all fields have defaults).

    The batch fields are the optimisation profile of the input's first dimension; trtexec's
    timed inference runs at opt_batch. The pipeline's config subclasses this class to add its
    own fields: fields without mapping metadata are not build options and are ignored here.
    """
    min_batch: int = _option(
        1, "smallest batch the engine accepts",
        trtexec=lambda v, o, x: [f"--minShapes={x.shapes(v)}"],
        polygraphy=_no_kwargs)
    opt_batch: int = _option(
        8, "batch TensorRT tunes kernels for (and trtexec times)",
        trtexec=lambda v, o, x: [f"--optShapes={x.shapes(v)}", f"--shapes={x.shapes(v)}"],
        polygraphy=_no_kwargs)
    max_batch: int = _option(
        64, "largest batch the engine accepts",
        trtexec=lambda v, o, x: [f"--maxShapes={x.shapes(v)}"],
        polygraphy=_no_kwargs)
    workspace_mb: int = _option(
        1024, "builder workspace limit in MiB",
        # No unit suffix: trtexec reads MiB by default in every version (suffixes came later).
        trtexec=lambda v, o, x: [f"--memPoolSize=workspace:{v}"],
        polygraphy=lambda v, o, x: {"memory_pool_limits": {x.trt.MemoryPoolType.WORKSPACE: v << 20}})
    opt_level: int = _option(
        3, "builder optimization level 0–5 (higher: longer build, maybe faster engine)",
        trtexec=lambda v, o, x: [f"--builderOptimizationLevel={v}"],
        polygraphy=lambda v, o, x: {"builder_optimization_level": v})
    dla_core: int = _option(
        -1, "DLA core to run on, -1 for the GPU only (Jetson; TensorRT 10 or ≥ 11.4.1)",
        trtexec=lambda v, o, x: [f"--useDLACore={v}"] if v >= 0 else [],
        # Polygraphy always picks DLA core 0: trt_build sets other cores after CreateConfig.
        polygraphy=lambda v, o, x: {"use_dla": True} if v >= 0 else {},
        refuse=_refuse_dla)
    gpu_fallback: bool = _option(
        True, "with dla_core: let layers the DLA cannot run go to the GPU",
        trtexec=lambda v, o, x: ["--allowGPUFallback"] if v and o.dla_core >= 0 else [],
        polygraphy=lambda v, o, x: {"allow_gpu_fallback": v} if o.dla_core >= 0 else {})
    hardware_compatibility: str = _option(
        "", "'ampere_plus': one engine for every Ampere+ desktop GPU, at some speed cost",
        trtexec=lambda v, o, x: ["--hardwareCompatibilityLevel=ampere+"] if v else [],
        polygraphy=lambda v, o, x: ({"hardware_compatibility_level":
                                       x.trt.HardwareCompatibilityLevel.AMPERE_PLUS} if v else {}))
    version_compatible: bool = _option(
        False, "engine runs on later TensorRT runtimes too (10 → 11 included)",
        trtexec=lambda v, o, x: ["--versionCompatible"] if v else [],
        polygraphy=lambda v, o, x: {"version_compatible": True} if v else {})
    legacy_fp16_flag: bool = _option(
        False, "TensorRT 10 only: FP32 ONNX built weakly typed with the FP16 builder flag",
        # Strong typing is on unless this flag asks for the weakly typed FP16 build: TensorRT 10
        # refuses precision flags on a strongly typed network; 11 is always strongly typed.
        trtexec=lambda v, o, x: ["--fp16"] if v else ["--stronglyTyped"],
        polygraphy=lambda v, o, x: {"fp16": True} if v else {},
        refuse=_refuse_legacy_fp16)

    def __post_init__(self):
        name = type(self).__name__
        for f in build_fields(self):
            value, default = getattr(self, f.name), f.default
            # bool is an int in Python: a `true` for a batch size must not pass as 1.
            if type(value) is not type(default):
                raise ExportError(f"{name}.{f.name}: expected {type(default).__name__}, "
                                  f"got {type(value).__name__} {value!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportError(f"{name}: expected 1 ≤ min_batch ≤ opt_batch ≤ max_batch, "
                              f"got {self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if self.workspace_mb < 1:
            raise ExportError(f"{name}.workspace_mb: expected ≥ 1, got {self.workspace_mb}")
        if not 0 <= self.opt_level <= 5:
            raise ExportError(f"{name}.opt_level: expected 0–5, got {self.opt_level}")
        if self.dla_core < -1:
            raise ExportError(f"{name}.dla_core: expected -1 (no DLA) or a core ≥ 0, "
                              f"got {self.dla_core}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise ExportError(f"{name}.hardware_compatibility: expected '' or 'ampere_plus', "
                              f"got {self.hardware_compatibility!r}")
        if self.hardware_compatibility and self.dla_core >= 0:
            raise ExportError(f"{name}: hardware_compatibility is for desktop GPUs; TensorRT "
                              f"does not support it with DLA (dla_core {self.dla_core})")


def build_fields(options) -> list:
    """The fields of `options` that are build options (those carrying a trtexec mapping)."""
    return [f for f in fields(options) if "trtexec" in f.metadata]


def options_json(options: EngineOptions) -> dict:
    """The build options as JSON (what the sidecar records); pipeline-only fields left out."""
    return {f.name: getattr(options, f.name) for f in build_fields(options)}


def _check_input(input_name, input_shape) -> tuple:
    if not isinstance(input_name, str) or not input_name or any(c in input_name for c in ":,\n"):
        raise ExportError(f"input_name: expected the ONNX input's name (no ':', ',' or newline), "
                          f"got {input_name!r}")
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or min(shape) < 1:
        raise ExportError(f"input_shape: expected positive dims without the batch, e.g. "
                          f"(3, 224, 224), got {input_shape!r}")
    return shape


def check_supported(options: EngineOptions, version) -> None:
    """Refuse, in one line, options this TensorRT cannot build; `version` a string or tuple."""
    numbers = version_tuple(version) if isinstance(version, str) else tuple(version)
    if numbers[0] not in MAJORS:
        raise ExportError(f"TensorRT {'.'.join(map(str, numbers))}: this project builds with "
                          f"TensorRT 10 or 11")
    for f in build_fields(options):
        refuse = f.metadata["refuse"]
        reason = refuse(getattr(options, f.name), options, numbers) if refuse else None
        if reason:
            raise ExportError(reason)


def trt_major(trt_module) -> int:
    return version_tuple(trt_module.__version__)[0]


def network_flags(trt_module) -> int:
    """Creation flags of a strongly typed network (TensorRT 10: opt-in; 11: always on, ignored).

    Looked up by name, never `1 << 1`: the enum value is 1 on TensorRT 10 and 0 on 11.
    """
    return 1 << int(trt_module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


# ---------------------------------------------------------------- generated forms

def trtexec_args(options: EngineOptions, *, onnx_name, engine_name, input_name, input_shape,
                 trt_major: int, timing_cache=None) -> list[str]:
    """trtexec's arguments (without the program) for TensorRT `trt_major`, from the metadata.

    Only the major is known here: DLA on TensorRT 11.0–11.3 is refused by trtexec itself.
    No --skipInference: trtexec's timing summary is the first measurement on the device.
    """
    shape = _check_input(input_name, input_shape)
    check_supported(options, (int(trt_major),))
    facts = Facts(input_name, shape, int(trt_major))
    args = [f"--onnx={onnx_name}", f"--saveEngine={engine_name}"]
    for f in build_fields(options):
        args += f.metadata["trtexec"](getattr(options, f.name), options, facts)
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    return args


def create_config_kwargs(options: EngineOptions, trt_module, *, input_name, input_shape,
                         timing_cache=None) -> dict:
    """Keyword arguments for Polygraphy's CreateConfig for this TensorRT, from the metadata.

    Never passes fp16/int8 on TensorRT 11 (CreateConfig would call the removed set_flag).
    Every keyword is checked against CreateConfig's signature, so a Polygraphy that lacks one
    fails here with one line rather than deep inside a build.
    """
    from polygraphy.backend.trt import Profile

    shape = _check_input(input_name, input_shape)
    check_supported(options, trt_module.__version__)
    facts = Facts(input_name, shape, trt_major(trt_module), trt_module)
    profile = Profile().add(input_name, min=(options.min_batch, *shape),
                            opt=(options.opt_batch, *shape), max=(options.max_batch, *shape))
    kwargs = {"profiles": [profile]}
    for f in build_fields(options):
        kwargs.update(f.metadata["polygraphy"](getattr(options, f.name), options, facts))
    if timing_cache:
        kwargs["load_timing_cache"] = str(timing_cache)
    unknown = sorted(set(kwargs) - create_config_parameters())
    if unknown:
        import polygraphy
        raise ExportError(f"polygraphy {polygraphy.__version__}: CreateConfig takes no "
                          f"{', '.join(unknown)}: install a newer polygraphy")
    return kwargs


def create_config_parameters() -> set:
    """Every keyword Polygraphy's CreateConfig really accepts.

    CreateConfig.__init__ takes **kwargs and hands them to its base class: follow the MRO while
    there are **kwargs to collect them all.
    """
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


def build_info(options: EngineOptions, *, input_name, input_shape, precision) -> BuildInfo:
    """What the engine's sidecar records about how it was asked to be built."""
    shape = _check_input(input_name, input_shape)
    if precision not in PRECISIONS:
        raise ExportError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return BuildInfo(input_name=input_name, input_shape=shape, precision=precision,
                     min_batch=options.min_batch, opt_batch=options.opt_batch,
                     max_batch=options.max_batch,
                     strongly_typed=not options.legacy_fp16_flag, options=options_json(options))


# ---------------------------------------------------------------- the bundle's build files

def write_build_files(bundle_dir, options: EngineOptions, *, onnx_name, engine_name, input_name,
                      input_shape, precision) -> list[Path]:
    """Write what edgerun/build_engine.sh reads beside it; returns the paths written.

    - trtexec_args_trt10.txt, trtexec_args_trt11.txt: trtexec's arguments, one a line, for each
      major these options can build on (the timing cache as @TIMING_CACHE@, named on the device);
    - engine.env: ONNX, ENGINE, BUILD_INFO and, per major these options cannot build on,
      TRT<major>_REFUSED with the one-line reason (shell-quoted; the script sources it);
    - engine_build.json: the BuildInfo that `python3 -m edgerun record` writes into the sidecar.
    """
    bundle_dir = Path(bundle_dir)
    for label, name in (("onnx_name", onnx_name), ("engine_name", engine_name)):
        if not isinstance(name, str) or not name or "\n" in name or "/" in name:
            raise ExportError(f"{label}: expected a file name in the bundle folder (no '/' or "
                              f"newline), got {name!r}")
    info = build_info(options, input_name=input_name, input_shape=input_shape, precision=precision)
    env = {"ONNX": onnx_name, "ENGINE": engine_name, "BUILD_INFO": BUILD_INFO_NAME}
    written = []
    for major in MAJORS:
        try:
            args = trtexec_args(options, onnx_name=onnx_name, engine_name=engine_name,
                                input_name=input_name, input_shape=info.input_shape,
                                trt_major=major, timing_cache=TIMING_CACHE_PLACEHOLDER)
        except ExportError as e:
            env[f"TRT{major}_REFUSED"] = str(e)
            (bundle_dir / f"trtexec_args_trt{major}.txt").unlink(missing_ok=True)  # a stale one
            continue
        written.append(atomic_write(bundle_dir / f"trtexec_args_trt{major}.txt",
                                    "".join(a + "\n" for a in args)))
    env_text = "# Written by export.trt_options.write_build_files; read by build_engine.sh.\n"
    env_text += "".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items())
    written.append(atomic_write(bundle_dir / ENV_NAME, env_text))
    written.append(write_json(bundle_dir / BUILD_INFO_NAME, asdict(info)))
    return written

