"""Hardening round 2 (issue 23), the bundle and runtime side: nothing a verb loads is unverified,
nothing in the bundle folder runs unless its manifest lists it, every runtime input is one line.

Most tests build tiny bundles with onnx.helper (test_bundle's `make_bundle`) and run the runtime in a
fresh process from inside the bundle, as the `Next:` block says; a few run the pipeline itself on a
300-image MNIST subset (about 25 s each) for what only a run shows: the package stage's checks.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TRAIN_BASELINE
from test_bundle import make_bundle
from test_infer import idx, reference

from edgerun.bundle import FORMAT
from edgerun.cli import main
from edgerun.io import sha256_file

MARKER = "planted-code-ran"


# ---------------------------------------------------------------- helpers

def list_everything(bundle: Path, base: dict | None = None) -> Path:
    """manifest.json lists every file in the folder with its sha256 (format 4), as the package stage
    writes it: edgerun/* as the runtime, the rest as build files unless already listed."""
    path = bundle / "manifest.json"
    doc = json.loads(path.read_text()) if path.exists() else json.loads(json.dumps(base))
    for p in sorted(bundle.rglob("*")):
        name = p.relative_to(bundle).as_posix()
        if p.is_file() and name != "manifest.json" and "__pycache__" not in name:
            entry = doc["files"].get(name) or {"kind": "runtime" if name.startswith("edgerun/") else "build"}
            doc["files"][name] = {**entry, "sha256": sha256_file(p)}
    doc["format"] = FORMAT
    path.write_text(json.dumps(doc))
    return bundle


def runtime_bundle(root: Path) -> Path:
    """test_bundle's tiny bundle with the runtime the package stage ships (edgerun/), all listed."""
    from pipeline.package import runtime_files
    bundle = make_bundle(root)
    (bundle / "edgerun").mkdir()
    for src in runtime_files():
        shutil.copyfile(src, bundle / "edgerun" / src.name)
    return list_everything(bundle)


def images(folder: Path, n=20) -> Path:
    """An IDX images file of n random 4x4 images and its labels file (the model's own answers)."""
    folder.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(3).integers(0, 256, (n, 4, 4), dtype=np.uint8)
    idx(folder / "t-labels-idx1-ubyte.gz", reference(x[:, None]).argmax(1).astype(np.uint8))
    return idx(folder / "t-images-idx3-ubyte.gz", x)


def edgerun_in(bundle: Path, *argv, env=None, cwd=None) -> subprocess.CompletedProcess:
    """`python3 -m edgerun ...` in a fresh process, from inside the bundle as the Next: block runs it."""
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONIOENCODING")}
    return subprocess.run([sys.executable, "-B", "-m", "edgerun", *map(str, argv)], cwd=cwd or bundle,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=120)


def one_failed_line(p: subprocess.CompletedProcess) -> str:
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("FAILED | error: "), (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    return lines[0][len("FAILED | error: "):]


def plant(bundle: Path, name: str) -> Path:
    """A module that leaves a marker file and exits 97 if it is ever imported."""
    path = bundle / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"open({str(bundle.parent / MARKER)!r}, 'w').write('ran')\nraise SystemExit(97)\n")
    return path


# ---------------------------------------------------------------- planted code never runs

@pytest.mark.parametrize("module", ["onnxruntime.py", "numpy.py"])
@pytest.mark.parametrize("how", ["cd bundle", "PYTHONPATH=bundle"])
def test_a_module_planted_beside_the_runtime_never_runs_and_the_bundle_is_refused(tmp_path, module, how):
    """numpy is imported before any check can run: only leaving the bundle off sys.path stops it."""
    bundle = runtime_bundle(tmp_path / "deploy")
    data = images(tmp_path / "data")
    plant(bundle, module)
    if how == "cd bundle":
        p = edgerun_in(bundle, "infer", "--bundle", ".", "--input", data)
    else:   # what build_engine.sh did; the runtime still comes from the bundle
        p = edgerun_in(bundle, "infer", "--bundle", bundle, "--input", data, env={"PYTHONPATH": str(bundle)},
                       cwd=tmp_path)
    assert not (tmp_path / MARKER).exists(), "the planted module ran"
    where = "." if how == "cd bundle" else bundle
    assert one_failed_line(p) == (f"{where}: {module} is in the bundle but not listed in manifest.json: refused "
                                  f"(the packager did not write it; remove it or copy the bundle again)")


@pytest.mark.parametrize("name, named", [
    ("onnxruntime/__init__.py", "onnxruntime/"), ("edgerun/ort_extra.py", "edgerun/ort_extra.py"),
    ("__pycache__/numpy.cpython-311.pyc", "__pycache__/"), ("edgerun/__pycache__/x.cpython-311.pyc", None),
    ("sub/model.onnx", "sub/"), ("model.onnx.data", None), ("trtexec_args_trt10.txt", None), ("engine.env", None),
    ("run.sh", None), ("model.onnx.json", None)])
@pytest.mark.parametrize("verb", ["infer", "benchmark", "check"])
def test_an_unlisted_file_in_the_bundle_is_refused_by_every_verb(tmp_path, capsys, name, named, verb):
    bundle = runtime_bundle(tmp_path / "deploy")
    (bundle / name).parent.mkdir(parents=True, exist_ok=True)
    (bundle / name).write_bytes(b"x")
    argv = {"infer": ["infer", "--bundle", bundle, "--input", images(tmp_path / "data")],
            "benchmark": ["benchmark", bundle, "--processes", "1"], "check": ["check", bundle]}[verb]
    assert main([str(a) for a in argv]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"FAILED | error: {bundle}: {named or name} is in the bundle but not listed in manifest.json: "
                   f"refused (the packager did not write it; remove it or copy the bundle again)"]


def test_what_the_runtime_and_the_user_write_on_the_target_is_tolerated(tmp_path):
    """benchmark.json, an --output file, the engine build_engine.sh builds, its sidecar and timing cache,
    and Python's bytecode cache of the listed runtime: no verb loads them."""
    bundle = runtime_bundle(tmp_path / "deploy")
    data = images(tmp_path / "data")
    for name in ("benchmark.json", "pred.csv", "model.engine", "model.engine.json", "model.trt10.3.0.timing-cache"):
        (bundle / name).write_bytes(b"{}")
    p = edgerun_in(bundle, "infer", "--bundle", ".", "--input", data, "--format", "json", "--output", "pred.json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((bundle / "pred.json").read_text())["accuracy"]["top1_pct"] == 100.0
    import importlib.util
    import py_compile
    for src in (bundle / "edgerun").glob("*.py"):   # what Python writes there when it may
        py_compile.compile(str(src), cfile=importlib.util.cache_from_source(str(src)), doraise=True)
    p = edgerun_in(bundle, "infer", "--bundle", ".", "--input", data)
    assert p.returncode == 0 and p.stdout.splitlines()[-1].startswith("PASSED | 20 predictions"), p.stdout + p.stderr


def test_a_runtime_file_changed_after_packaging_is_refused(tmp_path):
    bundle = runtime_bundle(tmp_path / "deploy")
    with open(bundle / "edgerun" / "readers.py", "a") as f:
        f.write("\n# edited on the device\n")
    msg = one_failed_line(edgerun_in(bundle, "infer", "--bundle", ".", "--input", images(tmp_path / "data")))
    assert msg.startswith("edgerun/readers.py: sha256 ") and "does not match manifest.json" in msg


# ---------------------------------------------------------------- external data

def external_data_bundle(root: Path) -> Path:
    import onnx
    bundle = make_bundle(root)
    model = onnx.load(str(bundle / "model.onnx"))
    onnx.save(model, str(bundle / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["files"]["model.onnx"]["sha256"] = sha256_file(bundle / "model.onnx")
    doc["files"]["model.onnx.data"] = {"kind": "onnx-data", "sha256": sha256_file(bundle / "model.onnx.data")}
    (bundle / "manifest.json").write_text(json.dumps(doc))
    return bundle


def test_onnx_external_data_zeroed_is_refused_before_loading(tmp_path, capsys):
    """The issue's case: weights in external data, zeroed after packaging, ran at 11 % 'sha256 verified'."""
    bundle = external_data_bundle(tmp_path / "deploy")
    data = images(tmp_path / "data")
    assert main(["infer", "--bundle", str(bundle), "--input", str(data)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("PASSED | 20 predictions, accuracy 100.00 %")
    size = (bundle / "model.onnx.data").stat().st_size
    (bundle / "model.onnx.data").write_bytes(bytes(size))
    for argv in (["infer", "--bundle", str(bundle), "--input", str(data)], ["benchmark", str(bundle)],
                 ["check", str(bundle / "model.onnx")]):
        assert main(argv) == 1
        out = capsys.readouterr().out.strip()
        assert out.startswith(f"FAILED | error: {bundle}/model.onnx.data: sha256 ") and "\n" not in out, out


def test_onnx_external_data_the_manifest_does_not_list_is_refused(tmp_path, capsys):
    bundle = external_data_bundle(tmp_path / "deploy")
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["files"]["weights.bin"] = doc["files"].pop("model.onnx.data")   # listed under another name
    (bundle / "weights.bin").write_bytes((bundle / "model.onnx.data").read_bytes())
    (bundle / "model.onnx.data").unlink()
    (bundle / "manifest.json").write_text(json.dumps(doc))
    (bundle / "model.onnx.data").symlink_to(bundle / "weights.bin")   # what the model reads: unlisted
    assert main(["infer", "--bundle", str(bundle), "--input", str(images(tmp_path / "data"))]) == 1
    assert capsys.readouterr().out.strip() == (
        f"FAILED | error: {bundle}: model.onnx.data is in the bundle but not listed in manifest.json: refused "
        f"(the packager did not write it; remove it or copy the bundle again)")
    (bundle / "model.onnx.data").unlink()
    from edgerun.bundle import BundleError
    from edgerun.verify import load_verified, verify_model
    with pytest.raises(BundleError, match="its weights are in external data 'model.onnx.data', which manifest.json "
                                          "does not list: refused"):
        verify_model(load_verified(bundle), "model.onnx")


# ---------------------------------------------------------------- the manifest parser is strict

@pytest.mark.parametrize("old, new, message", [
    ('"labels": [', '"labels": ["z"], "labels": [', "duplicate key 'labels'"),     # json keeps the last one
    ('"sha256": "', '"sha256": "0", "sha256": "', "duplicate key 'sha256'"),
    ('"labels": [', '"x_labels": 1, "labels": [', "unknown field 'x_labels' in the manifest"),
    ('"kind": "onnx"', '"kind": "onnx", "kind_": 1', "unknown field 'kind_' in files['model.onnx']"),
])
def test_manifest_with_duplicate_or_unknown_keys_is_refused(tmp_path, old, new, message):
    from edgerun.bundle import BundleError, load_manifest
    bundle = make_bundle(tmp_path / "deploy")
    raw = (bundle / "manifest.json").read_text()
    assert old in raw
    (bundle / "manifest.json").write_text(raw.replace(old, new, 1))
    with pytest.raises(BundleError) as e:
        load_manifest(bundle)
    assert str(e.value).startswith(f"{bundle}/manifest.json: unreadable manifest (") and message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="3"), "format must be a JSON integer, got '3'"),
    (lambda d: d.update(format=3), "format must be 4 (this runtime's"),
    (lambda d: d.update(model=["tiny"]), "model must be a JSON object"),
    (lambda d: d.update(verified="yes"), "verified must be a JSON object"),
    (lambda d: d["files"]["model.onnx"].update(role=1), "files['model.onnx'].role must be a string, got 1"),
    (lambda d: d["input"]["normalisation"].update(center=0), "unknown field 'center' in input.normalisation"),
])
def test_manifest_fields_of_the_wrong_type_are_refused(tmp_path, edit, message):
    from edgerun.bundle import BundleError, load_manifest
    bundle = make_bundle(tmp_path / "deploy")
    doc = json.loads((bundle / "manifest.json").read_text())
    edit(doc)
    (bundle / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError) as e:
        load_manifest(bundle)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------- check: crafted ONNX files

def crafted(path: Path, case: str) -> Path:
    """conv_onnx's model with one defect only a hostile or broken exporter writes."""
    import onnx
    from conftest import conv_onnx
    from onnx import TensorProto, helper, numpy_helper
    model = onnx.load(str(conv_onnx(path, 4)))
    g = model.graph
    if case == "attribute of the wrong type":
        del g.node[0].attribute[:]
        g.node[0].attribute.append(helper.make_attribute("pads", "1,1,1,1"))
    elif case == "DequantizeLinear with no inputs":
        g.node.insert(0, helper.make_node("DequantizeLinear", [], ["dq"], name="dq0"))
    else:
        zero_point = {"zero point shorter than its shape": None,
                      "zero point of strings": helper.make_tensor("zp", TensorProto.STRING, [], [b"x"]),
                      "zero point of another shape": numpy_helper.from_array(np.zeros((2, 2), np.int8), "zp")}[case]
        if zero_point is None:
            zero_point = helper.make_tensor("zp", TensorProto.INT8, [4], b"\x00" * 4, raw=True)
            zero_point.raw_data = b"\x00"
        g.initializer.extend([numpy_helper.from_array(np.ones((4, 1, 3, 3), np.int8), "wq"),
                              numpy_helper.from_array(np.ones(4, np.float32), "scale"), zero_point])
        g.node.insert(0, helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w2"], axis=0, name="dq1"))
        g.node[1].input[1] = "w2"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("attribute of the wrong type", "not a valid ONNX model (onnx.checker: ValidationError: Mismatched attribute type"),
    ("DequantizeLinear with no inputs", "not a valid ONNX model (onnx.checker: ValidationError: Node(dq0) with "
                                        "schema(::DequantizeLinear:13) has input size 0"),
    ("zero point shorter than its shape", "not a valid ONNX model (onnx.checker: ValidationError: TensorProto "
                                          "(tensor name: zp) raw_data size (1 bytes) is too small"),
    ("zero point of strings", "malformed model, the pre-flight cannot read it (ValueError: invalid literal"),
])
def test_check_on_a_crafted_onnx_is_one_line(tmp_path, case, message):
    path = crafted(tmp_path / "m.onnx", case)
    for cli in (["-m", "edgerun"], ["-m", "pipeline"]):   # `python -m edgerun check` and `edgepipe check`
        p = subprocess.run([sys.executable, *cli, "check", str(path)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert message in one_failed_line(p)


def test_check_names_a_zero_point_whose_shape_is_not_its_scales(tmp_path, capsys):
    """onnx.checker lets it through; TensorRT would not: an issue (exit 2), not a pass."""
    path = crafted(tmp_path / "m.onnx", "zero point of another shape")
    assert main(["check", str(path), "--trt-major", "10"]) == 2
    assert ("dq1 (DequantizeLinear) zero-point: zero point of shape [2, 2] for a scale of shape [4]; ONNX needs "
            "the same shape") in capsys.readouterr().out


def test_check_of_a_bundle_file_changed_after_packaging_is_refused(tmp_path, capsys):
    bundle = runtime_bundle(tmp_path / "deploy")
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[-5] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    for target in (bundle, bundle / "model.onnx"):
        assert main(["check", str(target)]) == 1
        out = capsys.readouterr().out.strip()
        assert out.startswith(f"FAILED | error: {bundle}/model.onnx: sha256 ") and "\n" not in out


# ---------------------------------------------------------------- benchmark's numbers

@pytest.mark.parametrize("argv, message", [
    (["--batches", "100000000"], "--batches 100000000: the inputs alone would take 6.0 GiB (64 bytes per input); "
                                 "at most 1 GiB: choose smaller batches"),
    (["--batches", "1,1"], "--batches '1,1': expected at most 16 different batch sizes"),
    (["--block-ms", "nan"], "--block-ms nan: expected a positive number of milliseconds, at most 10000"),
    (["--block-ms", "inf"], "--block-ms inf: expected a positive number of milliseconds, at most 10000"),
    (["--block-ms", "-1"], "--block-ms -1.0: expected a positive number of milliseconds, at most 10000"),
    (["--iters", "1000000000"], "--iters 1000000000: expected an integer >= 1 and <= 100000"),
    (["--processes", "1000"], "--processes 1000: expected an integer >= 1 and <= 32"),
])
def test_benchmark_refuses_absurd_numbers_before_allocating(tmp_path, capsys, argv, message):
    import time
    bundle = make_bundle(tmp_path / "deploy")
    t = time.perf_counter()
    assert main(["benchmark", str(bundle), *argv]) == 1
    assert time.perf_counter() - t < 10   # refused, not attempted
    assert capsys.readouterr().out.strip() == f"FAILED | error: {message}"
    assert not (bundle / "benchmark.json").exists()


# ---------------------------------------------------------------- the target's environment

def test_onnxruntime_missing_on_the_target_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # `import onnxruntime` raises ImportError
    bundle = make_bundle(tmp_path / "deploy")
    assert main(["infer", "--bundle", str(bundle), "--input", str(images(tmp_path / "data"))]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("FAILED | error: onnxruntime cannot be imported by ") and "\n" not in out
    assert "pip install onnxruntime" in out
    assert main(["benchmark", str(bundle), "--processes", "1"]) == 1   # not a PASSED with nothing measured
    assert capsys.readouterr().out.strip() == ("FAILED | error: nothing measured: ONNX fp32 on -: no backend for "
                                               "onnx files here (TensorRT/onnxruntime missing)")


def test_a_terminal_that_cannot_print_utf8_gets_escapes_not_a_traceback(tmp_path):
    """PYTHONIOENCODING=ascii: `≤` in infer's summary, a label `café`, `…` in a refusal; files stay UTF-8."""
    bundle = runtime_bundle(tmp_path / "deploy")
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["labels"] = ["a", "b", "café"]
    (bundle / "manifest.json").write_text(json.dumps(doc))
    data = images(tmp_path / "data")
    ascii_env = {"PYTHONIOENCODING": "ascii"}
    p = edgerun_in(bundle, "infer", "--bundle", ".", "--input", data, "--format", "csv", "--output", tmp_path / "p.csv",
                   env=ascii_env)
    assert p.returncode == 0 and "of \\u226464" in p.stdout, p.stdout + p.stderr
    assert "café".encode() in (tmp_path / "p.csv").read_bytes()
    p = edgerun_in(bundle, "infer", "--bundle", ".", "--input", data, "--format", "csv", env=ascii_env)
    assert p.returncode == 0 and ",caf\\xe9," in p.stdout, p.stdout + p.stderr
    model = bytearray((bundle / "model.onnx").read_bytes())
    model[-5] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(model))
    p = edgerun_in(bundle, "infer", "--bundle", ".", "--input", data, env=ascii_env)
    assert "\\u2026 does not match manifest.json" in one_failed_line(p)


# ---------------------------------------------------------------- build_engine.sh

def test_build_engine_sh_refuses_an_onnx_changed_after_packaging_before_trtexec(tmp_path):
    from test_export_trt import make_bundle as trt_bundle
    from test_export_trt import run_script

    from export.trt_options import EngineOptions
    bundle, env, log = trt_bundle(tmp_path, EngineOptions(max_batch=16))
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[-5] ^= 0xFF   # same size, one weight: the fake `check` passes, the hash must not
    (bundle / "model.onnx").write_bytes(bytes(data))
    run = run_script(bundle, env)
    assert run.returncode == 1 and "trtexec" not in (log.read_text() if log.exists() else "")
    assert run.stderr.strip().splitlines()[-2].startswith(f"error: {bundle}/model.onnx: sha256 ")
    assert run.stderr.strip().splitlines()[-1] == "error: model.onnx does not match manifest.json (above)"
    assert not (bundle / "model.engine").exists()


def test_build_engine_sh_refuses_changed_build_files_before_sourcing_them(tmp_path):
    from test_export_trt import make_bundle as trt_bundle
    from test_export_trt import run_script

    from export.trt_options import EngineOptions
    bundle, env, log = trt_bundle(tmp_path, EngineOptions(max_batch=16))
    with open(bundle / "engine.env", "a") as f:
        f.write(f"touch {tmp_path / MARKER}\n")
    run = run_script(bundle, env)
    assert run.returncode == 1 and not (tmp_path / MARKER).exists() and not log.exists()
    assert run.stderr.strip().splitlines()[-1] == ("error: the bundle's build files do not match manifest.json "
                                                    "(above)")


# ---------------------------------------------------------------- the package stage

CHEAP = [TRAIN_BASELINE, "data.train_subset=300", "data.test_subset=100", "baseline.epochs=1", "baseline.min_top1=0",
         "prune.target=ratio", "prune.ratio=0.3", "finetune.epochs=0.1", "finetune.max_drop=100",
         "export.fp16=false", "export.max_drop=100", "quantize.enabled=false", "profile.iters=3",
         "profile.warmup=1", "profile.batches=[1]", "profile.rounds=1", "profile.processes=1", "profile.block_ms=2",
         "profile.baseline_onnx=false", "package.batch=1"]


def run_pipeline(runs, *sets, force=None):
    import pipeline
    return pipeline.run("configs/cpu.toml", [*CHEAP, *sets], run_name="h", runs=runs, log=lambda m: None,
                        force=force)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = run_pipeline(runs)
    assert result.passed, result.message
    return runs, result


def test_the_package_lists_every_file_it_writes_and_its_bundle_ran(packaged):
    from edgerun.verify import load_verified
    _, result = packaged
    bundle = result.bundle
    manifest = load_verified(bundle)   # strict, nothing unlisted, the runtime as listed
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    on_disk -= {"manifest.json", "stage.json"}   # stage.json: the runner's record of the stage, read by no verb
    assert on_disk == set(manifest.files)
    assert {f"edgerun/{n}" for n in ("infer.py", "bundle.py", "verify.py", "trt_onnx_support.json")} <= on_disk
    ran = result.record("package").metrics["bundle_runs"]
    assert ran["model"] == manifest.chosen and ran["count"] == 100 and ran["agreement"] == 1.0


def test_a_new_profile_is_never_paired_with_an_old_package(packaged):
    """`make profile` forces the profile; the package depends on what it measured and runs again."""
    runs, first = packaged
    makefile = (ROOT / "Makefile").read_text()
    assert "--from profile --force profile package" in makefile.split("\nprofile:")[1].split("\n\n")[0]
    again = run_pipeline(runs, force=["profile"])
    assert again.passed, again.message
    assert {r.name: r.status for r in again.records}["package"] == "ran"
    measured = [r for r in again.record("profile").metrics["latency"] if r["file"] == "model.onnx"]
    chosen = json.loads((again.bundle / "manifest.json").read_text())["chosen"]
    assert chosen["p50_ms"] == measured[0]["p50_ms"]


def test_the_package_fingerprint_holds_the_runtime_it_copies(tmp_path, monkeypatch):
    import pipeline.package as package
    copy = tmp_path / "edgerun"
    shutil.copytree(ROOT / "edgerun", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(package, "RUNTIME", copy)
    before = package.package_environment()
    (copy / "stray.txt").write_text("not shipped, not fingerprinted")
    assert package.package_environment() == before
    with open(copy / "infer.py", "a") as f:
        f.write("\n# a change to the runtime\n")
    assert package.package_environment() != before


def test_the_package_stage_is_wired_to_its_runtime_fingerprint():
    from pipeline.package import package_environment
    from pipeline.stages import STAGES
    assert STAGES[-1].name == "package" and STAGES[-1].environment is package_environment


def test_num_classes_12_on_mnist_fails_at_package_in_one_line(packaged, capsys):
    """The issue's case: it PASSED, then the bundle's own infer (the Next: command) failed on the target."""
    from pipeline.cli import main as edgepipe
    runs, _ = packaged
    argv = ["run", "--config", "configs/cpu.toml", "--runs", str(runs), "--run", "h12"]
    for s in [*CHEAP, "model.num_classes=12"]:
        argv += ["--set", s]
    assert edgepipe(argv) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == ("FAILED | error: the bundle does not run: `python3 -m edgerun infer --bundle . --input "
                       "sample/images-idx3-ubyte.gz --format json` failed: model.onnx: the model's output is "
                       "[100, 12], expected [100, 10] (one score per label in the manifest)")
    assert not (runs / "h12" / "deploy").exists()
