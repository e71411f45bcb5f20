"""End to end through the real command line on a small MNIST subset: the smoke test CI runs.

Most pipeline behaviour is tested in-process through the API (test_pipeline.py); these few runs
prove what only a process shows: exit codes, the last line, and a bundle that works on its own.
"""
import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SMALL

# The real command line on the default search path takes minutes: `make test-e2e` runs this file (CI does,
# after `make test`) together with the default deploy under load.
pytestmark = pytest.mark.e2e
STAGES = ["baseline", "prune", "finetune", "export_onnx", "quantize", "engine", "profile", "package"]


def cli(*args, cwd=ROOT, timeout=900):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


# One full fine-tune epoch on the 2,000 images, not SMALL's 0.3: after 0.3 epochs the barely trained pick sat
# on the INT8 gate's edge. An AVX2-only CI machine (7-bit weights there) replayed its pick (6, 3) to a 2.0 pt
# INT8 drop (limit 1.5); with 1 epoch, five picks from (4, 2) to (8, 4) dropped 0-0.33 pt under the same
# emulated CPU.
SMOKE = [*SMALL, "finetune.epochs=1"]


def run(runs, *extra, config="configs/cpu.toml"):
    sets = [a for s in SMOKE + list(extra) for a in ("--set", s)]
    return cli("run", "--config", config, "--run", "smoke", "--runs", str(runs), *sets)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    p = run(runs)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("PASSED | 8 stages: 7 ran, 0 cached, 1 skipped")
    assert "Next:" in p.stdout and "python3 -m edgerun infer --bundle ." in p.stdout
    return runs


def report(runs):
    return json.loads((runs / "smoke/report.json").read_text())


def test_first_run_produces_every_stage_and_the_bundle(runs):
    rep = report(runs)
    assert [s["name"] for s in rep["stages"]] == STAGES
    by = {s["name"]: s for s in rep["stages"]}
    # The seed's convention (conv/linear multiply-accumulates) beside torch-pruning's op count.
    assert by["baseline"]["metrics"]["macs"] == 3_976_448 and by["baseline"]["metrics"]["ops_tp"] == 4_051_722
    for name in ("prune", "finetune", "export_onnx", "quantize"):
        assert set(by[name]["gate"]) >= {"passed", "metric", "value", "reference", "drop", "max_drop", "summary"}
    assert by["baseline"]["gate"]["metric"] == "top1_vs_chance"
    bundle = runs / "smoke/deploy"
    for f in ("model.onnx", "model_int8.onnx", "model_int8_trt.onnx", "manifest.json", "build_engine.sh",
              "edgerun/infer.py", "sample/images-idx3-ubyte.gz"):
        assert (bundle / f).exists(), f
    assert not (bundle / "pipeline").exists() and not (bundle / "export").exists()
    assert oct((bundle / "model.onnx").stat().st_mode)[-3:] == "644"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["chosen"]["file"] in manifest["files"]
    assert manifest["engine_recipe"]["source"] == "model_int8_trt.onnx"
    assert "NOT executed" in manifest["verified"]["tensorrt"]


def test_unchanged_rerun_is_all_cached(runs):
    p = run(runs)
    assert p.returncode == 0, p.stderr
    assert [s["status"] for s in report(runs)["stages"]] == ["cached"] * 5 + ["skipped", "cached", "cached"]


def test_failed_gate_exits_2_and_names_it(runs):
    p = run(runs, "finetune.max_drop=0")
    assert p.returncode == 2
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED | gate: stage finetune: top1 dropped") and "limit 0.0 pt" in last
    rep = report(runs)
    assert rep["outcome"]["passed"] is False
    assert (runs / "smoke/03_finetune.failed").is_dir()


def test_user_errors_exit_1_on_one_line(runs):
    p = run(runs, "prune.ration=0.3")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stdout.strip() == ("FAILED | error: configs/cpu.toml: config: unknown key 'prune.ration' "
                                "(did you mean 'ratio'?)")
    p = cli("run", "--bogus")   # argparse's usage errors are user errors too
    assert p.returncode == 1 and p.stdout.strip().startswith("FAILED | error:")
    p = run(runs, "engine.required=true")
    assert p.returncode == 1 and "engine.required = true" in p.stdout.strip().splitlines()[-1]
    assert report(runs)["outcome"]["passed"] is False   # the old report no longer claims success


def test_bundle_works_on_its_own_without_torch(runs, tmp_path):
    """What a Jetson has: the bundle folder, python3, numpy and onnxruntime; the Next: commands as printed."""
    bundle = tmp_path / "deploy"
    shutil.copytree(runs / "smoke/deploy", bundle)
    code = ("import runpy, sys; sys.argv = ['edgerun', *sys.argv[1:]]; "
            "import edgerun.cli as c; rc = c.main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules and 'pipeline' not in sys.modules; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "infer", "--bundle", ".", "--input", "sample/images-idx3-ubyte.gz",
                        "--format", "json", "--output", "pred.json"], cwd=bundle, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((bundle / "pred.json").read_text())
    assert doc["accuracy"]["count"] == 256 and len(doc["predictions"]) == 256
    p = subprocess.run([sys.executable, "-c", code, "check", "model_int8_trt.onnx", "--trt-major", "10"], cwd=bundle,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-c", code, "check", "model_int8.onnx", "--trt-major", "10"], cwd=bundle,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and p.stdout.strip().splitlines()[-1].startswith("FAILED")
    p = subprocess.run([sys.executable, "-c", code, "benchmark", ".", "--output", "bench.json", "--iters", "10",
                        "--rounds", "3", "--block-ms", "2", "--processes", "1", "--batches", "1"], cwd=bundle,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((bundle / "bench.json").read_text())


def test_infer_accuracy_equals_the_reports_top1_for_that_file(runs, tmp_path):
    """The same test images the pipeline scored, through the bundle's own infer: the same top-1."""
    from pipeline.data import load_split
    from pipeline.package import _idx_bytes
    test = load_split("mnist", "data/mnist", "test", subset=300, seed=0)
    (tmp_path / "t-images-idx3-ubyte.gz").write_bytes(_idx_bytes(test.images[:, 0]))
    (tmp_path / "t-labels-idx1-ubyte.gz").write_bytes(_idx_bytes(test.labels.astype("uint8")))
    p = cli("infer", "--bundle", str(runs / "smoke/deploy"), "--model", "model.onnx", "--input",
            str(tmp_path / "t-images-idx3-ubyte.gz"), "--format", "json", "--output", str(tmp_path / "p.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((tmp_path / "p.json").read_text())
    export = next(s for s in report(runs)["stages"] if s["name"] == "export_onnx")
    assert doc["accuracy"]["count"] == 300
    assert abs(doc["accuracy"]["top1_pct"] - export["metrics"]["top1"]) < 1e-3


def test_the_manifest_records_the_int8_form_and_the_runtime_warns_where_it_would_saturate(runs, monkeypatch):
    """The bundle says which INT8 weight form it ships and why (issue 19: correct on every CPU); a
    full-range CPU form opened on a CPU without VNNI/AMX gets a note. The CPU is faked for the second
    half: this proves the rule, not the saturation (tests/test_int8_form.py emulates that)."""
    import dataclasses
    from types import MappingProxyType

    from calib.int8form import FULL, REDUCED
    from edgerun import machine
    from edgerun.verify import load_verified
    manifest = load_verified(runs / "smoke/deploy")
    form = manifest.int8_form["onnx-int8"]
    assert form["weights"] == (REDUCED if machine.int16_int8_dot() else FULL) and form["reason"]
    assert manifest.int8_risk("model_int8.onnx") is None     # what was chosen here suits this CPU
    full = dataclasses.replace(manifest, int8_form=MappingProxyType({"onnx-int8": {**form, "weights": FULL}}))
    monkeypatch.setattr(machine, "int16_int8_dot", lambda *a, **k: True)
    assert "can saturate here" in full.int8_risk("model_int8.onnx")
    assert full.int8_risk("model.onnx") is None
