"""Repeatability of the latency profile: how far apart are the p50s of the same artifacts, run again?

    python -m benchmarks.bench_profile [--run runs/cpu] [--config configs/cpu.toml] [--repeats 3]
                                       [--set profile.iters=200 ...] [--also-threads 1]

Profiles the artifacts of a finished default run (`make deploy` writes runs/cpu/) `--repeats` times
in this one process, exactly as the profile stage does (pipeline.profile.profile_artifacts, the
stage's config), and reports for every artifact x backend x batch the p50 of each repeat, their
min / max and the relative spread (max - min) / median, plus whether the "slower than its parent"
flags of the realized-speedup table come out the same every time; `--also-threads N` repeats it
all with profile.threads = N for comparison. Writes
benchmarks/profile_repeatability.md and .json. A measurement of the measurement, not a timed test.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT_MD = ROOT / "benchmarks" / "profile_repeatability.md"
OUT_JSON = ROOT / "benchmarks" / "profile_repeatability.json"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_run(run_dir: Path, cfg):
    """(records, folders) of a finished run; None if its models are not there."""
    from pipeline.runner import Runner, intact, read_record
    from pipeline.stages import STAGES
    folders = Runner(cfg, STAGES, run_dir, None, data_identity=lambda: "").folder
    records = {}
    for stage in STAGES:
        rec = read_record(folders[stage.name])
        if rec is not None and intact(folders[stage.name], rec):
            records[stage.name] = rec
    if not {"baseline", "finetune", "export_onnx"} <= set(records):
        return None
    return records, folders


def spread_table(repeats: list[list[dict]]) -> list[dict]:
    """One entry per artifact x backend x batch: the p50 of each repeat and their spread."""
    keys = list(dict.fromkeys((r["artifact"], r["backend"], r["batch"]) for rows in repeats for r in rows))
    out = []
    for art, backend, batch in keys:
        p50 = [next((r["p50_ms"] for r in rows if (r["artifact"], r["backend"], r["batch"]) == (art, backend, batch)),
                    None) for rows in repeats]
        p99 = [next((r["p99_ms"] for r in rows if (r["artifact"], r["backend"], r["batch"]) == (art, backend, batch)),
                    None) for rows in repeats]
        vals = [v for v in p50 if v is not None]
        med = float(np.median(vals))
        within = [next((r.get("p50_spread_pct") for r in rows
                        if (r["artifact"], r["backend"], r["batch"]) == (art, backend, batch)), None) for rows in repeats]
        within = [w for w in within if w is not None]
        out.append({"artifact": art, "backend": backend, "batch": batch, "p50_ms": [round(v, 6) for v in vals],
                    "p99_ms": [round(v, 6) for v in p99 if v is not None],
                    "min_ms": round(min(vals), 6), "max_ms": round(max(vals), 6), "median_ms": round(med, 6),
                    "spread_pct": round(100.0 * (max(vals) - min(vals)) / med, 2),
                    "within_run_round_spread_pct": round(float(np.median(within)), 2) if within else None})
    return out


def flag_stability(repeats: list[list[dict]], tolerance: float) -> list[dict]:
    from pipeline.profile import speedup_table
    per = [{(s["artifact"], s["backend"], s["batch"]): s for s in speedup_table(rows, tolerance)} for rows in repeats]
    keys = list(dict.fromkeys(k for p in per for k, s in p.items() if s.get("parent")))
    out = []
    for k in keys:
        flags = [bool(p.get(k, {}).get("slower_than_parent")) for p in per]
        ratios = [p[k]["vs_parent"] for p in per if k in p and p[k].get("vs_parent") is not None]
        out.append({"artifact": k[0], "backend": k[1], "batch": k[2], "parent": per[0].get(k, {}).get("parent"),
                    "flagged": sum(flags), "of": len(flags), "vs_parent": ratios})
    return out


def analyse(repeats: list[list[dict]], env: dict, tolerance: float) -> dict:
    rows = spread_table(repeats)
    spreads = [r["spread_pct"] for r in rows]
    worst = max(rows, key=lambda r: r["spread_pct"])
    return {"threads": env.get("threads"), "environment": env,
            "summary": {"rows": len(rows), "median_spread_pct": float(np.median(spreads)),
                        "max_spread_pct": float(max(spreads)),
                        "worst": f"{worst['artifact']} on {worst['backend']} at batch {worst['batch']}",
                        "within_5pct": sum(s <= 5 for s in spreads), "within_10pct": sum(s <= 10 for s in spreads)},
            "rows": rows, "flags": flag_stability(repeats, tolerance), "raw": repeats}


def _section(a: dict, tolerance: float, level: str = "##") -> list[str]:
    s = a["summary"]
    lines = [f"{level} Summary", "",
             f"- Median spread of the p50 across repeats: **{s['median_spread_pct']:.1f} %**; "
             f"worst: {s['max_spread_pct']:.1f} % ({s['worst']}).",
             f"- Rows within 5 % / 10 %: {s['within_5pct']} / {s['within_10pct']} of {s['rows']}.",
             f"- The report flags an artifact slower than its parent when it is more than "
             f"{tolerance * 100:.0f} % slower (profile.slower_tolerance). A difference smaller than the "
             "spread here is noise.", "",
             f"{level} p50 per repeat", "",
             "| artifact | backend | batch | p50 per repeat (ms) | min | max | spread | within-run round spread |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in a["rows"]:
        w = r["within_run_round_spread_pct"]
        lines.append(f"| {r['artifact']} | {r['backend']} | {r['batch']} | {', '.join(f'{v:.4f}' for v in r['p50_ms'])} | "
                     f"{r['min_ms']:.4f} | {r['max_ms']:.4f} | {r['spread_pct']:.1f} % | "
                     f"{'–' if w is None else f'{w:.1f} %'} |")
    lines += ["", f"{level} Are the \"slower than parent\" flags stable?", "",
              "| artifact | backend | batch | parent | flagged | parent p50 / p50 per repeat |",
              "|---|---|---:|---|---:|---|"]
    for f in a["flags"]:
        lines.append(f"| {f['artifact']} | {f['backend']} | {f['batch']} | {f['parent']} | {f['flagged']} of {f['of']} | "
                     f"{', '.join(f'{v:.3g}×' for v in f['vs_parent'])} |")
    unstable = [f for f in a["flags"] if 0 < f["flagged"] < f["of"]]
    lines += ["", (f"{len(unstable)} flag(s) changed between repeats: their difference is within the noise."
                   if unstable else "Every flag came out the same in every repeat.")]
    return lines


def to_markdown(result: dict) -> str:
    env, m = result["environment"], result["environment"].get("method", {})
    lines = ["# Profile repeatability", "",
             f"`{result['command']}`: {result['repeats']} profiles of `{result['run']}`'s artifacts, one after "
             f"another in one process ({result['date']}). Each profile: {m.get('warmup')} warm-up calls, "
             f"{m.get('iters')} timed calls per artifact × backend × batch in {m.get('rounds')} interleaved round(s), "
             f"threads {env.get('threads')} (0/default: torch and onnxruntime choose).",
             "",
             f"CPU: {env.get('cpu')} ({env.get('cores')} logical cores). Load average before: "
             f"{result['load_avg_before']}, after: {result['load_avg_after']}. Other processes on a shared machine "
             "widen these spreads; on a quiet target they are the floor to compare changes against.", ""]
    lines += _section(result, result["tolerance"])
    other = result.get("also_threads")
    if other:
        lines += ["", f"## The same with profile.threads = {other['threads']}", "",
                  "Same artifacts, same process, right after the runs above. Compare the torch rows: on an "
                  "oversubscribed machine multi-threaded torch (OpenMP) waits at every operator's barrier.", ""]
        lines += _section(other, result["tolerance"], "###")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/cpu", help="a finished run folder (default: make deploy's)")
    ap.add_argument("--config", default="configs/cpu.toml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--also-threads", type=int, metavar="N",
                    help="then repeat everything with profile.threads = N and report it beside")
    argv_used = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    run_dir = Path(args.run) if Path(args.run).is_absolute() else ROOT / args.run

    from pipeline.config import load_config
    from pipeline.errors import PipelineError
    try:
        cfg = load_config(ROOT / args.config if not Path(args.config).is_absolute() else args.config, args.overrides)
    except PipelineError as e:
        print(f"FAILED | error: {e}")
        return 1
    loaded = load_run(run_dir, cfg) if run_dir.is_dir() else None
    if loaded is None:
        print(f"FAILED | {args.run}/ has no finished run (baseline, finetune and export_onnx): run `make deploy` first")
        return 1
    records, folders = loaded

    from pipeline.profile import BASELINE_ONNX, profile_artifacts
    from pipeline.report import DEFAULT_TOLERANCE
    from pipeline.runner import Context
    from pipeline.stages import _artifacts

    load_before = [round(v, 2) for v in os.getloadavg()]
    tolerance = float(getattr(cfg.profile, "slower_tolerance", DEFAULT_TOLERANCE))
    out = Path(tempfile.mkdtemp(prefix="bench_profile_"))
    try:
        cached = folders["profile"] / BASELINE_ONNX
        if cached.is_file():  # the profile stage's export of the unpruned baseline: reuse it
            shutil.copy2(cached, out / BASELINE_ONNX)

        def series(c, label):
            ctx = Context(c, run_dir, out, records, folders, None, lambda m: None)
            artifacts = _artifacts(ctx)
            reps, env = [], {}
            for i in range(args.repeats):
                print(f"{label}repeat {i + 1}/{args.repeats}: profiling {len(artifacts)} artifacts",
                      file=sys.stderr, flush=True)
                rows, env = profile_artifacts(ctx, artifacts)
                reps.append(rows)
            return analyse(reps, env, tolerance)

        main_series = series(cfg, "")
        other = None
        if args.also_threads is not None:
            c2 = dataclasses.replace(cfg, profile=dataclasses.replace(cfg.profile, threads=args.also_threads))
            other = series(c2, f"threads={args.also_threads}: ")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result = {
        "command": "python -m benchmarks.bench_profile" + (f" {' '.join(argv_used)}" if argv_used else ""),
        "run": args.run, "date": datetime.datetime.now().isoformat(timespec="seconds"), "repeats": args.repeats,
        "tolerance": tolerance, "load_avg_before": load_before, "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        **main_series, "also_threads": other,
    }
    _write(OUT_JSON, json.dumps(result, indent=2, default=str) + "\n")
    md = to_markdown(result)
    _write(OUT_MD, md)
    print(md)
    print(f"wrote {OUT_MD.relative_to(ROOT)} and {OUT_JSON.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
