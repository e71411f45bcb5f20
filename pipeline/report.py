"""report.json (the contract other tools read) and report.md (the same, for a person)."""
from __future__ import annotations

from pathlib import Path

from pipeline.runner import library_versions, write_json

STAGE_KEYS = ("name", "status", "seconds", "metrics", "gate")


def build(records: list[dict], cfg, outcome: dict | None = None) -> dict:
    stages = []
    for r in records:
        s = {k: r.get(k) for k in STAGE_KEYS}
        if r.get("reason"):
            s["reason"] = r["reason"]
        stages.append(s)
    profile = next((r for r in records if r["name"] == "profile"), None)
    latency = [{k: row[k] for k in ("artifact", "backend", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s",
                                    "mean_ms", "std_ms", "file", "precision", "top1", "size_bytes")}
               for row in (profile["metrics"]["latency"] if profile and profile.get("metrics") else [])]
    return {
        "run": cfg.run.name, "target": cfg.run.target,
        "outcome": outcome or {"passed": all(r["status"] != "failed" for r in records)},
        "stages": stages, "latency": latency,
        "environment": profile["metrics"].get("environment") if profile and profile.get("metrics") else None,
        "libraries": library_versions(),
        "not_run_on_hardware": _not_run(records),
    }


def _not_run(records: list[dict]) -> list[str]:
    engine = next((r for r in records if r["name"] == "engine"), None)
    notes = []
    if engine is None or engine["status"] == "skipped":
        notes.append("TensorRT engine build, engine accuracy gate and engine latency: not executed here "
                     "(no TensorRT/GPU); run deploy/build_engine.sh on the target.")
    notes.append("onnxruntime CUDA / TensorRT execution providers: measured only where present "
                 "(see the latency table's backend column).")
    return notes


def choose_variant(records: dict, latency: list[dict], package_cfg, shipped: set) -> dict:
    """The fastest shipped artifact on the target's backend that passed every gate."""
    passed = {name for name, r in records.items()
              if r["status"] != "failed" and (r.get("gate") is None or r["gate"]["passed"])}
    rows = [row for row in latency if row["backend"] == package_cfg.backend and row["batch"] == package_cfg.batch
            and row["file"] in shipped and row["stage"] in passed]
    if not rows:
        return {"file": None, "why": f"no artifact was measured on {package_cfg.backend} at batch "
                                     f"{package_cfg.batch} on this machine; build and measure on the target"}
    key = package_cfg.objective
    best = min(rows, key=lambda r: r[key])
    others = ", ".join(f"{r['file']} {r[key]:.4g}" for r in sorted(rows, key=lambda r: r[key]) if r is not best)
    return {"file": best["file"], "backend": best["backend"], "batch": best["batch"], key: best[key],
            "top1": best.get("top1"),
            "why": f"lowest {key} ({best[key]:.4g}) on {best['backend']} at batch {best['batch']} among "
                   f"gated artifacts" + (f"; others: {others}" if others else "")}


def _fmt(v, nd=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def to_markdown(report: dict) -> str:
    lines = [f"# Deployment report: {report['run']} (target {report['target']})", ""]
    o = report["outcome"]
    lines += [f"**{'PASSED' if o.get('passed') else 'FAILED'}**" + (f": {o['message']}" if o.get("message") else ""), ""]
    lines += ["## Stages", "", "| stage | status | seconds | top-1 % | MACs | params | size | gate |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for s in report["stages"]:
        m, g = s.get("metrics") or {}, s.get("gate")
        if g:
            gate = (f"{'pass' if g['passed'] else 'FAIL'}{' (warn)' if g.get('mode') == 'warn' else ''}: "
                    f"drop {_fmt(g.get('drop'), 3)} ≤ {g.get('max_drop')}")
            extra = [c for c in g.get("checks", [])[1:]]
            gate += "".join(f"; {c['metric']} {_fmt(c['value'], 6)} {c['limit']}" for c in extra)
        else:
            gate = s.get("reason") or "–"
        size = m.get("size_bytes")
        lines.append(f"| {s['name']} | {s['status']} | {_fmt(s.get('seconds'), 1)} | {_fmt(m.get('top1'))} | "
                     f"{_fmt(m.get('macs'))} | {_fmt(m.get('params'))} | "
                     f"{_fmt(size / 1024, 1) + ' KiB' if size else '–'} | {gate} |")
    if report["latency"]:
        env = report.get("environment") or {}
        lines += ["", "## Latency", "", f"CPU: {env.get('cpu')}, threads: {env.get('threads')}.", "",
                  "| artifact | backend | batch | p50 ms | p90 ms | p99 ms | throughput/s |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in report["latency"]:
            lines.append(f"| {r['artifact']} | {r['backend']} | {r['batch']} | {r['p50_ms']:.3f} | "
                         f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['throughput_per_s']:.0f} |")
    chosen = next((s["metrics"].get("chosen") for s in report["stages"] if s["name"] == "package" and s.get("metrics")), None)
    if chosen:
        lines += ["", "## Shipped variant", "", f"`{chosen.get('file')}`: {chosen.get('why')}"]
    lines += ["", "## Not executed on real hardware", ""] + [f"- {n}" for n in report["not_run_on_hardware"]]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, records: list[dict], cfg, outcome: dict | None = None) -> dict:
    report = build(records, cfg, outcome)
    write_json(folder / "report.json", report)
    tmp = folder / "report.md.tmp"
    tmp.write_text(to_markdown(report))
    tmp.replace(folder / "report.md")
    return report
