"""edgerun.timing: the one timer on a fake clock, the interleaved protocol, the process repeat; edgerun.machine."""
import gc
import json

import numpy as np
import pytest

from edgerun import machine as mach
from edgerun import timing
from edgerun.errors import EdgeError
from edgerun.timing import (
    Comparison,
    Repeated,
    Spec,
    SpecItem,
    TimingError,
    calibrate,
    compare,
    measure,
    repeat_in_processes,
    summarize,
    time_calls,
)


class FakeClock:
    """A clock that only moves when a timed function runs: durations[i] seconds for call i."""

    def __init__(self, durations):
        self.t, self.durations, self.calls = 0.0, list(durations), 0

    def __call__(self):
        return self.t

    def fn(self):
        self.t += self.durations[self.calls % len(self.durations)]
        self.calls += 1


# ---------------------------------------------------------------- absolute latency

def test_measure_statistics_on_a_fake_clock():
    clock = FakeClock([i / 1000.0 for i in range(1, 101)])  # 1, 2, ..., 100 ms
    st = measure(clock.fn, warmup=0, iters=100, clock=clock)
    assert st.iters == 100 and st.stopped_by == "iters"
    assert st.p50_ms == pytest.approx(50.5) and st.min_ms == pytest.approx(1.0)
    assert st.p90_ms == pytest.approx(90.1) and st.p99_ms == pytest.approx(99.01)
    assert st.max_ms == pytest.approx(100.0) and st.mean_ms == pytest.approx(50.5)
    assert st.std_ms == pytest.approx(np.std(np.arange(1, 101)))
    assert st.total_s == pytest.approx(5.05) and st.to_json()["p50_ms"] == st.p50_ms


def test_warmup_calls_are_not_timed():
    clock = FakeClock([1.0, 1.0] + [0.002] * 50)  # two slow warm-up calls, then 2 ms calls
    st = measure(clock.fn, warmup=2, iters=10, clock=clock)
    assert clock.calls == 12 and st.iters == 10 and st.max_ms == pytest.approx(2.0)


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
    with pytest.raises(TimingError, match="iters > 0 or time_budget_s > 0"):
        time_calls(lambda: None, iters=0, time_budget_s=0.0)


def test_iterations_cap_wins_over_a_long_budget_and_sync_runs_each_call():
    clock, synced = FakeClock([0.001]), []
    st = measure(clock.fn, warmup=3, iters=7, time_budget_s=60.0, clock=clock, sync=lambda: synced.append(1))
    assert st.iters == 7 and st.stopped_by == "iters" and len(synced) == 10


def test_percentiles_are_ordered_and_gc_restored_on_real_timings():
    clock = FakeClock(np.random.default_rng(0).exponential(0.001, 500))
    st = measure(clock.fn, warmup=0, iters=500, clock=clock)
    assert st.min_ms <= st.p50_ms <= st.p90_ms <= st.p99_ms <= st.max_ms
    assert gc.isenabled()
    real = measure(lambda: sum(range(100)), warmup=2, iters=20)
    assert real.iters == 20 and 0 < real.p50_ms <= real.p99_ms
    with pytest.raises(TimingError, match="no samples") as e:
        summarize([])
    assert isinstance(e.value, EdgeError)


# ---------------------------------------------------------------- the protocol on fake clocks

class LoadedMachine:
    """One clock shared by every callable; a callable costs ``base`` seconds times the machine's
    current slowdown, which changes every ``period`` seconds (other processes coming and going)."""

    def __init__(self, slowdowns, period=0.05):
        self.t, self.slowdowns, self.period, self.log = 0.0, slowdowns, period, []

    def __call__(self):
        return self.t

    def callable(self, name, base):
        def fn():
            self.log.append(name)
            self.t += base * self.slowdowns[int(self.t / self.period) % len(self.slowdowns)]
        return fn


def test_a_candidate_twice_as_slow_gives_ratio_two_on_a_quiet_machine():
    m = LoadedMachine([1.0])
    c = compare({"ref": m.callable("ref", 0.001), "slow": m.callable("slow", 0.002)}, reference="ref",
                block_ms=30, rounds=25, warmup=0, clock=m, loadavg=lambda: (0.5, 0.5, 0.5))
    r = c.ratios["slow"]
    assert r.median == pytest.approx(2.0) and r.p10 == pytest.approx(2.0) and r.p90 == pytest.approx(2.0)
    assert r.p50_ms == pytest.approx(2.0) and r.to_p50_ms == pytest.approx(1.0) and r.rounds == 25
    assert c.ratios["ref"].median == pytest.approx(1.0)
    assert c.load_before == (0.5, 0.5, 0.5) and c.load_after == (0.5, 0.5, 0.5)


def test_interleaving_keeps_the_ratio_while_load_moves_the_absolute_times():
    # The machine slows down by up to 3x in bursts: absolute times scatter, the ratio must not.
    m = LoadedMachine([1.0, 1.0, 3.0, 1.5, 1.0, 2.5, 1.0], period=0.2)
    c = compare({"ref": m.callable("ref", 0.001), "slow": m.callable("slow", 0.002)}, reference="ref",
                block_ms=30, rounds=25, warmup=0, clock=m, loadavg=lambda: None)
    r = c.ratios["slow"]
    ref_ms = c.per_call_ms("ref")
    assert ref_ms.max() / ref_ms.min() >= 2.0          # the absolute figure moved by >= 2x ...
    assert r.median == pytest.approx(2.0, rel=0.05)    # ... the median ratio did not
    assert r.p10 <= r.median <= r.p90 and r.p10 > 1.3 and r.p90 < 3.0


def test_order_alternates_each_round_and_blocks_last_at_least_block_ms():
    m = LoadedMachine([1.0])
    c = compare({n: m.callable(n, 0.004) for n in "ABC"}, reference="A", block_ms=10, rounds=4, warmup=0,
                clock=m, loadavg=lambda: None)
    assert c.calls_per_block == (3, 3, 3)                # 3 x 4 ms >= 10 ms
    timed = m.log[-4 * 9:]                               # the rounds, after calibration
    blocks = [timed[i] for i in range(0, len(timed), 3)]
    assert blocks == list("ABC" "CBA" "ABC" "CBA")


def test_block_calibration_reaches_the_block_without_overshooting_much():
    fast = FakeClock([0.0001])  # 0.1 ms a call: 300 calls make 30 ms
    n = calibrate(fast.fn, 0.030, clock=fast)
    assert 300 <= n <= 400
    slow = FakeClock([0.050])   # one call is longer than a block
    assert calibrate(slow.fn, 0.030, clock=slow) == 1


def test_compare_refuses_an_unknown_reference_and_no_rounds():
    with pytest.raises(TimingError, match="reference 'x' is not one of the runs"):
        compare({"a": lambda: None}, reference="x")
    with pytest.raises(TimingError, match="rounds >= 1"):
        compare({"a": lambda: None}, reference="a", rounds=0)


def test_comparison_round_trips_through_json_and_pairs_any_two():
    m = LoadedMachine([1.0])
    c = compare({"a": m.callable("a", 0.001), "b": m.callable("b", 0.003), "c": m.callable("c", 0.0015)},
                reference="a", block_ms=5, rounds=5, warmup=0, clock=m, loadavg=lambda: (1.0, 1.0, 1.0))
    back = Comparison.from_json(json.loads(json.dumps(c.to_json())))
    assert back == c
    assert back.ratio("b", "c").median == pytest.approx(2.0) and back.ratio("c").median == pytest.approx(1.5)
    with pytest.raises(TimingError, match="no callable named 'z'"):
        c.ratio("z")


def fake_comparison(ratio: float, rounds: int = 5, jitter: float = 0.0) -> Comparison:
    ref = [1.0 + jitter * (i % 2) for i in range(rounds)]
    return Comparison("ref", ("ref", "cand"), (10, 5), (tuple(ref), tuple(ratio * v for v in ref)), 30.0)


def test_repeated_accepts_close_processes_and_rejects_spread_ones():
    rep = Repeated(1, (fake_comparison(2.0), fake_comparison(2.1), fake_comparison(2.2)))
    p = rep.pair("cand")
    assert p.median == pytest.approx(2.1) and p.processes == 3 and p.reproducible is True
    assert p.spread == pytest.approx(1.1) and p.p10 <= p.median <= p.p90
    assert rep.reproducible is True
    bad = Repeated(1, (fake_comparison(2.0), fake_comparison(2.6), fake_comparison(2.1)))
    assert bad.pair("cand").reproducible is False and bad.reproducible is False
    one = Repeated(1, (fake_comparison(2.0),))
    assert one.pair("cand").reproducible is None and one.reproducible is None  # one process: not checked


def test_repeat_measures_again_once_and_then_says_not_reproducible(monkeypatch):
    sets = iter([[{1: fake_comparison(2.0)}, {1: fake_comparison(3.0)}, {1: fake_comparison(2.0)}],   # spread 1.5
                 [{1: fake_comparison(2.0)}, {1: fake_comparison(2.05)}, {1: fake_comparison(2.1)}]])
    monkeypatch.setattr(timing, "_run_workers", lambda spec, n, timeout_s, python: next(sets))
    spec = Spec((SpecItem("ref", "r.onnx", "onnxruntime-cpu"), SpecItem("cand", "c.onnx", "onnxruntime-cpu")),
                "ref", (1,), (4,))
    (rep,) = repeat_in_processes(spec, 3)
    assert rep.remeasured and rep.reproducible is True and rep.pair("cand").median == pytest.approx(2.05)
    assert rep.first_spread == pytest.approx(1.5) and rep.to_json()["first_spread"] == pytest.approx(1.5)
    sets = iter([[{1: fake_comparison(2.0)}, {1: fake_comparison(3.0)}, {1: fake_comparison(2.0)}]] * 2)
    (rep,) = repeat_in_processes(spec, 3)
    assert rep.remeasured and rep.reproducible is False


# ---------------------------------------------------------------- real processes, real ONNX

def matmul_onnx(path, layers: int):
    """A chain of ``layers`` 64x64 MatMuls: cost grows with ``layers``."""
    import onnx
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "input"
    for i in range(layers):
        w = (rng.standard_normal((64, 64)) * 0.1).astype(np.float32)
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, (64, 64), w.ravel().tolist()))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["logits"]))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 64]) for n in ("input", "logits")]
    graph = helper.make_graph(nodes, "chain", io[:1], io[1:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return str(path)


def test_repeat_in_three_fresh_processes_on_real_onnx_files(tmp_path):
    light, heavy = matmul_onnx(tmp_path / "light.onnx", 1), matmul_onnx(tmp_path / "heavy.onnx", 12)
    spec = Spec((SpecItem("light", light, "onnxruntime-cpu"), SpecItem("heavy", heavy, "onnxruntime-cpu")),
                "light", (1, 16), (64,), threads=1, block_ms=5, rounds=7, warmup=2)
    reps = repeat_in_processes(spec, 3)
    assert [r.batch for r in reps] == [1, 16]
    for rep in reps:
        assert rep.processes == 3 and rep.reproducible in (True, False)
        p = rep.pair("heavy")
        assert p.median > 1.0 and p.p10 <= p.median <= p.p90 and len(p.process_medians) == 3
        assert p.p50_ms > p.to_p50_ms > 0
        for c in rep.comparisons:
            assert c.rounds == 7 and c.load_before is not None and all(n >= 1 for n in c.calls_per_block)


def test_a_worker_that_fails_is_one_line_naming_the_file(tmp_path):
    spec = Spec((SpecItem("gone", str(tmp_path / "gone.onnx"), "onnxruntime-cpu"),), "gone", (1,), (64,))
    with pytest.raises(TimingError, match=r"timing worker failed \(exit 1\): gone.onnx: no such file") as e:
        repeat_in_processes(spec, 1)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- edgerun.machine

def test_simd_block_from_cpu_flags():
    assert mach.simd_block(frozenset({"sse4_2", "avx2", "avx512f"})) == 16
    assert mach.simd_block(frozenset({"avx2", "fma"})) == 8
    assert mach.simd_block(frozenset({"neon", "asimd"})) == 4
    assert mach.simd_block(frozenset()) == 4
    assert mach.cpu_flags("processor : 0\nflags\t\t: fpu avx2 avx512f\n") == {"fpu", "avx2", "avx512f"}
    assert mach.cpu_flags("Features\t: fp asimd\n") == {"fp", "asimd"}
    here = mach.machine()
    assert here.simd_block == mach.simd_block() and here.usable_cores >= 1 and here.cpu


def test_oversubscription_rules():
    assert mach.oversubscribed(1, processes=1, cores=2) is None
    assert "3 threads x 1 process(es) > 2 cores" in mach.oversubscribed(3, cores=2)
    assert "x 3 process(es)" in mach.oversubscribed(1, processes=3, cores=2)
    assert "busy machine" in mach.oversubscribed(2, cores=2, load=(2.5, 1.0, 1.0))
    assert mach.oversubscribed(1, cores=2, load=(9.0, 9.0, 9.0)) is None   # one thread never waits for another


def test_run_command_never_raises():
    assert mach.run_command(["no-such-program-xyz"]) is None
    assert "failed" in mach.run_command(["sleep", "5"], timeout=0.1)
    assert mach.run_command(["sh", "-c", "echo hi; exit 3"]).startswith("(exit 3)")
