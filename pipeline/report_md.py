"""report.md: report.json for a person. The summary comes first, then the tables that back it."""
from __future__ import annotations

from pipeline import report_fmt as fmt
from pipeline.plots import caption, row_order
from pipeline.records import GateResult, Metric
from pipeline.report_summary import MAC_CONVENTIONS, drop_key, metric_of


def to_markdown(report: dict) -> str:
    o = report["outcome"]
    lines = [f"# Deployment report: {report['run']} (target {report['target']})", "",
             f"**{'PASSED' if o.get('passed') else 'FAILED'}**" + (f": {o['message']}" if o.get("message") else ""),
             ""]
    lines += summary_md(report)
    lines += _stages_md(report)
    if report.get("latency"):
        lines += _environment_md(report.get("environment") or {})
        lines += _latency_md(report)
        lines += _speedup_md(report)
    plots = report.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            text = caption(p, metric_of(report))
            lines += [f"![{text}]({p})", "", f"*{text}.*", ""]
    lines += _shipped_md(report)
    lines += ["", "## Not executed on real hardware", ""] + [f"- {n}" for n in report["not_run_on_hardware"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- summary

def summary_md(report: dict) -> list[str]:
    s, m = report.get("summary") or {}, metric_of(report)
    lines = ["## Summary", ""]
    shipped = s.get("shipped")
    if shipped:
        where = (f" on {shipped['backend']} at batch {shipped['batch']}" if shipped.get("backend") else "")
        lines.append(f"- **Shipped:** `{shipped['file']}` ({shipped.get('role') or 'role unknown'}"
                     f"{', made by ' + shipped['stage'] if shipped.get('stage') else ''}), measured{where}: "
                     f"p50 {fmt.ms(shipped.get('p50_ms'))}, {m.label} {m.text(shipped.get(m.name))}, "
                     f"file {fmt.kib(shipped.get('size_bytes'))}. Why: {shipped.get('reason') or 'no reason recorded'}")
    else:
        lines.append(f"- **Nothing shipped:** {s.get('not_shipped_reason') or 'no choice recorded'}.")
    acc = s.get("accuracy") or {}
    ref, shipped_value = acc.get(f"reference_{m.name}"), acc.get(f"shipped_{m.name}")
    if acc.get(drop_key(m)) is not None:
        lines.append(f"- **Accuracy:** {m.label} {m.text(shipped_value)} against {m.text(ref)}"
                     f" for {acc['reference_stage']}: a drop of {m.diff(acc[drop_key(m)])}.")
    elif ref is not None:
        lines.append(f"- **Accuracy:** {acc['reference_stage']} {m.label} {m.text(ref)}; "
                     "no shipped artifact to compare.")
    lines += _speedup_summary(s.get("speedup"), shipped)
    lines += _widths_md(s.get("widths"), m)
    red = [r for r in (s.get("reduction") or {}).values() if r.get("reference") is not None]
    if red:
        lines += [f"- **Compute reduction, {r['label']}:** {fmt.count(r['reference'])} ({r['reference_stage']}) → "
                  f"{fmt.count(r['final'])} ({r['final_stage']}), {fmt.ratio(r['ratio'])} fewer." for r in red]
    on_target = s.get("on_target")
    if on_target:
        lines.append(f"- **On the target ({report.get('target')}) the package would choose:** {_on_target(on_target)}.")
    if s.get("preflight"):
        lines.append("- **TensorRT pre-flight** (a static check of each ONNX file against TensorRT's documented "
                     f"ONNX support, per major; no engine built): {_preflight(s['preflight'])}.")
    recipe = s.get("engine_recipe")
    if isinstance(recipe, dict):
        lines.append("- **Engine recipe:** " + (
            f"`{recipe.get('script')}` builds the engine from `{recipe.get('source')}` for TensorRT "
            f"{', '.join(str(m) for m in recipe.get('trt_majors') or []) or '?'} on the target"
            + (f"; {recipe['note']}" if recipe.get("note") else "") if recipe.get("offered")
            else f"none offered: {recipe.get('reason') or 'no reason recorded'}") + ".")
    if s.get("not_reached"):
        why = ("not part of this run" if s.get("passed") else
               f"the run stopped at {s['failed_stage']}" if s.get("failed_stage") else "the run stopped before them")
        lines.append(f"- **Not reached** ({why}): " + ", ".join(s["not_reached"]) + ".")
    lines += [f"- **Not executed here:** {n}." for n in s.get("not_executed") or []]
    return lines


def _widths_md(w: dict | None, m: Metric) -> list[str]:
    if not w:
        return []
    if w.get("source") == "replayed":
        return [f"- **Widths:** replayed (prune.widths / prune.from_record), not searched: `{w['widths']}`."]
    load = w.get("load") or {}
    lo, hi = w.get("measured_p10_p90") or (None, None)
    line = (f"- **Widths:** searched for {w.get('goal')} (prune.goal = {w.get('goal_mode')}): the shipped widths "
            f"verified {fmt.ratio(w.get('measured_speedup'))} (p10–p90 {fmt.ratio(lo)}–{fmt.ratio(hi)}, "
            f"{w.get('processes')} process(es)) in {w.get('seconds')} s, goal "
            f"{'met' if w.get('goal_met') else 'NOT met'}; 1-minute load while measuring "
            f"{load.get('start', '–')} → max {load.get('max', '–')}")
    tried = w.get("tried") or []
    if len(tried) > 1 or (tried and not tried[0]["passed"]):
        line += "; fine-tuned in turn: " + ", ".join(
            f"{fmt.ratio(t['speedup'])} → {m.text(t.get(m.name))} ({'passed' if t['passed'] else 'missed the gate'})"
            for t in tried)
    lines = [line + f"; shipped widths `{w['widths']}`."]
    lines += [f"- **Search note:** {n}." for n in w.get("notes") or []]
    return lines


def _speedup_summary(sp: dict | None, shipped: dict | None) -> list[str]:
    if not shipped:
        return []
    if not sp or sp.get("speedup") is None:
        return ["- **Speedup:** not measured for the shipped artifact against an unpruned reference on its "
                "backend and batch."]
    spread = (f", p10–p90 {fmt.ratio(sp['speedup_p10'])}–{fmt.ratio(sp['speedup_p90'])}"
              if sp.get("speedup_p10") is not None and sp.get("speedup_p90") is not None else ", no p10–p90 recorded")
    repro = {True: f", reproducible across {sp.get('processes')} processes",
             False: f", NOT reproducible across {sp.get('processes')} processes"}.get(
        sp.get("reproducible"), f", reproducibility not checked: {sp.get('processes') or 1} process")
    what = (f"against {sp.get('reference')} on {sp['backend']} at batch {sp['batch']} "
            f"(interleaved p50s {fmt.ms(sp.get('reference_p50_ms'))} → "
            f"{fmt.ms(sp.get('ratio_p50_ms') if sp.get('ratio_p50_ms') is not None else sp.get('p50_ms'))}"
            f"{spread}{repro})")
    if sp.get("caveats"):
        # A ratio the measurement itself doubts is not a speedup: say what was measured and why it is not one.
        return [f"- **⚠ No reliable speedup:** {fmt.ratio(sp['speedup'])} measured {what}, but "
                + "; ".join(sp["caveats"]) + "."]
    return [f"- **Speedup vs the unpruned reference:** {fmt.ratio(sp['speedup'])} {what}."]


def _on_target(d: dict) -> str:
    head = f"`{d['file']}`" if d.get("file") else ""
    if d.get("role"):
        head += f" ({d['role']})"
    why = d.get("reason") or d.get("why") or d.get("how")
    rest = {k: v for k, v in d.items() if k not in ("file", "role", "reason", "why", "how")}
    return (head + (f": {why}" if why else "") + (f" [{_kv(rest)}]" if rest else "")).strip().rstrip(".") or "–"


def _preflight(d) -> str:
    """The package's {file: {TensorRT major: ok}} as ``model.onnx (TensorRT 10 ok, TensorRT 11 FAILED)``."""
    if not isinstance(d, dict):
        return str(d)
    word = {True: "ok", False: "FAILED"}

    def check(name) -> str:
        return f"TensorRT {name}" if str(name).isdigit() else str(name)
    return "; ".join(f"{k} ({', '.join(f'{check(m)} {word.get(ok, ok)}' for m, ok in v.items())})"
                     if isinstance(v, dict) else f"{k} {word.get(v, v)}" for k, v in d.items())


def _kv(d) -> str:
    if not isinstance(d, dict):
        return str(d)
    return ", ".join(f"{k} {v}" for k, v in d.items() if v is not None)


def _shipped_md(report: dict) -> list[str]:
    """The package stage's candidates and what it left out (its reason is in the summary)."""
    chosen = next((s["metrics"]["chosen"] for s in report["stages"]
                   if isinstance((s.get("metrics") or {}).get("chosen"), dict)), None)
    shipped, m = (report.get("summary") or {}).get("shipped"), metric_of(report)
    if not shipped:
        return []
    lines = ["", "## Shipped variant", "", f"`{shipped['file']}`: {shipped.get('reason') or 'no reason recorded'}"]
    key = (chosen or {}).get("objective")
    cands = (chosen or {}).get("candidates") or []
    if key and cands:
        unit = fmt.kib if key == "size_bytes" else fmt.ms
        lines += ["", f"| candidate | {key} | {m.label} |", "|---|---:|---:|"]
        lines += [f"| {c['file']} | {unit(c.get(key))} | {m.text(c.get(m.name))} |" for c in cands]
    return lines


# ---------------------------------------------------------------- stages

def _stages_md(report: dict) -> list[str]:
    metric = metric_of(report)
    lines = ["", "## Stages", "",
             f"| stage | status | seconds | {metric.label} | MACs | ops (torch-pruning) | params | size | gate |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    seen = set()
    for s in report["stages"]:
        seen.add(s["name"])
        m = s.get("metrics") or {}
        gate = GateResult.from_json(s.get("gate"))
        gate_text = s.get("reason") or fmt.NA if gate is None else fmt.gate_text(gate)
        lines.append(f"| {s['name']} | {s['status']} | {fmt.seconds(s.get('seconds'))} | "
                     f"{metric.text(m.get(metric.name))} | "
                     f"{fmt.count(m.get('macs'))} | {fmt.count(m.get('ops_tp'))} | {fmt.count(m.get('params'))} | "
                     f"{fmt.kib(m.get('size_bytes'))} | {gate_text} |")
    for name in report.get("stage_order") or []:
        if name not in seen:
            lines.append(f"| {name} | not run | – | – | – | – | – | – | – |")
    lines += ["", f"*MACs*: {MAC_CONVENTIONS['macs']}. *ops (torch-pruning)*: {MAC_CONVENTIONS['ops_tp']}; "
              "the two conventions differ, so compare a column only with itself."]
    return lines


# ---------------------------------------------------------------- environment and latency

def _environment_md(env: dict) -> list[str]:
    """The machine and the method. Keys of pipeline.profile's environment, and the older names beside them."""
    logical, usable = env.get("logical_cores", env.get("cores")), env.get("usable_cores", env.get("affinity_cores"))
    lines = ["", "## Environment", ""]
    lines.append(f"- CPU: {env.get('cpu')}; {logical} logical cores"
                 + (f" ({env['physical_cores']} physical)" if env.get("physical_cores") else "")
                 + (f", {usable} usable by this process" if usable else "")
                 + (f"; SIMD {', '.join(env['simd'])}" if env.get("simd") else ""))
    lines.append(f"- Threads: torch {env.get('torch_threads', fmt.NA)}, onnxruntime intra-op "
                 f"{env.get('ort_intra_op_threads', env.get('threads'))} (profile.threads / run.threads; 0 = default)")
    if env.get("load_avg_start") is not None:
        lines.append(f"- Load average (1/5/15 min) at start {env['load_avg_start']}, at end {env.get('load_avg_end')}:"
                     " other work on the machine inflates and spreads the absolute times")
        busy = load_warning(env)
        if busy:
            lines.append(f"- **⚠ {busy}**")
    if env.get("libraries"):
        lines.append("- Libraries: " + _kv(env["libraries"]))
    if env.get("ort_providers"):
        lines.append(f"- onnxruntime providers: {', '.join(env['ort_providers'])}")
    lines.append(f"- GPU: {_kv(env['gpu']) if env.get('gpu') else 'none found'}")
    j = env.get("jetson")
    if j:
        power = (j.get("nvpmodel") or "").splitlines()
        lines.append(f"- Jetson: L4T {j.get('l4t_release') or fmt.NA}; power mode: "
                     f"{power[0] if power else 'nvpmodel not found'}")
        if j.get("jetson_clocks"):
            lines += ["", "  ```", *["  " + ln for ln in j["jetson_clocks"].splitlines()[:20]], "  ```"]
    m = env.get("method") or {}
    if m:
        lines.append(f"- Absolute times: {m.get('warmup')} warm-up calls, then {m.get('iters')} timed calls"
                     + (f" or {m['time_budget_s']} s" if m.get("time_budget_s") else "")
                     + f" per artifact × backend × batch; {m.get('timer')}; input {m.get('input')}; "
                     f"throughput = {m.get('throughput')}")
        r = m.get("ratios")
        if isinstance(r, dict):
            lines.append(f"- Ratios: {r.get('rounds')} rounds of interleaved blocks of ≥ {r.get('block_ms')} ms, "
                         f"order {r.get('order')}, in {r.get('processes')} fresh processes, accepted when "
                         f"{r.get('accept')}; torch models {r.get('torch')}")
    if env.get("copies_included"):
        lines.append(f"- {env['copies_included']}")
    lines += [f"- Note: {n}" for n in env.get("notes") or []]
    peak = env.get("peak_rss_mb")
    lines.append(f"- Peak resident memory of the profiling process: {fmt.NA if peak is None else f'{peak:.1f}'} MiB")
    return lines


def load_warning(env: dict) -> str | None:
    """A warning when more work was runnable than there were cores while profiling."""
    cores = (env.get("usable_cores") or env.get("affinity_cores") or env.get("logical_cores")
             or env.get("cores") or 0)
    loads = [v for key in ("load_avg_start", "load_avg_end") for v in (env.get(key) or [])[:1]]
    if not cores or not loads or max(loads) <= cores:
        return None
    return (f"The machine was oversubscribed while profiling (1-min load average up to {max(loads):.1f} on {cores} "
            f"cores): every absolute time here is inflated and noisy; compare ratios, not times. Multi-threaded "
            f"torch suffers most (its OpenMP threads wait for each other at every operator). Profile on a quiet "
            f"machine, or set profile.threads = 1 to compare artifacts.")


def _latency_md(report: dict) -> list[str]:
    lines = ["", "## Latency", "",
             "| artifact | backend | batch | p50 ms | p90 ms | p99 ms | mean ± std ms | throughput/s | calls | "
             "round spread | RSS Δ MiB | size |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(report["latency"], key=row_order):
        spread, mem = r.get("p50_spread_pct"), r.get("rss_delta_mb")
        mem = fmt.NA if mem is None else f"{mem:.1f}"
        if r.get("gpu_mb") is not None:
            mem += f" (GPU {r['gpu_mb']:.1f})"
        tput = r.get("throughput_per_s")
        busy = " ⚠" if r.get("oversubscribed") else ""
        lines.append(f"| {r['artifact']}{busy} | {r['backend']} | {r['batch']} | {fmt.sig3(r.get('p50_ms'))} | "
                     f"{fmt.sig3(r.get('p90_ms'))} | {fmt.sig3(r.get('p99_ms'))} | "
                     f"{fmt.sig3(r.get('mean_ms'))} ± {fmt.sig3(r.get('std_ms'))} | "
                     f"{fmt.NA if tput is None else f'{tput:,.0f}'} | {fmt.count(r.get('iters'))} | "
                     f"{fmt.NA if spread is None else f'{spread:.1f} %'} | {mem} | {fmt.kib(r.get('size_bytes'))} |")
    lines += ["", "*calls*: timed calls pooled over the rounds; *round spread*: (max − min) of the per-round p50s "
              "over the p50. *RSS Δ*: growth of the process's resident memory around creating and running the "
              "model at that batch (psutil RSS; approximate: allocator caches, onnxruntime's arena, memory reused "
              "from earlier artifacts). With few calls p99 is close to the slowest call. ⚠: timed while "
              "oversubscribed (more threads than usable cores): inflated."]
    skipped = report.get("skipped") or []
    if skipped:
        lines += ["", "Not measured:", ""]
        for n in skipped:
            if isinstance(n, dict):
                lines.append(f"- {n.get('artifact')} on {n.get('backend')}"
                             + (f" at batch {n['batch']}" if n.get("batch") else "") + f": {n.get('reason')}")
            else:
                lines.append(f"- {n}")
    return lines


# ---------------------------------------------------------------- speedup

def _speedup_md(report: dict) -> list[str]:
    rows = report.get("speedup") or []
    if not rows:
        return ["", "## Realized speedup", "", "No ratios were recorded by this profile: the absolute times above "
                "were taken at different moments and are not divided into speedups."]
    tol = report.get("flag_tolerance", 0.05)
    lines = ["", "## Realized speedup", "",
             "Speedup = the reference's time / the artifact's time at the same batch (> 1× is faster): the median "
             "of per-round ratios where the profile interleaved them, with their p10–p90, and how many fresh "
             "processes repeated it. The reference is the unpruned baseline in the same backend family on the same "
             "backend (*vs torch-cpu*, where shown: the ratio to the unpruned torch model on torch-cpu). *Ideal* is "
             "the MAC ratio (baseline MACs / artifact MACs), what pruning would give if latency followed MACs; "
             "*realized/ideal* is their quotient. *vs parent*: against the artifact it was made from (pruned vs "
             f"unpruned, fp16/int8 vs fp32); flagged ⚠ when more than {tol * 100:.0f} % slower. A row in "
             "parentheses with ⚠ is **not a speedup**: the measurement itself was unreliable (see *caveats*).", ""]
    flagged = [r for r in rows if r.get("flag") or r.get("caveats")]
    if flagged:
        lines += ["**Flagged** (slower than the parent, or a measurement that is no speedup):", ""]
        lines += [f"- ⚠ {r['artifact']} on {r['backend']} at batch {r['batch']}: "
                  f"{r.get('flag') or '; '.join(r['caveats'])}" for r in flagged] + [""]
    else:
        lines += ["No row is flagged: none is slower than its parent, every ratio was measured cleanly.", ""]
    torch_cpu = any(r.get("vs_torch_cpu") is not None for r in rows)  # older profile records only
    head = ["artifact", "backend", "batch", "p50 ms", "reference", "speedup", "p10–p90", "processes",
            *(["vs torch-cpu"] if torch_cpu else []), "ideal (MACs)", "realized/ideal", "parent", "vs parent",
            "caveats"]
    align = {"artifact": "---", "backend": "---", "reference": "---", "parent": "---", "caveats": "---"}
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(align.get(h, "---:") for h in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_speedup_cells(r, torch_cpu)) + " |")
    lines += ["", "*?*: realized/ideal far above 100 % usually means the reference was slowed by noise (see the "
              "latency table's round spread); sometimes the smaller model fits a cache."]
    return lines


def _speedup_cells(r: dict, torch_cpu: bool) -> list[str]:
    """One speedup row; a row with caveats shows its ratios in parentheses behind ⚠, never as plain speedups."""
    flagged = bool(r.get("caveats"))

    def shown(text: str) -> str:
        return f"({text})" if flagged and text != fmt.NA else text

    lo, hi = r.get("speedup_p10"), r.get("speedup_p90")
    eff = r.get("efficiency")
    eff_text = fmt.NA if eff is None else f"{eff * 100:.0f} %" + (" ?" if eff > 1.25 else "")
    speed = shown(fmt.ratio(r.get("speedup")))
    cells = [str(r["artifact"]), str(r["backend"]), str(r["batch"]), fmt.sig3(r.get("p50_ms")),
             r.get("reference") or fmt.NA, "⚠ " + speed if flagged else speed,
             shown(f"{lo:.2f}–{hi:.2f}×") if lo is not None and hi is not None else fmt.NA,
             str(r.get("processes") or fmt.NA)]
    if torch_cpu:
        cells.append(shown(fmt.ratio(r.get("vs_torch_cpu"))))
    cells += [fmt.ratio(r.get("mac_ratio")), shown(eff_text), r.get("parent") or fmt.NA,
              shown(fmt.ratio(r.get("vs_parent"))) + (" ⚠" if r.get("slower_than_parent") else ""),
              "; ".join(c.split(":")[0] for c in r.get("caveats") or []) or fmt.NA]
    return cells
