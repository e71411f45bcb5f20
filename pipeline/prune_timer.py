"""What the latency search measures with: runtimes (openers), the variant timer, the fresh-process
verification, the time budget with its progress lines, and the load seen while measuring.

Measurement on a shared machine is noisy (a table built under load mispredicted a pick by 1.8x), so
the timer re-times a table entry that disagrees with both of its neighbours (a spike or a dip no
latency step explains) and keeps the median of three timings; the fresh-process verification
(``verify``) stays the judge of what ships.

TensorRT (``tensorrt_opener``: FP16-typed ONNX built by Polygraphy into an engine per variant) is
written against the documented API, its plumbing tested with fakes, and NOT executed in this
workplace (no GPU, no TensorRT).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgerun.machine import load_average
from edgerun.timing import compare

TABLE_BLOCK_MS, TABLE_ROUNDS = 15.0, 11    # interleaved blocks for the tables (a quick screen)
CHECK_BLOCK_MS, CHECK_ROUNDS = 30.0, 25    # the protocol's blocks for pick vs unpruned
# A table entry off both of its neighbours by more than this (same direction) is timed twice more.
NEIGHBOUR_TOL = 0.15
PROGRESS_EVERY_S = 10.0                    # at most one progress line per this many seconds

Opener = Callable[[Path], object]   # an ONNX path -> a session with .run(x) and .close()


def cpu_opener(threads: int) -> Opener:
    from edgerun.sessions import open_session
    return lambda path: open_session(path, "onnxruntime-cpu", threads=threads)


def tensorrt_opener(batch: int, input_shape: tuple[int, ...]) -> Opener:
    """An engine per variant, built from its FP16-typed ONNX (what a GPU target deploys; TensorRT 10
    and 11 both honour strong typing, api-facts.md). NOT executed here: no GPU, no TensorRT."""
    def open_(path: Path):
        from export.fp16 import to_fp16
        fp16 = path.with_name(path.stem + "_fp16.onnx")
        to_fp16(path, fp16)
        return _trt_session(build_trt_engine(fp16, (batch, *input_shape)))
    return open_


def build_trt_engine(onnx_path: Path, shape: tuple[int, ...]) -> bytes:
    """Serialized engine for one static input shape (Polygraphy's loaders). NOT executed here."""
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, Profile, engine_bytes_from_network
    profile = Profile().add("input", min=shape, opt=shape, max=shape)
    return engine_bytes_from_network(NetworkFromOnnxPath(str(onnx_path), strongly_typed=True),
                                     config=CreateConfig(profiles=[profile]))


def _trt_session(engine: bytes):
    """A session over an in-memory engine (Polygraphy TrtRunner; host<->device copies included)."""
    from types import SimpleNamespace

    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    runner = TrtRunner(EngineFromBytes(engine))
    runner.activate()
    return SimpleNamespace(run=lambda x: runner.infer({"input": x}), close=runner.deactivate)


# --------------------------------------------------------------------------------------------- budget, load
class Budget:
    """The search's time budget (seconds on ``clock``; 0 = none) and its progress lines with an ETA."""

    def __init__(self, seconds: float, clock: Callable[[], float] | None, log: Callable[[str], object] | None):
        self.seconds, self.clock, self.log = float(seconds), clock or time.perf_counter, log
        self.t0 = self.clock()
        self._said = self.t0
        self.exhausted = False
        self.loads: list[float] = []

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def out(self) -> bool:
        """True once the budget is spent (and stays so): the search then ships the best pick it verified."""
        if self.seconds > 0 and not self.exhausted and self.elapsed() >= self.seconds:
            self.exhausted = True
            if self.log:
                self.log(f"  latency search: time budget of {self.seconds:g} s spent (prune.search_budget_s): "
                         "finishing with the best pick measured so far")
        return self.exhausted

    def sample_load(self) -> None:
        la = load_average()
        if la is not None:
            self.loads.append(round(float(la[0]), 2))

    def load_summary(self) -> dict | None:
        """The 1-minute load average seen while measuring: first, highest and last sample."""
        return {"start": self.loads[0], "max": max(self.loads), "end": self.loads[-1],
                "samples": len(self.loads)} if self.loads else None

    def progress(self, what: str, done: int, total: int, started: float) -> None:
        """One line at most every PROGRESS_EVERY_S: what is being timed, and an ETA for it."""
        now = self.clock()
        if self.log is None or now - self._said < PROGRESS_EVERY_S or not done:
            return
        self._said = now
        eta = (now - started) / done * (total - done)
        budget = f" of a {self.seconds:g} s budget" if self.seconds > 0 else ""
        self.log(f"  latency search: {what} {done}/{total}, {now - self.t0:.0f} s elapsed{budget}, "
                 f"about {eta:.0f} s left for it")


# --------------------------------------------------------------------------------------------- the timer
class Timer:
    """Exports variants, opens them on the runtime and compares them; counts what it measured."""

    def __init__(self, build_variant, export, opener: Opener, x: np.ndarray, workdir: Path, clock, shipped=None):
        """``export`` writes what the tables time (fast); ``shipped`` (default: ``export``) is the exporter
        of the file that ships: verification times its graphs, so a verified speed is the shipped graph's."""
        self.build_variant, self.export, self.opener, self.x = build_variant, export, opener, x
        self.shipped = shipped or export
        self.workdir, self.clock, self.measurements, self.remeasured, self._paths = workdir, clock, 0, 0, {}

    def path_of(self, widths: dict[str, int], shipped: bool = False) -> Path:
        """The variant's ONNX, exported once per distinct widths and exporter (the reference recurs in every table)."""
        shipped = shipped and self.shipped is not self.export   # one exporter: one file per widths
        key = (shipped, tuple(sorted(widths.items())))
        if key not in self._paths:
            path = self.workdir / f"variant_{len(self._paths) + 1}.onnx"
            (self.shipped if shipped else self.export)(self.build_variant(widths), path)   # writes ``path``
            self._paths[key] = path
        return self._paths[key]

    def _open(self, widths: dict[str, int], shipped: bool = False):
        self.measurements += 1
        return self.opener(self.path_of(widths, shipped))

    def compare(self, variants: dict[str, dict[str, int]], reference: str, *, block_ms: float, rounds: int,
                shipped: bool = False):
        sessions = {}
        try:
            for name, widths in variants.items():
                sessions[name] = self._open(widths, shipped)
            runs = {n: (lambda s=s: s.run(self.x)) for n, s in sessions.items()}
            kwargs = {"clock": self.clock} if self.clock is not None else {}
            return compare(runs, reference=reference, block_ms=block_ms, rounds=rounds, **kwargs)
        finally:
            for s in sessions.values():
                s.close()

    def against_unpruned(self, full: dict[str, int], widths: dict[str, int], shipped: bool = False):
        """``widths`` timed against the unpruned model with the protocol's blocks, in this process."""
        return self.compare({"unpruned": full, "pick": widths}, "unpruned", block_ms=CHECK_BLOCK_MS,
                            rounds=CHECK_ROUNDS, shipped=shipped).ratio("pick")

    def table_ratios(self, name: str, pick: dict[str, int], widths: tuple[int, ...]) -> tuple[dict[int, float], float]:
        """Median time ratio over ``pick`` of ``pick`` with group ``name`` at each width; entries that
        disagree with both neighbours are timed twice more (median of three). Returns (ratios, ref ms)."""
        def timed(ws):
            variants = {"ref": pick, **{str(w): {**pick, name: w} for w in ws}}
            c = self.compare(variants, "ref", block_ms=TABLE_BLOCK_MS, rounds=TABLE_ROUNDS)
            return {w: c.ratio(str(w)).median for w in ws}, c.ratio("ref").p50_ms
        ratios, ref_ms = timed(widths)
        # the reference (ratio 1 by definition) helps judge its neighbours but is never re-timed itself
        odd = tuple(w for w in outliers({pick[name]: 1.0, **ratios}) if w != pick[name])
        if odd:
            self.remeasured += len(odd)
            again = [timed(odd)[0] for _ in range(2)]
            ratios.update({w: float(np.median([ratios[w], *(a[w] for a in again)])) for w in odd})
        return ratios, ref_ms


def outliers(ratios: dict[int, float], tol: float = NEIGHBOUR_TOL) -> tuple[int, ...]:
    """Widths whose ratio is above both neighbours' or below both by more than ``tol``: a spike or a
    dip. Latency steps are one-sided (wider costs the same or more) and are not flagged; a real cliff
    (17 input channels off NCHWc) is, and its three timings keep it."""
    ws = sorted(ratios)
    odd = []
    for lo, w, hi in zip(ws, ws[1:], ws[2:], strict=False):
        r, a, b = ratios[w], ratios[lo], ratios[hi]
        if r > max(a, b) * (1 + tol) or r < min(a, b) * (1 - tol):
            odd.append(w)
    return tuple(odd)


# --------------------------------------------------------------------------------------------- verification
@dataclass(frozen=True)
class Final:
    """A pick timed against the unpruned model with the protocol (time ratios: pick / unpruned)."""
    median: float
    p10: float
    p90: float
    processes: int
    spread: float
    p50_ms: float
    to_p50_ms: float


def verify(timer: Timer, full, pick, backend, threads, x, processes) -> Final:
    """The pick against the unpruned model with the protocol, both as the shipped exporter writes them: in
    fresh processes on onnxruntime CPU (their spread says whether it reproduces), else in this process."""
    if backend == "onnxruntime-cpu" and processes > 0 and timer.clock is None:
        from edgerun.timing import Spec, SpecItem, repeat_in_processes
        a, b = timer.path_of(full, shipped=True), timer.path_of(pick, shipped=True)
        spec = Spec(items=(SpecItem("unpruned", str(a), backend), SpecItem("pick", str(b), backend)),
                    reference="unpruned", batches=(int(x.shape[0]),), input_shape=tuple(x.shape[1:]),
                    threads=threads, block_ms=CHECK_BLOCK_MS, rounds=CHECK_ROUNDS)
        p = repeat_in_processes(spec, processes)[0].pair("pick")
        return Final(p.median, p.p10, p.p90, p.processes, p.spread, p.p50_ms, p.to_p50_ms)
    r = timer.against_unpruned(full, pick, shipped=True)
    return Final(r.median, r.p10, r.p90, 1, 1.0, r.p50_ms, r.to_p50_ms)
