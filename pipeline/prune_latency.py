"""Per-group widths chosen by latency measured on the deploy runtime (prune.target = "latency_ms" | "speedup").

1. Groups: torch-pruning's groups of coupled channels, the objects its pruner ranks (pipeline.prune
   builds them with the pruner it prunes with); each carries its channels' importance, ascending.
2. Tables: for each group, the whole model with only that group narrowed to each candidate width
   (every other group at the current pick) is exported at the deployment batch and timed against the
   current pick, interleaved (edgerun.timing.compare, the project's one timer). Whole-model variants,
   not a per-layer proxy: the table includes reorders, fusions and the fixed per-run cost as they are.
   Candidates: multiples of the runtime's block, 2^k and 3 * 2^k below one block, and one channel above
   each block boundary (a probe: 17 input channels fall out of onnxruntime's NCHWc kernels on AVX-512).
3. Greedy: the predicted time ratio is the product over groups of r_g(w_g). A conv's cost scales
   with its input times its output width, so savings of two groups around one layer multiply; a sum
   of savings predicted 11x where 3.2x was measured on SimpleCNN, the product 3.4x. For small
   changes both agree. Each move narrows one group to the candidate that loses the least importance
   per millisecond saved, and only where it saves at least STEP_TOL of the current predicted time:
   channels inside a latency step buy nothing. Once the goal is met, each group widens back to the widest
   candidate of the same step.
4. Verify: the pick is timed against the unpruned model. The product still ignores the fixed
   per-run cost and the interactions of more than two groups, so a pick that misses the goal gets
   its tables rebuilt around it and the greedy goes on, at most MAX_ROUNDS rounds. A goal the tables
   predict out of reach is not refused on the prediction: the narrowest pick is measured, and only a
   measured miss with nothing narrower left to try is "cannot reach".

Runtimes: onnxruntime CPU (executed here); TensorRT (tensorrt_opener: FP16-typed ONNX built by
Polygraphy into an engine per variant) is written against the documented API, its plumbing tested
with fakes, and NOT executed in this workplace (no GPU, no TensorRT).
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgerun.timing import compare
from pipeline.errors import PipelineError

STEP_TOL = 0.03        # a width saves time only when it cuts >= 3 % of the current time (noise: +-4 % at batch 1)
MAX_ROUNDS = 4         # table rebuilds around the pick when the measured ratio misses (or overshoots) the goal
OVERSHOOT = 0.95       # a pick measured more than ~5 % faster than the goal gives channels back
MAX_MULTIPLES = 12     # block multiples per group; wider groups get a coarser grid (bounded search time)
WIDER = 3              # nearest candidates above the pick in a rebuilt table (then ~2x, 4x, ... the pick)
TABLE_BLOCK_MS, TABLE_ROUNDS = 15.0, 11    # interleaved blocks for the tables (a quick screen)
CHECK_BLOCK_MS, CHECK_ROUNDS = 30.0, 25    # the protocol's blocks for pick vs unpruned

# FP16 tensor cores want channel counts that are multiples of 8 (NVIDIA's Deep Learning Performance
# Guide, "Tensor Core Requirements": 8 for FP16, 16 for INT8 on most GPUs); see resolve_round_to.
GPU_ROUND_TO = 8


def resolve_round_to(round_to: int, run_target: str, flags: frozenset[str] | None = None) -> int:
    """``round_to`` = 0 means auto: the CPU's SIMD block (16 on AVX-512, 8 on AVX2) for run.target cpu,
    GPU_ROUND_TO for GPU targets; any other value is used as given."""
    if round_to < 0:
        raise PipelineError(f"prune.round_to: must be >= 0 (0 = auto), got {round_to}")
    if round_to:
        return int(round_to)
    if run_target == "cpu":
        from edgerun.machine import simd_block
        return simd_block(flags)
    return GPU_ROUND_TO


def latency_backend(run_target: str) -> str:
    """The runtime a latency target is timed on: onnxruntime CPU for run.target cpu, TensorRT for GPU
    targets (where TensorRT and a GPU are present; refused otherwise: a CPU table would be the wrong one)."""
    if run_target == "cpu":
        return "onnxruntime-cpu"
    from edgerun.trt import trt_version_info
    if trt_version_info() is None:
        raise PipelineError(f"prune.target: a latency target for run.target {run_target!r} is timed with TensorRT, "
                            "which is not available here; use target = 'macs' here or run the prune stage on the "
                            "device")
    return "tensorrt"


@dataclass(frozen=True)
class Group:
    """One prunable group: its root module, its width before pruning, its channels' importance (ascending)."""
    name: str
    channels: int
    importance: tuple[float, ...]
    min_width: int = 1

    def lost(self, kept_from: int, kept_to: int) -> float:
        """Importance removed when the group goes from ``kept_from`` to ``kept_to`` channels (least first)."""
        return float(sum(self.importance[self.channels - kept_from:self.channels - kept_to]))


@dataclass(frozen=True)
class Table:
    """Measured time of the model with ``group`` at each width, over the reference (the pick ``at``)."""
    group: str
    at: int                           # the group's width in the reference model
    widths: tuple[int, ...]
    ratios: tuple[float, ...]         # median over rounds of variant time / reference time
    reference_ms: float

    def ratio_of(self) -> dict[int, float]:
        return {self.at: 1.0, **dict(zip(self.widths, self.ratios, strict=True))}


@dataclass(frozen=True)
class Pick:
    widths: dict[str, int]
    predicted: float                  # predicted time ratio vs the tables' reference
    reached: bool
    # (group, from, to, importance lost per ratio saved | minus the importance a widening regained)
    moves: tuple[tuple[str, int, int, float], ...]


@dataclass(frozen=True)
class LatencySearch:
    """What the search measured and chose (the prune stage's ``latency_search`` metrics)."""
    backend: str
    batch: int
    threads: int
    block: int
    goal: str
    goal_ratio: float                 # pruned / unpruned time the goal asks for
    channels: dict[str, int]          # per group, before
    widths: dict[str, int]            # per group, chosen
    predicted_speedup: float
    measured_speedup: float           # the protocol's check (median over processes where run in processes)
    measured_p10_p90: tuple[float, float]
    processes: int
    process_spread: float
    unpruned_ms: float
    pruned_ms: float
    rounds: int
    measurements: int                 # variants timed (each distinct one exported once)
    table_size: int                   # table entries over all rounds
    seconds: float
    skipped_groups: tuple[str, ...] = ()
    load_average: tuple | None = None
    tables: tuple[Table, ...] = field(default=(), repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("tables")
        return d

    def tables_json(self) -> list[dict]:
        return [asdict(t) for t in self.tables]


# --------------------------------------------------------------------------------------------- candidates
def candidate_widths(channels: int, block: int, *, below: int | None = None, min_width: int = 1) -> tuple[int, ...]:
    """Kept widths worth timing for a group of ``channels``, narrower than ``below`` (default: channels)."""
    below = channels if below is None else below
    return tuple(w for w in _grid(channels, block) if min_width <= w < below)


def table_widths(channels: int, block: int, at: int, *, min_width: int = 1) -> tuple[int, ...]:
    """A table's widths around the pick ``at``: every narrower candidate, and wider ones so that a pick
    that overshot its goal can give channels back: the WIDER nearest, then about 2x, 4x, 8x ... ``at``
    and the full width (a group the first round cut to 1 of 256 channels climbs back in one round)."""
    above = sorted(w for w in (*_grid(channels, block), channels) if w > at)
    wider = set(above[:WIDER])
    target = 2 * at
    while above and target < 2 * channels:
        wider.add(min(above, key=lambda w: (abs(w - target), w)))
        target *= 2
    return tuple(sorted({*candidate_widths(channels, block, below=at, min_width=min_width), *wider}))


def _grid(channels: int, block: int) -> list[int]:
    step = block * max(1, math.ceil((channels // block) / MAX_MULTIPLES)) if block > 1 else 1
    widths = set(range(step, channels, step)) if block > 1 else set()
    widths |= {m + 1 for m in list(widths)}             # just above a boundary: where cliffs are
    # Below one block only the consumers' inputs save time, in proportion: steps of about 1.5x (1, 2, 3,
    # 4, 6, 8, 12 for a 16 block). SimpleCNN's conv1 at 3 kept 98.35 % top-1 where 2 kept 98.23 %.
    widths |= {k * 2 ** e for k in (1, 3) for e in range(block.bit_length()) if k * 2 ** e < max(block, 2)}
    return sorted(w for w in widths if w < channels)


# --------------------------------------------------------------------------------------------- the greedy
def predict(ratios: dict[str, dict[int, float]], widths: dict[str, int]) -> float:
    """The predicted time ratio of ``widths`` vs the tables' reference (``ratios``: per group, width ->
    ratio, Table.ratio_of): the product over groups."""
    return math.prod(r[widths[n]] for n, r in ratios.items())


def greedy(groups: list[Group], tables: list[Table], start: dict[str, int], goal: float,
           tol: float = STEP_TOL) -> Pick:
    """Narrow groups from ``start`` (the tables' reference) until the predicted ratio is <= ``goal``."""
    by_name = {g.name: g for g in groups}
    table = {t.group: t.ratio_of() for t in tables}
    widths = dict(start)

    def predicted(ws):
        return predict(table, ws)

    moves = []
    while predicted(widths) > goal:
        best = None
        here = predicted(widths)
        for n, ratio in table.items():
            now = widths[n]
            for w in ratio:
                saved = here - predicted({**widths, n: w})
                # relative to the current time, as the tables' noise is: an absolute floor would stop the
                # greedy once the model is a few times faster, however much a group could still save
                if w >= now or saved < tol * here:    # wider, or inside the current step: no time bought
                    continue
                key = (by_name[n].lost(now, w) / saved, -saved, n, -w)
                if best is None or key < best[0]:
                    best = (key, n, w)
        if best is None:
            return Pick(widths, predicted(widths), False, tuple(moves))
        (cost, *_), n, w = best
        moves.append((n, widths[n], w, cost))
        widths[n] = w
    while True:   # give back what the goal allows, most importance first (a wider width of the same step too)
        best = None
        for n, ratio in table.items():
            for w in ratio:
                if w > widths[n] and predicted({**widths, n: w}) <= goal:
                    key = (-by_name[n].lost(w, widths[n]), -w, n)
                    if best is None or key < best[0]:
                        best = (key, n, w)
        if best is None:
            return Pick(widths, predicted(widths), True, tuple(moves))
        (regained, *_), n, w = best
        moves.append((n, widths[n], w, regained))
        widths[best[1]] = w


def give_back(groups: list[Group], tables: list[Table], pick: dict[str, int], ratio: float, goal: float,
              measure: Callable[[dict[str, int]], float], log: Callable[[str], object] | None = None,
              ) -> list[tuple[dict[str, int], float]]:
    """Widen ``pick`` (measured at ``ratio`` of the unpruned time, under ``goal``) one width at a time:
    the widening predicted to keep the goal that regains the most importance per time it adds (inside a
    latency step: free, first), then measured; a miss is not kept and the next one is tried. The tables
    (around ``pick``) only rank the widenings: with many groups their product misjudges by several x
    (ResNet: predicted 5x, measured 21x), so each step is measured. Stops within OVERSHOOT of the goal.
    Returns the kept steps in order, (widths, measured ratio) each."""
    by_name = {g.name: g for g in groups}
    table = {t.group: t.ratio_of() for t in tables}
    tried: set[tuple[str, int]] = set()
    steps = []
    while ratio < goal * OVERSHOOT:
        best = None
        for n, r in table.items():
            for w, rw in r.items():
                est = ratio * rw / r[pick[n]]
                if w <= pick[n] or (n, w) in tried or est > goal:
                    continue
                value = by_name[n].lost(w, pick[n]) / max(est - ratio, 1e-9)
                key = (-value, -w, n)
                if best is None or key < best[0]:
                    best = (key, n, w)
        if best is None:
            break
        _, n, w = best
        trial = {**pick, n: w}
        got = measure(trial)
        if log:
            kept = "" if got <= goal else " (misses the goal: not kept)"
            log(f"give back {n} {pick[n]} -> {w}: measured {1 / got:.2f}x{kept}")
        tried.add((n, w))
        if got <= goal:
            pick, ratio = trial, got
            steps.append((pick, ratio))
    return steps


# --------------------------------------------------------------------------------------------- runtimes
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


# --------------------------------------------------------------------------------------------- measuring
class _Timer:
    """Exports variants, opens them on the runtime and compares them; counts what it measured."""

    def __init__(self, build_variant, export, opener: Opener, x: np.ndarray, workdir: Path, clock):
        self.build_variant, self.export, self.opener, self.x = build_variant, export, opener, x
        self.workdir, self.clock, self.measurements, self._paths = workdir, clock, 0, {}

    def path_of(self, widths: dict[str, int]) -> Path:
        """The variant's ONNX, exported once per distinct widths (the reference recurs in every table)."""
        key = tuple(sorted(widths.items()))
        if key not in self._paths:
            path = self.workdir / f"variant_{len(self._paths) + 1}.onnx"
            self._paths[key] = self.export(self.build_variant(widths), path)
        return self._paths[key]

    def _open(self, widths: dict[str, int]):
        self.measurements += 1
        return self.opener(self.path_of(widths))

    def compare(self, variants: dict[str, dict[str, int]], reference: str, *, block_ms: float, rounds: int):
        sessions = {}
        try:
            for name, widths in variants.items():
                sessions[name] = self._open(widths)
            runs = {n: (lambda s=s: s.run(self.x)) for n, s in sessions.items()}
            kwargs = {"clock": self.clock} if self.clock is not None else {}
            return compare(runs, reference=reference, block_ms=block_ms, rounds=rounds, **kwargs)
        finally:
            for s in sessions.values():
                s.close()

    def against_unpruned(self, full: dict[str, int], widths: dict[str, int]):
        """``widths`` timed against the unpruned model with the protocol's blocks, in this process."""
        return self.compare({"unpruned": full, "pick": widths}, "unpruned", block_ms=CHECK_BLOCK_MS,
                            rounds=CHECK_ROUNDS).ratio("pick")

    def table(self, group: Group, pick: dict[str, int], block: int) -> Table | None:
        widths = table_widths(group.channels, block, pick[group.name], min_width=group.min_width)
        if not widths:
            return None
        variants = {"ref": pick, **{str(w): {**pick, group.name: w} for w in widths}}
        c = self.compare(variants, "ref", block_ms=TABLE_BLOCK_MS, rounds=TABLE_ROUNDS)
        return Table(group.name, pick[group.name], widths, tuple(round(c.ratio(str(w)).median, 5) for w in widths),
                     round(c.ratio("ref").p50_ms, 6))


def search(groups: list[Group], *, build_variant: Callable[[dict[str, int]], object],
           export: Callable[[object, Path], Path], x: np.ndarray, block: int, speedup: float = 0.0,
           latency_ms: float = 0.0, backend: str = "onnxruntime-cpu", threads: int = 1, opener: Opener | None = None,
           verify_processes: int = 3, clock=None, skipped: tuple[str, ...] = (),
           log: Callable[[str], object] | None = None) -> LatencySearch:
    """Widths per group that meet ``speedup`` (x, vs the unpruned model) or ``latency_ms`` at x's batch.

    ``build_variant(widths)`` returns the model with those groups narrowed (others unpruned);
    ``export(model, path)`` writes its ONNX. Raises PipelineError when the goal cannot be met."""
    if (speedup > 0) == (latency_ms > 0):
        raise PipelineError("prune: the latency search needs exactly one goal: speedup > 1 or latency_ms > 0")
    if speedup and speedup <= 1.0:
        raise PipelineError(f"prune.speedup: must be > 1 (x faster than the unpruned model), got {speedup}")
    if not groups:
        raise PipelineError("prune: the latency search found no prunable channel group (all ignored or attention)")
    opener = opener or (cpu_opener(threads) if backend == "onnxruntime-cpu" else None)
    if opener is None:
        raise PipelineError(f"prune: no latency runtime for backend {backend!r}")
    t0 = time.perf_counter()
    full = {g.name: g.channels for g in groups}
    pick, tables_all, ref_vs_unpruned, goal, unpruned_ms = dict(full), [], 1.0, None, None
    # every pick that met the goal in this process, narrowest first (given back in turn):
    # (widths, measured ratio vs unpruned, predicted ratio); once one has, every round only gives back
    history = []
    with tempfile.TemporaryDirectory(prefix="prune_latency_") as tmp:
        timer = _Timer(build_variant, export, opener, x, Path(tmp), clock)

        def measured(widths) -> float:   # time ratio vs the unpruned model
            return timer.against_unpruned(full, widths).median

        for rnd in range(1, MAX_ROUNDS + 1):
            tables = [t for g in groups if (t := timer.table(g, pick, block)) is not None]
            tables_all += tables
            if goal is None:
                unpruned_ms = tables[0].reference_ms if tables else float("nan")
                goal = 1.0 / speedup if speedup else latency_ms / unpruned_ms
            if history:
                # The pick beat the goal by more than OVERSHOOT: give channels back, each widening measured.
                base, ratios = ref_vs_unpruned, {t.group: t.ratio_of() for t in tables}
                steps = give_back(groups, tables, pick, ref_vs_unpruned, goal, measured,
                                  (lambda m, r=rnd: log(f"  latency search round {r}: {m}")) if log else None)
                history += [(w, r, base * predict(ratios, w)) for w, r in steps]
                if not steps:
                    break
                pick, ref_vs_unpruned = steps[-1]
                if ref_vs_unpruned >= goal * OVERSHOOT:
                    break
                continue
            chosen = greedy(groups, tables, pick, goal / ref_vs_unpruned)
            if not chosen.reached and chosen.widths == pick:   # nothing narrower left to try
                raise _unreachable(speedup, latency_ms, backend, x.shape[0], ref_vs_unpruned * chosen.predicted,
                                   unpruned_ms, "measured" if rnd > 1 else "predicted")
            predicted = ref_vs_unpruned * chosen.predicted
            pick = chosen.widths
            ref_vs_unpruned = measured(pick)
            if log:
                log(f"  latency search round {rnd}: {pick} predicted {1 / predicted:.2f}x, "
                    f"measured {1 / ref_vs_unpruned:.2f}x")
            if ref_vs_unpruned <= goal:
                history.append((pick, ref_vs_unpruned, predicted))
                if ref_vs_unpruned >= goal * OVERSHOOT:   # close to the goal: no channel left to give back
                    break
                # Faster than asked: the channels beyond the goal cost accuracy for nothing. Rebuild the
                # tables around this pick and give widths back (next round).
        if not history:
            if not chosen.reached:
                raise _unreachable(speedup, latency_ms, backend, x.shape[0], ref_vs_unpruned, unpruned_ms,
                                   "measured")
            raise PipelineError(f"prune: {_goal_text(speedup, latency_ms)} not met after {MAX_ROUNDS} rounds of "
                                f"measured tables: the last pick measured {1 / ref_vs_unpruned:.2f}x; relax the goal")
        pick, predicted, final = _verified(timer, full, history, goal, backend, threads, x, verify_processes, log)
        if final.median > goal:
            raise PipelineError(f"prune: {_goal_text(speedup, latency_ms)} met in the search but not when verified: "
                                f"the narrowest pick measured {1 / final.median:.2f}x (p10-p90 {1 / final.p90:.2f}-"
                                f"{1 / final.p10:.2f}x, {final.processes} process(es)); relax the goal or retry on a "
                                "quieter machine")
    from edgerun.machine import load_average
    return LatencySearch(
        backend=backend, batch=int(x.shape[0]), threads=threads, block=block, goal=_goal_text(speedup, latency_ms),
        goal_ratio=round(goal, 5), channels=full, widths=pick, predicted_speedup=round(1 / predicted, 3),
        measured_speedup=round(1 / final.median, 3),
        measured_p10_p90=(round(1 / final.p90, 3), round(1 / final.p10, 3)),
        processes=final.processes, process_spread=round(final.spread, 3), unpruned_ms=round(final.to_p50_ms, 6),
        pruned_ms=round(final.p50_ms, 6), rounds=rnd, measurements=timer.measurements,
        table_size=sum(len(t.widths) for t in tables_all), seconds=round(time.perf_counter() - t0, 1),
        skipped_groups=tuple(skipped), load_average=load_average(), tables=tuple(tables_all))


def _unreachable(speedup, latency_ms, backend, batch, ratio, unpruned_ms, how) -> PipelineError:
    return PipelineError(f"prune: cannot reach {_goal_text(speedup, latency_ms)} on {backend} at batch {batch}: "
                         f"the narrowest widths {how} {1 / ratio:.2f}x "
                         f"({ratio * unpruned_ms:.4g} ms; a fixed per-run cost bounds tiny models); "
                         "relax the goal, max_layer_ratio or ignored_layers")


def _goal_text(speedup: float, latency_ms: float) -> str:
    return f"speedup {speedup:g}x" if speedup else f"latency {latency_ms:g} ms"


def _verified(timer, full, history, goal, backend, threads, x, processes, log):
    """The widest pick of ``history`` (narrowest first, each met the goal in this process) that the
    protocol's verification confirms, by bisection (widths only grow along it, so its time does too);
    the narrowest pick, verified, when none is confirmed. Returns (widths, predicted ratio, _Final)."""
    checked = {}

    def verify(i):
        if i not in checked:
            checked[i] = _verify(timer, full, history[i][0], backend, threads, x, processes)
            if log and len(history) > 1:
                log(f"  latency search: verified pick {i + 1}/{len(history)}: {1 / checked[i].median:.2f}x")
        return checked[i]
    best, lo, hi = None, 0, len(history) - 1
    if verify(hi).median <= goal:
        best = hi
    else:
        hi -= 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if verify(mid).median <= goal:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
    i = 0 if best is None else best
    return history[i][0], history[i][2], verify(i)


@dataclass(frozen=True)
class _Final:
    median: float
    p10: float
    p90: float
    processes: int
    spread: float
    p50_ms: float
    to_p50_ms: float


def _verify(timer: _Timer, full, pick, backend, threads, x, processes) -> _Final:
    """The pick against the unpruned model with the protocol: in fresh processes on onnxruntime CPU
    (their spread says whether it reproduces), else in this process."""
    if backend == "onnxruntime-cpu" and processes > 0 and timer.clock is None:
        from edgerun.timing import Spec, SpecItem, repeat_in_processes
        a, b = timer.path_of(full), timer.path_of(pick)
        spec = Spec(items=(SpecItem("unpruned", str(a), backend), SpecItem("pick", str(b), backend)),
                    reference="unpruned", batches=(int(x.shape[0]),), input_shape=tuple(x.shape[1:]),
                    threads=threads, block_ms=CHECK_BLOCK_MS, rounds=CHECK_ROUNDS)
        p = repeat_in_processes(spec, processes)[0].pair("pick")
        return _Final(p.median, p.p10, p.p90, p.processes, p.spread, p.p50_ms, p.to_p50_ms)
    r = timer.against_unpruned(full, pick)
    return _Final(r.median, r.p10, r.p90, 1, 1.0, r.p50_ms, r.to_p50_ms)
