"""The project's one timer, and a measurement protocol that holds on a shared machine.

Absolute latency (``measure``): warm-up calls, then timed calls of one batch each
(``time.perf_counter``, the garbage collector off while timing); p50/p90/p99 use numpy's linear
interpolation, so p50 <= p90 <= p99.

Ratios (``compare``), used by the profile stage, the benchmark verb and the pruning search:

* every callable is built once (sessions open) before timing starts;
* each round times one *block* of calls of every callable in turn; a block's call count is
  calibrated so that it lasts at least ``block_ms`` (default 30 ms), and the order alternates each
  round (A B C, C B A, ...), so that load from other processes hits every callable alike;
* per round, the ratio candidate time / reference time; over >= 25 rounds the median ratio and its
  p10-p90. Both absolute per-call figures (median over rounds) and the load average before and
  after are recorded with it;
* ``repeat_in_processes`` runs the same comparison in >= 3 fresh processes
  (``python -m edgerun.timing SPEC.json``) and accepts it when max/min of the per-process median
  ratios is <= 1.2; otherwise it measures once more and, if that fails too, says
  ``reproducible=False``. Torch models cannot be handed to a worker by path: callers compare them
  in-process (one process, ``reproducible=None``).

Ratios, not absolute times, are what a report compares: on a loaded machine absolute times move by
2x while interleaved ratios at batch 1 held within +-4 % (api-facts.md).
"""
from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgerun.errors import EdgeError
from edgerun.machine import load_average

MAX_SPREAD = 1.2   # accept a ratio when max/min over processes is at most this


class TimingError(EdgeError):
    """A bad timing request (no calls, unknown reference) or a worker process that failed."""


# ---------------------------------------------------------------- absolute latency

@dataclass(frozen=True)
class Stats:
    """Statistics of per-call times, in milliseconds."""
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    iters: int
    stopped_by: str = "iters"   # iters | time_budget
    total_s: float = 0.0        # time spent in the timed calls

    def to_json(self) -> dict:
        return asdict(self)


def summarize(times_ms, *, stopped_by: str = "iters") -> Stats:
    a = np.asarray(times_ms, dtype=np.float64)
    if a.size == 0:
        raise TimingError("summarize: no samples (expected at least one timed call)")
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return Stats(p50, p90, p99, float(a.mean()), float(a.std()), float(a.min()), float(a.max()), int(a.size),
                 stopped_by, float(a.sum() / 1000.0))


def time_calls(fn: Callable[[], object], *, iters: int, time_budget_s: float = 0.0, min_iters: int = 5,
               clock: Callable[[], float] = time.perf_counter, sync: Callable[[], object] | None = None,
               ) -> tuple[list[float], str]:
    """Times calls of ``fn``; returns (milliseconds per call, what stopped it: "iters" | "time_budget").

    ``iters`` > 0 caps the calls; ``time_budget_s`` > 0 stops once that much time has passed and at
    least ``min_iters`` calls were made (with ``iters`` = 0 the budget alone decides). ``sync`` runs
    inside the timed region after each call (``torch.cuda.synchronize`` for asynchronous GPU work).
    """
    if iters <= 0 and time_budget_s <= 0:
        raise TimingError(f"time_calls: expected iters > 0 or time_budget_s > 0, got {iters} and {time_budget_s}")
    times: list[float] = []
    gc_was_on = gc.isenabled()
    gc.disable()   # a collection inside one call would land on whichever artifact is timed then
    try:
        start = clock()
        while True:
            t = clock()
            fn()
            if sync is not None:
                sync()
            end = clock()
            times.append((end - t) * 1000.0)
            if iters > 0 and len(times) >= iters:
                return times, "iters"
            if time_budget_s > 0 and end - start >= time_budget_s and len(times) >= min_iters:
                return times, "time_budget"
    finally:
        if gc_was_on:
            gc.enable()


def measure(fn: Callable[[], object], *, warmup: int, iters: int, time_budget_s: float = 0.0, min_iters: int = 5,
            clock: Callable[[], float] = time.perf_counter, sync: Callable[[], object] | None = None) -> Stats:
    """``warmup`` untimed calls, then timed calls of ``fn()`` (see time_calls)."""
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    times, stopped = time_calls(fn, iters=iters, time_budget_s=time_budget_s, min_iters=min_iters,
                                clock=clock, sync=sync)
    return summarize(times, stopped_by=stopped)


# ---------------------------------------------------------------- interleaved comparison

@dataclass(frozen=True)
class Ratio:
    """Time of ``name`` / time of ``to``, over rounds (> 1: ``name`` is slower)."""
    name: str
    to: str
    median: float
    p10: float
    p90: float
    rounds: int
    p50_ms: float         # ``name``'s per-call time, median over rounds
    to_p50_ms: float      # ``to``'s

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """One interleaved comparison: per-call times of every callable in every round."""
    reference: str
    names: tuple[str, ...]
    calls_per_block: tuple[int, ...]
    round_ms: tuple[tuple[float, ...], ...]      # [name][round]: milliseconds per call in that round's block
    block_ms: float
    load_before: tuple[float, ...] | None = None
    load_after: tuple[float, ...] | None = None

    @property
    def rounds(self) -> int:
        return len(self.round_ms[0])

    def per_call_ms(self, name: str) -> np.ndarray:
        return np.asarray(self.round_ms[self._index(name)])

    def round_ratios(self, name: str, to: str | None = None) -> np.ndarray:
        return self.per_call_ms(name) / self.per_call_ms(to or self.reference)

    def ratio(self, name: str, to: str | None = None) -> Ratio:
        to = to or self.reference
        r = self.round_ratios(name, to)
        p10, p50, p90 = (float(v) for v in np.percentile(r, [10, 50, 90]))
        return Ratio(name, to, p50, p10, p90, r.size, float(np.median(self.per_call_ms(name))),
                     float(np.median(self.per_call_ms(to))))

    @property
    def ratios(self) -> dict[str, Ratio]:
        """Every callable against the reference."""
        return {n: self.ratio(n) for n in self.names}

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise TimingError(f"comparison: no callable named {name!r} (have {', '.join(self.names)})") from None

    def to_json(self) -> dict:
        return {"reference": self.reference, "names": list(self.names), "calls_per_block": list(self.calls_per_block),
                "round_ms": [list(r) for r in self.round_ms], "block_ms": self.block_ms,
                "load_before": self.load_before, "load_after": self.load_after,
                "ratios": {n: r.to_json() for n, r in self.ratios.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Comparison":
        def opt(v):
            return tuple(v) if v is not None else None
        return cls(d["reference"], tuple(d["names"]), tuple(d["calls_per_block"]),
                   tuple(tuple(float(x) for x in r) for r in d["round_ms"]), float(d["block_ms"]),
                   opt(d.get("load_before")), opt(d.get("load_after")))


def _time_block(fn: Callable[[], object], calls: int, clock: Callable[[], float]) -> float:
    t = clock()
    for _ in range(calls):
        fn()
    return clock() - t


def calibrate(fn: Callable[[], object], block_s: float, *, clock: Callable[[], float] = time.perf_counter,
              max_calls: int = 1 << 20) -> int:
    """The smallest tried call count whose block took at least ``block_s`` seconds."""
    calls = 1
    while True:
        took = _time_block(fn, calls, clock)
        if took >= block_s or calls >= max_calls:
            return calls
        # Aim 20 % past the target, but grow at most 10x a step so that one slow call cannot overshoot.
        want = math.ceil(calls * 1.2 * block_s / took) if took > 0 else calls * 10
        calls = min(max_calls, max(calls + 1, min(want, calls * 10)))


def compare(runs: dict[str, Callable[[], object]], *, reference: str, block_ms: float = 30.0, rounds: int = 25,
            warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
            loadavg: Callable[[], tuple | None] = load_average) -> Comparison:
    """Interleaved blocks of calls of every callable in ``runs``; see the module docstring."""
    names = tuple(runs)
    if reference not in runs:
        raise TimingError(f"compare: reference {reference!r} is not one of the runs ({', '.join(names) or 'none'})")
    if rounds < 1 or block_ms <= 0:
        raise TimingError(f"compare: expected rounds >= 1 and block_ms > 0, got {rounds} and {block_ms}")
    load_before = loadavg()
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        calls = tuple(calibrate(runs[n], block_ms / 1000.0, clock=clock) for n in names)
        per_round: list[list[float]] = [[] for _ in names]
        for r in range(rounds):
            order = range(len(names)) if r % 2 == 0 else reversed(range(len(names)))
            for i in order:
                per_round[i].append(_time_block(runs[names[i]], calls[i], clock) * 1000.0 / calls[i])
    finally:
        if gc_was_on:
            gc.enable()
    return Comparison(reference, names, calls, tuple(tuple(r) for r in per_round), float(block_ms),
                      load_before, loadavg())


# ---------------------------------------------------------------- the same, in fresh processes

@dataclass(frozen=True)
class SpecItem:
    name: str
    path: str
    backend: str   # onnxruntime-cpu | onnxruntime-cuda | onnxruntime-tensorrt | tensorrt


@dataclass(frozen=True)
class Spec:
    """What a worker process opens and compares: files on backends, at each batch."""
    items: tuple[SpecItem, ...]
    reference: str
    batches: tuple[int, ...]
    input_shape: tuple[int, ...]     # one sample, without the batch dimension
    threads: int = 0
    block_ms: float = 30.0
    rounds: int = 25
    warmup: int = 3
    seed: int = 0
    dtype: str = "float32"           # the model input's element type
    workload: str = "batch"          # batch: run(batch of inputs); prefill | decode: a decoder (edgerun.decode_timing)
    tokens: int = 0                  # prefill: prompt tokens; decode: tokens already cached

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Spec":
        return cls(**{**d, "items": tuple(SpecItem(**i) for i in d["items"]), "batches": tuple(d["batches"]),
                      "input_shape": tuple(d["input_shape"])})


@dataclass(frozen=True)
class PairRatio:
    """A ratio (time of ``name`` / time of ``to``) over one or more processes."""
    name: str
    to: str
    median: float                        # median of the per-process medians
    p10: float                           # of the per-round ratios of all processes together
    p90: float
    processes: int
    process_medians: tuple[float, ...]
    spread: float                        # max / min of the process medians (1.0 with one process)
    reproducible: bool | None            # spread <= max_spread; None: one process, not checked
    p50_ms: float                        # absolute per-call figures: median over processes
    to_p50_ms: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Repeated:
    """The comparisons of one batch, one per process."""
    batch: int
    comparisons: tuple[Comparison, ...]
    max_spread: float = MAX_SPREAD
    remeasured: bool = False
    first_spread: float | None = None    # when remeasured: the worst spread of the first attempt

    @property
    def processes(self) -> int:
        return len(self.comparisons)

    @property
    def reference(self) -> str:
        return self.comparisons[0].reference

    def pair(self, name: str, to: str | None = None) -> PairRatio:
        to = to or self.reference
        per = [c.ratio(name, to) for c in self.comparisons]
        medians = tuple(r.median for r in per)
        pooled = np.concatenate([c.round_ratios(name, to) for c in self.comparisons])
        p10, p90 = (float(v) for v in np.percentile(pooled, [10, 90]))
        spread = max(medians) / min(medians)
        return PairRatio(name, to, float(np.median(medians)), p10, p90, len(per), medians, spread,
                         None if len(per) == 1 else spread <= self.max_spread,
                         float(np.median([r.p50_ms for r in per])), float(np.median([r.to_p50_ms for r in per])))

    def worst_spread(self) -> float:
        return max(self.pair(n).spread for n in self.comparisons[0].names)

    @property
    def reproducible(self) -> bool | None:
        """Every callable against the reference within max_spread (None: one process)."""
        if self.processes == 1:
            return None
        return all(self.pair(n).reproducible for n in self.comparisons[0].names)

    def to_json(self) -> dict:
        return {"batch": self.batch, "processes": self.processes, "reproducible": self.reproducible,
                "remeasured": self.remeasured, "first_spread": self.first_spread, "max_spread": self.max_spread,
                "comparisons": [c.to_json() for c in self.comparisons]}


def repeat_in_processes(spec: Spec, n: int = 3, *, max_spread: float = MAX_SPREAD, timeout_s: float = 600.0,
                        python: str = sys.executable,
                        log: Callable[[str], object] | None = None) -> tuple[Repeated, ...]:
    """``compare`` in ``n`` fresh processes, one after another (concurrent ones would load each other).

    A batch whose ratios spread more than ``max_spread`` across processes is measured once more in
    ``n`` new processes; the second set is kept, and ``reproducible`` says whether it held.
    """
    if n < 1:
        raise TimingError(f"repeat_in_processes: expected n >= 1 processes, got {n}")
    first = _run_workers(spec, n, timeout_s, python)
    out = []
    for b in spec.batches:
        rep = Repeated(b, tuple(c[b] for c in first), max_spread)
        if rep.reproducible is False:
            if log:
                log(f"  batch {b}: ratios differ across processes by more than {max_spread}x: measuring again")
            again = _run_workers(replace(spec, batches=(b,)), n, timeout_s, python)
            rep = Repeated(b, tuple(c[b] for c in again), max_spread, remeasured=True, first_spread=rep.worst_spread())
        out.append(rep)
    return tuple(out)


def _run_workers(spec: Spec, n: int, timeout_s: float, python: str) -> list[dict[int, Comparison]]:
    import tempfile
    # The worker imports this very package, wherever it lies (a repository, a deploy bundle): `-m` run
    # from the folder holding it finds it first. Not PYTHONPATH: a folder on it is searched from the
    # interpreter's start, before edgerun can leave a bundle folder off the path (edgerun/__init__.py).
    root = Path(__file__).resolve().parents[1]
    items = tuple(replace(i, path=str(Path(i.path).resolve())) for i in spec.items)   # the cwd changes
    with tempfile.TemporaryDirectory(prefix="edgerun_timing_") as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(replace(spec, items=items).to_json()))
        results = []
        for _ in range(n):
            try:
                p = subprocess.run([python, "-m", "edgerun.timing", str(path)], capture_output=True, text=True,
                                   timeout=timeout_s, cwd=root)
            except subprocess.TimeoutExpired:
                raise TimingError(f"timing worker: no result within {timeout_s:.0f} s") from None
            if p.returncode != 0:
                lines = [ln for ln in p.stderr.splitlines() if ln.strip()] or ["(no message)"]
                raise TimingError(f"timing worker failed (exit {p.returncode}): {lines[-1]}")
            data = json.loads(p.stdout.strip().splitlines()[-1])
            results.append({int(b): Comparison.from_json(c) for b, c in data.items()})
        return results


def worker(spec: Spec) -> dict[int, Comparison]:
    """Opens every item once, then compares them at each batch (what ``python -m edgerun.timing`` runs)."""
    if spec.workload != "batch":
        return {1: _decoder_worker(spec)}
    from edgerun.sessions import open_session
    rng = np.random.default_rng(spec.seed)
    sessions = {i.name: open_session(i.path, i.backend, threads=spec.threads, batches=spec.batches,
                                     input_shape=spec.input_shape) for i in spec.items}
    try:
        out = {}
        for b in spec.batches:
            x = rng.standard_normal((b, *spec.input_shape), dtype=np.float32).astype(spec.dtype)
            runs = {name: (lambda s=s, x=x: s.run(x)) for name, s in sessions.items()}
            out[b] = compare(runs, reference=spec.reference, block_ms=spec.block_ms, rounds=spec.rounds,
                             warmup=spec.warmup)
        return out
    finally:
        for s in sessions.values():
            s.close()


def _decoder_worker(spec: Spec) -> Comparison:
    """A decoder's prefill or decode step, every item on onnxruntime's CPU (batch 1)."""
    from edgerun.decode_timing import open_decoder_runs
    if spec.batches != (1,) or any(i.backend != "onnxruntime-cpu" for i in spec.items):
        raise TimingError("decoder timing runs at batch 1 on onnxruntime-cpu only")
    runs, close = open_decoder_runs({i.name: i.path for i in spec.items}, spec.workload, spec.tokens, spec.threads)
    try:
        return compare(runs, reference=spec.reference, block_ms=spec.block_ms, rounds=spec.rounds,
                       warmup=spec.warmup)
    finally:
        close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m edgerun.timing SPEC.json", file=sys.stderr)
        return 2
    try:
        spec = Spec.from_json(json.loads(Path(args[0]).read_text()))
        result = worker(spec)
    except EdgeError as e:
        print(f"{e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"{args[0]}: not a timing spec ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    print(json.dumps({str(b): c.to_json() for b, c in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
