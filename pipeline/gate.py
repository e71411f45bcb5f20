"""Accuracy gates: a task metric's drop against its reference, plus limits on other figures.

A gate reads only a stage's metrics and its input records, so the runner can evaluate it again on
a cached result when its settings change (relaxing a gate never reruns the stage).
"""
from __future__ import annotations

from pipeline.records import Check, GateResult


def drop_check(metric: str, value: float, reference: float, max_drop: float) -> Check:
    drop = reference - value
    return Check(metric=metric, value=value, reference=reference, drop=round(drop, 6), max_drop=max_drop,
                 passed=drop <= max_drop + 1e-9)


def limit_check(metric: str, value: float, limit: float, *, at_least: bool) -> Check:
    """``at_least``: value must be >= limit (cosine, agreement); else <= limit (max-abs error)."""
    passed = value >= limit if at_least else value <= limit
    return Check(metric=metric, value=value, limit=f"{'>=' if at_least else '<='} {limit}", passed=bool(passed))


def gate(mode: str, *checks: Check) -> GateResult | None:
    """``mode``: fail (a failed check stops the run), warn (recorded only) or off (no gate)."""
    if mode == "off" or not checks:
        return None
    return GateResult(mode=mode, checks=tuple(checks))
