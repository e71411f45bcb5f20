"""pipeline.profile: the speedup table from protocol ratios, and a real profile of tiny ONNX + torch models."""
import dataclasses
import json
from pathlib import Path

import pytest
from conftest import conv_onnx

from edgerun import machine as mach
from edgerun.errors import EdgeError
from edgerun.timing import Comparison, Repeated
from pipeline import profile as prof
from pipeline.profile import Profile, ProfileError, ProfileOptions, profile_artifacts, role, speedup_table
from pipeline.profile_speedup import run_name
from pipeline.records import Artifact, Located, Score

# ---------------------------------------------------------------- the speedup table on synthetic ratios

def row(artifact, r, backend, batch, p50, macs, **extra):
    return {"artifact": artifact, "role": r, "backend": backend, "batch": batch, "p50_ms": p50,
            "p99_ms": p50 * 1.5, "macs": macs, **extra}


def comparison(times: dict[str, float], backend: str, rounds: int = 9, jitter: float = 0.02) -> Comparison:
    """Per-call times per round: each artifact's time x the same per-round load factor, plus jitter."""
    load = [1.0 + 0.5 * (i % 3) for i in range(rounds)]      # the machine's load moves every round ...
    wobble = [1.0 + jitter * ((i * 7) % 5 - 2) / 2 for i in range(rounds)]
    names = tuple(run_name(a, backend) for a in times)
    round_ms = tuple(tuple(t * load[i] * (wobble[i] if k else 1.0) for i in range(rounds))  # ... alike for all
                     for k, t in enumerate(times.values()))
    return Comparison(names[0], names, (10,) * len(names), round_ms, 30.0)


ROWS = [
    row("baseline (torch)", "baseline-torch", "torch-cpu", 1, 2.0, 4000),
    row("pruned (torch)", "pruned-torch", "torch-cpu", 1, 1.0, 1000),
    row("baseline ONNX fp32 (unpruned)", "baseline-onnx", "onnxruntime-cpu", 1, 1.0, 4000),
    row("ONNX fp32", "onnx-fp32", "onnxruntime-cpu", 1, 0.4, 1000),
    row("ONNX fp16", "onnx-fp16", "onnxruntime-cpu", 1, 0.41, 1000),
    row("ONNX int8", "onnx-int8", "onnxruntime-cpu", 1, 0.6, 1000),
]
TORCH = Repeated(1, (comparison({"baseline (torch)": 2.0, "pruned (torch)": 1.0}, "torch-cpu"),))
ORT_TIMES = {"baseline ONNX fp32 (unpruned)": 1.0, "ONNX fp32": 0.4, "ONNX fp16": 0.41, "ONNX int8": 0.6}
ORT = Repeated(1, tuple(comparison(ORT_TIMES, "onnxruntime-cpu", jitter=j) for j in (0.0, 0.02, 0.04)))


def test_speedups_come_from_the_ratios_with_their_spread():
    table = {s["artifact"]: s for s in speedup_table(ROWS, [TORCH, ORT])}
    pruned = table["pruned (torch)"]
    assert pruned["reference"] == "baseline (torch)" and pruned["speedup"] == pytest.approx(2.0, rel=0.03)
    assert pruned["speedup_p10"] <= pruned["speedup"] <= pruned["speedup_p90"]
    assert pruned["processes"] == 1 and pruned["reproducible"] is None   # torch: one process, not checked
    assert pruned["mac_ratio"] == pytest.approx(4.0) and pruned["efficiency"] == pytest.approx(0.5, rel=0.03)
    assert pruned["ratio_p50_ms"] < pruned["reference_p50_ms"]            # both absolute figures kept
    fp32 = table["ONNX fp32"]
    assert fp32["reference"] == "baseline ONNX fp32 (unpruned)" and fp32["speedup"] == pytest.approx(2.5, rel=0.03)
    assert fp32["parent"] == "baseline ONNX fp32 (unpruned)" and fp32["vs_parent"] == fp32["speedup"]
    assert fp32["processes"] == 3 and fp32["reproducible"] is True and fp32["flag"] is None
    assert table["baseline (torch)"]["speedup"] == 1.0 and table["baseline (torch)"]["parent"] is None


def test_int8_slower_than_fp32_is_flagged_and_noise_is_not():
    table = {s["artifact"]: s for s in speedup_table(ROWS, [TORCH, ORT], tolerance=0.05)}
    int8 = table["ONNX int8"]
    assert int8["slower_than_parent"] is True and int8["parent"] == "ONNX fp32"
    assert int8["vs_parent"] == pytest.approx(0.4 / 0.6, rel=0.03)
    assert "slower than its parent ONNX fp32 on onnxruntime-cpu at batch 1: 1.5" in int8["flag"]
    assert "p10-p90" in int8["flag"] and "3 process(es)" in int8["flag"]
    assert table["ONNX fp16"]["slower_than_parent"] is False           # 2.5 % slower: within tolerance
    assert table["baseline (torch)"]["slower_than_parent"] is None     # no parent
    strict = {s["artifact"]: s for s in speedup_table(ROWS, [TORCH, ORT], tolerance=0.0)}
    assert strict["ONNX fp16"]["slower_than_parent"] is True


def test_artifacts_never_compared_together_get_no_speedup_rather_than_a_p50_quotient():
    ort_alone = Repeated(1, (comparison({"ONNX fp32": 0.4}, "onnxruntime-cpu"),))
    other = Repeated(1, (comparison({"baseline ONNX fp32 (unpruned)": 1.0}, "onnxruntime-cpu"),))
    table = {s["artifact"]: s for s in speedup_table(ROWS[2:4], [ort_alone, other])}
    assert table["ONNX fp32"]["speedup"] is None and table["ONNX fp32"]["vs_parent"] is None
    assert table["ONNX fp32"]["reference"] == "baseline ONNX fp32 (unpruned)"   # known, but not compared


def test_ratios_that_do_not_hold_across_processes_are_flagged():
    spread = Repeated(1, tuple(comparison({"baseline ONNX fp32 (unpruned)": 1.0, "ONNX fp32": t}, "onnxruntime-cpu")
                               for t in (0.4, 0.6, 0.4)))
    (entry,) = [s for s in speedup_table(ROWS[2:4], [spread]) if s["artifact"] == "ONNX fp32"]
    assert entry["reproducible"] is False and "not reproducible across 3 processes" in entry["flag"]


def test_oversubscribed_rows_are_never_presented_as_speedups():
    rows = [dict(r, oversubscribed="2 threads on a busy machine (load 7.0 >= 2 cores)") if r["role"] == "pruned-torch"
            else r for r in ROWS[:2]]
    table = {s["artifact"]: s for s in speedup_table(rows, [TORCH])}
    pruned = table["pruned (torch)"]
    assert pruned["speedup"] is None and pruned["vs_parent"] is None and pruned["slower_than_parent"] is None
    assert pruned["oversubscribed"] and "oversubscribed (2 threads on a busy machine" in pruned["flag"]
    assert table["baseline (torch)"]["speedup"] == 1.0


def test_engines_compare_with_the_baseline_onnx_on_tensorrt_and_their_fp32_engine():
    rows = [row("baseline ONNX fp32 (unpruned)", "baseline-onnx", "onnxruntime-tensorrt", 8, 1.0, 4000),
            row("engine fp32", "engine-fp32", "tensorrt", 8, 0.5, 1000),
            row("engine int8", "engine-int8", "tensorrt", 8, 0.25, 1000)]
    rep = Repeated(8, (Comparison(run_name(rows[0]["artifact"], "onnxruntime-tensorrt"),
                                  tuple(run_name(r["artifact"], r["backend"]) for r in rows), (1, 1, 1),
                                  ((1.0,) * 5, (0.5,) * 5, (0.25,) * 5), 30.0),))
    table = {s["artifact"]: s for s in speedup_table(rows, [rep])}
    assert table["engine fp32"]["speedup"] == pytest.approx(2.0)
    assert table["engine int8"]["speedup"] == pytest.approx(4.0)
    assert table["engine int8"]["vs_parent"] == pytest.approx(2.0)


def test_roles_of_older_rows():
    assert role({"kind": "torch", "stage": "baseline"}) == "baseline-torch"
    assert role({"kind": "torch", "stage": "finetune"}) == "pruned-torch"
    assert role({"kind": "onnx", "stage": "profile", "precision": "fp32"}) == "baseline-onnx"
    assert role({"kind": "onnx", "stage": "quantize", "precision": "int8"}) == "onnx-int8"
    assert role({"backend": "tensorrt", "file": "m.engine", "precision": "fp16"}) == "engine-fp16"
    assert role({"role": "onnx-int8-trt"}) == "onnx-int8-trt"


# ---------------------------------------------------------------- a real profile

def torch_model(channels: int):
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, channels, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 10))


def located(tmp: Path, role_, kind, file, label, macs, stage, precision="fp32", channels=8, top1=98.0):
    path = tmp / file
    if kind == "onnx":
        conv_onnx(path, channels)
    else:
        path.write_bytes(b"x" * 100)   # stands for the checkpoint; the loader builds the model
    return Located(Artifact(role_, kind, file, precision, label, stage), path, Score("top1", top1), macs)


def items(tmp: Path, torch_too=True):
    out = [located(tmp, "onnx-fp32", "onnx", "model.onnx", "ONNX fp32", 1000, "export_onnx", channels=8),
           located(tmp, "baseline-onnx", "onnx", "baseline.onnx", "baseline ONNX fp32 (unpruned)", 4000,
                   "export_onnx", channels=64, top1=98.5)]
    if torch_too:
        out += [located(tmp, "pruned-torch", "torch", "pruned.pt", "pruned (torch)", 1000, "finetune"),
                located(tmp, "baseline-torch", "torch", "baseline.pt", "baseline (torch)", 4000, "baseline", top1=98.5)]
    return out


MODELS = {"baseline-torch": 64, "pruned-torch": 8}
FAST = ProfileOptions(batches=(1, 4), warmup=1, iters=6, threads=1, rounds=5, block_ms=2.0, processes=1)


def loader(loc: Located):
    return torch_model(MODELS[loc.artifact.role])


def test_profile_times_every_artifact_backend_and_batch(tmp_path):
    logs = []
    p = profile_artifacts(items(tmp_path), input_shape=(1, 8, 8), options=FAST, load_torch=loader, log=logs.append)
    assert isinstance(p, Profile)
    assert [(r["artifact"], r["backend"], r["batch"]) for r in p.rows] == [
        ("baseline (torch)", "torch-cpu", 1), ("baseline (torch)", "torch-cpu", 4),
        ("pruned (torch)", "torch-cpu", 1), ("pruned (torch)", "torch-cpu", 4),
        ("baseline ONNX fp32 (unpruned)", "onnxruntime-cpu", 1),
        ("baseline ONNX fp32 (unpruned)", "onnxruntime-cpu", 4),
        ("ONNX fp32", "onnxruntime-cpu", 1), ("ONNX fp32", "onnxruntime-cpu", 4)]
    for r in p.rows:
        for key in ("artifact", "backend", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "mean_ms",
                    "std_ms", "file", "precision", "top1", "size_bytes"):
            assert key in r
        assert r["iters"] == 6 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["threads"] == 1
        assert r["throughput_per_s"] == pytest.approx(r["batch"] * 1000 / r["p50_ms"])
        assert r["size_bytes"] > 0 and r["macs"] in (1000, 4000) and r["oversubscribed"] is None
    # one comparison per backend and batch; torch in this process
    assert sorted((c.batch, c.processes) for c in p.comparisons) == [(1, 1), (1, 1), (4, 1), (4, 1)]
    table = {(s["artifact"], s["batch"]): s for s in p.speedups}
    for b in (1, 4):
        for name in ("pruned (torch)", "ONNX fp32"):
            s = table[(name, b)]
            assert s["speedup"] > 0 and s["speedup_p10"] <= s["speedup"] <= s["speedup_p90"] and s["processes"] == 1
            assert s["mac_ratio"] == pytest.approx(4.0)
    assert p.environment["method"]["ratios"]["rounds"] == 5 and p.environment["load_avg_start"] is not None
    assert p.environment["simd_block"] == mach.simd_block() and p.skipped == ()
    json.dumps(p.to_json())   # the stage record is JSON
    assert any("p50" in line for line in logs) and any("ratios on torch-cpu" in line for line in logs)


def test_onnx_ratios_in_three_fresh_processes(tmp_path):
    opts = dataclasses.replace(FAST, batches=(64,), processes=3)
    p = profile_artifacts(items(tmp_path, torch_too=False), input_shape=(1, 8, 8), options=opts, log=lambda m: None)
    (rep,) = p.comparisons
    assert rep.processes == 3 and rep.reproducible in (True, False)
    fp32 = next(s for s in p.speedups if s["artifact"] == "ONNX fp32")
    assert fp32["processes"] == 3 and fp32["reproducible"] in (True, False)
    # 8 output channels against 64 at batch 64 (about 2x apart here): the smaller conv must not come out slower
    assert fp32["speedup"] > 1.0


def test_torch_without_a_loader_or_switched_off_is_said_not_silent(tmp_path):
    p = profile_artifacts(items(tmp_path), input_shape=(1, 8, 8), options=dataclasses.replace(FAST, batches=(1,)),
                          log=lambda m: None)
    assert {s.reason for s in p.skipped} == {"no torch loader given"} and len(p.skipped) == 2
    assert {r["backend"] for r in p.rows} == {"onnxruntime-cpu"}
    off = profile_artifacts(items(tmp_path), input_shape=(1, 8, 8), load_torch=loader, log=lambda m: None,
                            options=dataclasses.replace(FAST, batches=(1,), torch=False))
    assert {s.reason for s in off.skipped} == {"profile.torch is false"}


def test_a_gpu_backend_that_cannot_open_is_recorded_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setattr(prof, "backends_for",
                        lambda kind, torch_enabled=True: ["onnxruntime-cpu", "onnxruntime-cuda"])
    p = profile_artifacts(items(tmp_path, torch_too=False)[:1], input_shape=(1, 8, 8),
                          options=dataclasses.replace(FAST, batches=(1,)), log=lambda m: None)
    assert {r["backend"] for r in p.rows} == {"onnxruntime-cpu"}
    (skip,) = p.skipped
    assert skip.backend == "onnxruntime-cuda" and "could not open" in skip.reason
    assert p.environment["not_measured"] == [skip.to_json()]


def test_threads_on_a_busy_machine_are_flagged_oversubscribed(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(mach, "load_average", lambda: (64.0, 64.0, 64.0))
    opts = dataclasses.replace(FAST, batches=(1,), threads=2)
    torch.set_num_threads(1)
    p = profile_artifacts(items(tmp_path)[2:], input_shape=(1, 8, 8), options=opts, load_torch=loader,
                          log=lambda m: None)
    assert torch.get_num_threads() == 1   # process-wide: the profile puts it back
    assert {r["threads"] for r in p.rows} == {2}
    assert all("busy machine" in r["oversubscribed"] for r in p.rows)
    pruned = next(s for s in p.speedups if s["artifact"] == "pruned (torch)")
    assert pruned["speedup"] is None and "not presented as a speedup" in pruned["flag"]


@pytest.mark.parametrize("change, message", [
    ({"batches": ()}, r"profile batches \(\): expected positive integers"),
    ({"batches": (1, 0)}, "expected positive integers"),
    ({"iters": 0}, "expected iters > 0 or time_budget_s > 0"),
    ({"rounds": 0}, "expected rounds >= 1"),
    ({"processes": 0}, "processes >= 1"),
])
def test_bad_options_are_one_line_errors(tmp_path, change, message):
    with pytest.raises(ProfileError, match=message) as e:
        profile_artifacts([], input_shape=(1, 8, 8), options=dataclasses.replace(FAST, **change))
    assert isinstance(e.value, EdgeError) and "\n" not in str(e.value)
    with pytest.raises(ProfileError, match="input_shape"):
        profile_artifacts([], input_shape=(), options=FAST)
    twice = items(tmp_path, torch_too=False)
    twice[1] = dataclasses.replace(twice[1], artifact=dataclasses.replace(twice[1].artifact, label="ONNX fp32"))
    with pytest.raises(ProfileError, match="label 'ONNX fp32' appears twice on onnxruntime-cpu"):
        profile_artifacts(twice, input_shape=(1, 8, 8), options=FAST)


def test_options_are_frozen_with_defaults_and_tuples():
    o = ProfileOptions()
    assert o.rounds >= 25 and o.block_ms >= 30 and o.processes >= 3 and isinstance(o.batches, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.iters = 1
