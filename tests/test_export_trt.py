"""TensorRT without TensorRT: export.trt_options (options → trtexec / Polygraphy forms for
TensorRT 10 and 11, on fake `tensorrt` modules), export.trt_build (faked Polygraphy loaders),
edgerun.trt (sidecar, compatibility, `record`) and edgerun/build_engine.sh run end to end with a
fake trtexec. Tests that need a real TensorRT and GPU are marked gpu and skip here.
"""
import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import polygraphy.backend.trt as ptrt
import pytest
from onnx import TensorProto, helper

import export.trt_build as trt_build
import export.trt_options as trt_options
from edgerun.errors import EdgeError
from edgerun.trt import (
    BuildInfo,
    EngineError,
    TrtEngineRunner,
    add_record_parser,
    check_engine_compat,
    record_engine,
    run_record,
    script_path,
    sidecar_path,
    trt_version_info,
)
from export.errors import ExportError
from export.trt_build import build_engine, timing_cache_name
from export.trt_options import (
    TIMING_CACHE_PLACEHOLDER,
    EngineOptions,
    build_info,
    create_config_kwargs,
    network_flags,
    options_json,
    trt_major,
    trtexec_args,
    write_build_files,
)

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
    flags = {"GPU_FALLBACK": 3, "VERSION_COMPATIBLE": 12, "TF32": 6}
    if major == 10:
        flags.update(FP16=0, INT8=1)
    return Namespace(
        removed=REMOVED_MODULE_NAMES if major >= 11 else (),
        __version__=version,
        BuilderFlag=Namespace(removed=REMOVED_BUILDER_FLAGS if major >= 11 else (), **flags),
        NetworkDefinitionCreationFlag=Namespace(
            removed={"EXPLICIT_BATCH"} if major >= 11 else (),
            # STRONGLY_TYPED is enum value 1 on TensorRT 10 and 0 on 11 (EXPLICIT_BATCH gone).
            STRONGLY_TYPED=1 if major == 10 else 0, **({"EXPLICIT_BATCH": 0} if major == 10 else {})),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="MemoryPoolType.WORKSPACE"),
        HardwareCompatibilityLevel=types.SimpleNamespace(NONE="HCL.NONE", AMPERE_PLUS="HCL.AMPERE_PLUS"),
    )


TRT10, TRT11_2, TRT11_4 = fake_trt("10.3.0.30"), fake_trt("11.2.0.5"), fake_trt("11.4.1.2")
FULL = dict(min_batch=1, opt_batch=8, max_batch=64, workspace_mb=512, opt_level=4, version_compatible=True)
IO = dict(input_name="images", input_shape=(3, 32, 32))


def tiny_onnx(path):
    """Conv → ReLU → global pool → flatten, dynamic batch; built with onnx.helper (no torch)."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.standard_normal(108).astype(np.float32))
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return path


# ---------------------------------------------------------------- options → Polygraphy

def test_trt_major_and_network_flags():
    assert (trt_major(TRT10), trt_major(TRT11_4)) == (10, 11)
    assert network_flags(TRT10) == 1 << 1
    assert network_flags(TRT11_4) == 1 << 0


@pytest.mark.parametrize("trt", [TRT10, TRT11_4], ids=["trt10", "trt11"])
def test_config_kwargs_mapping(trt):
    kwargs = create_config_kwargs(EngineOptions(**FULL, hardware_compatibility="ampere_plus"), trt, **IO,
                                  timing_cache="/caches/t.bin")
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


def test_config_kwargs_are_accepted_by_polygraphy_create_config():
    for options in (EngineOptions(**FULL), EngineOptions(dla_core=1, gpu_fallback=False),
                    EngineOptions(legacy_fp16_flag=True)):
        ptrt.CreateConfig(**create_config_kwargs(options, TRT10, **IO))  # TypeError on a bad keyword


def test_unknown_create_config_keyword_is_one_line(monkeypatch):
    monkeypatch.setattr(trt_options, "create_config_parameters", lambda: {"profiles"})
    with pytest.raises(ExportError, match=r"CreateConfig takes no builder_optimization_level, "
                                          r"memory_pool_limits: install a newer polygraphy$"):
        create_config_kwargs(EngineOptions(), TRT10, **IO)


def test_legacy_fp16_flag_only_on_trt10():
    assert create_config_kwargs(EngineOptions(legacy_fp16_flag=True), TRT10, **IO)["fp16"] is True
    with pytest.raises(ExportError, match="^legacy_fp16_flag: TensorRT 11 has no FP16 builder flag"):
        create_config_kwargs(EngineOptions(legacy_fp16_flag=True), TRT11_4, **IO)


def test_dla_allowed_on_trt10_and_from_11_4_1():
    for trt in (TRT10, TRT11_4):
        kwargs = create_config_kwargs(EngineOptions(dla_core=0, gpu_fallback=True), trt, **IO)
        assert kwargs["use_dla"] is True and kwargs["allow_gpu_fallback"] is True
    assert not {"use_dla", "allow_gpu_fallback"} & set(create_config_kwargs(EngineOptions(), TRT10, **IO))
    with pytest.raises(ExportError, match=r"^dla_core 0: TensorRT 11.2.0.5 has no DLA .*11.4.1"):
        create_config_kwargs(EngineOptions(dla_core=0), TRT11_2, **IO)
    with pytest.raises(ExportError, match="^dla_core 1: TensorRT 11.3.0 has no DLA"):
        create_config_kwargs(EngineOptions(dla_core=1), fake_trt("11.3.0"), **IO)
    with pytest.raises(ExportError, match="^TensorRT 8.5.2: this project builds with TensorRT 10 or 11$"):
        create_config_kwargs(EngineOptions(), fake_trt("8.5.2"), **IO)


def test_trt11_paths_never_touch_removed_api():
    # Every TensorRT-facing helper with every option TensorRT 11 allows: any lookup of a removed
    # name raises AssertionError inside the fake.
    for options in (EngineOptions(**FULL), EngineOptions(dla_core=0),
                    EngineOptions(**FULL, hardware_compatibility="ampere_plus")):
        kwargs = create_config_kwargs(options, TRT11_4, **IO)
        assert not {"fp16", "int8", "calibrator"} & set(kwargs)
        trtexec_args(options, onnx_name="m.onnx", engine_name="m.engine", **IO, trt_major=11)
    network_flags(TRT11_4)
    with pytest.raises(AssertionError):  # the fake itself does catch a lookup
        TRT11_4.BuilderFlag.FP16


def test_engine_options_validation():
    with pytest.raises(ExportError, match=r"^EngineOptions: expected 1 ≤ min_batch ≤ opt_batch ≤ max_batch, "
                                          r"got 8, 4, 16$"):
        EngineOptions(min_batch=8, opt_batch=4, max_batch=16)
    with pytest.raises(ExportError, match=r"^EngineOptions.hardware_compatibility: expected '' or "
                                          r"'ampere_plus', got 'turing_plus'$"):
        EngineOptions(hardware_compatibility="turing_plus")
    with pytest.raises(ExportError, match="does not support it with DLA"):
        EngineOptions(hardware_compatibility="ampere_plus", dla_core=0)
    with pytest.raises(ExportError, match=r"^EngineOptions.opt_level: expected 0–5, got 7$"):
        EngineOptions(opt_level=7)
    with pytest.raises(ExportError, match=r"^EngineOptions.workspace_mb: expected ≥ 1, got 0$"):
        EngineOptions(workspace_mb=0)
    with pytest.raises(ExportError, match=r"^EngineOptions.dla_core: expected -1 \(no DLA\)"):
        EngineOptions(dla_core=-2)
    # A TOML `true` for a batch, or "8" for a number, must not pass as 1 or as a string.
    with pytest.raises(ExportError, match=r"^EngineOptions.max_batch: expected int, got bool True$"):
        EngineOptions(max_batch=True)
    with pytest.raises(ExportError, match=r"^EngineOptions.gpu_fallback: expected bool, got str 'yes'$"):
        EngineOptions(gpu_fallback="yes")
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineOptions().max_batch = 4


def test_bad_input_facts_are_one_line():
    for shape in ((), (3, 0, 8), ("a",), None):
        with pytest.raises(ExportError, match=r"^input_shape: expected positive dims without the batch"):
            trtexec_args(EngineOptions(), onnx_name="m.onnx", engine_name="m.engine", input_name="x",
                         input_shape=shape, trt_major=10)
    with pytest.raises(ExportError, match=r"^input_name: expected the ONNX input's name"):
        create_config_kwargs(EngineOptions(), TRT10, input_name="a:b", input_shape=(3, 8, 8))
    with pytest.raises(ExportError, match=r"^precision: expected one of fp32, fp16, int8, got 'bf16'$"):
        build_info(EngineOptions(), input_name="x", input_shape=(3, 8, 8), precision="bf16")


# ---------------------------------------------------------------- options → trtexec

SHAPES = ["--minShapes=images:1x3x32x32", "--optShapes=images:8x3x32x32", "--shapes=images:8x3x32x32",
          "--maxShapes=images:64x3x32x32", "--memPoolSize=workspace:512", "--builderOptimizationLevel=4"]
HEAD = ["--onnx=m.onnx", "--saveEngine=m.engine"]


def args_for(options, major, **kw):
    return trtexec_args(options, onnx_name="m.onnx", engine_name="m.engine", **IO, trt_major=major, **kw)


def test_trtexec_args_trt10_and_trt11():
    options = EngineOptions(**FULL, dla_core=0, gpu_fallback=True)
    expected = HEAD + SHAPES + ["--useDLACore=0", "--allowGPUFallback", "--versionCompatible",
                                "--stronglyTyped", "--timingCacheFile=/caches/t.bin"]
    assert args_for(options, 10, timing_cache="/caches/t.bin") == expected
    assert args_for(options, 11, timing_cache="/caches/t.bin") == expected
    # No DLA: no --allowGPUFallback either, whatever gpu_fallback says.
    assert args_for(EngineOptions(**FULL), 10) == HEAD + SHAPES + ["--versionCompatible", "--stronglyTyped"]

    legacy = EngineOptions(**FULL, legacy_fp16_flag=True, hardware_compatibility="ampere_plus")
    assert args_for(legacy, 10) == HEAD + SHAPES + ["--hardwareCompatibilityLevel=ampere+",
                                                    "--versionCompatible", "--fp16"]
    with pytest.raises(ExportError, match="^legacy_fp16_flag: TensorRT 11 has no .*--fp16"):
        args_for(legacy, 11)
    with pytest.raises(ExportError, match="TensorRT 12: this project builds with TensorRT 10 or 11"):
        args_for(EngineOptions(), 12)
    for major in (10, 11):  # INT8 comes from the ONNX's Q/DQ nodes, never from a flag
        assert not {"--int8", "--best", "--calib", "--fp16", "--skipInference"} & set(args_for(EngineOptions(), major))


def test_a_new_field_is_the_only_edit_a_new_option_needs(monkeypatch):
    """A subclass adds one option with its mapping metadata: trtexec args, CreateConfig kwargs and
    the recorded options all pick it up; a pipeline-only field (no metadata) is left out of all."""

    @dataclasses.dataclass(frozen=True)
    class WithSparsity(EngineOptions):
        sparsity: bool = trt_options._option(
            False, "use 2:4 structured sparsity",
            trtexec=lambda v, o, x: ["--sparsity=enable"] if v else [],
            polygraphy=lambda v, o, x: {"sparse_weights": True} if v else {})
        max_drop: float = 0.01  # a pipeline-only field, as the lead's EngineCfg adds

    plain = args_for(WithSparsity(**FULL), 10)
    assert plain == args_for(EngineOptions(**FULL), 10)
    assert args_for(WithSparsity(**FULL, sparsity=True), 10) == plain + ["--sparsity=enable"]
    assert args_for(WithSparsity(sparsity=True, max_drop=0.5), 11)[-1] == "--sparsity=enable"
    accepted = trt_options.create_config_parameters()
    assert "sparse_weights" in accepted  # a real CreateConfig keyword
    assert create_config_kwargs(WithSparsity(sparsity=True), TRT10, **IO)["sparse_weights"] is True
    recorded = options_json(WithSparsity(sparsity=True))
    assert recorded["sparsity"] is True and "max_drop" not in recorded
    with pytest.raises(ExportError, match=r"^WithSparsity.sparsity: expected bool, got int 1$"):
        WithSparsity(sparsity=1)


def test_every_option_maps_to_both_tools():
    for f in dataclasses.fields(EngineOptions):
        assert {"help", "trtexec", "polygraphy"} <= set(f.metadata), f.name
        assert f.default is not dataclasses.MISSING, f.name


# ---------------------------------------------------------------- bundle files and build_engine.sh

def test_write_build_files(tmp_path):
    options = EngineOptions(max_batch=16)
    paths = write_build_files(tmp_path, options, onnx_name="model.onnx", engine_name="model.engine",
                              input_name="input", input_shape=(3, 8, 8), precision="int8")
    names = sorted(p.name for p in paths)
    assert names == ["engine.env", "engine_build.json", "trtexec_args_trt10.txt", "trtexec_args_trt11.txt"]
    for major in (10, 11):
        lines = (tmp_path / f"trtexec_args_trt{major}.txt").read_text().splitlines()
        assert lines == trtexec_args(options, onnx_name="model.onnx", engine_name="model.engine",
                                     input_name="input", input_shape=(3, 8, 8), trt_major=major,
                                     timing_cache=TIMING_CACHE_PLACEHOLDER)
    assert "REFUSED" not in (tmp_path / "engine.env").read_text()
    info = BuildInfo.load(tmp_path / "engine_build.json")
    assert info == build_info(options, input_name="input", input_shape=(3, 8, 8), precision="int8")
    assert info.options == options_json(options) and info.strongly_typed is True

    # Legacy FP16 cannot build on TensorRT 11: no args file (a stale one goes), a reason instead.
    write_build_files(tmp_path, EngineOptions(legacy_fp16_flag=True), onnx_name="model.onnx",
                      engine_name="model.engine", input_name="input", input_shape=(3, 8, 8), precision="fp16")
    assert not (tmp_path / "trtexec_args_trt11.txt").exists()
    assert "TRT11_REFUSED='legacy_fp16_flag: TensorRT 11 has no" in (tmp_path / "engine.env").read_text()
    with pytest.raises(ExportError, match=r"^engine_name: expected a file name in the bundle folder"):
        write_build_files(tmp_path, options, onnx_name="model.onnx", engine_name="../x.engine",
                          input_name="input", input_shape=(3, 8, 8), precision="fp32")


def test_build_script_is_valid_bash_and_uses_the_placeholder():
    script = script_path()
    assert script.is_file() and script.parent.name == "edgerun"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    assert TIMING_CACHE_PLACEHOLDER in text and trt_options.ENV_NAME in text
    assert 'python3 -m edgerun check "$ONNX" --trt-major "$MAJOR"' in text


SHIM = '''\
"""Stands in for `python3 -m edgerun`: a fake `check` (logs, exits FAKE_CHECK_RC) and the real
`record` verb, with a fake GPU because this machine has none."""
import os, sys
import edgerun.trt as trt
verb = sys.argv[1]
with open(os.environ["CALL_LOG"], "a") as log:
    log.write(" ".join(["edgerun", *sys.argv[1:]]) + "\\n")
if verb == "check":
    rc = int(os.environ.get("FAKE_CHECK_RC", "0"))
    if rc:
        print("FAILED | model.onnx: TensorRT has no NonMaxSuppression here", file=sys.stderr)
    sys.exit(rc)
trt.cuda_device = lambda index=0: ("Fake GPU", "8.7")
from edgerun.cli import main
sys.exit(main(sys.argv[1:]))
'''


BUNDLE_MANIFEST = {"input": {"name": "input", "shape": ["batch", 3, 8, 8], "dtype": "float32", "layout": "NCHW",
                             "normalisation": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}},
                   "labels": ["a", "b", "c", "d"], "files": {"model.onnx": {"kind": "onnx"}}}


def make_bundle(tmp_path, options, version_code="100300", real_edgerun_cli=False):
    """A bundle folder with the script, its files and edgerun; fake trtexec (and python3) on PATH."""
    from test_hardening_bundle import list_everything

    from pipeline.package import runtime_files
    bundle = tmp_path / "bundle"
    (bundle / "edgerun").mkdir(parents=True)
    for src in runtime_files():   # the runtime as the package stage ships it
        (bundle / "edgerun" / src.name).write_bytes(src.read_bytes())
    (bundle / "build_engine.sh").write_bytes(script_path().read_bytes())
    tiny_onnx(bundle / "model.onnx")
    write_build_files(bundle, options, onnx_name="model.onnx", engine_name="model.engine",
                      input_name="input", input_shape=(3, 8, 8), precision="fp32")
    list_everything(bundle, BUNDLE_MANIFEST)   # build_engine.sh verifies what it reads against it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    (bin_dir / "trtexec").write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = --help ]; then\n'
        f'  echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version_code}] [b17]"; exit 0\n'
        'fi\n'
        f'echo "trtexec $*" >> {log}\n'
        'for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done\n'
        'echo "[I] GPU Compute Time: min = 0.1 ms, mean = 0.12 ms"\n')
    (tmp_path / "shim.py").write_text(SHIM)
    shim = "" if real_edgerun_cli else \
        f'if [ "$1 $2" = "-m edgerun" ]; then shift 2; exec "{sys.executable}" {tmp_path}/shim.py "$@"; fi\n'
    (bin_dir / "python3").write_text(f'#!/usr/bin/env bash\n{shim}exec "{sys.executable}" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "CALL_LOG": str(log)}
    env.pop("PYTHONPATH", None)
    env.pop("TRTEXEC", None)
    return bundle, env, log


def run_script(bundle, env):
    return subprocess.run(["bash", str(bundle / "build_engine.sh")], env=env, capture_output=True,
                          text=True, timeout=120)


def test_build_script_end_to_end_with_fake_trtexec(tmp_path):
    """TensorRT 10.3.0 per the banner: check first, trtexec with the generated args (timing cache
    named on the device, inference not skipped), then the real `record` writes the sidecar."""
    bundle, env, log = make_bundle(tmp_path, EngineOptions(max_batch=16))
    run = run_script(bundle, env)
    assert run.returncode == 0, run.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "edgerun check model.onnx --trt-major 10"
    assert calls[1].split()[1:] == ["--onnx=model.onnx", "--saveEngine=model.engine",
                                    "--minShapes=input:1x3x8x8", "--optShapes=input:8x3x8x8",
                                    "--shapes=input:8x3x8x8", "--maxShapes=input:16x3x8x8",
                                    "--memPoolSize=workspace:1024", "--builderOptimizationLevel=3",
                                    "--stronglyTyped", "--timingCacheFile=model.trt10.3.0.timing-cache"]
    assert calls[2] == ("edgerun record --onnx model.onnx --engine model.engine --build-info "
                        "engine_build.json --trt-version 10.3.0")
    assert "GPU Compute Time" in run.stdout and "PASSED | model.engine: TensorRT 10.3.0 on sm_87" in run.stdout
    meta = check_engine_compat(bundle / "model.engine", trt_version="10.3.0.30", gpu_name="Fake GPU",
                               compute_capability="8.7")
    assert meta["options"]["max_batch"] == 16 and meta["profile"]["max"] == [16, 3, 8, 8]


def test_build_script_refusals_are_one_line_and_build_nothing(tmp_path):
    bundle, env, log = make_bundle(tmp_path / "a", EngineOptions(legacy_fp16_flag=True), version_code="110401")
    run = run_script(bundle, env)
    assert run.returncode == 1 and not log.exists()
    assert run.stderr.strip() == ("error: TensorRT 11.4.1: legacy_fp16_flag: TensorRT 11 has no FP16 builder "
                                  "flag or --fp16 (removed): convert the ONNX with export.fp16.to_fp16 and "
                                  "build it as it is")

    bundle, env, log = make_bundle(tmp_path / "b", EngineOptions(), version_code="120000")
    run = run_script(bundle, env)
    assert run.returncode == 1 and "TensorRT 12.0.0 is not supported" in run.stderr

    bundle, env, log = make_bundle(tmp_path / "c", EngineOptions(), version_code="110401")
    run = run_script(bundle, {**env, "FAKE_CHECK_RC": "1"})
    assert run.returncode == 1
    assert log.read_text().splitlines() == ["edgerun check model.onnx --trt-major 11"]  # no trtexec build
    assert run.stderr.strip().splitlines()[-1] == ("error: the pre-flight check refused model.onnx for "
                                                   "TensorRT 11 (reason above): not building")
    assert not (bundle / "model.engine").exists()


@pytest.mark.skipif(importlib.util.find_spec("edgerun.__main__") is None
                    or importlib.util.find_spec("edgerun.preflight") is None,
                    reason="edgerun's CLI (helper G) and pre-flight (helper D) are not written yet")
def test_build_script_with_the_real_edgerun_cli(tmp_path):
    bundle, env, log = make_bundle(tmp_path, EngineOptions(max_batch=16), real_edgerun_cli=True)
    run = run_script(bundle, env)
    assert log.read_text().startswith("trtexec --onnx=model.onnx"), run.stderr  # the real check passed
    if trt_version_info() is None:  # no GPU here: recording refuses in one line
        assert run.returncode == 1
        assert run.stdout.strip().splitlines()[-1].endswith("model.engine: no CUDA GPU here to record it against")


# ---------------------------------------------------------------- sidecar and compatibility

HERE = dict(trt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7")


def info(**options):
    return build_info(EngineOptions(**options), input_name="input", input_shape=(3, 8, 8), precision="fp32")


@pytest.fixture
def recorded(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "model.engine"
    engine.write_bytes(os.urandom(4096))
    return engine, record_engine(onnx_path, engine, info(max_batch=32), **HERE)


def test_record_engine_sidecar(recorded):
    engine, meta = recorded
    assert json.loads(sidecar_path(engine).read_text()) == meta
    assert meta["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert meta["onnx_sha256"] == hashlib.sha256((engine.parent / "model.onnx").read_bytes()).hexdigest()
    assert meta["compute_capability"] == "8.7" and meta["tensorrt_version"] == "10.3.0.30"
    assert meta["profile"] == {"input": "input", "min": [1, 3, 8, 8], "opt": [8, 3, 8, 8], "max": [32, 3, 8, 8]}
    assert meta["options"] == options_json(EngineOptions(max_batch=32))
    assert oct(sidecar_path(engine).stat().st_mode & 0o777) == "0o644"


def test_record_refuses_a_version_no_runtime_can_read(recorded):
    engine, _ = recorded
    with pytest.raises(EngineError, match=r"^TensorRT version 'latest' not understood"):
        record_engine(engine.with_name("model.onnx"), engine, info(), **{**HERE, "trt_version": "latest"})
    assert check_engine_compat(engine, **HERE)  # the old sidecar is left as it was


def test_compat_same_device(recorded):
    engine, meta = recorded
    assert check_engine_compat(engine, trt_version="10.3.0.30", gpu_name="Orin", compute_capability="sm_87") == meta
    # trtexec's banner gives three numbers, Python's __version__ four: the common part must agree.
    check_engine_compat(engine, trt_version="10.3.0", gpu_name="Orin", compute_capability=(8, 7))


def test_compat_other_device_is_one_line(recorded):
    engine, _ = recorded
    with pytest.raises(EngineError) as err:
        check_engine_compat(engine, trt_version="11.4.1.2", gpu_name="NVIDIA H100", compute_capability="9.0")
    assert str(err.value) == ("model.engine: built for TensorRT 10.3.0.30 on sm_87 (Orin), this is "
                              "TensorRT 11.4.1.2 on sm_90 (NVIDIA H100): rebuild it on this device")
    with pytest.raises(EngineError, match="this is TensorRT 10.3.0.30 on sm_72"):
        check_engine_compat(engine, trt_version="10.3.0.30", gpu_name="Xavier", compute_capability="7.2")
    with pytest.raises(EngineError, match="this is TensorRT 10.3.1"):
        check_engine_compat(engine, trt_version="10.3.1", gpu_name="Orin", compute_capability="8.7")
    with pytest.raises(EngineError, match=r"^compute capability 'x' not understood"):
        check_engine_compat(engine, trt_version="10.3.0", gpu_name="Orin", compute_capability="x")


def test_compat_version_and_hardware_compatible_engines(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    record_engine(onnx_path, engine, info(version_compatible=True, hardware_compatibility="ampere_plus"),
                  trt_version="10.3.0", gpu_name="RTX 3060", compute_capability="8.6")
    for version, cc in (("10.16.1", "8.9"), ("11.4.1", "9.0"), ("10.3.0", "12.0")):
        check_engine_compat(engine, trt_version=version, gpu_name="x", compute_capability=cc)
    for version, cc in (("10.2.0", "8.6"), ("12.0.0", "8.6"), ("10.3.0", "7.5")):
        with pytest.raises(EngineError, match="rebuild it on this device"):
            check_engine_compat(engine, trt_version=version, gpu_name="x", compute_capability=cc)


def test_compat_truncated_or_replaced_engine(recorded):
    engine, _ = recorded
    engine.write_bytes(engine.read_bytes()[:1000])
    with pytest.raises(EngineError, match=r"^model.engine: 1000 bytes that do not match "
                                          r"model.engine.json \(4096 bytes.*truncated or replaced"):
        check_engine_compat(engine, **HERE)
    engine.write_bytes(bytes(4096))  # same size, other content
    with pytest.raises(EngineError, match="truncated or replaced"):
        check_engine_compat(engine, **HERE)


def test_compat_missing_or_broken_sidecar_or_engine(recorded):
    engine, _ = recorded
    side = sidecar_path(engine)
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "options": {**meta["options"], "version_compatible": "no"}}))
    with pytest.raises(EngineError, match="^model.engine: built for TensorRT 10.3.0.30"):
        check_engine_compat(engine, **{**HERE, "trt_version": "10.8.0"})  # "no" is not True
    side.write_text(json.dumps({**meta, "engine_size_bytes": "4096"}))
    with pytest.raises(EngineError, match=r"^model.engine.json: not readable .*engine_size_bytes is str"):
        check_engine_compat(engine, **HERE)
    side.write_text(side.read_text()[:50])
    with pytest.raises(EngineError, match="^model.engine.json: not readable engine metadata"):
        check_engine_compat(engine, **HERE)
    side.write_text('{"engine": "model.engine"}')
    with pytest.raises(EngineError, match="^model.engine.json: not readable .*no engine_size_bytes"):
        check_engine_compat(engine, **HERE)
    side.unlink()
    with pytest.raises(EngineError, match="^model.engine: its metadata model.engine.json is missing"):
        check_engine_compat(engine, **HERE)
    engine.unlink()
    with pytest.raises(EngineError, match="^model.engine: no such file"):
        check_engine_compat(engine, **HERE)
    assert issubclass(EngineError, EdgeError)


def test_build_info_load_errors(tmp_path):
    path = tmp_path / "engine_build.json"
    for text in ("[1]", "{", json.dumps({"input_name": "x"}),
                 json.dumps({**dataclasses.asdict(info()), "max_batch": "64"})):
        path.write_text(text)
        with pytest.raises(EngineError, match=r"^engine_build.json: not a readable engine build description \("):
            BuildInfo.load(path)
    with pytest.raises(EngineError, match=r"^missing.json: not a readable"):
        BuildInfo.load(tmp_path / "missing.json")


def record_args(engine, *extra):
    parser = argparse.ArgumentParser()
    add_record_parser(parser.add_subparsers(dest="verb"))
    return parser.parse_args(["record", "--onnx", str(engine.with_name("model.onnx")), "--engine", str(engine),
                              "--trt-version", "10.3.0", *extra])


def test_record_verb(recorded, capsys, monkeypatch):
    engine, _ = recorded
    import edgerun.trt
    write_build_files(engine.parent, EngineOptions(), onnx_name="model.onnx", engine_name="model.engine",
                      input_name="input", input_shape=(3, 8, 8), precision="fp16")
    monkeypatch.setattr(edgerun.trt, "cuda_device", lambda index=0: ("Orin", "8.7"))  # no GPU here
    assert run_record(record_args(engine)) == 0
    assert capsys.readouterr().out == f"PASSED | {engine}: TensorRT 10.3.0 on sm_87 (Orin), fp16\n"
    assert check_engine_compat(engine, **HERE)["precision"] == "fp16"

    side = sidecar_path(engine)
    side.unlink()
    side.mkdir()  # a folder where the sidecar file should go: the rename onto it fails
    with pytest.raises(EdgeError, match=rf"^{side}: could not write \(Is a directory\)"):
        run_record(record_args(engine))
    assert [p.name for p in engine.parent.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(EngineError, match="^nope.json: not a readable engine build description"):
        run_record(record_args(engine, "--build-info", str(engine.parent / "nope.json")))


def test_record_through_the_edgerun_cli_without_a_gpu(recorded, capsys):
    engine, _ = recorded
    if trt_version_info() is not None:
        pytest.skip("a GPU is here")
    cli = pytest.importorskip("edgerun.cli", reason="edgerun's CLI (helper G) is not written yet")
    write_build_files(engine.parent, EngineOptions(), onnx_name="model.onnx", engine_name="model.engine",
                      input_name="input", input_shape=(3, 8, 8), precision="fp32")
    rc = cli.main(["record", "--onnx", str(engine.with_name("model.onnx")), "--engine", str(engine),
                   "--trt-version", "10.3.0"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1 and len(out) == 1 and out[0].startswith("FAILED")
    assert out[0].endswith("model.engine: no CUDA GPU here to record it against")


def test_timing_cache_name():
    assert timing_cache_name("NVIDIA Jetson AGX Orin", "10.3.0.30") == \
        "timing-cache_NVIDIA-Jetson-AGX-Orin_trt10.3.0.30.bin"


# ---------------------------------------------------------------- build_engine wiring (faked)

def test_build_engine_wiring_with_faked_polygraphy(tmp_path, monkeypatch):
    """build_engine's own logic: loaders called with strong typing, timing cache load + save,
    DLA core, engine then sidecar. Polygraphy's loaders are fakes: no engine is built."""
    calls = {}
    accepted = trt_options.create_config_parameters()  # the real CreateConfig's, before faking it
    monkeypatch.setattr(trt_options, "create_config_parameters", lambda: accepted)

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

    monkeypatch.setattr(ptrt, "NetworkFromOnnxPath", fake_network)
    monkeypatch.setattr(ptrt, "CreateConfig", fake_config)
    monkeypatch.setattr(ptrt, "PostprocessConfig", fake_postprocess)
    monkeypatch.setattr(ptrt, "engine_from_network", fake_engine)
    monkeypatch.setattr(ptrt, "save_engine", lambda engine, path: Path(path).write_bytes(b"serialized engine"))
    monkeypatch.setattr(trt_build, "_import_tensorrt", lambda name: TRT10)
    monkeypatch.setattr(trt_build, "cuda_device", lambda index=0: ("NVIDIA Jetson AGX Orin", "8.7"))

    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "out" / "model.engine"
    cache = tmp_path / "t.bin"
    io = dict(input_name="input", input_shape=(3, 8, 8))
    meta = build_engine(onnx_path, engine, EngineOptions(dla_core=1), **io, precision="fp16", timing_cache=cache)
    assert calls["network"] == ("model.onnx", True)
    assert calls["config"]["load_timing_cache"] == str(cache)
    assert calls["config"]["use_dla"] is True and calls["dla_core"] == 1
    assert calls["engine"] == ("network", "config", str(cache))
    assert engine.read_bytes() == b"serialized engine"
    assert sorted(p.name for p in engine.parent.iterdir()) == ["model.engine", "model.engine.json"]
    assert meta["tensorrt_version"] == "10.3.0.30" and meta["gpu_name"] == "NVIDIA Jetson AGX Orin"
    assert meta["precision"] == "fp16" and meta["strongly_typed"] is True
    assert meta["built_with"].startswith("polygraphy ")
    check_engine_compat(engine, trt_version="10.3.0.30", gpu_name="NVIDIA Jetson AGX Orin", compute_capability="8.7")

    # Legacy FP16 on TensorRT 10: weakly typed network, fp16 flag in the config.
    meta = build_engine(onnx_path, engine, EngineOptions(legacy_fp16_flag=True), **io, precision="fp16")
    assert calls["network"] == ("model.onnx", False) and calls["config"]["fp16"] is True
    assert meta["strongly_typed"] is False and "load_timing_cache" not in calls["config"]

    def failing(*args, **kwargs):
        raise RuntimeError("Could not find any implementation for node Conv\nmore detail")

    monkeypatch.setattr(ptrt, "engine_from_network", failing)
    other = tmp_path / "failed" / "model.engine"
    with pytest.raises(ExportError, match=r"^model.onnx: TensorRT build failed \(RuntimeError: Could "
                                          r"not find any implementation for node Conv\)$"):
        build_engine(onnx_path, other, EngineOptions(), **io, precision="fp32")
    assert not other.parent.exists() or list(other.parent.iterdir()) == []


# ---------------------------------------------------------------- without TensorRT, imports

def test_no_tensorrt_here(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except Exception:
        assert trt_version_info() is None
        with pytest.raises(EngineError, match=r"^model.engine: TensorRT's Python API or a CUDA GPU is missing here$"):
            TrtEngineRunner(tmp_path / "model.engine")
        with pytest.raises(ExportError, match=r"^model.onnx: TensorRT's Python API is not importable here"):
            build_engine(tiny_onnx(tmp_path / "model.onnx"), tmp_path / "model.engine", EngineOptions(),
                         input_name="input", input_shape=(3, 8, 8), precision="fp32")
    else:
        pytest.skip("tensorrt is installed here")


def test_package_imports_stay_light():
    code = ("import sys, export, export.trt_options, export.trt_build, edgerun.trt\n"
            "heavy = {'torch', 'tensorrt', 'onnxruntime', 'polygraphy', 'onnx'} & set(sys.modules)\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---------------------------------------------------------------- real TensorRT + GPU

needs_trt = pytest.mark.skipif(trt_version_info() is None, reason="needs TensorRT and a CUDA GPU")


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("fp16", [False, True])
def test_real_engine_matches_onnxruntime(tmp_path, fp16):
    from edgerun.ort import OrtRunner
    from export.fp16 import to_fp16
    from export.parity import compare_outputs

    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    built = Path(to_fp16(onnx_path, tmp_path / "model_fp16.onnx")["path"]) if fp16 else onnx_path
    here = trt_version_info()
    cache = tmp_path / timing_cache_name(here["gpu_name"], here["version"])
    options = EngineOptions(min_batch=1, opt_batch=4, max_batch=16, workspace_mb=256)
    meta = build_engine(built, tmp_path / "model.engine", options, input_name="input", input_shape=(3, 8, 8),
                        precision="fp16" if fp16 else "fp32", timing_cache=cache)
    assert meta["tensorrt_version"] == here["version"] and cache.is_file()

    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    with OrtRunner(onnx_path) as ort_runner, TrtEngineRunner(tmp_path / "model.engine") as trt_runner:
        assert trt_runner.input_names == ["input"] and trt_runner.output_names == ["logits"]
        for batch in (1, 7, 16):
            feed = {"input": x[:batch]}
            result = compare_outputs(ort_runner.infer(feed), trt_runner.infer(feed))
            assert result["max_abs"] <= (1e-2 if fp16 else 1e-3), result
            assert result["min_mean_cosine"] >= 0.999, result
        assert trt_runner.last_inference_time() > 0
