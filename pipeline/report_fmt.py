"""The report's number formats: one function per kind of number, so every table and plot agrees.

the task's figure and its differences: as the task's Metric writes them (pipeline.records.Metric: a
classifier's top-1 ``98.60 %``, a difference ``0.30 pt``); times: 3
significant digits and ms (``0.100 ms``, ``12.3 ms``, ``1,234 ms``); ratios: 2 decimals and ×; file
sizes: KiB with one decimal; counts (MACs, parameters): thousands separators. A missing value is ``–``.
"""
from __future__ import annotations

import math

NA = "–"


def sig3(v: float | None) -> str:
    """3 significant digits without exponent notation (1,234 rather than 1.23e+03)."""
    if v is None:
        return NA
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    decimals = 2 - math.floor(math.log10(abs(v)))
    return f"{v:.{decimals}f}" if decimals > 0 else f"{v:,.0f}"


def ms(v: float | None) -> str:
    return NA if v is None else f"{sig3(v)} ms"


def ratio(v: float | None) -> str:
    return NA if v is None else f"{v:.2f}×"


def kib(size_bytes: int | float | None) -> str:
    return NA if size_bytes is None else f"{size_bytes / 1024:,.1f} KiB"


def count(v: int | float | None) -> str:
    return NA if v is None else f"{v:,.0f}"


def seconds(v: float | None) -> str:
    return NA if v is None else f"{v:.1f}"


def check_text(check) -> str:
    """One gate check (pipeline.records.Check) in the report's formats.

    A drop check compares a task metric in percent (top-1): 2 decimals, like every accuracy here.
    A limit check holds a parity figure (cosine 0.99998, max-abs error 3e-06): 6 significant digits.
    """
    if check.drop is not None:
        ref = NA if check.reference is None else f"{check.reference:.2f}"
        return (f"{check.metric} dropped {check.drop:.2f} pt ({ref} -> {check.value:.2f}), "
                f"limit {check.max_drop} pt")
    return f"{check.metric} = {check.value:.6g}, limit {check.limit}"


def gate_text(gate) -> str:
    """A gate (pipeline.records.GateResult) as one line: ``pass: ...``, ``pass, warn only: ...``,
    ``FAIL: ...`` or ``failed, warn only: ...``; a warn-only gate that failed is never shown as a pass."""
    warn = ", warn only" if gate.mode == "warn" else ""
    bad = gate.first_failure()
    if bad is None:
        return f"pass{warn}: {check_text(gate.checks[0])}" if gate.checks else f"pass{warn}"
    return f"{'FAIL' if not warn else 'failed' + warn}: {check_text(bad)}"
