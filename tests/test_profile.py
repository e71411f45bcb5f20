"""pipeline.profile: timing statistics on a fake clock, the realized-speedup logic, a real tiny profile."""
import gc
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import profile as prof
from pipeline.profile import measure, role, speedup_table, summarize, time_calls


class FakeClock:
    """A clock that only moves when the timed function runs: durations[i] seconds for call i."""

    def __init__(self, durations):
        self.t, self.durations, self.calls = 0.0, list(durations), 0

    def __call__(self):
        return self.t

    def fn(self):
        self.t += self.durations[self.calls % len(self.durations)]
        self.calls += 1


def test_measure_statistics_on_a_fake_clock():
    clock = FakeClock([i / 1000.0 for i in range(1, 101)])  # 1, 2, ..., 100 ms
    stats = measure(clock.fn, warmup=0, iters=100, clock=clock)
    assert stats["iters"] == 100 and stats["stopped_by"] == "iters"
    assert stats["p50_ms"] == pytest.approx(50.5) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["p90_ms"] == pytest.approx(90.1) and stats["p99_ms"] == pytest.approx(99.01)
    assert stats["max_ms"] == pytest.approx(100.0) and stats["mean_ms"] == pytest.approx(50.5)
    assert stats["std_ms"] == pytest.approx(np.std(np.arange(1, 101)))
    assert stats["total_s"] == pytest.approx(5.05)


def test_warmup_calls_are_not_timed():
    clock = FakeClock([1.0, 1.0, 0.002])  # two slow warm-up calls, then 2 ms calls
    clock.durations = [1.0, 1.0] + [0.002] * 50
    stats = measure(clock.fn, warmup=2, iters=10, clock=clock)
    assert clock.calls == 12 and stats["iters"] == 10 and stats["max_ms"] == pytest.approx(2.0)


def test_time_budget_stops_early_but_not_below_min_iters():
    clock = FakeClock([1 / 64])  # exact in binary: no rounding at the budget's edge
    times, stopped = time_calls(clock.fn, iters=1000, time_budget_s=0.125, clock=clock)
    assert stopped == "time_budget" and len(times) == 8
    slow = FakeClock([1.0])  # every call alone exceeds the budget
    times, stopped = time_calls(slow.fn, iters=1000, time_budget_s=0.1, min_iters=5, clock=slow)
    assert len(times) == 5 and stopped == "time_budget"
    only_budget = FakeClock([1 / 64])
    times, _ = time_calls(only_budget.fn, iters=0, time_budget_s=0.5, clock=only_budget)
    assert len(times) == 32
    with pytest.raises(ValueError):
        time_calls(lambda: None, iters=0, time_budget_s=0.0)


def test_iterations_cap_wins_over_a_long_budget_and_sync_runs_each_call():
    clock, synced = FakeClock([0.001]), []
    stats = measure(clock.fn, warmup=3, iters=7, time_budget_s=60.0, clock=clock, sync=lambda: synced.append(1))
    assert stats["iters"] == 7 and stats["stopped_by"] == "iters" and len(synced) == 10


def test_percentiles_are_ordered_and_gc_restored_on_real_timings():
    rng = np.random.default_rng(0)
    clock = FakeClock(rng.exponential(0.001, 500))
    stats = measure(clock.fn, warmup=0, iters=500, clock=clock)
    assert stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert gc.isenabled()
    real = measure(lambda: sum(range(100)), warmup=2, iters=20)
    assert real["iters"] == 20 and 0 < real["p50_ms"] <= real["p99_ms"]
    with pytest.raises(ValueError):
        summarize([])


def test_roles_from_artifact_metadata():
    assert role({"kind": "torch", "stage": "baseline"}) == "baseline-torch"
    assert role({"kind": "torch", "stage": "finetune"}) == "pruned-torch"
    assert role({"kind": "onnx", "stage": "profile", "precision": "fp32"}) == "baseline-onnx"
    assert role({"kind": "onnx", "stage": "quantize", "precision": "int8"}) == "onnx-int8"
    assert role({"kind": "engine", "stage": "engine", "precision": "fp16"}) == "engine-fp16"


def row(artifact, r, backend, batch, p50, macs):
    return {"artifact": artifact, "role": r, "backend": backend, "batch": batch, "p50_ms": p50,
            "p99_ms": p50 * 1.5, "macs": macs}


SYNTH = [
    row("baseline (torch)", "baseline-torch", "torch-cpu", 1, 2.0, 4000),
    row("pruned (torch)", "pruned-torch", "torch-cpu", 1, 1.0, 1000),
    row("baseline ONNX fp32 (unpruned)", "baseline-onnx", "onnxruntime-cpu", 1, 1.0, 4000),
    row("ONNX fp32", "onnx-fp32", "onnxruntime-cpu", 1, 0.4, 1000),
    row("ONNX fp16", "onnx-fp16", "onnxruntime-cpu", 1, 0.41, 1000),   # 2.5 % slower: within tolerance
    row("ONNX int8 (onnxruntime Q/DQ)", "onnx-int8", "onnxruntime-cpu", 1, 0.6, 1000),  # slower than fp32
]


def test_speedup_ratios_against_the_same_family_and_torch_cpu():
    table = {(s["artifact"], s["batch"]): s for s in speedup_table(SYNTH)}
    pruned = table[("pruned (torch)", 1)]
    assert pruned["reference"] == "baseline (torch)" and pruned["speedup"] == pytest.approx(2.0)
    assert pruned["mac_ratio"] == pytest.approx(4.0) and pruned["efficiency"] == pytest.approx(0.5)
    fp32 = table[("ONNX fp32", 1)]
    assert fp32["reference"] == "baseline ONNX fp32 (unpruned)" and fp32["speedup"] == pytest.approx(2.5)
    assert fp32["vs_torch_cpu"] == pytest.approx(5.0) and fp32["parent"] == "baseline ONNX fp32 (unpruned)"
    assert table[("baseline (torch)", 1)]["speedup"] == pytest.approx(1.0)
    assert not fp32["slower_than_parent"] and fp32["flag"] is None


def test_int8_slower_than_fp32_is_flagged_and_noise_is_not():
    table = {s["artifact"]: s for s in speedup_table(SYNTH, tolerance=0.05)}
    int8 = table["ONNX int8 (onnxruntime Q/DQ)"]
    assert int8["slower_than_parent"] is True and int8["parent"] == "ONNX fp32"
    assert "slower than its parent ONNX fp32" in int8["flag"] and int8["vs_parent"] == pytest.approx(0.4 / 0.6, abs=1e-3)
    assert table["ONNX fp16"]["slower_than_parent"] is False
    assert table["baseline (torch)"]["slower_than_parent"] is None  # no parent
    strict = {s["artifact"]: s for s in speedup_table(SYNTH, tolerance=0.0)}
    assert strict["ONNX fp16"]["slower_than_parent"] is True


def test_pruned_slower_than_unpruned_is_flagged_and_parents_stay_on_one_backend():
    rows = [row("baseline (torch)", "baseline-torch", "torch-cpu", 8, 1.0, 4000),
            row("pruned (torch)", "pruned-torch", "torch-cpu", 8, 1.3, 1000),
            row("ONNX fp32", "onnx-fp32", "onnxruntime-cpu", 8, 0.5, 1000)]  # no baseline ONNX measured
    table = {s["artifact"]: s for s in speedup_table(rows)}
    assert table["pruned (torch)"]["slower_than_parent"] is True
    fp32 = table["ONNX fp32"]
    assert fp32["reference"] is None and fp32["speedup"] is None and fp32["parent"] is None
    assert fp32["vs_torch_cpu"] == pytest.approx(2.0) and fp32["mac_ratio"] == pytest.approx(4.0)


def test_run_command_never_raises():
    assert prof.run_command(["no-such-program-xyz"]) is None
    assert "failed" in prof.run_command(["sleep", "5"], timeout=0.1)
    assert prof.run_command(["sh", "-c", "echo hi; exit 3"]).startswith("(exit 3)")


# ---------------------------------------------------------------- a real profile of a tiny ONNX model

def tiny_onnx(path, scale=1.0):
    import onnx
    from onnx import TensorProto, helper
    w = helper.make_tensor("w", TensorProto.FLOAT, (16, 10), (np.ones((16, 10)) * scale).ravel().tolist())
    shape = helper.make_tensor("shape", TensorProto.INT64, (2,), [0, 16])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["f"]),
         helper.make_node("MatMul", ["f", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return str(path)


def fake_ctx(tmp_path, **profile):
    p = dict(batches=(1, 4), warmup=2, iters=6, time_budget_s=0.0, threads=1, torch=False, rounds=2,
             baseline_onnx=False)
    p.update(profile)
    cfg = SimpleNamespace(profile=SimpleNamespace(**p), run=SimpleNamespace(threads=0),
                          data=SimpleNamespace(channels=1, size=(4, 4)), engine=SimpleNamespace(min_batch=1, max_batch=64))
    records = {"finetune": {"metrics": {"macs": 160}}, "export_onnx": {"metrics": {"macs": 160}}}
    logs = []
    return SimpleNamespace(cfg=cfg, records=records, out=tmp_path, log=logs.append), logs


def arts(tmp_path):
    return [{"kind": "onnx", "precision": "int8", "label": "ONNX int8 (onnxruntime Q/DQ)", "stage": "quantize",
             "name": "b.onnx", "path": tiny_onnx(tmp_path / "b.onnx", 0.5), "top1": 97.0},
            {"kind": "onnx", "precision": "fp32", "label": "ONNX fp32", "stage": "export_onnx", "name": "a.onnx",
             "path": tiny_onnx(tmp_path / "a.onnx"), "top1": 98.0}]


def test_profile_artifacts_measures_every_artifact_and_batch(tmp_path):
    ctx, logs = fake_ctx(tmp_path)
    rows, env = prof.profile_artifacts(ctx, arts(tmp_path))
    assert [(r["artifact"], r["batch"]) for r in rows] == [("ONNX fp32", 1), ("ONNX fp32", 4),
                                                           ("ONNX int8 (onnxruntime Q/DQ)", 1),
                                                           ("ONNX int8 (onnxruntime Q/DQ)", 4)]
    for r in rows:
        assert r["backend"] == "onnxruntime-cpu" and r["iters"] == 6 and r["rounds"] == 2
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput_per_s"] == pytest.approx(r["batch"] * 1000 / r["p50_ms"])
        assert r["threads"] == 1 and r["macs"] == 160 and r["size_bytes"] > 0 and r["role"].startswith("onnx-")
        assert isinstance(r["rss_delta_mb"], float) and len(r["round_p50_ms"]) == 2
    assert env["threads"] == 1 and env["cpu"] and "onnxruntime" in env["libraries"]
    assert env["method"]["rounds"] == 2 and env["not_measured"] == [] and env["jetson"] is None
    assert any("p50" in line for line in logs)


def test_profile_sequential_mode_and_time_budget(tmp_path):
    ctx, _ = fake_ctx(tmp_path, rounds=1, iters=100000, time_budget_s=0.05, batches=(2,))
    rows, _ = prof.profile_artifacts(ctx, arts(tmp_path)[:1])
    (r,) = rows
    assert r["stopped_by"] == "time_budget" and 5 <= r["iters"] < 100000 and r["p50_spread_pct"] is None


def test_a_gpu_backend_that_cannot_open_is_recorded_not_fatal(tmp_path, monkeypatch):
    ctx, _ = fake_ctx(tmp_path, batches=(1,))
    monkeypatch.setattr(prof, "backends_for", lambda kind, torch_enabled=True: ["onnxruntime-cpu", "onnxruntime-cuda"])
    rows, env = prof.profile_artifacts(ctx, arts(tmp_path)[1:])
    assert {r["backend"] for r in rows} == {"onnxruntime-cpu"}
    (skip,) = env["not_measured"]
    assert skip["backend"] == "onnxruntime-cuda" and "could not open" in skip["reason"]
