"""Does the default `make deploy` pass on this machine, quiet and loaded? `make bench-default`.

    python -m benchmarks.bench_default [--quiet 3] [--loaded 5] [--runs /tmp/bench-default-runs]

Runs the real command (`python -m pipeline run --config configs/cpu.toml`) from an empty runs folder
each time (the vendored baseline checkpoint is all it starts from), ``--quiet`` times alone and
``--loaded`` times with two busy-loop processes beside it (what `(while :; do :; done) &` twice does),
alternating loaded and quiet runs so that a slow hour of the machine hits both. Per run: PASSED or
not, wall seconds, the shipped top-1, the profile's verified speedup of the shipped file against the
unpruned FP32 ONNX (batch 1, onnxruntime CPU, 1 thread, p10-p90 over 3 fresh processes), the search's
widths and how many picks the fine-tune tried, and the 1-minute load average while the search
measured. Writes benchmarks/default_deploy.md and .json. A measurement, not a timed test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "default_deploy"
BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"
SEED_TOP1, GOAL = 98.29, 4.0


def one_run(runs: Path, name: str, loaded: bool) -> dict:
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2 if loaded else 0)]
    try:
        time.sleep(2.0 if busy else 0.0)
        t0 = time.perf_counter()
        argv = ["run", "--config", "configs/cpu.toml", "--runs", str(runs), "--run", name]
        p = subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=3600)
        seconds = time.perf_counter() - t0
    finally:
        for b in busy:
            b.kill()
            b.wait()
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr.strip().splitlines()[-1]
    row = {"name": name, "loaded": loaded, "exit": p.returncode, "last_line": last, "seconds": round(seconds, 1)}
    report = runs / name / "report.json"
    if report.is_file():
        s = json.loads(report.read_text())["summary"]
        sp, w = s.get("speedup") or {}, s.get("widths") or {}
        row.update(top1=(s.get("shipped") or {}).get("top1"), speedup=sp.get("speedup"),
                   speedup_p10_p90=(sp.get("speedup_p10"), sp.get("speedup_p90")), widths=w.get("widths"),
                   search_verified=w.get("measured_speedup"), goal_met=w.get("goal_met"),
                   tried=[(t["speedup"], t["top1"], t["passed"]) for t in w.get("tried") or []], load=w.get("load"))
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# The default deploy, quiet and under load", "",
             f"Measured {meta['date']} by `make bench-default` on {meta['cpu']} ({meta['cores']} usable cores, SIMD "
             f"block {meta['simd_block']}): `python -m pipeline run --config configs/cpu.toml` from an empty runs "
             "folder each time (the baseline is the vendored checkpoint), loaded = two busy-loop processes beside it, "
             "runs alternating. Speedup: the profile stage's ratio of the shipped `model.onnx` to the unpruned FP32 "
             "ONNX, onnxruntime CPU, 1 thread, batch 1, median over 3 fresh processes (p10-p90). Load: the 1-minute "
             "load average while the latency search measured (first / max).", "",
             "| run | load | result | seconds | top-1 | speedup (p10-p90) | widths "
             "| picks fine-tuned (speedup → top-1) | load while searching |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r.get("speedup_p10_p90") or (None, None)
        tried = ", ".join(f"{s}x → {t} %{'' if ok else ' ✗'}" for s, t, ok in r.get("tried") or []) or "1 (no ladder)"
        load = r.get("load") or {}
        lines.append(f"| {r['name']} | {'2 busy loops' if r['loaded'] else 'quiet'} | "
                     f"{'PASSED' if r['exit'] == 0 else 'FAILED: ' + r['last_line'][:120]} | {r['seconds']} | "
                     f"{r.get('top1')} | {r.get('speedup')}x ({lo}-{hi}) | {r.get('widths')} | {tried} | "
                     f"{load.get('start')} / {load.get('max')} |")
    for loaded in (False, True):
        rs = [r for r in rows if r["loaded"] == loaded]
        if rs:
            ok = sum(r["exit"] == 0 and (r.get("top1") or 0) >= SEED_TOP1 for r in rs)
            fast = sum((r.get("speedup") or 0) >= GOAL for r in rs)
            lines.append(f"\n**{'Loaded' if loaded else 'Quiet'}:** PASSED with top-1 >= {SEED_TOP1} % in {ok} of "
                         f"{len(rs)}; speedup >= {GOAL}x in {fast} of {len(rs)}; median "
                         f"{sorted(r['seconds'] for r in rs)[len(rs) // 2]} s a run.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quiet", type=int, default=3)
    ap.add_argument("--loaded", type=int, default=5)
    ap.add_argument("--runs", default="/tmp/bench-default-runs")
    args = ap.parse_args(argv)
    from edgerun.machine import cpu_name, simd_block, usable_cores
    runs = Path(args.runs)
    order, left = [], {True: args.loaded, False: args.quiet}
    while any(left.values()):   # loaded, quiet, loaded, ... while both last
        for loaded in (True, False):
            if left[loaded]:
                order.append(loaded)
                left[loaded] -= 1
    rows = []
    for i, loaded in enumerate(order):
        shutil.rmtree(runs, ignore_errors=True)   # an empty runs folder: no stage cache, no store
        rows.append(one_run(runs, f"run{i + 1}", loaded))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"date": str(datetime.date.today()), "cpu": cpu_name(), "cores": usable_cores(),
            "simd_block": simd_block()}
    OUT.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    OUT.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
