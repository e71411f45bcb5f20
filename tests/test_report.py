"""pipeline.report (+ report_summary, report_md, report_fmt, plots) and pipeline.choose, on hand-built records."""
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from pipeline import report_fmt as fmt
from pipeline.choose import choose_variant
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.plots import plot_pareto, score_limits
from pipeline.records import Artifact, Check, GateResult, Score, StageRecord
from pipeline.report import build_report, write_report
from pipeline.report_md import to_markdown
from pipeline.tasks import Classify

PKG = SimpleNamespace(backend="onnxruntime-cpu", objective="p50_ms", batch=1)
ORDER = ["baseline", "prune", "finetune", "export_onnx", "quantize", "engine", "profile", "package"]
LEGACY_KEYS = {"run", "target", "outcome", "stages", "latency", "speedup", "flags", "flag_tolerance",
               "environment", "libraries", "plots", "not_run_on_hardware"}
SHIPPED = {"model.onnx", "model_fp16.onnx", "model_int8.onnx", "calib.npz"}


def gate(passed, mode="fail", drop=0.1, max_drop=0.3):
    return GateResult(mode, (Check("top1", 98.0, passed, reference=98.0 + drop, drop=drop, max_drop=max_drop),))


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
                 lat("baseline ONNX fp32 (unpruned)", "baseline_fp32.onnx", "export_onnx", "fp32", "onnxruntime-cpu",
                     b, 0.15 * k, 98.9, 90_000, "baseline-onnx", 3_976_448),
                 lat("ONNX fp32", "model.onnx", "export_onnx", "fp32", "onnxruntime-cpu", b, 0.10 * k, 98.6, 30_000,
                     "onnx-fp32", 1_100_000),
                 lat("ONNX fp16", "model_fp16.onnx", "export_onnx", "fp16", "onnxruntime-cpu", b, 0.25 * k, 98.6,
                     16_000, "onnx-fp16", 1_100_000),
                 lat("ONNX int8 (onnxruntime Q/DQ)", "model_int8.onnx", "quantize", "int8", "onnxruntime-cpu", b,
                     0.18 * k, 98.5, 12_000, "onnx-int8", 1_100_000)]
    return rows


ENV = {"cpu": "Test CPU", "cores": 2, "threads": "default", "libraries": {"onnxruntime": "1.x"},
       "load_avg_start": [1.0, 1.0, 1.0], "load_avg_end": [1.2, 1.0, 1.0], "gpu": None, "jetson": None,
       "method": {"warmup": 10, "iters": 50, "rounds": 3, "time_budget_s": 0.0, "timer": "perf_counter",
                  "input": "random", "throughput": "b/p50"}}


def speedups():
    """Speedup rows in the profile's protocol form: median ratio with p10-p90 over processes."""
    return [
        {"artifact": "ONNX fp32", "role": "onnx-fp32", "backend": "onnxruntime-cpu", "batch": 1, "p50_ms": 0.10,
         "reference": "baseline ONNX fp32 (unpruned)", "reference_p50_ms": 0.153, "ratio_p50_ms": 0.102,
         "speedup": 1.5,
         "speedup_p10": 1.41, "speedup_p90": 1.58, "processes": 3, "reproducible": True, "vs_torch_cpu": 3.0,
         "mac_ratio": 3.615, "efficiency": 0.415, "parent": "baseline ONNX fp32 (unpruned)", "vs_parent": 1.5,
         "slower_than_parent": False, "flag": None},
        {"artifact": "ONNX int8 (onnxruntime Q/DQ)", "role": "onnx-int8", "backend": "onnxruntime-cpu", "batch": 1,
         "p50_ms": 0.18, "reference": "baseline ONNX fp32 (unpruned)", "speedup": 0.83, "speedup_p10": 0.5,
         "speedup_p90": 1.3, "processes": 3, "reproducible": False, "parent": "ONNX fp32", "vs_parent": 0.56,
         "slower_than_parent": True, "flag": "slower than its parent ONNX fp32 on onnxruntime-cpu at batch 1; "
                                             "not reproducible across 3 processes"},
        # the profile gives an oversubscribed row no ratio at all
        {"artifact": "pruned + fine-tuned (torch)", "role": "pruned-torch", "backend": "torch-cpu", "batch": 1,
         "p50_ms": 0.2, "reference": "baseline (torch)", "speedup": None, "speedup_p10": None, "speedup_p90": None,
         "processes": None, "reproducible": None, "oversubscribed": "2 threads on 2 cores at load 3.1",
         "flag": "oversubscribed (2 threads on 2 cores at load 3.1): not presented as a speedup"},
    ]


def records(quantize_gate=None, prune_gate=None, profile_speedups=True, finetune_status="ran"):
    def art(role, kind, file, precision="fp32", **kw):
        return Artifact(role, kind, file, precision=precision, **kw)
    profile = {"latency": latency(), "environment": dict(ENV), "skipped": [
        {"artifact": "ONNX fp16", "backend": "torch-cpu", "reason": "an ONNX file does not run on torch"}]}
    if profile_speedups:
        profile["speedup"] = speedups()
    return [
        StageRecord("baseline", "ran", 10.0, {"top1": 98.9, "macs": 3_976_448, "ops_tp": 4_012_000,
                                              "params": 421_642, "size_bytes": 1_690_000},
                    artifacts=(art("baseline-torch", "torch", "model.pt", stage="baseline"),)),
        StageRecord("prune", "ran", 2.0, {"top1": 90.0, "macs": 1_100_000, "ops_tp": 1_120_000, "params": 110_000,
                                          "size_bytes": 450_000},
                    gate=gate(True, "warn") if prune_gate is None else prune_gate),
        StageRecord("finetune", finetune_status, 9.0, {"top1": 98.6, "macs": 1_100_000, "ops_tp": 1_120_000,
                                                       "params": 110_000, "size_bytes": 450_000},
                    gate=gate(True), artifacts=(art("pruned-torch", "torch", "", stage="finetune"),)),
        StageRecord("export_onnx", "ran", 3.0, {"top1": 98.6, "macs": 1_100_000, "ops_tp": 1_120_000,
                                                "params": 110_000, "size_bytes": 440_000,
                                                "fp16": {"top1": 98.6, "size_bytes": 225_000}},
                    gate=gate(True), artifacts=(art("onnx-fp32", "onnx", "model.onnx"),
                                                art("onnx-fp16", "onnx", "model_fp16.onnx", "fp16",
                                                    score=Score("top1", 98.6)),
                                                art("baseline-onnx", "onnx", "baseline_fp32.onnx"))),
        StageRecord("quantize", "ran", 5.0, {"top1": 98.5, "macs": 1_100_000, "ops_tp": 1_120_000, "params": 110_000,
                                             "size_bytes": 120_000},
                    gate=gate(True) if quantize_gate is None else quantize_gate,
                    artifacts=(art("onnx-int8", "onnx", "model_int8.onnx", "int8"),
                               art("calibration", "calibration", "calib.npz"))),
        StageRecord("engine", "skipped", 0.0, {}, reason="no TensorRT here"),
        StageRecord("profile", "ran", 20.0, profile),
    ]


def with_package(recs, **chosen_extra):
    chosen = {**choose_variant(recs, latency(), PKG, SHIPPED), **chosen_extra}
    package = {"chosen": chosen, "preflight": PREFLIGHT, "engine_recipe": RECIPE,
               "files": sorted(SHIPPED)}
    return [*recs, StageRecord("package", "ran", 1.0, package)]


ON_TARGET = {"file": "model_int8.engine", "role": "engine-int8", "reason": "INT8 engine on the Jetson's GPU"}
PREFLIGHT = {"model.onnx": {"10": True, "11": True}, "model_int8.onnx": {"10": False}}
RECIPE = {"offered": True, "source": "model_int8_trt.onnx", "script": "build_engine.sh", "trt_majors": [10, 11],
          "note": "NOT executed here"}


# ---------------------------------------------------------------- choose_variant

def test_choose_variant_picks_the_fastest_gated_artifact():
    c = choose_variant(records(), latency(), PKG, SHIPPED)
    assert c["file"] == "model.onnx" and c["role"] == "onnx-fp32" and c["backend"] == "onnxruntime-cpu"
    assert c["p50_ms"] == pytest.approx(0.10) and [x["file"] for x in c["candidates"]] == [
        "model.onnx", "model_int8.onnx", "model_fp16.onnx"]
    assert "lowest p50_ms, 0.100 ms" in c["why"] and "runner-up model_int8.onnx 0.180 ms (1.80×" in c["why"]
    assert "top-1 is 98.60 %" in c["why"] and "file 29.3 KiB" in c["why"]
    assert "calib.npz (not measured" in c["why"]  # shipped but not a model: said, not silently dropped


def test_choose_variant_skips_a_failed_gate_and_says_why():
    rows = latency()
    for r in rows:  # make int8 the fastest: it must still lose to its gate
        if r["file"] == "model_int8.onnx":
            r["p50_ms"] = 0.01
    c = choose_variant(records(quantize_gate=gate(False, "warn", drop=0.6)), rows, PKG, SHIPPED)
    assert c["file"] == "model.onnx"
    (ex,) = [e for e in c["excluded"] if e["file"] == "model_int8.onnx"]
    assert "quantize gate failed (top1 dropped 0.60 pt" in ex["reason"] and "limit 0.3 pt" in ex["reason"]
    assert "warn-only gate" in ex["reason"] and "model_int8.onnx (quantize gate failed" in c["why"]


def test_an_upstream_warn_only_gate_does_not_block_shipping_but_a_failed_stage_does():
    recs = records(prune_gate=gate(False, "warn", drop=8.9))  # pruning lost accuracy, fine-tuning recovered it
    assert choose_variant(recs, latency(), PKG, SHIPPED)["file"] == "model.onnx"
    recs = records(finetune_status="failed")
    none = choose_variant(recs, latency(), PKG, SHIPPED)
    assert none["file"] is None and "finetune gate failed" in none["why"]


def test_an_int8_stage_is_not_on_the_path_of_an_fp32_artifact():
    recs = records(quantize_gate=gate(False, "fail", drop=2.0))
    recs[4] = replace(recs[4], status="failed")
    recs.append(StageRecord("engine2", "ran", 1.0, {"top1": 98.6}, gate=gate(True),
                            artifacts=(Artifact("engine-fp32", "engine", "model.engine"),)))
    rows = [lat("TRT fp32", "model.engine", "engine2", "fp32", "onnxruntime-cpu", 1, 0.01, 98.6, 5000,
                "engine-fp32", None)] + latency()
    assert choose_variant(recs, rows, PKG, SHIPPED | {"model.engine"})["file"] == "model.engine"
    rows[0]["precision"] = "int8"  # an INT8 engine is made from the quantize stage's file: blocked
    assert choose_variant(recs, rows, PKG, SHIPPED | {"model.engine"})["file"] == "model.onnx"


def test_choose_variant_other_objectives_and_nothing_measured():
    size = choose_variant(records(), latency(), SimpleNamespace(backend="onnxruntime-cpu", objective="size_bytes",
                                                                batch=8), SHIPPED)
    assert size["file"] == "model_int8.onnx" and "11.7 KiB" in size["why"]
    none = choose_variant(records(), latency(), SimpleNamespace(backend="tensorrt", objective="p50_ms", batch=1),
                          SHIPPED)
    assert none["file"] is None and "tensorrt" in none["why"] and "build and measure on the target" in none["why"]


# ---------------------------------------------------------------- report.json

def test_report_json_keeps_the_legacy_keys_and_adds_summary():
    rep = build_report(with_package(records()), Config(), stage_order=ORDER)
    assert LEGACY_KEYS | {"summary"} <= set(rep)
    for s in rep["stages"]:
        assert {"name", "status", "seconds", "metrics", "gate"} <= set(s)
    assert rep["stages"][1]["gate"]["mode"] == "warn" and rep["stages"][1]["gate"]["checks"][0]["drop"] == 0.1
    for r in rep["latency"]:
        assert {"artifact", "backend", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s"} <= set(r)
    assert [s["artifact"] for s in rep["speedup"]] == [s["artifact"] for s in speedups()]
    assert rep["flags"] == [s["flag"] for s in speedups() if s["flag"]]
    assert rep["outcome"]["passed"] and rep["environment"]["cpu"] == "Test CPU"
    assert rep["flag_tolerance"] == Config().profile.slower_tolerance and "onnxruntime" in rep["libraries"]
    assert any("TensorRT" in n for n in rep["not_run_on_hardware"])
    assert json.loads(json.dumps(rep)) == rep  # plain JSON, no dataclasses left


def test_summary_names_what_shipped_why_and_what_it_gained():
    recs = with_package(records(), on_target=ON_TARGET)
    s = build_report(recs, Config(), stage_order=ORDER)["summary"]
    sh = s["shipped"]
    assert (sh["file"], sh["role"], sh["stage"], sh["backend"], sh["batch"]) == (
        "model.onnx", "onnx-fp32", "export_onnx", "onnxruntime-cpu", 1)
    assert sh["p50_ms"] == pytest.approx(0.10) and sh["top1"] == 98.6 and "lowest p50_ms" in sh["reason"]
    assert s["accuracy"] == {"reference_stage": "baseline", "reference_top1": 98.9, "shipped_top1": 98.6,
                             "drop_pt": pytest.approx(0.3)}
    sp = s["speedup"]
    assert (sp["speedup"], sp["speedup_p10"], sp["speedup_p90"], sp["processes"], sp["reproducible"]) == (
        1.5, 1.41, 1.58, 3, True) and sp["caveats"] == []
    assert s["reduction"]["macs"]["ratio"] == pytest.approx(3_976_448 / 1_100_000, rel=1e-3)
    assert s["reduction"]["ops_tp"]["ratio"] == pytest.approx(4_012_000 / 1_120_000, rel=1e-3)
    assert s["on_target"] == ON_TARGET and s["preflight"]
    assert any(n.startswith("TensorRT") for n in s["not_executed"]) and any("CUDA" in n for n in s["not_executed"])
    assert any("stage engine: skipped (no TensorRT here)" == n for n in s["not_executed"])
    md = to_markdown(build_report(recs, Config(), stage_order=ORDER))
    head = md[:md.index("## Stages")]  # the summary comes before every table
    assert "**Shipped:** `model.onnx` (onnx-fp32, made by export_onnx)" in head
    assert "p50 0.100 ms, top-1 98.60 %, file 29.3 KiB" in head and "a drop of 0.30 pt" in head
    assert "**Speedup vs the unpruned reference:** 1.50× against baseline ONNX fp32 (unpruned)" in head
    assert "(interleaved p50s 0.153 ms → 0.102 ms, p10–p90 1.41×–1.58×, reproducible across 3 processes)" in head
    assert "`model_int8.engine` (engine-int8): INT8 engine on the Jetson's GPU" in head
    assert ("per major; no engine built): model.onnx (TensorRT 10 ok, TensorRT 11 ok); model_int8.onnx "
            "(TensorRT 10 FAILED).") in head
    assert ("**Engine recipe:** `build_engine.sh` builds the engine from `model_int8_trt.onnx` for TensorRT 10, 11 "
            "on the target; NOT executed here.") in head
    assert "**Not executed here:** TensorRT" in head and "**Not executed here:** CUDA" in head


def test_warn_only_gates_are_shown_as_such():
    recs = with_package(records(prune_gate=GateResult("warn", (Check("top1", 73.59, False, reference=98.9,
                                                                     drop=25.31, max_drop=5.0),))))
    md = to_markdown(build_report(recs, Config(), stage_order=ORDER))
    row = next(ln for ln in md.splitlines() if ln.startswith("| prune |"))
    assert "failed, warn only: top1 dropped 25.31 pt (98.90 -> 73.59), limit 5.0 pt" in row
    assert "pass" not in row
    passing_warn = fmt.gate_text(gate(True, "warn"))
    assert passing_warn.startswith("pass, warn only: top1 dropped 0.10 pt")
    assert fmt.gate_text(gate(False, "fail", drop=0.5)).startswith("FAIL: top1 dropped 0.50 pt")
    limit = GateResult("fail", (Check("top1", 98.0, True, reference=98.0, drop=0.0, max_drop=0.3),
                                Check("cosine", 0.9812341, False, limit=">= 0.999")))
    assert fmt.gate_text(limit) == "FAIL: cosine = 0.981234, limit >= 0.999"


def test_order_follows_the_stage_list_not_the_records():
    recs = with_package(records())
    shuffled = [recs[6], recs[0], recs[7], recs[3], recs[1], recs[2], recs[5], recs[4]]
    order = ORDER[:6] + ["extra"] + ORDER[6:]  # a stage in the list that has no record
    rep = build_report(shuffled + [StageRecord("unlisted", "ran", 1.0)], Config(), stage_order=order)
    assert [s["name"] for s in rep["stages"]] == ORDER + ["unlisted"]
    md = to_markdown(rep)
    rows = [ln.split("|")[1].strip() for ln in md.splitlines() if ln.startswith("| ") and " | ran |" in ln
            or " | not run |" in ln or " | skipped |" in ln]
    assert rows[:len(ORDER)] == ORDER and "| extra | not run |" in md
    assert rep["summary"]["not_reached"] == ["extra"]


def test_flagged_speedups_are_never_shown_as_plain_speedups():
    rep = build_report(with_package(records()), Config(), stage_order=ORDER)
    torch_row = next(s for s in rep["speedup"] if s["role"] == "pruned-torch")
    assert torch_row["caveats"] == ["oversubscribed: 2 threads on 2 cores at load 3.1"]
    int8 = next(s for s in rep["speedup"] if s["role"] == "onnx-int8")
    assert int8["caveats"] == ["not reproducible: the medians of 3 processes differed by more than 1.2x"]
    md = to_markdown(rep)
    table = {ln.split("|")[1].strip() + "/" + ln.split("|")[2].strip(): ln for ln in md.splitlines()
             if ln.startswith("| ") and ln.count("|") == 15}
    assert "| ⚠ – | – | – |" in table["pruned + fine-tuned (torch)/torch-cpu"]
    assert "| oversubscribed |" in table["pruned + fine-tuned (torch)/torch-cpu"]
    assert "| ⚠ (0.83×) |" in table["ONNX int8 (onnxruntime Q/DQ)/onnxruntime-cpu"]
    assert "| (0.56×) ⚠ | not reproducible |" in table["ONNX int8 (onnxruntime Q/DQ)/onnxruntime-cpu"]
    assert "| 1.50× | 1.41–1.58× | 3 |" in table["ONNX fp32/onnxruntime-cpu"]  # unflagged: plain
    assert ("- ⚠ pruned + fine-tuned (torch) on torch-cpu at batch 1: oversubscribed (2 threads on 2 cores at "
            "load 3.1): not presented as a speedup") in md
    # when the shipped artifact's own ratio is flagged, the summary says it is no speedup
    rows = speedups()
    rows[0]["reproducible"] = False
    recs = with_package(records())
    recs[6] = replace(recs[6], metrics={**recs[6].metrics, "speedup": rows})
    rep = build_report(recs, Config(), stage_order=ORDER)
    head = to_markdown(rep).split("## Stages")[0]
    assert "**⚠ No reliable speedup:** 1.50× measured" in head and "not reproducible" in head
    assert "Speedup vs the unpruned reference" not in head and rep["summary"]["speedup"]["caveats"]


def test_both_mac_conventions_are_labelled():
    md = to_markdown(build_report(with_package(records()), Config(), stage_order=ORDER))
    assert "| stage | status | seconds | top-1 | MACs | ops (torch-pruning) | params | size | gate |" in md
    assert "| baseline | ran | 10.0 | 98.90 % | 3,976,448 | 4,012,000 | 421,642 | 1,650.4 KiB |" in md
    assert "*MACs*: MACs (conv/linear multiply-accumulates, as thop/fvcore count them)" in md
    head = md.split("## Stages")[0]
    assert ("**Compute reduction, MACs (conv/linear multiply-accumulates, as thop/fvcore count them):** "
            "3,976,448 (baseline) → 1,100,000 (export_onnx), 3.62× fewer.") in head
    assert ("**Compute reduction, ops (torch-pruning's count: MACs plus bias adds and ReLUs):** 4,012,000 "
            "(baseline) → 1,120,000 (export_onnx), 3.58× fewer.") in head


def test_write_report_writes_json_markdown_and_plots(tmp_path):
    rep = write_report(tmp_path, with_package(records(), on_target=ON_TARGET), Config(), stage_order=ORDER)
    assert rep["plots"] == ["plot_pareto.png", "plot_latency.png", "plot_stages.png"], rep.get("plot_errors")
    for p in rep["plots"]:
        data = (tmp_path / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (tmp_path / "report.md").read_text()
    for heading in ("## Summary", "## Stages", "## Environment", "## Latency", "## Realized speedup", "## Plots",
                    "## Shipped variant", "## Not executed on real hardware"):
        assert heading in md, heading
    assert md.index("## Summary") < md.index("## Stages") < md.index("## Latency")
    assert "| finetune | ran |" in md and "](plot_pareto.png)" in md and "](plot_stages.png)" in md
    assert "| ONNX fp32 | onnxruntime-cpu | 1 | 0.100 | 0.120 | 0.150 | 0.110 ± 0.0100 | 10,000 | 50 |" in md
    assert "- ONNX fp16 on torch-cpu: an ONNX file does not run on torch" in md  # the profile's skipped list
    assert "`model.onnx`: model.onnx (ONNX fp32) has the lowest p50_ms" in md
    assert "| candidate | p50_ms | top-1 |" in md and "| model_int8.onnx | 0.180 ms | 98.50 % |" in md
    assert "Why: model.onnx (ONNX fp32) has the lowest p50_ms" in md.split("## Stages")[0]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(rep)) and on_disk["summary"]["shipped"]["file"] == "model.onnx"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_the_package_argument_stands_in_for_a_record_not_written_yet():
    recs = records()
    chosen = choose_variant(recs, latency(), PKG, SHIPPED)
    rep = build_report(recs, Config(), stage_order=ORDER, package={"chosen": {**chosen, "on_target": ON_TARGET}})
    assert rep["summary"]["shipped"]["file"] == "model.onnx" and rep["summary"]["on_target"] == ON_TARGET
    assert rep["summary"]["not_reached"] == ["package"]
    assert "**Not reached** (not part of this run): package." in to_markdown(rep)
    interrupted = build_report(records()[:2], Config(), stage_order=ORDER, outcome={"passed": False,
                                                                                    "message": "interrupted"})
    assert interrupted["summary"]["failed_stage"] is None
    assert "**Not reached** (the run stopped before them): finetune, export_onnx" in to_markdown(interrupted)


def test_a_failed_run_says_where_it_stopped_and_that_nothing_shipped(tmp_path):
    failed = replace(records()[1], status="failed",
                     gate=GateResult("fail", (Check("top1", 90.0, False, reference=98.9, drop=8.9, max_drop=5.0),)))
    outcome = {"passed": False, "message": "prune: top1 dropped 8.90 pt", "stage": "prune"}
    rep = write_report(tmp_path, [records()[0], failed], Config(), stage_order=ORDER, outcome=outcome)
    s = rep["summary"]
    assert not s["passed"] and s["failed_stage"] == "prune" and s["shipped"] is None and s["speedup"] is None
    assert s["not_reached"] == ORDER[2:] and rep["latency"] == [] and rep["speedup"] == []
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Deployment report") and "**FAILED**: prune: top1 dropped 8.90 pt" in md
    assert "**Nothing shipped:** the run did not reach the package stage" in md
    assert "**Not reached** (the run stopped at prune): finetune, export_onnx" in md
    assert "| prune | failed |" in md and "FAIL: top1 dropped 8.90 pt" in md and "| profile | not run |" in md
    assert "## Latency" not in md and "## Shipped variant" not in md
    assert rep["plots"] == ["plot_stages.png"] and "](plot_stages.png)" in md and "plot_pareto" not in md


def test_old_profile_records_without_new_fields_still_build():
    recs = records(profile_speedups=False)
    for r in recs[6].metrics["latency"]:
        for k in ("role", "macs", "iters", "rss_delta_mb", "p50_spread_pct", "mean_ms", "std_ms", "p90_ms"):
            r.pop(k)
    rep = build_report(with_package(recs), Config(), stage_order=ORDER)
    assert {r["role"] for r in rep["latency"]} >= {"baseline-torch", "onnx-int8", "onnx-fp32"}
    # no ratios recorded: the report never divides p50s taken at different moments
    assert rep["speedup"] == [] and rep["flags"] == [] and rep["summary"]["speedup"] is None
    md = to_markdown(rep)
    assert "No ratios were recorded by this profile" in md and "| – ± – |" in md
    assert "**Speedup:** not measured for the shipped artifact" in md


def test_records_that_are_not_stage_records_are_refused_in_one_line():
    with pytest.raises(PipelineError, match=r"^write_report: records\[1\] is a dict, expected a pipeline"):
        build_report([records()[0], {"name": "prune"}], Config(), stage_order=ORDER)


# ---------------------------------------------------------------- formats and plots

@pytest.mark.parametrize("value,text", [(0.1, "0.100"), (0.012345, "0.0123"), (12.34, "12.3"), (123.4, "123"),
                                        (1234.5, "1,234"), (0.0, "0"), (None, "–")])
def test_times_have_three_significant_digits(value, text):
    assert fmt.sig3(value) == text


TOP1 = Classify().describe()


def test_other_formats():
    assert (TOP1.text(98.6), TOP1.diff(0.3), fmt.ratio(3.615), fmt.kib(30_000), fmt.ms(0.25)) == (
        "98.60 %", "0.30 pt", "3.62×", "29.3 KiB", "0.250 ms")


@pytest.mark.parametrize("values", [[98.5, 98.6], [99.9, 100.0], [0.0, 0.05], [50.0, 90.0], [97.0]])
def test_top1_axis_never_exaggerates_small_differences(values):
    lo, hi = score_limits(values, TOP1)
    assert hi - lo >= TOP1.min_span - 1e-9 and 0.0 <= lo <= min(values) and max(values) <= hi <= 100.0


def test_an_unbounded_metric_axis_is_not_clipped_to_a_percent():
    metric = replace(TOP1, name="logit_mae", bounds=None, min_span=0.0)
    lo, hi = score_limits([120.0, 130.0], metric)
    assert lo < 120.0 and hi > 130.0 and hi > 100.0


def test_pareto_plot_uses_the_honest_axis():
    rep = build_report(with_package(records()), Config(), stage_order=ORDER)
    fig = plot_pareto(rep)
    lo, hi = fig.axes[0].get_ylim()
    assert hi - lo >= TOP1.min_span and lo <= 98.5 and hi >= 98.9


def _last_line_speed(tmp_path, speedup):
    from pipeline.cli import _speed
    (tmp_path / "report.json").write_text(json.dumps({"summary": {
        "speedup": speedup, "widths": {"load": {"start": 1.52, "max": 2.64}}}}))
    return _speed(SimpleNamespace(run_dir=tmp_path))


def test_the_last_line_says_an_unreproducible_speedup_with_its_caveat_not_nothing(tmp_path):
    sp = {"speedup": 3.8337, "batch": 1, "speedup_p10": 2.3074, "speedup_p90": 5.6994, "processes": 3}
    plain = _last_line_speed(tmp_path, sp)
    assert plain == ["3.83x vs the unpruned ONNX at batch 1, p10-p90 2.31-5.70, 3 process(es)",
                     "load 1.52-2.64 while searching"]
    caveat = "not reproducible: the medians of 3 processes differed by more than 1.2x"
    flagged = _last_line_speed(tmp_path, {**sp, "caveats": [caveat]})
    assert flagged[0] == plain[0] + f" [{caveat}]" and flagged[1] == plain[1]
    assert _last_line_speed(tmp_path, {"speedup": None}) == []
