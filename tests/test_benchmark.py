"""edgerun.benchmark: `benchmark BUNDLE` end to end on onnxruntime CPU with a tiny bundle built here."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import conv_onnx

from edgerun import benchmark as bench
from edgerun.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def make_bundle(root: Path) -> Path:
    """A deploy folder as pipeline.stages.package_stage writes it: models + manifest.json."""
    bundle = root / "deploy"
    bundle.mkdir()
    conv_onnx(bundle / "model_fp32.onnx", 8)
    conv_onnx(bundle / "model_int8.onnx", 64)
    (bundle / "calib.npz").write_bytes(b"not a model")
    files = {"model_fp32.onnx": {"kind": "onnx", "precision": "fp32", "label": "ONNX fp32", "stage": "export_onnx"},
             "model_int8.onnx": {"kind": "onnx", "precision": "int8", "label": "ONNX int8", "stage": "quantize"},
             "calib.npz": {"kind": "calibration", "stage": "quantize"}}
    for name, meta in files.items():
        meta["sha256"] = sha256_file(bundle / name)
    (bundle / "manifest.json").write_text(json.dumps({
        "model": {"name": "tiny"}, "labels": [str(i) for i in range(10)], "target": "cpu",
        "input": {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32", "layout": "NCHW",
                  "normalisation": {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]}},
        "files": files, "chosen": {"file": "model_fp32.onnx", "why": "fastest"}}))
    return bundle


def run(argv) -> int:
    return bench.main(argv)


FAST = ["--warmup", "1", "--iters", "5", "--rounds", "3", "--block-ms", "2"]


def test_benchmark_a_bundle_on_onnxruntime_cpu(tmp_path, capsys):
    bundle = make_bundle(tmp_path)
    assert run([str(bundle), "--batches", "1,4", "--processes", "1", "--threads", "1", *FAST]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("PASSED | 4 latency rows (1 backend(s), batches 1,4), 2 ratios -> ")
    assert any(line.startswith("ONNX int8") and "onnxruntime-cpu" in line for line in lines)
    out = json.loads((bundle / "benchmark.json").read_text())
    rows = out["latency"]
    assert [(r["file"], r["batch"]) for r in rows] == [("model_fp32.onnx", 1), ("model_fp32.onnx", 4),
                                                       ("model_int8.onnx", 1), ("model_int8.onnx", 4)]
    for r in rows:
        assert r["backend"] == "onnxruntime-cpu" and r["iters"] == 5 and r["threads"] == 1
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["throughput_per_s"] == pytest.approx(r["batch"] * 1000 / r["p50_ms"])
    assert {r["role"] for r in rows} == {"onnx-fp32", "onnx-int8"}
    ratios = out["ratios"]
    assert [(r["artifact"], r["reference"], r["batch"]) for r in ratios] == [("ONNX int8", "ONNX fp32", 1),
                                                                            ("ONNX int8", "ONNX fp32", 4)]
    for r in ratios:
        assert r["p10"] <= r["ratio"] <= r["p90"] and r["processes"] == 1 and r["reproducible"] is None
        assert r["p50_ms"] > 0 and r["reference_p50_ms"] > 0
    assert out["machine"]["simd_block"] in (4, 8, 16) and out["machine"]["jetson"] is None
    assert "onnxruntime" in out["libraries"] and out["method"]["ratios"]["rounds"] == 3
    assert out["not_measured"] == []


def test_benchmark_ratios_in_three_processes_and_output_elsewhere(tmp_path, capsys):
    bundle = make_bundle(tmp_path)
    target = tmp_path / "out" / "bench.json"
    assert run([str(bundle), "--batches", "64", "--output", str(target), "--threads", "1", *FAST]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"-> {target}")
    (ratio,) = json.loads(target.read_text())["ratios"]
    assert ratio["processes"] == 3 and ratio["reproducible"] in (True, False)
    # 64 output channels against 8 at batch 64 (about 2x apart here): the bigger conv must not come out faster
    assert ratio["ratio"] > 1.0
    assert not (bundle / "benchmark.json").exists()


def test_a_gpu_backend_that_cannot_open_is_recorded_not_fatal(tmp_path, monkeypatch, capsys):
    bundle = make_bundle(tmp_path)
    monkeypatch.setattr(bench, "backends_for", lambda kind: ["onnxruntime-cpu", "onnxruntime-cuda"])
    assert run([str(bundle), "--batches", "1", "--processes", "1", *FAST]) == 0
    out = json.loads((bundle / "benchmark.json").read_text())
    assert {r["backend"] for r in out["latency"]} == {"onnxruntime-cpu"}
    assert [s["backend"] for s in out["not_measured"]] == ["onnxruntime-cuda"] * 2
    assert "CUDAExecutionProvider" in out["not_measured"][0]["reason"]
    assert "not measured: ONNX fp32 on onnxruntime-cuda" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nowhere"], "nowhere: bundle not found"),
    (["{bundle}", "--batches", "1,x"], "--batches '1,x': expected positive integers"),
    (["{bundle}", "--batches", "0"], "--batches '0': expected positive integers"),
    (["{bundle}", "--iters", "0"], "--iters 0: expected an integer >= 1"),
    (["{bundle}", "--block-ms", "0"], "--block-ms 0.0: expected a positive number"),
])
def test_bad_input_is_one_failed_line(tmp_path, capsys, argv, message):
    bundle = make_bundle(tmp_path)
    argv = [a.format(tmp=tmp_path, bundle=bundle) for a in argv]
    assert run(argv) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("FAILED | error: ") and message in out[-1]


def test_a_bundle_with_a_replaced_or_missing_file_or_no_manifest(tmp_path, capsys):
    bundle = make_bundle(tmp_path)
    conv_onnx(bundle / "model_int8.onnx", 16)   # replaced after packaging: never loaded
    assert run([str(bundle)]) == 1
    assert "model_int8.onnx: sha256" in capsys.readouterr().out
    (bundle / "model_int8.onnx").unlink()
    assert run([str(bundle)]) == 1
    assert "model_int8.onnx: listed in manifest.json but missing from the bundle" in capsys.readouterr().out
    (bundle / "manifest.json").write_text("{\"files\": {}}")
    assert run([str(bundle)]) == 1
    assert "unreadable manifest (no field 'input')" in capsys.readouterr().out
    (bundle / "manifest.json").unlink()
    assert run([str(bundle)]) == 1
    assert "not a deploy bundle (no manifest.json)" in capsys.readouterr().out
    assert not (bundle / "benchmark.json").exists()


def test_a_bundle_archive_and_the_edgerun_command_line(tmp_path, capsys):
    import tarfile

    from edgerun import cli
    bundle = make_bundle(tmp_path)
    archive = tmp_path / "deploy.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="deploy")
    assert cli.main(["benchmark", str(archive), "--batches", "2", "--processes", "1", *FAST]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASSED | 2 latency rows")
    out = json.loads((tmp_path / "deploy.tar.gz.benchmark.json").read_text())
    assert len(out["latency"]) == 2 and len(out["ratios"]) == 1
    assert cli.main(["benchmark", str(bundle), "--batches", "x"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FAILED | error: --batches 'x'")


def test_runtime_modules_import_neither_torch_nor_the_pipeline():
    code = ("import sys, edgerun.benchmark, edgerun.timing, edgerun.machine; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'pipeline', 'export', 'calib'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr


def test_standalone_module_entry_point(tmp_path):
    bundle = make_bundle(tmp_path)
    p = subprocess.run([sys.executable, "-m", "edgerun.benchmark", str(bundle), "--batches", "1", "--processes", "1",
                        *FAST], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("PASSED | 2 latency rows")


def test_a_backend_is_one_registered_opener(tmp_path):
    """A new runtime is one opener in edgerun.sessions' registry; open_session (every caller's way in) uses it."""
    from edgerun import sessions
    seen = []

    def opener(path, backend, *, threads, batches, input_shape):
        seen.append((path.name, backend, threads, tuple(batches)))
        return sessions.Session(run=lambda x: x * 2, close=lambda: None, backend=backend, threads=threads)
    sessions.register_backend("fake-npu", opener)
    try:
        s = sessions.open_session(tmp_path / "m.bin", "fake-npu", threads=3, batches=(1, 4))
        assert s.run(np.ones(2)).tolist() == [2.0, 2.0] and seen == [("m.bin", "fake-npu", 3, (1, 4))]
    finally:
        del sessions.OPENERS["fake-npu"]
    with pytest.raises(sessions.BenchmarkError, match="unknown backend 'fake-npu'"):
        sessions.open_session(tmp_path / "m.bin", "fake-npu")
