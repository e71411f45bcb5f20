"""export.tensorrt without TensorRT: option mapping for TensorRT 10 and 11 on fake `tensorrt`
modules, trtexec lines, the build script, the engine sidecar and its compatibility checks.
Tests that need a real TensorRT and GPU are marked gpu and skip here.
"""
import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import export.tensorrt as trtmod
from export.errors import ExportError
from export.tensorrt import (EngineOptions, build_engine, build_script, check_engine_compat,
                             create_config_kwargs, network_flags, ort_tensorrt_provider_options,
                             record_engine, sidecar_path, timing_cache_name, trt_major,
                             trt_version_info, trtexec_command)

REPO = Path(__file__).resolve().parents[1]

# Names TensorRT 11 removed (NVIDIA's "TensorRT 10.x to 11.x Python API" migration page).
REMOVED_BUILDER_FLAGS = {"FP16", "INT8", "BF16", "FP8", "INT4", "FP4",
                         "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}
REMOVED_MODULE_NAMES = {"IInt8Calibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
                        "IInt8LegacyCalibrator", "IInt8EntropyCalibrator", "int8_calibrator",
                        "platform_has_fast_fp16", "platform_has_fast_int8"}


class Namespace:
    """Attributes given, plus names that fail the test if anyone even looks them up."""

    def __init__(self, removed=(), **attrs):
        self.__dict__.update(attrs)
        self.__dict__["_removed"] = set(removed)

    def __getattr__(self, name):  # only reached for attributes not set above
        if name in self.__dict__["_removed"]:
            raise AssertionError(f"removed TensorRT 11 API touched: {name}")
        raise AttributeError(name)


def fake_trt(version):
    major = int(version.split(".")[0])
    removed_flags = REMOVED_BUILDER_FLAGS if major >= 11 else set()
    flags = {"GPU_FALLBACK": 3, "VERSION_COMPATIBLE": 12, "TF32": 6}
    if major == 10:
        flags.update(FP16=0, INT8=1)
    return Namespace(
        removed=REMOVED_MODULE_NAMES if major >= 11 else (),
        __version__=version,
        BuilderFlag=Namespace(removed=removed_flags, **flags),
        NetworkDefinitionCreationFlag=Namespace(
            removed={"EXPLICIT_BATCH"} if major >= 11 else (),
            # STRONGLY_TYPED is enum value 1 on TensorRT 10 and 0 on 11 (EXPLICIT_BATCH gone).
            STRONGLY_TYPED=1 if major == 10 else 0, **({"EXPLICIT_BATCH": 0} if major == 10 else {})),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="MemoryPoolType.WORKSPACE"),
        HardwareCompatibilityLevel=types.SimpleNamespace(NONE="HCL.NONE", AMPERE_PLUS="HCL.AMPERE_PLUS"),
    )


TRT10, TRT11_2, TRT11_4 = fake_trt("10.3.0.30"), fake_trt("11.2.0.5"), fake_trt("11.4.1.2")

FULL = dict(min_batch=1, opt_batch=8, max_batch=64, input_name="images", input_shape=(3, 32, 32),
            workspace_mb=512, builder_optimization_level=4, timing_cache="/caches/t.bin",
            version_compatible=True)


def test_trt_major_and_network_flags():
    assert (trt_major(TRT10), trt_major(TRT11_4)) == (10, 11)
    assert network_flags(TRT10) == 1 << 1
    assert network_flags(TRT11_4) == 1 << 0


@pytest.mark.parametrize("trt", [TRT10, TRT11_4], ids=["trt10", "trt11"])
def test_config_kwargs_mapping(trt):
    kwargs = create_config_kwargs(EngineOptions(**FULL, hardware_compatibility="ampere_plus"), trt)
    assert set(kwargs) == {"profiles", "memory_pool_limits", "builder_optimization_level",
                           "load_timing_cache", "hardware_compatibility_level", "version_compatible"}
    (profile,) = kwargs["profiles"]
    shapes = profile["images"]
    assert (shapes.min, shapes.opt, shapes.max) == ((1, 3, 32, 32), (8, 3, 32, 32), (64, 3, 32, 32))
    assert kwargs["memory_pool_limits"] == {"MemoryPoolType.WORKSPACE": 512 << 20}
    assert kwargs["builder_optimization_level"] == 4
    assert kwargs["load_timing_cache"] == "/caches/t.bin"
    assert kwargs["hardware_compatibility_level"] == "HCL.AMPERE_PLUS"
    assert kwargs["version_compatible"] is True
    assert not {"fp16", "int8", "calibrator"} & set(kwargs)


def test_config_kwargs_are_accepted_by_polygraphy_create_config():
    from polygraphy.backend.trt import CreateConfig

    for options in (EngineOptions(**FULL), EngineOptions(dla_core=1, gpu_fallback=False),
                    EngineOptions(legacy_fp16_flag=True)):
        CreateConfig(**create_config_kwargs(options, TRT10))  # raises TypeError on a bad keyword


def test_unknown_create_config_keyword_is_one_line(monkeypatch):
    monkeypatch.setattr(trtmod, "_create_config_parameters", lambda: {"profiles"})
    with pytest.raises(ExportError, match=r"CreateConfig takes no builder_optimization_level, "
                                          r"memory_pool_limits: install a newer polygraphy"):
        create_config_kwargs(EngineOptions(), TRT10)


def test_legacy_fp16_flag_only_on_trt10():
    assert create_config_kwargs(EngineOptions(legacy_fp16_flag=True), TRT10)["fp16"] is True
    with pytest.raises(ExportError, match="legacy_fp16_flag: TensorRT 11.4.1.2 has no FP16 builder flag"):
        create_config_kwargs(EngineOptions(legacy_fp16_flag=True), TRT11_4)


def test_dla_allowed_on_trt10_and_from_11_4_1():
    for trt in (TRT10, TRT11_4):
        kwargs = create_config_kwargs(EngineOptions(dla_core=0, gpu_fallback=True), trt)
        assert kwargs["use_dla"] is True and kwargs["allow_gpu_fallback"] is True
    with pytest.raises(ExportError, match=r"dla_core 0: TensorRT 11.2.0.5 has no DLA .*11.4.1"):
        create_config_kwargs(EngineOptions(dla_core=0), TRT11_2)
    with pytest.raises(ExportError, match="dla_core 1: TensorRT 11.3.0 has no DLA"):
        create_config_kwargs(EngineOptions(dla_core=1), fake_trt("11.3.0"))


def test_trt11_paths_never_touch_removed_api():
    # Every TensorRT-facing helper, with every option TensorRT 11 allows: any lookup of a removed
    # name raises AssertionError inside the fake.
    for options in (EngineOptions(**FULL), EngineOptions(dla_core=0),
                    EngineOptions(**FULL, hardware_compatibility="ampere_plus", precision="int8")):
        kwargs = create_config_kwargs(options, TRT11_4)
        assert "fp16" not in kwargs and "int8" not in kwargs
        trtexec_command("m.onnx", "m.engine", options, 11)
    network_flags(TRT11_4)
    ort_tensorrt_provider_options(11, cache_dir="/c", min_batch=1, opt_batch=2, max_batch=4,
                                  input_name="input", input_shape=(3, 8, 8))
    with pytest.raises(AssertionError):  # the fake itself does catch a lookup
        TRT11_4.BuilderFlag.FP16


def test_engine_options_validation():
    with pytest.raises(ExportError, match="min_batch ≤ opt_batch ≤ max_batch, got 8, 4, 16"):
        EngineOptions(min_batch=8, opt_batch=4, max_batch=16)
    with pytest.raises(ExportError, match="precision"):
        EngineOptions(precision="bf16")
    with pytest.raises(ExportError, match="hardware_compatibility"):
        EngineOptions(hardware_compatibility="turing_plus")
    with pytest.raises(ExportError, match="DLA"):
        EngineOptions(hardware_compatibility="ampere_plus", dla_core=0)


# ---------------------------------------------------------------- trtexec and build script

COMMON = ["--minShapes=images:1x3x32x32", "--optShapes=images:8x3x32x32",
          "--maxShapes=images:64x3x32x32", "--memPoolSize=workspace:512",
          "--builderOptimizationLevel=4", "--timingCacheFile=/caches/t.bin"]


def test_trtexec_command_trt10_and_trt11():
    options = EngineOptions(**FULL, dla_core=0, gpu_fallback=True)
    tail = COMMON + ["--useDLACore=0", "--allowGPUFallback", "--versionCompatible", "--skipInference"]
    head = ["trtexec", "--onnx=m.onnx", "--saveEngine=m.engine"]
    assert trtexec_command("m.onnx", "m.engine", options, 10) == head + ["--stronglyTyped"] + tail
    assert trtexec_command("m.onnx", "m.engine", options, 11) == head + ["--stronglyTyped"] + tail

    legacy = EngineOptions(**FULL, legacy_fp16_flag=True, hardware_compatibility="ampere_plus")
    assert trtexec_command("m.onnx", "m.engine", legacy, 10) == head + ["--fp16"] + COMMON + [
        "--hardwareCompatibilityLevel=ampere+", "--versionCompatible", "--skipInference"]
    with pytest.raises(ExportError, match="no --fp16"):
        trtexec_command("m.onnx", "m.engine", legacy, 11)
    for major in (10, 11):
        cmd = " ".join(trtexec_command("m.onnx", "m.engine", EngineOptions(precision="int8"), major))
        assert not {"--int8", "--best", "--calib", "--fp16"} & set(cmd.split())


@pytest.mark.parametrize("legacy", [False, True])
def test_build_script_has_both_forms_and_is_valid_bash(tmp_path, legacy):
    options = EngineOptions(**FULL, legacy_fp16_flag=legacy)
    script = build_script("model.onnx", "model.engine", options)
    path = tmp_path / "build_engine.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert "python3 -c 'import tensorrt, polygraphy'" in script
    assert "python3 -m export.tensorrt build --onnx model.onnx --engine model.engine" in script
    assert "--timing-cache auto" in script
    lines = [line.strip() for line in script.splitlines()]
    form10 = next(lines[i + 1] for i, line in enumerate(lines) if line == "10)")
    form11 = next(lines[i + 1] for i, line in enumerate(lines) if line == "11)")
    assert form10.startswith('"$TRTEXEC" --onnx=model.onnx --saveEngine=model.engine')
    assert '--timingCacheFile="$TIMING_CACHE"' in form10
    if legacy:
        assert "--fp16" in form10 and "--stronglyTyped" not in form10
        assert form11.startswith("echo 'error: legacy_fp16_flag needs TensorRT 10")
    else:
        assert "--stronglyTyped" in form10 and form11.startswith('"$TRTEXEC" ')
        assert "--stronglyTyped" in form11 and "--fp16" not in form11


def tiny_onnx(path):
    """Conv → ReLU → global pool → flatten, dynamic batch; built with onnx.helper (no torch)."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3],
                                rng.standard_normal(108).astype(np.float32))
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_build_script_trtexec_path_runs_with_a_fake_trtexec(tmp_path):
    """Runs the generated script where Python has no tensorrt: it must take the trtexec branch
    of the major the banner reports, then try to record the engine (which needs a GPU)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "export").symlink_to(REPO / "export")
    tiny_onnx(bundle / "model.onnx")
    options = EngineOptions(input_shape=(3, 8, 8), max_batch=16, timing_cache="t.bin")
    (bundle / "build_engine.sh").write_text(build_script("model.onnx", "model.engine", options))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    trtexec = bin_dir / "trtexec"
    trtexec.write_text("#!/usr/bin/env bash\n"
                       'if [ "$1" = --help ]; then echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b17] # trtexec --help"; exit 0; fi\n'
                       f'printf "%s\\n" "$@" > {tmp_path}/trtexec_args\n'
                       'for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done\n')
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    for f in (trtexec, python3):
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "TRTEXEC": str(trtexec)}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(["bash", str(bundle / "build_engine.sh")], env=env, capture_output=True,
                         text=True, timeout=60)
    args = (tmp_path / "trtexec_args").read_text().split()
    assert args == ["--onnx=model.onnx", "--saveEngine=model.engine", "--stronglyTyped",
                    "--minShapes=input:1x3x8x8", "--optShapes=input:8x3x8x8",
                    "--maxShapes=input:16x3x8x8", "--memPoolSize=workspace:1024",
                    "--builderOptimizationLevel=3", "--timingCacheFile=model.trt10.3.0.timing-cache",
                    "--skipInference"]
    assert "TensorRT 10.3.0 (trtexec): building model.engine" in run.stdout
    if trt_version_info() is None:  # no GPU here: recording refuses in one line
        assert run.returncode == 1
        assert "FAILED | model.engine: no CUDA GPU here" in run.stderr


# ---------------------------------------------------------------- onnxruntime TensorRT EP

def test_ort_tensorrt_provider_options():
    kw = dict(cache_dir="/cache", min_batch=1, opt_batch=8, max_batch=32, input_name="input",
              input_shape=(3, 224, 224))
    providers = ort_tensorrt_provider_options(10, fp16=True, **kw)
    (name, trt_opts), cuda, cpu = providers
    assert name == "TensorrtExecutionProvider" and cuda[0] == "CUDAExecutionProvider"
    assert cpu[0] == "CPUExecutionProvider"
    assert trt_opts["trt_fp16_enable"] is True and "trt_int8_enable" not in trt_opts
    assert trt_opts["trt_engine_cache_enable"] and trt_opts["trt_engine_cache_path"] == "/cache"
    assert trt_opts["trt_timing_cache_enable"] and trt_opts["trt_timing_cache_path"] == "/cache"
    assert trt_opts["trt_profile_min_shapes"] == "input:1x3x224x224"
    assert trt_opts["trt_profile_opt_shapes"] == "input:8x3x224x224"
    assert trt_opts["trt_profile_max_shapes"] == "input:32x3x224x224"

    (_, trt11_opts), _, _ = ort_tensorrt_provider_options(11, **kw)
    assert not {"trt_fp16_enable", "trt_int8_enable"} & set(trt11_opts)
    with pytest.raises(ExportError, match="precision comes from the ONNX"):
        ort_tensorrt_provider_options(11, int8=True, **kw)


# ---------------------------------------------------------------- sidecar and compatibility

@pytest.fixture
def recorded(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "model.engine"
    engine.write_bytes(os.urandom(4096))
    meta = record_engine(onnx_path, engine, EngineOptions(input_shape=(3, 8, 8)),
                         trt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7")
    return engine, meta


def test_record_engine_sidecar(recorded):
    engine, meta = recorded
    assert json.loads(sidecar_path(engine).read_text()) == meta
    assert meta["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert meta["onnx_sha256"] == hashlib.sha256((engine.parent / "model.onnx").read_bytes()).hexdigest()
    assert meta["compute_capability"] == "8.7" and meta["tensorrt_version"] == "10.3.0.30"
    assert meta["profile"] == {"input": "input", "min": [1, 3, 8, 8], "opt": [8, 3, 8, 8],
                               "max": [32, 3, 8, 8]}


def test_compat_same_device(recorded):
    engine, meta = recorded
    assert check_engine_compat(engine, trt_version="10.3.0.30", gpu_name="Orin",
                               compute_capability="sm_87") == meta
    # trtexec's banner gives three numbers, Python's __version__ four: the common part must agree.
    check_engine_compat(engine, trt_version="10.3.0", gpu_name="Orin", compute_capability=(8, 7))


def test_compat_other_device_is_one_line(recorded):
    engine, _ = recorded
    with pytest.raises(ExportError) as err:
        check_engine_compat(engine, trt_version="11.4.1.2", gpu_name="NVIDIA H100",
                            compute_capability="9.0")
    assert str(err.value) == ("model.engine: built for TensorRT 10.3.0.30 on sm_87 (Orin), this is "
                              "TensorRT 11.4.1.2 on sm_90 (NVIDIA H100): rebuild it on this device")
    with pytest.raises(ExportError, match="this is TensorRT 10.3.0.30 on sm_72"):
        check_engine_compat(engine, trt_version="10.3.0.30", gpu_name="Xavier", compute_capability="7.2")
    with pytest.raises(ExportError, match="this is TensorRT 10.3.1"):
        check_engine_compat(engine, trt_version="10.3.1", gpu_name="Orin", compute_capability="8.7")


def test_compat_version_and_hardware_compatible_engines(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    options = EngineOptions(version_compatible=True, hardware_compatibility="ampere_plus")
    record_engine(onnx_path, engine, options, trt_version="10.3.0", gpu_name="RTX 3060",
                  compute_capability="8.6")
    for version, cc in (("10.16.1", "8.9"), ("11.4.1", "9.0"), ("10.3.0", "12.0")):
        check_engine_compat(engine, trt_version=version, gpu_name="x", compute_capability=cc)
    for version, cc in (("10.2.0", "8.6"), ("12.0.0", "8.6"), ("10.3.0", "7.5")):
        with pytest.raises(ExportError, match="rebuild it on this device"):
            check_engine_compat(engine, trt_version=version, gpu_name="x", compute_capability=cc)


def test_compat_truncated_engine(recorded):
    engine, _ = recorded
    engine.write_bytes(engine.read_bytes()[:1000])
    with pytest.raises(ExportError, match=r"model.engine: 1000 bytes that do not match "
                                          r"model.engine.json \(4096 bytes.*truncated or replaced"):
        check_engine_compat(engine, trt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7")


def test_compat_same_size_other_content(recorded):
    engine, _ = recorded
    engine.write_bytes(bytes(4096))
    with pytest.raises(ExportError, match="truncated or replaced"):
        check_engine_compat(engine, trt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7")


def test_compat_missing_or_broken_sidecar_or_engine(recorded):
    engine, _ = recorded
    here = dict(trt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7")
    side = sidecar_path(engine)
    side.write_text(side.read_text()[:50])
    with pytest.raises(ExportError, match="model.engine.json: not readable engine metadata"):
        check_engine_compat(engine, **here)
    side.write_text('{"engine": "model.engine"}')
    with pytest.raises(ExportError, match="model.engine.json: not readable .*no engine_size_bytes"):
        check_engine_compat(engine, **here)
    side.unlink()
    with pytest.raises(ExportError, match="model.engine: its metadata model.engine.json is missing"):
        check_engine_compat(engine, **here)
    engine.unlink()
    with pytest.raises(ExportError, match="model.engine: no such file"):
        check_engine_compat(engine, **here)


def test_timing_cache_name():
    assert timing_cache_name("NVIDIA Jetson AGX Orin", "10.3.0.30") == \
        "timing-cache_NVIDIA-Jetson-AGX-Orin_trt10.3.0.30.bin"


# ---------------------------------------------------------------- build_engine wiring (faked)

def test_build_engine_wiring_with_faked_polygraphy(tmp_path, monkeypatch):
    """build_engine's own logic: loaders called with strong typing, timing cache load + save,
    DLA core, atomic engine + sidecar. Polygraphy's loaders are fakes: no engine is built."""
    import polygraphy.backend.trt as ptrt

    calls = {}
    accepted = trtmod._create_config_parameters()  # the real CreateConfig's, before faking it
    monkeypatch.setattr(trtmod, "_create_config_parameters", lambda: accepted)

    def fake_network(path, strongly_typed=None):
        calls["network"] = (Path(path).name, strongly_typed)
        return "network"

    def fake_config(**kwargs):
        calls["config"] = kwargs
        return "config"

    def fake_postprocess(config, func):
        cfg = types.SimpleNamespace(DLA_core=0)
        func(None, None, cfg)
        calls["dla_core"] = cfg.DLA_core
        return config

    def fake_engine(network, config=None, save_timing_cache=None):
        calls["engine"] = (network, config, save_timing_cache)
        return "engine"

    def fake_save(engine, path):
        Path(path).write_bytes(b"serialized engine")

    monkeypatch.setattr(ptrt, "NetworkFromOnnxPath", fake_network)
    monkeypatch.setattr(ptrt, "CreateConfig", fake_config)
    monkeypatch.setattr(ptrt, "PostprocessConfig", fake_postprocess)
    monkeypatch.setattr(ptrt, "engine_from_network", fake_engine)
    monkeypatch.setattr(ptrt, "save_engine", fake_save)
    monkeypatch.setattr(trtmod, "_import_tensorrt", lambda name: TRT10)
    monkeypatch.setattr(trtmod, "_cuda_device", lambda index=0: ("NVIDIA Jetson AGX Orin", "8.7"))

    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "out" / "model.engine"
    options = EngineOptions(input_shape=(3, 8, 8), dla_core=1, timing_cache=str(tmp_path / "t.bin"),
                            precision="fp16")
    meta = build_engine(onnx_path, engine, options)
    assert calls["network"] == ("model.onnx", True)
    assert calls["config"]["load_timing_cache"] == str(tmp_path / "t.bin")
    assert calls["config"]["use_dla"] is True and calls["dla_core"] == 1
    assert calls["engine"] == ("network", "config", str(tmp_path / "t.bin"))
    assert engine.read_bytes() == b"serialized engine"
    assert sorted(p.name for p in engine.parent.iterdir()) == ["model.engine", "model.engine.json"]
    assert meta["tensorrt_version"] == "10.3.0.30" and meta["gpu_name"] == "NVIDIA Jetson AGX Orin"
    assert meta["precision"] == "fp16" and meta["strongly_typed"] is True
    assert meta["built_with"].startswith("polygraphy ")
    check_engine_compat(engine, trt_version="10.3.0.30", gpu_name="NVIDIA Jetson AGX Orin",
                        compute_capability="8.7")

    # Legacy FP16 on TensorRT 10: weakly typed network, fp16 flag in the config.
    build_engine(onnx_path, engine, EngineOptions(input_shape=(3, 8, 8), legacy_fp16_flag=True))
    assert calls["network"] == ("model.onnx", False) and calls["config"]["fp16"] is True

    def failing(*args, **kwargs):
        raise RuntimeError("Could not find any implementation for node Conv\nmore detail")

    monkeypatch.setattr(ptrt, "engine_from_network", failing)
    other = tmp_path / "failed" / "model.engine"
    with pytest.raises(ExportError, match=r"^model.onnx: TensorRT build failed \(RuntimeError: Could "
                                          r"not find any implementation for node Conv\)$"):
        build_engine(onnx_path, other, options)
    assert list(other.parent.iterdir()) == []


# ---------------------------------------------------------------- without TensorRT, CLI, imports

def test_no_tensorrt_here():
    try:
        import tensorrt  # noqa: F401
    except Exception:
        assert trt_version_info() is None
    else:
        pytest.skip("tensorrt is installed here")


def test_cli_round_trip_and_one_line_failure(tmp_path):
    options = EngineOptions(**FULL, dla_core=1, gpu_fallback=False, legacy_fp16_flag=True,
                            precision="fp16")
    args = trtmod._parser().parse_args(["build", "--onnx", "a", "--engine", "b",
                                        *trtmod._cli_args(options)])
    assert trtmod._options_from_args(args) == options

    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    run = subprocess.run([sys.executable, "-m", "export.tensorrt", "build", "--onnx", str(onnx_path),
                          "--engine", str(tmp_path / "model.engine"), "--input-shape", "3x8x8"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    if trt_version_info() is None:
        assert run.returncode == 1 and run.stdout == ""
        assert run.stderr.startswith("FAILED | model.onnx: TensorRT's Python API is not importable")
        assert run.stderr.count("\n") == 1


def test_package_imports_stay_light():
    code = ("import sys, export, export.runners, export.tensorrt, export.errors\n"
            "heavy = {'torch', 'tensorrt', 'onnxruntime', 'polygraphy', 'onnx'} & set(sys.modules)\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---------------------------------------------------------------- real TensorRT + GPU

needs_trt = pytest.mark.skipif(trt_version_info() is None, reason="needs TensorRT and a CUDA GPU")


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("fp16", [False, True])
def test_real_engine_matches_onnxruntime(tmp_path, fp16):
    from export.fp16 import to_fp16
    from export.parity import compare_outputs
    from export.runners import OrtRunner
    from export.tensorrt import TrtEngineRunner

    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    built = onnx_path
    if fp16:
        built = Path(to_fp16(onnx_path, tmp_path / "model_fp16.onnx")["path"])
    here = trt_version_info()
    options = EngineOptions(input_shape=(3, 8, 8), min_batch=1, opt_batch=4, max_batch=16,
                            workspace_mb=256, precision="fp16" if fp16 else "fp32",
                            timing_cache=str(tmp_path / timing_cache_name(here["gpu_name"],
                                                                          here["version"])))
    meta = build_engine(built, tmp_path / "model.engine", options)
    assert meta["tensorrt_version"] == here["version"]
    assert Path(options.timing_cache).is_file()

    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    with OrtRunner(onnx_path) as ort_runner, TrtEngineRunner(tmp_path / "model.engine") as trt_runner:
        assert TrtEngineRunner.includes_host_device_copies
        assert trt_runner.input_names == ["input"] and trt_runner.output_names == ["logits"]
        for batch in (1, 7, 16):
            feed = {"input": x[:batch]}
            result = compare_outputs(ort_runner.infer(feed), trt_runner.infer(feed))
            assert result["max_abs"] <= (1e-2 if fp16 else 1e-3), result
            assert result["min_mean_cosine"] >= 0.999, result
        assert trt_runner.last_inference_time() > 0
