"""End to end through the CLI on a small MNIST subset: the smoke test CI runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data.train_subset=3000", "data.test_subset=500", "baseline.epochs=1", "finetune.epochs=0.3", "finetune.max_drop=5",
         "quantize.calib_size=64", "quantize.max_drop=1.0", "profile.iters=5", "profile.warmup=2",
         "profile.batches=[1, 8]"]
STAGES = ["baseline", "prune", "finetune", "export_onnx", "quantize", "engine", "profile", "package"]


def cli(*args, runs):
    cmd = [sys.executable, "-m", "pipeline", *args]
    if args[0] == "run":
        cmd += ["--runs", str(runs)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def run(runs, *extra, config="configs/cpu.toml"):
    sets = [a for s in SMALL + list(extra) for a in ("--set", s)]
    return cli("run", "--config", config, "--run", "smoke", *sets, runs=runs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    p = run(runs)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("PASSED | 8 stages: 7 ran, 0 cached, 1 skipped")
    return runs


def report(runs):
    return json.loads((runs / "smoke/report.json").read_text())


def test_first_run_produces_every_stage_and_the_bundle(runs):
    rep = report(runs)
    assert [s["name"] for s in rep["stages"]] == STAGES
    status = {s["name"]: s["status"] for s in rep["stages"]}
    assert status["engine"] == "skipped" and all(status[n] == "ran" for n in STAGES if n != "engine")
    by = {s["name"]: s for s in rep["stages"]}
    base, pruned = by["baseline"]["metrics"], by["finetune"]["metrics"]
    # torch-pruning 1.6.1 also counts bias adds and ReLUs: 3,976,448 multiply-adds + 75,274.
    assert base["macs"] == 4_051_722 and pruned["macs"] < base["macs"]
    for name in ("prune", "finetune", "export_onnx", "quantize"):
        g = by[name]["gate"]
        assert set(g) >= {"passed", "metric", "value", "reference", "drop", "max_drop"}
    assert by["baseline"]["gate"] is None and by["export_onnx"]["gate"]["passed"]
    assert by["export_onnx"]["metrics"]["parity"]["max_abs"] <= 1e-4
    lat = rep["latency"]
    assert {(r["artifact"], r["batch"]) for r in lat} >= {("ONNX int8 (onnxruntime Q/DQ)", 1), ("ONNX fp32", 8)}
    assert all(r["p50_ms"] > 0 and r["p50_ms"] <= r["p99_ms"] for r in lat)
    bundle = runs / "smoke/deploy"
    for f in ("model.onnx", "model_fp16.onnx", "model_int8.onnx", "calib.npz", "manifest.json",
              "build_engine.sh", "report.md", "config.json", "export/tensorrt.py", "pipeline/infer.py"):
        assert (bundle / f).exists(), f
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input"]["normalisation"]["mean"] == [0.1307]
    assert manifest["chosen"]["file"] in manifest["files"]
    assert "NOT executed" in manifest["verified"]["tensorrt"]
    md = (runs / "smoke/report.md").read_text()
    assert "| finetune | ran |" in md and "Not executed on real hardware" in md


def test_unchanged_rerun_is_all_cached(runs):
    p = run(runs)
    assert p.returncode == 0, p.stderr
    assert [s["status"] for s in report(runs)["stages"]] == ["cached"] * 5 + ["skipped", "cached", "cached"]


def test_changed_stage_config_reruns_it_and_later(runs):
    p = run(runs, "export.opset=17")
    assert p.returncode == 0, p.stderr
    status = [s["status"] for s in report(runs)["stages"]]
    assert status[:3] == ["cached"] * 3 and status[3] == "ran"


def test_failed_gate_exits_2_and_names_it(runs):
    p = run(runs, "finetune.max_drop=-100")
    assert p.returncode == 2
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED | gate: stage finetune: top1 dropped") and "max_drop -100" in last
    rep = report(runs)
    assert rep["outcome"]["passed"] is False and rep["stages"][-1]["name"] == "finetune"
    assert rep["stages"][-1]["status"] == "failed" and not rep["stages"][-1]["gate"]["passed"]
    assert (runs / "smoke/03_finetune.failed").is_dir()


def test_config_error_exits_1_on_one_line(runs):
    p = run(runs, "prune.ration=0.3")
    assert p.returncode == 1
    assert p.stdout.strip() == ("FAILED | error: configs/cpu.toml: config: unknown key 'prune.ration' "
                                "(did you mean 'ratio'?)")
    assert "Traceback" not in p.stderr


def test_infer_on_bundle_without_torch(runs):
    # From inside the bundle, with its own copy of the code: what a Jetson has.
    code = ("import os, sys, pipeline; assert os.path.abspath(pipeline.__file__).startswith(sys.argv[1]), pipeline.__file__; "
            "from pipeline.cli import main; rc = main(['infer', '--bundle', '.', '--input', sys.argv[2], '--limit', '3']); "
            "assert 'torch' not in sys.modules, 'infer imported torch'; sys.exit(rc)")
    bundle = runs / "smoke/deploy"
    p = subprocess.run([sys.executable, "-c", code, str(bundle), str(ROOT / "data/mnist/t10k-images-idx3-ubyte.gz")],
                       cwd=bundle, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].split("\t")[1] == "7"  # the first MNIST test digit is a 7
    assert "10000 images with" in lines[-2] and lines[-1].startswith("PASSED | 10000 predictions")


def test_required_engine_without_tensorrt_is_a_one_line_error(runs):
    p = run(runs, "engine.required=true")
    assert p.returncode == 1
    assert p.stdout.strip().splitlines()[-1] == ("FAILED | error: engine.required = true for target cpu, but TensorRT and a CUDA GPU "
                                "are not available on this machine; build on the target with deploy/build_engine.sh")
    assert not (runs / "smoke/06_engine.failed").exists()
