"""What to ship: the fastest (or smallest) measured artifact that passed every gate on its path.

The package stage calls ``choose_variant``; the report only shows what it chose.
"""
from __future__ import annotations

from pipeline import report_fmt as fmt
from pipeline import tasks
from pipeline.records import StageRecord


def _why_failed(rec: StageRecord) -> str:
    if rec.gate is None:
        return f"{rec.name} failed"
    failed = [c for c in rec.gate.checks if not c]
    parts = [fmt.check_text(c) for c in failed]
    if rec.gate.mode == "warn":
        parts.append("warn-only gate")
    return f"{rec.name} gate failed" + (f" ({'; '.join(parts)})" if parts else "")


def _only_int8(rec: StageRecord) -> bool:
    models = [a for a in rec.artifacts if a.kind in ("torch", "onnx", "engine")]
    return bool(models) and all(a.precision == "int8" for a in models)


def gate_failures(records: list[StageRecord], stage: str, precision: str | None) -> list[str]:
    """Why an artifact made by ``stage`` may not ship: that stage's own gate did not pass (fail or
    warn mode), or a stage before it in the run failed.

    An earlier warn-only gate that failed (prune's, by default) does not count: later gates measure
    accuracy again (fine-tuning exists to recover what pruning lost). An earlier stage whose
    artifacts are all INT8 is not on the path of an FP32/FP16 artifact (an engine built from the
    FP32 ONNX does not depend on quantization).
    """
    names = [r.name for r in records]
    if stage not in names:
        return []
    i = names.index(stage)
    own = records[i]
    bad = [_why_failed(r) for r in records[:i]
           if r.status == "failed" and not (precision != "int8" and _only_int8(r))]
    if own.status == "failed" or (own.gate is not None and not own.gate.passed):
        bad.append(_why_failed(own))
    return bad


def _objective_text(key: str, v) -> str:
    return fmt.kib(v) if key == "size_bytes" else fmt.ms(v)


def choose_variant(records: list[StageRecord], latency_rows: list[dict], package_cfg, shipped: set[str]) -> dict:
    """The best shipped artifact on the target's backend that passed every gate on its path.

    ``records``: the run's stage records in stage order. "Best" is the lowest ``package_cfg.objective``
    (p50_ms, p99_ms or size_bytes) at ``package_cfg.batch`` on ``package_cfg.backend``; ties go to the
    lower p50, then the smaller file. The returned ``why`` names the winner's margin over the
    runner-up and what was left out and why.
    """
    key, backend, batch = package_cfg.objective, package_cfg.backend, package_cfg.batch
    rows = [row for row in latency_rows if row.get("backend") == backend and row.get("batch") == batch
            and row.get("file") in shipped]
    excluded, candidates = [], []
    for row in rows:
        bad = gate_failures(records, row.get("stage", ""), row.get("precision"))
        if bad:
            excluded.append({"file": row["file"], "reason": "; ".join(bad)})
        elif row.get(key) is None:
            excluded.append({"file": row["file"], "reason": f"no {key} recorded"})
        else:
            candidates.append(row)
    measured = {row["file"] for row in rows}
    for f in sorted(shipped - measured):
        excluded.append({"file": f, "reason": f"not measured on {backend} at batch {batch} here"})
    if not candidates:
        what = (f"no shipped artifact that passed every gate was measured on {backend} at batch {batch} "
                f"on this machine")
        if excluded:
            what += "; left out: " + "; ".join(f"{e['file']} ({e['reason']})" for e in excluded)
        return {"file": None, "objective": key, "backend": backend, "batch": batch, "excluded": excluded,
                "why": what + "; build and measure on the target"}
    ranked = sorted(candidates, key=lambda r: (r[key], r.get("p50_ms") or 0.0, r.get("size_bytes") or 0))
    best = ranked[0]
    why = (f"{best['file']} ({best.get('artifact')}) has the lowest {key}, {_objective_text(key, best[key])}, "
           f"on {backend} at batch {batch} among {len(ranked)} shipped artifact"
           f"{'s' if len(ranked) != 1 else ''} that passed every gate")
    if len(ranked) > 1:
        why += "; " + _runner_up(key, best, ranked[1])
        if len(ranked) > 2:
            why += "; then " + ", ".join(f"{r['file']} {_objective_text(key, r[key])}" for r in ranked[2:])
    m = tasks.of_run(records).describe()
    if best.get(m.name) is not None:
        why += f". Its {m.label} is {m.text(best[m.name])}"
        short = m.worse_by(best[m.name], m.best(r.get(m.name) for r in ranked))
        if short > 0:
            why += f" ({m.diff(short)} below the most accurate candidate, within its gates)"
    if key != "size_bytes" and best.get("size_bytes"):
        why += f"; file {fmt.kib(best['size_bytes'])}"
    if excluded:
        why += ". Left out: " + "; ".join(f"{e['file']} ({e['reason']})" for e in excluded)
    return {"file": best["file"], "artifact": best.get("artifact"), "role": best.get("role"),
            "backend": best["backend"], "batch": best["batch"], "objective": key, key: best[key],
            "p50_ms": best.get("p50_ms"), "p99_ms": best.get("p99_ms"), "size_bytes": best.get("size_bytes"),
            m.name: best.get(m.name),
            "candidates": [{"file": r["file"], key: r[key], m.name: r.get(m.name)} for r in ranked],
            "excluded": excluded, "why": why + "."}


def _runner_up(key: str, best: dict, second: dict) -> str:
    """The runner-up and the margin, saying when the margin is within the measurement's noise."""
    margin = second[key] / best[key] if best[key] else float("inf")
    text = f"runner-up {second['file']} {_objective_text(key, second[key])} ({fmt.ratio(margin)}"
    if key != "size_bytes":
        noise = max((r.get("p50_spread_pct") or 0.0) for r in (best, second)) / 100.0
        if margin - 1.0 <= max(noise, 0.05):
            text += (f", within measurement noise: the p50s of the rounds spread by {noise * 100:.0f} %; "
                     f"measure on the target before relying on the order" if noise > 0.05 else
                     ", within 5 %: practically a tie")
    return text + ")"
