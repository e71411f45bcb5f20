"""pipeline.report: the shipped-variant choice, report.json's contract, report.md's tables and plots."""
import json
from types import SimpleNamespace

import pytest

from pipeline.config import Config
from pipeline.report import build, choose_variant, to_markdown, write_report

PKG = SimpleNamespace(backend="onnxruntime-cpu", objective="p50_ms", batch=1)


def gate(passed, mode="fail", drop=0.1, max_drop=0.3):
    return {"passed": passed, "mode": mode, "metric": "top1", "value": 98.0, "reference": 98.1, "drop": drop,
            "max_drop": max_drop, "checks": [{"metric": "top1", "value": 98.0, "reference": 98.1, "drop": drop,
                                               "max_drop": max_drop, "passed": passed}]}


def lat(artifact, file, stage, precision, backend, batch, p50, top1, size, role, macs):
    return {"artifact": artifact, "file": file, "stage": stage, "precision": precision, "backend": backend,
            "batch": batch, "p50_ms": p50, "p90_ms": p50 * 1.2, "p99_ms": p50 * 1.5, "mean_ms": p50 * 1.1,
            "std_ms": p50 * 0.1, "throughput_per_s": batch * 1000 / p50, "top1": top1, "size_bytes": size,
            "role": role, "macs": macs, "iters": 50, "rss_delta_mb": 3.5, "p50_spread_pct": 4.0}


def latency():
    rows = []
    for b, k in ((1, 1.0), (8, 5.0)):
        rows += [lat("baseline (torch)", "model.pt", "baseline", "fp32", "torch-cpu", b, 0.30 * k, 98.9, 90_000,
                     "baseline-torch", 3_976_448),
                 lat("pruned + fine-tuned (torch)", "pruned", "finetune", "fp32", "torch-cpu", b, 0.20 * k, 98.6,
                     30_000, "pruned-torch", 1_100_000),
                 lat("baseline ONNX fp32 (unpruned)", "baseline_fp32.onnx", "profile", "fp32", "onnxruntime-cpu", b,
                     0.15 * k, 98.9, 90_000, "baseline-onnx", 3_976_448),
                 lat("ONNX fp32", "model.onnx", "export_onnx", "fp32", "onnxruntime-cpu", b, 0.10 * k, 98.6, 30_000,
                     "onnx-fp32", 1_100_000),
                 lat("ONNX fp16", "model_fp16.onnx", "export_onnx", "fp16", "onnxruntime-cpu", b, 0.25 * k, 98.6,
                     16_000, "onnx-fp16", 1_100_000),
                 lat("ONNX int8 (onnxruntime Q/DQ)", "model_int8.onnx", "quantize", "int8", "onnxruntime-cpu", b,
                     0.18 * k, 98.5, 12_000, "onnx-int8", 1_100_000)]
    return rows


SHIPPED = {"model.onnx", "model_fp16.onnx", "model_int8.onnx", "calib.npz"}


def records(quantize_gate=None, prune_gate=None):
    recs = {
        "baseline": {"name": "baseline", "status": "ran", "seconds": 10.0, "gate": None,
                     "metrics": {"top1": 98.9, "macs": 3_976_448, "params": 421_642, "size_bytes": 1_690_000}},
        "prune": {"name": "prune", "status": "ran", "seconds": 2.0, "gate": prune_gate or gate(True, "warn"),
                  "metrics": {"top1": 90.0, "macs": 1_100_000, "params": 110_000, "size_bytes": 450_000}},
        "finetune": {"name": "finetune", "status": "ran", "seconds": 9.0, "gate": gate(True),
                     "metrics": {"top1": 98.6, "macs": 1_100_000, "params": 110_000, "size_bytes": 450_000}},
        "export_onnx": {"name": "export_onnx", "status": "ran", "seconds": 3.0, "gate": gate(True),
                        "metrics": {"top1": 98.6, "macs": 1_100_000, "params": 110_000, "size_bytes": 440_000,
                                    "fp16": {"top1": 98.6, "size_bytes": 225_000}}},
        "quantize": {"name": "quantize", "status": "ran", "seconds": 5.0, "gate": quantize_gate or gate(True),
                     "metrics": {"top1": 98.5, "macs": 1_100_000, "params": 110_000, "size_bytes": 120_000}},
        "engine": {"name": "engine", "status": "skipped", "seconds": 0.0, "gate": None, "metrics": {},
                   "reason": "no TensorRT here"},
        "profile": {"name": "profile", "status": "ran", "seconds": 20.0, "gate": None,
                    "metrics": {"latency": latency(), "environment": {
                        "cpu": "Test CPU", "cores": 2, "threads": "default", "libraries": {"onnxruntime": "1.x"},
                        "load_avg_start": [1.0, 1.0, 1.0], "load_avg_end": [1.2, 1.0, 1.0], "gpu": None,
                        "jetson": None, "method": {"warmup": 10, "iters": 50, "rounds": 3, "time_budget_s": 0.0,
                                                   "timer": "perf_counter", "input": "random", "throughput": "b/p50"},
                        "not_measured": []}}},
    }
    return recs


def test_choose_variant_picks_the_fastest_gated_artifact():
    c = choose_variant(records(), latency(), PKG, SHIPPED)
    assert c["file"] == "model.onnx" and c["backend"] == "onnxruntime-cpu" and c["batch"] == 1
    assert c["p50_ms"] == pytest.approx(0.10) and [x["file"] for x in c["candidates"]] == [
        "model.onnx", "model_int8.onnx", "model_fp16.onnx"]
    assert "lowest p50_ms" in c["why"] and "runner-up model_int8.onnx" in c["why"] and "1.80x" in c["why"]
    assert "calib.npz (not measured" in c["why"]  # shipped but not a model: said, not silently dropped


def test_choose_variant_skips_a_failed_gate_and_says_why():
    lat_rows = latency()
    for r in lat_rows:  # make int8 the fastest: it must still lose to the gate
        if r["file"] == "model_int8.onnx":
            r["p50_ms"] = 0.01
    recs = records(quantize_gate=gate(False, "warn", drop=0.6))
    c = choose_variant(recs, lat_rows, PKG, SHIPPED)
    assert c["file"] == "model.onnx"
    (ex,) = [e for e in c["excluded"] if e["file"] == "model_int8.onnx"]
    assert "quantize gate failed" in ex["reason"] and "drop 0.6 > 0.3" in ex["reason"] and "mode warn" in ex["reason"]
    assert "model_int8.onnx (quantize gate failed" in c["why"]


def test_an_upstream_warn_only_gate_does_not_block_shipping():
    recs = records(prune_gate=gate(False, "warn", drop=8.9))  # pruning lost accuracy, fine-tuning recovered it
    assert choose_variant(recs, latency(), PKG, SHIPPED)["file"] == "model.onnx"
    recs["finetune"]["status"] = "failed"
    assert choose_variant(recs, latency(), PKG, SHIPPED)["file"] is None


def test_choose_variant_other_objectives_and_nothing_measured():
    size = choose_variant(records(), latency(), SimpleNamespace(backend="onnxruntime-cpu", objective="size_bytes",
                                                                batch=8), SHIPPED)
    assert size["file"] == "model_int8.onnx" and "KiB" in size["why"]
    none = choose_variant(records(), latency(), SimpleNamespace(backend="tensorrt", objective="p50_ms", batch=1),
                          SHIPPED)
    assert none["file"] is None and "tensorrt" in none["why"] and "build and measure on the target" in none["why"]


def cfg():
    c = Config()
    return c


def test_report_json_keeps_the_contract_and_adds_speedup():
    recs = records()
    rep = build(list(recs.values()), cfg())
    assert {"run", "target", "outcome", "stages", "latency", "speedup", "environment", "plots", "libraries",
            "not_run_on_hardware", "flags"} <= set(rep)
    for s in rep["stages"]:
        assert {"name", "status", "seconds", "metrics", "gate"} <= set(s)
    for r in rep["latency"]:
        assert {"artifact", "backend", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s"} <= set(r)
    fp16 = next(s for s in rep["speedup"] if s["artifact"] == "ONNX fp16" and s["batch"] == 1)
    assert fp16["slower_than_parent"] and fp16["parent"] == "ONNX fp32"
    assert len(rep["flags"]) == 4  # fp16 and int8 are both slower than fp32, at batch 1 and 8
    assert all("slower than its parent ONNX fp32" in f for f in rep["flags"])
    fp32 = next(s for s in rep["speedup"] if s["artifact"] == "ONNX fp32" and s["batch"] == 1)
    assert fp32["speedup"] == pytest.approx(1.5) and fp32["vs_torch_cpu"] == pytest.approx(3.0)
    assert rep["outcome"]["passed"] and rep["environment"]["cpu"] == "Test CPU"


def test_old_profile_records_without_new_fields_still_build():
    recs = records()
    for r in recs["profile"]["metrics"]["latency"]:
        for k in ("role", "macs", "iters", "rss_delta_mb", "p50_spread_pct", "mean_ms", "std_ms", "p90_ms"):
            r.pop(k)
    rep = build(list(recs.values()), cfg())
    assert {r["role"] for r in rep["latency"]} >= {"baseline-torch", "onnx-int8", "baseline-onnx"}
    assert "## Realized speedup" in to_markdown(rep)


def test_write_report_tables_plots_and_atomic_files(tmp_path):
    recs = records()
    recs["package"] = {"name": "package", "status": "ran", "seconds": 1.0, "gate": None,
                       "metrics": {"chosen": choose_variant(recs, latency(), PKG, SHIPPED)}}
    rep = write_report(tmp_path, list(recs.values()), cfg(), outcome={"passed": True})
    assert rep["plots"] == ["plot_pareto.png", "plot_latency.png", "plot_stages.png"]
    for p in rep["plots"]:
        assert (tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    for heading in ("## Stages", "## Environment", "## Latency", "## Realized speedup", "## Plots",
                    "## Shipped variant", "## Not executed on real hardware"):
        assert heading in md, heading
    assert "| finetune | ran |" in md and "![" in md and "](plot_pareto.png)" in md and "](plot_stages.png)" in md
    assert "⚠ ONNX fp16" in md and "`model.onnx`: model.onnx (ONNX fp32) has the lowest p50_ms" in md
    assert "| ONNX fp32 | onnxruntime-cpu | 1 | 0.100 | baseline ONNX fp32 (unpruned) | 1.50× | 3.00× | 3.62× | 41 % | baseline ONNX fp32 (unpruned) | 1.50× |" in md
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["plots"] == rep["plots"] and on_disk["speedup"]
    assert not list(tmp_path.glob("*.tmp"))


def test_markdown_embeds_only_existing_plots_and_survives_no_profile():
    recs = records()
    del recs["profile"]
    rep = build(list(recs.values()), cfg(), outcome={"passed": False, "message": "gate"})
    assert rep["latency"] == [] and rep["speedup"] == [] and rep["environment"] is None
    md = to_markdown(rep)
    assert "FAILED" in md and "![" not in md and "## Latency" not in md
    rep["plots"] = ["plot_stages.png"]
    assert "](plot_stages.png)" in to_markdown(rep) and "plot_pareto" not in to_markdown(rep)
