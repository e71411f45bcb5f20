"""The report's summary: what shipped and why, and what the run's numbers mean, from the stage records.

Every figure names what it was measured on; a figure that was not measured is None (shown as ``–``),
and a speedup the measurement itself casts doubt on carries its ``caveats``.
"""
from __future__ import annotations

from pipeline import tasks
from pipeline.profile_speedup import GPU_BACKENDS
from pipeline.records import Artifact, Metric, StageRecord

MAC_CONVENTIONS = {
    "macs": "MACs (conv/linear multiply-accumulates, as thop/fvcore count them)",
    "ops_tp": "ops (torch-pruning's count: MACs plus bias adds and ReLUs)",
}


def caveats(row: dict) -> list[str]:
    """Why a speedup row's ratio is not a speedup one can rely on (empty: nothing known against it)."""
    out = []
    over = row.get("oversubscribed")
    if over:
        out.append("oversubscribed: " + (over if isinstance(over, str) else
                                         "threads x processes exceeded the usable cores while timing"))
    if row.get("reproducible") is False:
        n = row.get("processes")
        out.append(f"not reproducible: the medians of {n or 'the'} processes differed by more than 1.2x")
    return out


def not_executed(records: list[StageRecord], latency: list[dict]) -> list[str]:
    """What this run did not execute on this machine, one short line each."""
    out = [f"stage {r.name}: skipped ({r.reason or 'no reason recorded'})" for r in records if r.status == "skipped"]
    built = any(a.kind == "engine" for r in records if r.status in ("ran", "cached") for a in r.artifacts)
    if not built:
        out.append("TensorRT: no engine was built, gated or timed here (no TensorRT/GPU); "
                   + tasks.of_run(records).engine_recipe)
    measured = {row.get("backend") for row in latency}
    missing = [b for b in GPU_BACKENDS if b not in measured]
    if missing:
        out.append(f"CUDA: no latency on {', '.join(missing)} (backend not present on this machine)")
    return out


def summary(records: list[StageRecord], latency: list[dict], speedup: list[dict], package: dict,
            outcome: dict, stage_order: list[str], metric: Metric) -> dict:
    """``metric``: the run's task figure; its ``name`` keys the shipped and reference values."""
    chosen = package.get("chosen") or {}
    file = chosen.get("file")
    made_by, art = _made_by(records, file)
    row = _latency_row(latency, chosen)
    key = metric.name
    reference = next((r for r in records if r.metrics.get(key) is not None), None)
    value = _first(chosen.get(key), (row or {}).get(key), art.score.value if art and art.score else None,
                   made_by.metrics.get(key) if made_by else None)
    shipped = None
    if file:
        shipped = {
            "file": file, "role": _first(chosen.get("role"), art.role if art else None, (row or {}).get("role")),
            "artifact": _first(chosen.get("artifact"), (row or {}).get("artifact")),
            "stage": made_by.name if made_by else (row or {}).get("stage"),
            "backend": chosen.get("backend"), "batch": chosen.get("batch"),
            "p50_ms": _first(chosen.get("p50_ms"), (row or {}).get("p50_ms")), key: value,
            "size_bytes": _first(chosen.get("size_bytes"), (row or {}).get("size_bytes")),
            "reason": _first(chosen.get("reason"), chosen.get("why")),
        }
    ref = reference.metrics[key] if reference else None
    return {
        "passed": bool(outcome.get("passed")), "message": outcome.get("message"),
        "failed_stage": _first(outcome.get("stage"), next((r.name for r in records if r.status == "failed"), None)),
        "shipped": shipped,
        "not_shipped_reason": None if file else _first(chosen.get("reason"), chosen.get("why"),
                                                       "the run did not reach the package stage"),
        "accuracy": accuracy(metric, reference.name if reference else None, ref, value),
        "speedup": _speedup(speedup, row or chosen) if file else None,
        "reduction": {key: _reduction(records, key, made_by) for key in MAC_CONVENTIONS},
        "widths": widths_summary(records),
        "on_target": chosen.get("on_target"),
        "preflight": package.get("preflight"),
        "engine_recipe": package.get("engine_recipe"),
        "not_executed": not_executed(records, latency),
        "not_reached": [name for name in stage_order if name not in {r.name for r in records}],
    }


def accuracy(metric: Metric, reference_stage: str | None, reference: float | None, shipped: float | None) -> dict:
    """The shipped figure against the reference's: ``reference_<metric>``, ``shipped_<metric>`` and the drop
    in the task's direction, keyed ``drop_<drop unit>`` (a classifier's ``drop_pt``) or ``drop``."""
    drop = None if reference is None or shipped is None else round(metric.worse_by(shipped, reference), 4)
    return {"reference_stage": reference_stage, f"reference_{metric.name}": reference,
            f"shipped_{metric.name}": shipped, drop_key(metric): drop}


def metric_of(report: dict) -> Metric:
    """report.json's task figure; a report written before it was recorded is a classifier's."""
    d = report.get("metric")
    return Metric.from_json(d) if isinstance(d, dict) else tasks.named("classify").describe()


def drop_key(metric: Metric) -> str:
    unit = metric.drop_unit.strip()
    return f"drop_{unit}" if unit else "drop"


def widths_summary(records: list[StageRecord]) -> dict | None:
    """How the pruned widths were chosen: searched (goal, verified speed, load while measuring, the
    picks the fine-tune tried) or replayed; None for ratio/MAC targets."""
    by = {r.name: r.metrics for r in records}
    p, f = by.get("prune") or {}, by.get("finetune") or {}
    if not p.get("widths"):
        return None
    search = p.get("latency_search") or {}
    out = {"source": p.get("widths_source"), "widths": f.get("widths") or p["widths"]}
    if search:
        out.update({k: search.get(k) for k in ("goal", "goal_mode", "goal_met", "measured_speedup",
                                               "measured_p10_p90", "processes", "load", "budget_s", "budget_spent",
                                               "seconds", "remeasured", "notes")})
        out["tried"] = f.get("tried")
        rung = f.get("rung")
        if rung:   # the fine-tune backed off: what ships is that rung, with its own verified speed
            r = p["ladder"][rung]
            out.update(measured_speedup=r["speedup"], measured_p10_p90=r["p10_p90"], goal_met=r["meets_goal"])
    return out


def _first(*values):
    return next((v for v in values if v is not None), None)


def _made_by(records: list[StageRecord], file: str | None) -> tuple[StageRecord | None, Artifact | None]:
    """The record and artifact that produced ``file`` (the bundle keeps the stage's file names)."""
    for r in reversed(records):
        for a in r.artifacts:
            if file and a.file == file:
                return r, a
    return None, None


def _latency_row(latency: list[dict], chosen: dict) -> dict | None:
    return next((r for r in latency if r.get("file") == chosen.get("file") and r.get("backend") ==
                 chosen.get("backend") and r.get("batch") == chosen.get("batch")), None)


def _speedup(rows: list[dict], shipped: dict) -> dict | None:
    """The shipped artifact's ratio against the unpruned reference on the same backend and batch."""
    row = next((r for r in rows if r.get("backend") == shipped.get("backend") and r.get("batch") ==
                shipped.get("batch") and (r.get("artifact") == shipped.get("artifact")
                                          or (r.get("file") and r.get("file") == shipped.get("file")))), None)
    if row is None:
        return None
    keys = ("artifact", "backend", "batch", "reference", "reference_p50_ms", "ratio_p50_ms", "p50_ms", "speedup",
            "speedup_p10",
            "speedup_p90", "processes", "reproducible", "parent", "vs_parent", "mac_ratio", "efficiency")
    return {**{k: row.get(k) for k in keys}, "caveats": caveats(row)}


def _reduction(records: list[StageRecord], key: str, made_by: StageRecord | None) -> dict:
    """The reference's count over the shipped artifact's (or, with nothing shipped, the last stage's)."""
    have = [r for r in records if r.metrics.get(key) is not None]
    ref = have[0] if have else None
    final = made_by if made_by is not None and made_by.metrics.get(key) is not None else (have[-1] if have else None)
    a = ref.metrics[key] if ref else None
    b = final.metrics[key] if final else None
    return {"label": MAC_CONVENTIONS[key], "reference_stage": ref.name if ref else None, "reference": a,
            "final_stage": final.name if final else None, "final": b,
            "ratio": round(a / b, 4) if a and b and final is not ref else None}
