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
   measured miss with nothing narrower left to try is "cannot reach". The pick that ships is the
   widest one the fresh-process verification confirms.
5. Goal and back-off: under goal "require" a goal not met (or not confirmed) is an error; under
   "best" the fastest verified pick ships, and the record says the goal was not met. Then the ladder:
   ``backoff`` wider picks (each given back from the one before, about 1/BACKOFF_STEP slower, each
   measured and verified), which the fine-tune stage tries in turn when a pick cannot be distilled
   back within the accuracy gate.
The search has a time budget: at it, it finishes with the best pick measured so far (pipeline.prune_timer).

Runtimes: onnxruntime CPU (executed here); TensorRT (tensorrt_opener: FP16-typed ONNX built by
Polygraphy into an engine per variant) is written against the documented API, its plumbing tested
with fakes, and NOT executed in this workplace (no GPU, no TensorRT).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import PipelineError
from pipeline.prune_greedy import (
    OVERSHOOT,
    Group,
    Table,
    give_back,
    greedy,
    is_head_group,
    least_widening,
    predict,
    table_widths,
)
from pipeline.prune_timer import Budget, Final, Opener, Timer, cpu_opener, verify

MAX_ROUNDS = 4         # table rebuilds around the pick when the measured ratio misses (or overshoots) the goal
BACKOFF_STEP = 0.85   # each back-off rung is asked to be about 1/0.85 = 1.18x slower than the one before
CONFIRM_TOL = 0.25    # a pick measured this far from its prediction is timed again (the slower result counts)
GOALS = ("require", "best")

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
class SearchOptions:
    """The latency search's rarer options (config keys prune.goal, search_budget_s, backoff)."""
    goal: str = "require"             # require | best
    budget_s: float = 0.0             # 0 = no time budget
    backoff: int = 0                  # wider rungs after the pick
    export: Callable | None = None    # the shipped file's exporter: verification times its graphs (None: the search's)


@dataclass(frozen=True)
class Rung:
    """One pick the fine-tune stage may ship: its widths and its verified speed vs the unpruned model."""
    widths: dict[str, int]
    speedup: float
    p10_p90: tuple[float, float]
    processes: int
    spread: float
    meets_goal: bool


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
    goal_mode: str = "require"
    goal_met: bool = True
    notes: tuple[str, ...] = ()       # what a reader must know: a goal not met, a budget spent
    ladder: tuple[Rung, ...] = ()     # the pick, then the back-off rungs, fastest first
    load: dict | None = None          # the 1-minute load average while measuring (first, max, last)
    budget_s: float = 0.0
    budget_spent: bool = False
    remeasured: int = 0               # table entries timed again because both neighbours disagreed
    verified_export: str = "search"   # whose graphs the verification timed: "shipped" or the search's own
    tables: tuple[Table, ...] = field(default=(), repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("tables")
        return d

    def tables_json(self) -> list[dict]:
        return [asdict(t) for t in self.tables]


# --------------------------------------------------------------------------------------------- the search
@dataclass
class _State:
    """Where the rounds stand: the current pick and its measured ratio vs the unpruned model."""
    pick: dict[str, int]
    ratio: float = 1.0
    goal: float | None = None
    unpruned_ms: float = float("nan")
    rounds: int = 0
    tables: list = field(default_factory=list)
    history: list = field(default_factory=list)    # picks that met the goal, narrowest first: (widths, r, pred)
    measured: list = field(default_factory=list)   # every pick measured: (widths, ratio, predicted)
    miss: str = ""                                 # why the goal is not met: what "require" raises


def search(groups: list[Group], *, build_variant: Callable[[dict[str, int]], object],
           export: Callable[[object, Path], Path], x: np.ndarray, block: int, speedup: float = 0.0,
           latency_ms: float = 0.0, backend: str = "onnxruntime-cpu", threads: int = 1, opener: Opener | None = None,
           verify_processes: int = 3, clock=None, skipped: tuple[str, ...] = (),
           log: Callable[[str], object] | None = None, goal_mode: str = "require", budget_s: float = 0.0,
           backoff: int = 0, export_shipped: Callable[[object, Path], object] | None = None) -> LatencySearch:
    """Widths per group that meet ``speedup`` (x, vs the unpruned model) or ``latency_ms`` at x's batch.

    ``build_variant(widths)`` returns the model with those groups narrowed (others unpruned);
    ``export(model, path)`` writes, to ``path``, the ONNX the tables time; ``export_shipped`` (default
    ``export``) the one every verification times, so the speed recorded is that of the graph that ships. ``goal_mode``
    "require": a goal not met raises PipelineError; "best": the fastest verified pick ships (``goal_met``
    False, with a note).
    ``budget_s`` > 0 bounds the search's time; ``backoff`` wider rungs follow the pick in ``ladder``."""
    _check_request(groups, speedup, latency_ms, goal_mode, backoff)
    opener = opener or (cpu_opener(threads) if backend == "onnxruntime-cpu" else None)
    if opener is None:
        raise PipelineError(f"prune: no latency runtime for backend {backend!r}")
    t0 = time.perf_counter()
    budget = Budget(budget_s, clock, log)
    budget.sample_load()
    full = {g.name: g.channels for g in groups}
    st = _State(pick=dict(full))
    with tempfile.TemporaryDirectory(prefix="prune_latency_") as tmp:
        timer = Timer(build_variant, export, opener, x, Path(tmp), clock, shipped=export_shipped)
        _rounds(st, timer, groups, full, block, budget, speedup, latency_ms, backend, x, log)
        notes = []
        if st.history:
            pick, predicted, final = _verified(timer, full, st.history, st.goal, backend, threads, x,
                                               verify_processes, log)
            if not _meets(final.median, st.goal):
                st.miss = (f"prune: {_goal_text(speedup, latency_ms)} met in the search but not when verified: "
                           f"the narrowest pick measured {1 / final.median:.2f}x (p10-p90 {1 / final.p90:.2f}-"
                           f"{1 / final.p10:.2f}x, {final.processes} process(es)); relax the goal or retry on a "
                           "quieter machine")
        else:
            if goal_mode == "require":
                raise PipelineError(st.miss)
            # "best": the fastest pick measured (the unpruned model if none was narrower), verified
            pick, _, predicted = min(st.measured, key=lambda m: m[1]) if st.measured else (dict(full), 1.0, 1.0)
            final = verify(timer, full, pick, backend, threads, x, verify_processes)
        met = _meets(final.median, st.goal)
        if not met:
            if goal_mode == "require":
                raise PipelineError(st.miss)
            notes.append(f"{_goal_text(speedup, latency_ms)} not reached ({st.miss.removeprefix('prune: ')}); "
                         f"prune.goal = 'best' ships the fastest verified pick: {1 / final.median:.2f}x")
        if budget.exhausted:
            notes.append(f"the search stopped at its time budget ({budget_s:g} s, prune.search_budget_s)")
        ladder = [_rung(pick, final, st.goal)]
        ladder += _backoff(timer, groups, full, block, ladder[0], final.median, st.goal, backoff, budget,
                           (backend, threads, x, verify_processes), log)
        budget.sample_load()
    return LatencySearch(
        backend=backend, batch=int(x.shape[0]), threads=threads, block=block, goal=_goal_text(speedup, latency_ms),
        goal_ratio=round(st.goal, 5), channels=full, widths=pick, predicted_speedup=round(1 / predicted, 3),
        measured_speedup=round(1 / final.median, 3),
        measured_p10_p90=(round(1 / final.p90, 3), round(1 / final.p10, 3)),
        processes=final.processes, process_spread=round(final.spread, 3), unpruned_ms=round(final.to_p50_ms, 6),
        pruned_ms=round(final.p50_ms, 6), rounds=st.rounds, measurements=timer.measurements,
        table_size=sum(len(t.widths) for t in st.tables), seconds=round(time.perf_counter() - t0, 1),
        skipped_groups=tuple(skipped), load_average=_load_now(), goal_mode=goal_mode, goal_met=met,
        notes=tuple(notes), ladder=tuple(ladder), load=budget.load_summary(), budget_s=float(budget_s),
        budget_spent=budget.exhausted, remeasured=timer.remeasured, tables=tuple(st.tables),
        verified_export="shipped" if export_shipped else "search")


def _check_request(groups, speedup, latency_ms, goal_mode, backoff) -> None:
    if (speedup > 0) == (latency_ms > 0):
        raise PipelineError("prune: the latency search needs exactly one goal: speedup > 1 or latency_ms > 0")
    if speedup and speedup <= 1.0:
        raise PipelineError(f"prune.speedup: must be > 1 (x faster than the unpruned model), got {speedup}")
    if goal_mode not in GOALS:
        raise PipelineError(f"prune.goal: expected one of {', '.join(GOALS)}, got {goal_mode!r}")
    if backoff < 0:
        raise PipelineError(f"prune.backoff: must be >= 0 (wider picks to fall back on), got {backoff}")
    if not groups:
        raise PipelineError("prune: the latency search found no prunable group of channels or attention heads "
                            "(all ignored, grouped-query attention, or too narrow for max_layer_ratio)")


def _rounds(st: _State, timer: Timer, groups, full, block, budget: Budget, speedup, latency_ms, backend, x,
            log) -> None:
    """Tables, greedy and measured picks, at most MAX_ROUNDS rounds, until a pick meets the goal within
    OVERSHOOT (then gives channels back), nothing narrower is left, or the budget is spent."""
    def measured(widths) -> float:   # time ratio vs the unpruned model
        return timer.against_unpruned(full, widths).median

    def say(rnd, msg):
        if log:
            log(f"  latency search round {rnd}: {msg}")
    for rnd in range(1, MAX_ROUNDS + 1):
        st.rounds = rnd
        tables = _tables(timer, groups, st.pick, block, budget, rnd)
        st.tables += tables
        if st.goal is None:
            st.unpruned_ms = tables[0].reference_ms
            st.goal = 1.0 / speedup if speedup else latency_ms / st.unpruned_ms
        if st.history:
            # The pick beat the goal by more than OVERSHOOT: give channels back, each widening measured.
            base, ratios = st.ratio, {t.group: t.ratio_of() for t in tables}
            steps = give_back(groups, tables, st.pick, st.ratio, st.goal, measured,
                              lambda m, r=rnd: say(r, m), budget.out)
            st.history += [(w, r, base * predict(ratios, w)) for w, r in steps]
            if not steps:
                return
            st.pick, st.ratio = steps[-1]
            if st.ratio >= st.goal * OVERSHOOT or budget.out():
                return
            continue
        chosen = greedy(groups, tables, st.pick, st.goal / st.ratio)
        if not chosen.reached and chosen.widths == st.pick:   # nothing narrower left to try
            st.miss = _unreachable(speedup, latency_ms, backend, x.shape[0], st.ratio * chosen.predicted,
                                   st.unpruned_ms, "measured" if rnd > 1 else "predicted")
            return
        predicted = st.ratio * chosen.predicted
        st.pick = chosen.widths
        st.ratio = measured(st.pick)
        if abs(st.ratio / predicted - 1) > CONFIRM_TOL:   # the tables mispredicted: confirm before trusting
            again = measured(st.pick)
            say(rnd, f"measured {1 / st.ratio:.2f}x where {1 / predicted:.2f}x was predicted; timed again: "
                     f"{1 / again:.2f}x (the slower counts)")
            st.ratio = max(st.ratio, again)
        st.measured.append((st.pick, st.ratio, predicted))
        say(rnd, f"{st.pick} predicted {1 / predicted:.2f}x, measured {1 / st.ratio:.2f}x")
        if _meets(st.ratio, st.goal):
            st.history.append((st.pick, st.ratio, predicted))
            if st.ratio >= st.goal * OVERSHOOT:   # close to the goal: no channel left to give back
                return
            # Faster than asked: the channels beyond the goal cost accuracy for nothing. Rebuild the
            # tables around this pick and give widths back (next round).
        if budget.out():
            break
    if not st.history and not st.miss:
        how = "at its time budget" if budget.exhausted else f"after {st.rounds} rounds of measured tables"
        st.miss = (f"prune: {_goal_text(speedup, latency_ms)} not met {how}: the last pick measured "
                   f"{1 / st.ratio:.2f}x; relax the goal")


def _tables(timer: Timer, groups, pick, block, budget: Budget, rnd: int) -> list[Table]:
    """One table per group around ``pick``; stops early at the budget (at least one table is built:
    it carries the reference time). Progress lines say how far the round is, with an ETA."""
    tables, started = [], budget.clock()
    todo = [(g, ws) for g in groups if (ws := table_widths(g.channels, 1 if is_head_group(g.name) else block,
                                                         pick[g.name], min_width=g.min_width))]
    total = sum(len(ws) + 1 for _, ws in todo)
    done = 0
    for g, ws in todo:
        if tables and budget.out():
            break
        ratios, ref_ms = timer.table_ratios(g.name, pick, ws)
        tables.append(Table(g.name, pick[g.name], ws, tuple(round(ratios[w], 5) for w in ws), round(ref_ms, 6)))
        done += len(ws) + 1
        budget.sample_load()
        budget.progress(f"round {rnd} tables, variants timed", done, total, started)
    if not tables:
        raise PipelineError("prune: the latency search found no group with a narrower width to time "
                            "(max_layer_ratio or ignored_layers leave nothing to prune)")
    return tables


def _backoff(timer: Timer, groups, full, block, first: Rung, ratio: float, goal: float, levels: int,
             budget: Budget, protocol, log) -> list[Rung]:
    """``levels`` wider picks after ``first``, each given back from the one before to about
    1/BACKOFF_STEP of its time, measured, then verified with the protocol."""
    if levels <= 0 or budget.out():
        return []
    backend, threads, x, processes = protocol
    pick, rungs = first.widths, []
    tables = _tables(timer, groups, pick, block, budget, 0)

    def measured(widths) -> float:
        return timer.against_unpruned(full, widths).median
    for level in range(1, levels + 1):
        if budget.out():
            break
        steps = give_back(groups, tables, pick, ratio, ratio / BACKOFF_STEP, measured, None, budget.out)
        if not steps:   # every widening overshoots the step asked for: a rung must still be wider than the last
            wider = least_widening(groups, tables, pick, ratio)
            if wider is None:
                break
            steps = [(wider, measured(wider))]
        pick, ratio = steps[-1]
        final = verify(timer, full, pick, backend, threads, x, processes)
        rungs.append(_rung(pick, final, goal))
        if log:
            log(f"  latency search: back-off rung {level}: {pick} verified {1 / final.median:.2f}x")
    return rungs


def _rung(widths, final: Final, goal: float) -> Rung:
    return Rung(dict(widths), round(1 / final.median, 3), (round(1 / final.p90, 3), round(1 / final.p10, 3)),
                final.processes, round(final.spread, 3), _meets(final.median, goal))


def _meets(ratio: float, goal: float) -> bool:
    """A measured time ratio meets the goal; a hair over it in floating point still does."""
    return ratio <= goal * (1 + 1e-9)


def _load_now():
    from edgerun.machine import load_average
    return load_average()


def _unreachable(speedup, latency_ms, backend, batch, ratio, unpruned_ms, how) -> str:
    return (f"prune: cannot reach {_goal_text(speedup, latency_ms)} on {backend} at batch {batch}: "
            f"the narrowest widths {how} {1 / ratio:.2f}x "
            f"({ratio * unpruned_ms:.4g} ms; a fixed per-run cost bounds tiny models); "
            "relax the goal, max_layer_ratio or ignored_layers")


def _goal_text(speedup: float, latency_ms: float) -> str:
    return f"speedup {speedup:g}x" if speedup else f"latency {latency_ms:g} ms"


def _verified(timer, full, history, goal, backend, threads, x, processes, log):
    """The widest pick of ``history`` (narrowest first, each met the goal in this process) that the
    protocol's verification confirms, by bisection (widths only grow along it, so its time does too);
    the narrowest pick, verified, when none is confirmed. Returns (widths, predicted ratio, Final)."""
    checked = {}

    def check(i):
        if i not in checked:
            checked[i] = verify(timer, full, history[i][0], backend, threads, x, processes)
            if log and len(history) > 1:
                log(f"  latency search: verified pick {i + 1}/{len(history)}: {1 / checked[i].median:.2f}x")
        return checked[i]
    best, lo, hi = None, 0, len(history) - 1
    if _meets(check(hi).median, goal):
        best = hi
    else:
        hi -= 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if _meets(check(mid).median, goal):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
    i = 0 if best is None else best
    return history[i][0], history[i][2], check(i)
