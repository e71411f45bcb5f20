"""report.json (the contract other tools read), report.md (the same, for a person) and its plots.

report.json keys: ``run``, ``target``, ``outcome``, ``stages`` (each {name, status, seconds, metrics,
gate}), ``latency`` (each {artifact, backend, batch, p50_ms, p90_ms, p99_ms, throughput_per_s, ...}),
``speedup`` (realized speedup vs the baseline beside the MAC ratio, see pipeline.profile.speedup_table),
``flags`` (the speedup rows slower than their parent), ``environment``, ``libraries``, ``plots`` (PNG
file names next to report.json) and ``not_run_on_hardware``.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.profile import BACKEND_ORDER, GPU_BACKENDS, ROLE_ORDER, role, speedup_table
from pipeline.runner import library_versions, write_json

STAGE_KEYS = ("name", "status", "seconds", "metrics", "gate")
LATENCY_KEYS = ("artifact", "backend", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "mean_ms",
                "std_ms", "file", "precision", "top1", "size_bytes")
GATED_ORDER = ("baseline", "prune", "finetune", "export_onnx", "quantize", "engine")
PLOTS = {"plot_pareto.png": "Top-1 vs p50 latency at the smallest batch (the Pareto view)",
         "plot_latency.png": "p50 latency per artifact and batch (whisker: p99)",
         "plot_stages.png": "MACs, parameters and file size per stage / artifact"}
DEFAULT_TOLERANCE = 0.05


# ---------------------------------------------------------------- report.json

def build(records: list[dict], cfg, outcome: dict | None = None) -> dict:
    stages = []
    for r in records:
        s = {k: r.get(k) for k in STAGE_KEYS}
        if r.get("reason"):
            s["reason"] = r["reason"]
        stages.append(s)
    profile = next((r for r in records if r["name"] == "profile"), None)
    pm = (profile or {}).get("metrics") or {}
    latency = [_latency_row(row) for row in pm.get("latency") or []]
    tolerance = _tolerance(cfg)
    speedup = speedup_table(latency, tolerance) if latency else []
    return {
        "run": cfg.run.name, "target": cfg.run.target,
        "outcome": outcome or {"passed": all(r["status"] != "failed" for r in records)},
        "stages": stages, "latency": latency,
        "speedup": speedup,
        "flags": [s["flag"] for s in speedup if s.get("flag")],
        "flag_tolerance": tolerance,
        "environment": pm.get("environment"),
        "libraries": library_versions(),
        "plots": [],
        "not_run_on_hardware": _not_run(records, latency),
    }


def _tolerance(cfg) -> float:
    return float(getattr(getattr(cfg, "profile", None), "slower_tolerance", DEFAULT_TOLERANCE))


def _latency_row(row: dict) -> dict:
    """The contract's keys first (None where an older profile record lacks one), then the rest."""
    out = {k: row.get(k) for k in LATENCY_KEYS}
    out.update({k: v for k, v in row.items() if k not in out})
    out.setdefault("role", role(row))
    if out.get("role") is None:
        out["role"] = role(row)
    return out


def _not_run(records: list[dict], latency: list[dict]) -> list[str]:
    engine = next((r for r in records if r["name"] == "engine"), None)
    notes = []
    if engine is None or engine["status"] == "skipped":
        notes.append("TensorRT engine build, engine accuracy gate and engine latency: not executed here "
                     "(no TensorRT/GPU); run deploy/build_engine.sh on the target.")
    measured = {r["backend"] for r in latency}
    missing = [b for b in GPU_BACKENDS if b not in measured]
    if missing:
        notes.append(f"Latency on {', '.join(missing)}: not measured (backend not present on this machine). "
                     "Those profiling branches are written against the documented APIs and have not run on a GPU.")
    notes.append("Jetson power mode (nvpmodel -q) and clocks (jetson_clocks --show) are recorded only where those "
                 "commands exist.")
    return notes


# ---------------------------------------------------------------- the shipped variant

def _gate_failures(records: dict, stage: str, precision: str | None) -> list[str]:
    """Why an artifact may not ship: its own stage's gate did not pass (fail or warn mode), or a stage
    it was made from failed. An upstream warn-only gate (prune's, by default) does not count: the
    later gates measure accuracy again (fine-tuning exists to recover what pruning lost)."""
    if stage in GATED_ORDER:
        path = list(GATED_ORDER[:GATED_ORDER.index(stage) + 1])
        if stage == "engine" and precision != "int8":
            path.remove("quantize")
    else:
        path = [stage]
    bad = []
    for name in path:
        r = records.get(name)
        if not r:
            continue
        g = r.get("gate")
        own = name == stage
        if r.get("status") == "failed" or (own and g is not None and not g.get("passed")):
            why = f"{name} {'gate failed' if g else 'failed'}"
            if g:
                failed = [c for c in g.get("checks") or [g] if not c.get("passed")]
                parts = [f"{c['metric']} drop {c['drop']:.3g} > {c.get('max_drop')}" if c.get("drop") is not None
                         else f"{c['metric']} {c.get('value')} violates {c.get('limit')}" for c in failed]
                if g.get("mode") == "warn":
                    parts.append("mode warn")
                why += f" ({', '.join(parts)})" if parts else ""
            bad.append(why)
    return bad


def _fmt_objective(key: str, v) -> str:
    if v is None:
        return "–"
    if key == "size_bytes":
        return f"{v / 1024:.1f} KiB"
    return f"{v:.4g} ms"


def choose_variant(records: dict, latency: list[dict], package_cfg, shipped: set) -> dict:
    """The best shipped artifact on the target's backend that passed every gate on its path.

    "Best" is the lowest ``package_cfg.objective`` (p50_ms, p99_ms or size_bytes) at
    ``package_cfg.batch`` on ``package_cfg.backend``; ties go to the lower p50, then the smaller file.
    The returned ``why`` names the winner's margin over the runner-up and what was left out and why.
    """
    key, backend, batch = package_cfg.objective, package_cfg.backend, package_cfg.batch
    rows = [row for row in latency if row["backend"] == backend and row["batch"] == batch
            and row["file"] in shipped]
    excluded, candidates = [], []
    for row in rows:
        bad = _gate_failures(records, row.get("stage", ""), row.get("precision"))
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
    why = (f"{best['file']} ({best.get('artifact')}) has the lowest {key}, {_fmt_objective(key, best[key])}, "
           f"on {backend} at batch {batch} among {len(ranked)} shipped artifact"
           f"{'s' if len(ranked) != 1 else ''} that passed every gate")
    if len(ranked) > 1:
        second = ranked[1]
        margin = second[key] / best[key] if best[key] else float("inf")
        noise = max((r.get("p50_spread_pct") or 0.0) for r in (best, second)) / 100.0 if key != "size_bytes" else 0.0
        close = ""
        if key != "size_bytes" and margin - 1.0 <= max(noise, 0.05):
            close = (f", within measurement noise: the p50s of the rounds spread by {noise * 100:.0f} %; "
                     f"measure on the target before relying on the order" if noise > 0.05 else
                     ", within 5 %: practically a tie")
        why += f"; runner-up {second['file']} {_fmt_objective(key, second[key])} ({margin:.2f}x{close})"
        if len(ranked) > 2:
            why += "; then " + ", ".join(f"{r['file']} {_fmt_objective(key, r[key])}" for r in ranked[2:])
    if best.get("top1") is not None:
        why += f". Its top-1 is {best['top1']:.2f} %"
        best_top1 = max((r.get("top1") for r in ranked if r.get("top1") is not None), default=None)
        if best_top1 is not None and best_top1 > best["top1"]:
            why += f" ({best_top1 - best['top1']:.2f} pt below the most accurate candidate, within its gates)"
    if key != "size_bytes" and best.get("size_bytes"):
        why += f"; file {best['size_bytes'] / 1024:.1f} KiB"
    if excluded:
        why += ". Left out: " + "; ".join(f"{e['file']} ({e['reason']})" for e in excluded)
    return {"file": best["file"], "artifact": best.get("artifact"), "backend": best["backend"],
            "batch": best["batch"], "objective": key, key: best[key], "p50_ms": best.get("p50_ms"),
            "p99_ms": best.get("p99_ms"), "size_bytes": best.get("size_bytes"), "top1": best.get("top1"),
            "candidates": [{"file": r["file"], key: r[key], "top1": r.get("top1")} for r in ranked],
            "excluded": excluded, "why": why + "."}


# ---------------------------------------------------------------- report.md

def _fmt(v, nd=2):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _x(v):
    return "–" if v is None else f"{v:.2f}×"


def _ms(v):
    return "–" if v is None else (f"{v:.3f}" if v < 100 else f"{v:.1f}")


def _kib(b):
    return "–" if not b else (f"{b / 1024:.1f} KiB" if b < 10 * 2**20 else f"{b / 2**20:.1f} MiB")


def to_markdown(report: dict) -> str:
    lines = [f"# Deployment report: {report['run']} (target {report['target']})", ""]
    o = report["outcome"]
    lines += [f"**{'PASSED' if o.get('passed') else 'FAILED'}**" + (f": {o['message']}" if o.get("message") else ""), ""]
    lines += _stages_md(report)
    if report.get("latency"):
        lines += _environment_md(report.get("environment") or {})
        lines += _latency_md(report)
        lines += _speedup_md(report)
    plots = report.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            lines += [f"![{PLOTS.get(p, p)}]({p})", "", f"*{PLOTS.get(p, p)}.*", ""]
    chosen = next((s["metrics"].get("chosen") for s in report["stages"] if s["name"] == "package" and s.get("metrics")), None)
    if chosen:
        lines += ["", "## Shipped variant", "", f"`{chosen.get('file')}`: {chosen.get('why')}"]
    lines += ["", "## Not executed on real hardware", ""] + [f"- {n}" for n in report["not_run_on_hardware"]]
    return "\n".join(lines) + "\n"


def _stages_md(report: dict) -> list[str]:
    lines = ["## Stages", "", "| stage | status | seconds | top-1 % | MACs | params | size | gate |",
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
    return lines


def _environment_md(env: dict) -> list[str]:
    lines = ["", "## Environment", ""]
    lines.append(f"- CPU: {env.get('cpu')}; {env.get('cores')} logical cores"
                 + (f" ({env['physical_cores']} physical)" if env.get("physical_cores") else "")
                 + (f", {env['affinity_cores']} usable by this process" if env.get("affinity_cores") else ""))
    lines.append(f"- Threads: torch {env.get('torch_threads', '–')}, onnxruntime intra-op "
                 f"{env.get('ort_intra_op_threads', env.get('threads'))} (profile.threads / run.threads; 0 = default)")
    if env.get("load_avg_start") is not None:
        lines.append(f"- Load average (1/5/15 min) at start {env['load_avg_start']}, at end {env.get('load_avg_end')}:"
                     " other work on the machine inflates and spreads the numbers")
        busy = _oversubscribed(env)
        if busy:
            lines.append(f"- **⚠ {busy}**")
    libs = env.get("libraries") or {}
    if libs:
        lines.append("- Libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items()))
    if env.get("ort_providers"):
        lines.append(f"- onnxruntime providers: {', '.join(env['ort_providers'])}")
    lines.append(f"- GPU: {_kv(env['gpu']) if env.get('gpu') else 'none found'}")
    j = env.get("jetson")
    if j:
        lines.append(f"- Jetson: L4T {j.get('l4t_release') or '–'}; power mode: "
                     f"{(j.get('nvpmodel') or 'nvpmodel not found').splitlines()[0] if j.get('nvpmodel') else 'nvpmodel not found'}")
        if j.get("jetson_clocks"):
            lines += ["", "  ```", *["  " + ln for ln in j["jetson_clocks"].splitlines()[:20]], "  ```"]
    m = env.get("method") or {}
    if m:
        lines.append(f"- Method: {m.get('warmup')} warm-up calls, then {m.get('iters')} timed calls"
                     + (f" or {m['time_budget_s']} s" if m.get("time_budget_s") else "")
                     + f" per artifact × backend × batch, split into {m.get('rounds')} interleaved round(s); "
                     f"{m.get('timer')}; input {m.get('input')}; throughput = {m.get('throughput')}")
    if env.get("copies_included"):
        lines.append(f"- {env['copies_included']}")
    lines.append(f"- Peak resident memory of the profiling process: {_fmt(env.get('peak_rss_mb'), 1)} MiB")
    return lines


def _oversubscribed(env: dict) -> str | None:
    """A warning when more work was runnable than there were cores while profiling."""
    cores = env.get("affinity_cores") or env.get("cores") or 0
    loads = [v for key in ("load_avg_start", "load_avg_end") for v in (env.get(key) or [])[:1]]
    if not cores or not loads or max(loads) <= cores:
        return None
    return (f"The machine was oversubscribed while profiling (1-min load average up to {max(loads):.1f} on {cores} "
            f"cores): every number here is inflated and noisy. Multi-threaded torch suffers most (its OpenMP "
            f"threads wait for each other at every operator: on a busy 2-core machine this project measured 128 ms "
            f"instead of 0.35 ms per call for the MNIST CNN with 2 torch threads). Profile on a quiet machine, or set profile.threads = 1 to compare artifacts.")


def _kv(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if v is not None)


def _latency_md(report: dict) -> list[str]:
    env = report.get("environment") or {}
    lines = ["", "## Latency", "",
             "| artifact | backend | batch | p50 ms | p90 ms | p99 ms | mean ± std ms | throughput/s | calls | "
             "round spread | RSS Δ MiB | size |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(report["latency"], key=_order):
        spread = r.get("p50_spread_pct")
        mem = r.get("rss_delta_mb")
        if r.get("gpu_mb") is not None:
            mem = f"{_fmt(mem, 1)} (GPU {_fmt(r['gpu_mb'], 1)})"
        lines.append(f"| {r['artifact']} | {r['backend']} | {r['batch']} | {_ms(r['p50_ms'])} | {_ms(r.get('p90_ms'))} | "
                     f"{_ms(r['p99_ms'])} | {_ms(r.get('mean_ms'))} ± {_ms(r.get('std_ms'))} | "
                     f"{r['throughput_per_s']:,.0f} | {_fmt(r.get('iters'))} | "
                     f"{'–' if spread is None else f'{spread:.1f} %'} | "
                     f"{mem if isinstance(mem, str) else _fmt(mem, 1)} | {_kib(r.get('size_bytes'))} |")
    lines += ["", "*calls*: timed calls pooled over the rounds; *round spread*: (max − min) of the per-round p50s "
              "over the p50. *RSS Δ*: growth of the process's resident memory from just before the model/session "
              "was created to after its warm-up at that batch (psutil RSS; approximate: allocator caches, "
              "onnxruntime's arena, memory reused from earlier artifacts). With few calls p99 is close to the "
              "slowest call."]
    if (env.get("not_measured")):
        lines += ["", "Not measured:", ""]
        lines += [f"- {n['artifact']} on {n['backend']}" + (f" at batch {n['batch']}" if n.get("batch") else "")
                  + f": {n['reason']}" for n in env["not_measured"]]
    return lines


def _speedup_md(report: dict) -> list[str]:
    rows = report.get("speedup") or []
    if not rows:
        return []
    tol = report.get("flag_tolerance", DEFAULT_TOLERANCE)
    lines = ["", "## Realized speedup", "",
             "Speedup = the reference's p50 / the artifact's p50 at the same batch (> 1× is faster). The reference "
             "is the unpruned baseline in the same backend family on the same backend (torch models: the torch "
             "baseline; ONNX files: the baseline exported to ONNX fp32 in the profile stage). *vs torch-cpu* is the "
             "ratio to the unpruned torch model on torch-cpu. *Ideal* is the MAC ratio (baseline MACs / artifact "
             "MACs), what pruning would give if latency followed MACs; *realized/ideal* is their quotient. "
             f"*vs parent*: against the artifact it was made from (pruned vs unpruned, fp16/int8 vs fp32); "
             f"flagged ⚠ when more than {tol * 100:.0f} % slower. A realized/ideal far above 100 % (marked ?) usually "
             "means the reference was slowed by noise (see the latency table's round spread); sometimes the smaller "
             "model fits a cache.", ""]
    flags = [r for r in rows if r.get("flag")]
    if flags:
        lines += ["**Slower than their parent:**", ""] + [f"- ⚠ {r['artifact']}: {r['flag']}" for r in flags] + [""]
    else:
        lines += ["No artifact is slower than its parent.", ""]
    lines += ["| artifact | backend | batch | p50 ms | reference | speedup | vs torch-cpu | ideal (MACs) | "
              "realized/ideal | parent | vs parent |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        parent = "–" if not r.get("parent") else r["parent"]
        vsp = _x(r.get("vs_parent")) + (" ⚠" if r.get("slower_than_parent") else "")
        eff = r.get("efficiency")
        lines.append(f"| {r['artifact']} | {r['backend']} | {r['batch']} | {_ms(r['p50_ms'])} | "
                     f"{r.get('reference') or '–'} | {_x(r.get('speedup'))} | {_x(r.get('vs_torch_cpu'))} | "
                     f"{_x(r.get('mac_ratio'))} | {'–' if eff is None else f'{eff * 100:.0f} %' + (' ?' if eff > 1.25 else '')} | {parent} | {vsp} |")
    return lines


def _order(r):
    rl = r.get("role") or role(r)
    return (BACKEND_ORDER.index(r["backend"]) if r["backend"] in BACKEND_ORDER else 99,
            ROLE_ORDER.index(rl) if rl in ROLE_ORDER else 99, r["artifact"], r["batch"])


# ---------------------------------------------------------------- plots

def write_plots(folder: Path, report: dict) -> list[str]:
    """PNG plots next to report.md (matplotlib's Agg canvas, no display); returns the names written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (Agg, headless)
        from matplotlib.figure import Figure  # noqa: F401
    except Exception:
        return []
    written = []
    for name, fn in (("plot_pareto.png", _plot_pareto), ("plot_latency.png", _plot_latency),
                     ("plot_stages.png", _plot_stages)):
        try:
            fig = fn(report)
        except Exception as e:  # a plot must never fail the run
            report.setdefault("plot_errors", []).append(f"{name}: {type(e).__name__}: {e}")
            continue
        if fig is None:
            continue
        _save(fig, Path(folder) / name)
        written.append(name)
    return written


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _short(label: str) -> str:
    return (label.replace(" (torch)", "").replace(" (onnxruntime Q/DQ)", "").replace(" (tensorrt Q/DQ)", "")
            .replace("pruned + fine-tuned", "pruned"))


COLORS = {"torch-cpu": "#1f77b4", "onnxruntime-cpu": "#ff7f0e", "torch-cuda": "#2ca02c",
          "onnxruntime-cuda": "#d62728", "onnxruntime-tensorrt": "#9467bd", "tensorrt": "#8c564b"}


def _chosen(report: dict) -> dict:
    return next((s["metrics"].get("chosen") or {} for s in report["stages"]
                 if s["name"] == "package" and s.get("metrics")), {})


def _lead(v: float) -> int:
    """The leading digit of a positive number (minor log ticks 2, 3, 5 get labels)."""
    import math
    return int(round(v / 10 ** math.floor(math.log10(v)))) if v > 0 else 0


def _label_offsets(points: list[tuple[float, float]]) -> list[float]:
    """Vertical label offsets (points) so that labels of nearby markers do not overlap.

    ``points`` are (log10 latency, top-1); a label is moved to the next free slot (6, -12, -24, 18, ...
    points, downwards first) when an earlier label sits within ~12 % of the x span and ~6 % of the y span with that slot.
    """
    if not points:
        return []
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xr, yr = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    slots = [6.0, -12.0, -24.0, 18.0, -36.0, 30.0, -48.0]
    placed: list[tuple[float, float, float]] = []
    out = []
    for x, y in points:
        u, v = (x - min(xs)) / xr, (y - min(ys)) / yr
        for off in slots:
            # a slot is taken if a close label already uses it (offsets turned into data-ish units)
            if not any(abs(u - pu) < 0.12 and abs((v + off / 300.0) - (pv + po / 300.0)) < 0.05
                       for pu, pv, po in placed):
                break
        placed.append((u, v, off))
        out.append(off)
    return out


def _plot_pareto(report: dict):
    import math

    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
    lat = [r for r in report.get("latency") or [] if r.get("top1") is not None and r.get("p50_ms")]
    if not lat:
        return None
    b = min(r["batch"] for r in lat)
    rows = sorted((r for r in lat if r["batch"] == b), key=lambda r: r["p50_ms"])
    chosen = _chosen(report)
    fig = Figure(figsize=(9, 5.2))
    ax = fig.add_subplot()
    backends = sorted({r["backend"] for r in rows}, key=lambda x: BACKEND_ORDER.index(x) if x in BACKEND_ORDER else 99)
    for backend in backends:
        pts = [r for r in rows if r["backend"] == backend]
        color = COLORS.get(backend, "#333333")
        ax.scatter([r["p50_ms"] for r in pts], [r["top1"] for r in pts], s=55, color=color, label=backend, zorder=3)
        front, best = [], float("-inf")
        for r in pts:  # sorted by latency: a point is on the front if more accurate than every faster one
            if r["top1"] > best:
                front.append(r)
                best = r["top1"]
        if len(front) > 1:
            ax.step([r["p50_ms"] for r in front], [r["top1"] for r in front], where="post", color=color,
                    alpha=0.5, linestyle="--", zorder=2)
    offsets = _label_offsets([(math.log10(r["p50_ms"]), r["top1"]) for r in rows])
    for r, off in zip(rows, offsets):
        color = COLORS.get(r["backend"], "#333333")
        ax.annotate(_short(r["artifact"]), (r["p50_ms"], r["top1"]), textcoords="offset points",
                    xytext=(7, off), fontsize=8, color=color)
        if chosen.get("file") == r.get("file") and chosen.get("backend") == r["backend"] and chosen.get("batch") == b:
            ax.scatter([r["p50_ms"]], [r["top1"]], s=220, facecolors="none", edgecolors="black", zorder=4,
                       label=f"shipped ({chosen['file']})")
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.2)
    span = math.log10(max(r["p50_ms"] for r in rows)) - math.log10(min(r["p50_ms"] for r in rows))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if span <= 1.5 and _lead(v) in (2, 3, 5) else ""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(f"p50 latency at batch {b} (ms, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"Accuracy vs latency at batch {b}: up and to the left is better (dashed: Pareto front)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def _plot_latency(report: dict):
    """A dot per artifact x backend at its p50, a line to its p99, a tick at p90; log scale over wide ranges."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
    lat = sorted(report.get("latency") or [], key=_order)
    if not lat:
        return None
    batches = sorted({r["batch"] for r in lat})
    keys = list(dict.fromkeys((r["artifact"], r["backend"]) for r in lat))
    fig = Figure(figsize=(4.2 * len(batches) + 2.5, 0.42 * len(keys) + 1.8))
    axes = fig.subplots(1, len(batches), sharey=True, squeeze=False)[0]
    by = {(r["artifact"], r["backend"], r["batch"]): r for r in lat}
    for ax, b in zip(axes, batches):
        here = [(y, by[(a, k, b)], COLORS.get(k, "#333333")) for y, (a, k) in enumerate(keys) if (a, k, b) in by]
        lo = min(r["p50_ms"] for _, r, _ in here)
        hi = max(r["p99_ms"] for _, r, _ in here)
        log = hi / max(lo, 1e-9) > 20
        for y, r, c in here:
            ax.plot([r["p50_ms"], r["p99_ms"]], [y, y], color=c, linewidth=1.5, alpha=0.7)
            if r.get("p90_ms") is not None:
                ax.plot([r["p90_ms"]], [y], marker="|", markersize=10, color=c)
            ax.plot([r["p50_ms"]], [y], marker="o", markersize=7, color=c)
            ax.annotate(f"{r['p50_ms']:.3g}", (r["p99_ms"], y), textcoords="offset points", xytext=(5, -3),
                        fontsize=7)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlim(lo / 1.6, hi * 4)
        else:
            ax.set_xlim(0, hi * 1.3)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("ms" + (" (log scale)" if log else "") + ": dot p50, tick p90, line end p99")
        ax.grid(True, axis="x", which="major", alpha=0.3)
    axes[0].set_yticks(list(range(len(keys))))
    axes[0].set_yticklabels([f"{_short(a)} [{k}]" for a, k in keys], fontsize=8)
    axes[0].set_ylim(len(keys) - 0.5, -0.5)
    fig.suptitle("Latency per artifact and backend (label: p50 ms)")
    return fig


def _stage_items(report: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    by = {s["name"]: s for s in report["stages"]}
    items = []

    def m(name):
        s = by.get(name)
        return (s.get("metrics") or {}) if s and s.get("status") not in ("skipped",) else None

    for name, label in (("baseline", "baseline"), ("prune", "pruned"), ("finetune", "fine-tuned")):
        x = m(name)
        if x:
            items.append((label, x.get("macs"), x.get("params"), x.get("size_bytes")))
    x = m("export_onnx")
    if x:
        items.append(("ONNX fp32", x.get("macs"), x.get("params"), x.get("size_bytes")))
        if isinstance(x.get("fp16"), dict):
            items.append(("ONNX fp16", x.get("macs"), x.get("params"), x["fp16"].get("size_bytes")))
    x = m("quantize")
    if x:
        items.append(("ONNX int8", x.get("macs"), x.get("params"), x.get("size_bytes")))
    x = m("engine")
    if x:
        items.append(("TRT engine", None, None, x.get("size_bytes")))
    return items


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _plot_stages(report: dict):
    from matplotlib.figure import Figure
    items = _stage_items(report)
    if not items:
        return None
    fig = Figure(figsize=(13, 0.45 * len(items) + 2.0))
    axes = fig.subplots(1, 3, sharey=True)
    labels = [i[0] for i in items]
    ys = list(range(len(items)))
    for ax, idx, title, scale, unit in ((axes[0], 1, "MACs", 1e6, "M"), (axes[1], 2, "parameters", 1e3, "K"),
                                        (axes[2], 3, "file size", 1024, "KiB")):
        vals = [(i[idx] or 0) / scale for i in items]
        ax.barh(ys, vals, color=["#7f7f7f" if j == 0 else "#1f77b4" for j in range(len(items))])
        base = vals[0] if vals and vals[0] else None
        for y, v in zip(ys, vals):
            if v:
                rel = f" ({v / base:.0%})" if base and y else ""
                ax.text(v, y, f" {_num(v)} {unit}{rel}", va="center", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel(unit)
        ax.set_xlim(0, max(vals + [1e-9]) * 1.45)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()
    fig.suptitle("What each stage left: MACs, parameters, file size (percent of the baseline)")
    return fig


# ---------------------------------------------------------------- writing

def write_report(folder: Path, records: list[dict], cfg, outcome: dict | None = None) -> dict:
    folder = Path(folder)
    report = build(records, cfg, outcome)
    report["plots"] = write_plots(folder, report)
    write_json(folder / "report.json", report)
    tmp = folder / "report.md.tmp"
    tmp.write_text(to_markdown(report))
    os.replace(tmp, folder / "report.md")
    return report
