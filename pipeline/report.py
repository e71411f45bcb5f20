"""report.json (the contract other tools read) and ``write_report``, which also writes report.md and the plots.

report.json keys (extended over time, never renamed):

* ``run``, ``target``, ``outcome`` ({passed, message?, stage?}), ``stage_order`` (the stage list's names);
* ``stages``: each {name, status, seconds, metrics, gate, artifacts, reason?} in stage order;
* ``latency``: the profile stage's rows, each {artifact, backend, batch, p50_ms, p90_ms, p99_ms,
  throughput_per_s, mean_ms, std_ms, file, precision, <metric>, size_bytes, role, ...}, where <metric>
  is the task's metric key (``metric.name``);
* ``speedup``: the profile stage's speedup rows (see pipeline.profile), each with ``caveats`` added
  here: why the ratio must not be read as a speedup (``oversubscribed``, ``reproducible`` false);
  empty for a profile record that recorded no ratios (absolute p50s are never divided here);
* ``flags`` (the speedup rows' ``flag`` texts: slower than the parent, oversubscribed, not
  reproducible), ``flag_tolerance``;
* ``environment``, ``skipped`` (what profiling did not measure, and why), ``libraries``, ``plots``
  (PNG names next to report.json), ``not_run_on_hardware``;
* ``metric``: the run's task figure (pipeline.records.Metric: kind, name, label, unit, drop_unit,
  higher_is_better, decimals, bounds, min_span); every ``<metric>`` key below is its ``name``;
* ``summary``: what shipped and why, accuracy drop, speedup vs the unpruned reference, MAC
  reduction in both conventions, the choice on the target, what did not execute here.

What it reads from stage metrics (missing keys are shown as missing, never guessed):
the profile stage (the record whose metrics hold ``latency``): ``latency``, ``speedup``,
``environment``, ``skipped`` (or ``not_measured``); speedup rows: artifact, backend, batch,
reference, reference_p50_ms, ratio_p50_ms, speedup, speedup_p10, speedup_p90, processes,
reproducible, oversubscribed, parent, vs_parent, slower_than_parent, mac_ratio, efficiency, flag. The package stage (the
record whose metrics hold ``chosen``, or the ``package`` argument): ``chosen`` {file, role,
reason (or why), backend, batch, p50_ms, <metric>, on_target}, ``preflight``, ``files``.
Every stage: ``task`` and its ``<metric>``, ``macs`` (conv/linear multiply-accumulates, as thop/fvcore count them),
``ops_tp`` (torch-pruning's op count, which adds bias adds and ReLUs), ``params``, ``size_bytes``.
"""
from __future__ import annotations

from pathlib import Path

from edgerun.io import atomic_write, write_json
from pipeline import tasks
from pipeline.errors import PipelineError
from pipeline.plots import write_plots
from pipeline.profile_speedup import GPU_BACKENDS, role
from pipeline.records import StageRecord
from pipeline.report_md import to_markdown
from pipeline.report_summary import caveats, not_executed, summary

LATENCY_KEYS = ("artifact", "backend", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "mean_ms",
                "std_ms", "file", "precision", "size_bytes")   # and the task's metric after precision
DEFAULT_TOLERANCE = 0.05


# ---------------------------------------------------------------- report.json

def build_report(records: list[StageRecord], cfg, *, stage_order: list[str], outcome: dict | None = None,
                 package: dict | None = None) -> dict:
    """report.json's content. ``records``: the run's stage records (a later record of a stage replaces an
    earlier one); ``stage_order``: the stage list's names; ``package``: the package stage's metrics when
    its record does not exist yet (the bundle's own report is written from inside that stage)."""
    recs = _ordered(records, stage_order)
    profile = next((r.metrics for r in recs if isinstance(r.metrics.get("latency"), list)), {})
    if package is None:
        package = next((r.metrics for r in recs if isinstance(r.metrics.get("chosen"), dict)), {})
    metric = tasks.of_run(recs).describe()
    latency = [_latency_row(row, metric.name) for row in profile.get("latency") or []]
    tolerance = float(getattr(getattr(cfg, "profile", None), "slower_tolerance", DEFAULT_TOLERANCE))
    # No fallback that divides the rows' p50s: times taken at different moments under different load
    # are not a ratio (pipeline.profile_speedup). A profile record without ratios gets none.
    speedup = [{**row, "caveats": caveats(row)} for row in profile.get("speedup") or []]
    environment = profile.get("environment")
    outcome = outcome or {"passed": all(r.status != "failed" for r in recs)}
    report = {
        "run": cfg.run.name, "target": cfg.run.target, "outcome": outcome, "stage_order": list(stage_order),
        "metric": metric.to_json(),
        "stages": [_stage_json(r) for r in recs], "latency": latency, "speedup": speedup,
        "flags": [s["flag"] for s in speedup if s.get("flag")], "flag_tolerance": tolerance,
        "environment": environment,
        "skipped": _first_list(profile.get("skipped"), profile.get("not_measured"),
                               (environment or {}).get("not_measured")),
        "libraries": _libraries(), "plots": [],
        "not_run_on_hardware": _not_run(recs, latency),
    }
    report["summary"] = summary(recs, latency, speedup, package, outcome, stage_order, metric)
    return report


def _ordered(records: list[StageRecord], stage_order: list[str]) -> list[StageRecord]:
    """The records in stage order; names outside ``stage_order`` follow, in the order given."""
    latest: dict[str, StageRecord] = {}
    for i, r in enumerate(records):
        if not isinstance(r, StageRecord):
            raise PipelineError(f"write_report: records[{i}] is a {type(r).__name__}, "
                                f"expected a pipeline.records.StageRecord")
        latest[r.name] = r
    rank = {name: i for i, name in enumerate(stage_order)}
    return sorted(latest.values(), key=lambda r: rank.get(r.name, len(rank)))


def _stage_json(r: StageRecord) -> dict:
    out = {"name": r.name, "status": r.status, "seconds": r.seconds, "cpu_seconds": r.cpu_seconds,
           "metrics": r.metrics, "gate": None if r.gate is None else r.gate.to_json(),
           "artifacts": [a.to_json() for a in r.artifacts]}
    if r.reason:
        out["reason"] = r.reason
    return out


def _latency_row(row: dict, metric: str) -> dict:
    """The contract's keys first (None where an older profile record lacks one), then the rest."""
    keys = (*LATENCY_KEYS[:LATENCY_KEYS.index("size_bytes")], metric, *LATENCY_KEYS[LATENCY_KEYS.index("size_bytes"):])
    out = {k: row.get(k) for k in keys}
    out.update({k: v for k, v in row.items() if k not in out})
    out["role"] = role(out)  # rows of older profile records carry no role
    return out


def _first_list(*values) -> list:
    return next((list(v) for v in values if v), [])


def _libraries() -> dict:
    from edgerun.machine import library_versions
    return library_versions()


def _not_run(records: list[StageRecord], latency: list[dict]) -> list[str]:
    notes = not_executed(records, latency)
    if any(b not in {r.get("backend") for r in latency} for b in GPU_BACKENDS):
        notes.append("The GPU profiling branches are written against the documented APIs and have not run on a GPU.")
    notes.append("Jetson power mode (nvpmodel -q) and clocks (jetson_clocks --show) are recorded only where those "
                 "commands exist.")
    return notes


# ---------------------------------------------------------------- writing

def write_report(folder, records: list[StageRecord], cfg, *, stage_order: list[str], outcome: dict | None = None,
                 package: dict | None = None) -> dict:
    """Writes report.json, report.md and the PNG plots into ``folder`` (each atomically); returns report.json."""
    folder = Path(folder)
    from pipeline.llm.report import decoder_section
    from pipeline.llm.report import to_markdown as decoder_markdown
    report = build_report(records, cfg, stage_order=stage_order, outcome=outcome, package=package)
    report["plots"] = write_plots(folder, report)
    from pipeline.vlm.report import to_markdown as vlm_markdown
    from pipeline.vlm.report import vlm_section
    extra = ""
    # a family's own figures and speeds (pipeline/llm/report.py, pipeline/vlm/report.py); None for the others
    for key, section, markdown in (("decoder", decoder_section, decoder_markdown), ("vlm", vlm_section, vlm_markdown)):
        found = section(records)
        if found is not None:
            report[key] = found
            extra += "\n" + markdown(found)
    write_json(folder / "report.json", report)
    atomic_write(folder / "report.md", to_markdown(report) + extra)
    return report
