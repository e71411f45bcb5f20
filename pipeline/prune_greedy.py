"""The arithmetic of the latency search (pipeline.prune_latency): groups and their importance,
measured tables, the candidate widths worth timing, the greedy that narrows by importance lost per
time saved, and the measured give-back. Pure functions of tables: no timing happens here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

STEP_TOL = 0.03        # a width saves time only when it cuts >= 3 % of the current time (noise: +-4 % at batch 1)
OVERSHOOT = 0.95       # a pick measured more than ~5 % faster than the goal gives channels back
MAX_MULTIPLES = 12     # block multiples per group; wider groups get a coarser grid (bounded search time)
WIDER = 3              # nearest candidates above the pick in a rebuilt table (then ~2x, 4x, ... the pick)
HEADS_SUFFIX = "#heads"   # a group of whole attention heads (pipeline.prune_heads): its width counts heads


def is_head_group(name: str) -> bool:
    return name.endswith(HEADS_SUFFIX)


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
    if block <= 1:   # heads: no SIMD block, every count is a candidate (a head's cost is its own)
        return list(range(1, channels))
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
              stop: Callable[[], bool] | None = None) -> list[tuple[dict[str, int], float]]:
    """Widen ``pick`` (measured at ``ratio`` of the unpruned time, under ``goal``) one width at a time:
    the widening predicted to keep the goal that regains the most importance per time it adds (inside a
    latency step: free, first), then measured; a miss is not kept and the next one is tried. The tables
    (around ``pick``) only rank the widenings: with many groups their product misjudges by several x
    (ResNet: predicted 5x, measured 21x), so each step is measured. Stops within OVERSHOOT of the goal,
    or when ``stop()`` says so (the time budget). Returns the kept steps in order, (widths, measured ratio) each."""
    by_name = {g.name: g for g in groups}
    table = {t.group: t.ratio_of() for t in tables}
    tried: set[tuple[str, int]] = set()
    steps = []
    while ratio < goal * OVERSHOOT and not (stop and stop()):
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


def least_widening(groups: list[Group], tables: list[Table], pick: dict[str, int],
                   ratio: float) -> dict[str, int] | None:
    """``pick`` with one group one table width wider: the widening predicted to add the least time (ties: the
    most importance regained). The back-off's step where every widening overshoots the time it asks for (a
    coarse table: 4 -> 6 channels is 1.4x), so that each rung is still wider than the last; None if none is."""
    by_name = {g.name: g for g in groups}
    best = None
    for t in tables:
        r, n = t.ratio_of(), t.group
        for w, rw in r.items():
            if w <= pick[n] or pick[n] not in r:
                continue
            key = (ratio * rw / r[pick[n]], -by_name[n].lost(w, pick[n]), n)
            if best is None or key < best[0]:
                best = (key, n, w)
    return None if best is None else {**pick, best[1]: best[2]}
