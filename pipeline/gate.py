"""Accuracy gates: a task metric's drop against its reference, plus limits on parity figures.

A gate is a plain dict (it goes into report.json as is): the first check is the headline
{"metric", "value", "reference", "drop", "max_drop"}; ``checks`` holds every check.
"""
from __future__ import annotations


def drop_check(metric: str, value: float, reference: float, max_drop: float) -> dict:
    drop = reference - value
    return {"metric": metric, "value": value, "reference": reference, "drop": round(drop, 6),
            "max_drop": max_drop, "passed": drop <= max_drop + 1e-9}


def limit_check(metric: str, value: float, limit: float, *, at_least: bool) -> dict:
    """``at_least``: value must be >= limit (cosine, agreement); else <= limit (max-abs error)."""
    passed = value >= limit if at_least else value <= limit
    return {"metric": metric, "value": value, "limit": f"{'>=' if at_least else '<='} {limit}", "passed": bool(passed)}


def gate(mode: str, *checks: dict) -> dict | None:
    """``mode``: fail (a failed check stops the run), warn (recorded only) or off (no gate)."""
    if mode == "off":
        return None
    head = checks[0]
    return {
        "passed": all(c["passed"] for c in checks), "mode": mode,
        "metric": head["metric"], "value": head["value"], "reference": head.get("reference"),
        "drop": head.get("drop"), "max_drop": head.get("max_drop"),
        "checks": list(checks),
    }
