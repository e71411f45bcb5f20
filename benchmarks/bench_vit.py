"""The vision-tower workload end to end: run configs/vit-tower.toml, then write benchmarks/vit_tower.md.

    python -m benchmarks.bench_vit                 # run the pipeline (cached stages are reused), then write
    python -m benchmarks.bench_vit --no-run        # only rewrite the table from runs/vit-tower/report.json
    python -m benchmarks.bench_vit --set data.train_subset=5000   # extra --set overrides for the run

The table has, per stage, top-1, MACs, parameters, size, token fidelity (cosine of each test image's
projected tokens, flattened, against the unpruned tower: mean and 1st percentile) where the stage
reports it, then the onnxruntime CPU (and torch CPU) latency rows and realized speedups of the report.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/vit-tower.toml"
OUT = ROOT / "benchmarks" / "vit_tower.md"


def _fmt(v, kind="") -> str:
    if v is None:
        return "–"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "size":
        return f"{v / 1024:,.1f} KiB"
    if kind == "cos":
        return f"{v:.6f}"
    if kind == "ms":
        return f"{v:.3f}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


def _stage_rows(stages: list[dict]) -> list[list[str]]:
    rows = []
    for s in stages:
        m = s.get("metrics") or {}
        if s["name"] in ("profile", "package"):
            continue
        if s["status"] == "skipped":
            rows.append([s["name"], "skipped", *["–"] * 6, _fmt(s.get("seconds"))])
            continue
        rows.append([s["name"], s["status"], _fmt(m.get("top1")), _fmt(m.get("macs"), "int"),
                     _fmt(m.get("params"), "int"), _fmt(m.get("size_bytes"), "size"),
                     _fmt(m.get("token_cos_mean"), "cos"), _fmt(m.get("token_cos_p1"), "cos"),
                     _fmt(s.get("seconds"))])
        fp16 = m.get("fp16")
        if isinstance(fp16, dict):
            rows.append([f"{s['name']} (fp16 file)", s["status"], _fmt(fp16.get("top1")), "–", "–",
                         _fmt(fp16.get("size_bytes"), "size"), _fmt(fp16.get("token_cos_mean"), "cos"),
                         _fmt(fp16.get("token_cos_p1"), "cos"), "–"])
    return rows


def _gate_lines(stages: list[dict]) -> list[str]:
    out = []
    for s in stages:
        g = s.get("gate") or {}
        checks = g.get("checks") if isinstance(g, dict) else None
        if not checks:
            continue
        parts = []
        for c in checks:
            val = c.get("value")
            val = f"{val:.6g}" if isinstance(val, (int, float)) else str(val)
            bound = (f"drop {c['drop']:.4g} (max {c['max_drop']})" if c.get("drop") is not None
                     else f"limit {c.get('limit', '?')}")
            parts.append(f"{c.get('metric', '?')} {val}, {bound} {'✓' if c.get('passed') else '✗'}")
        out.append(f"- **{s['name']}** ({g.get('mode', '')}): " + "; ".join(parts))
    return out


def write_markdown(report: dict, out: Path = OUT, *, wall_s: float | None = None, config: str = CONFIG) -> str:
    stages = report.get("stages", [])
    by = {s["name"]: s for s in stages}
    base = (by.get("baseline") or {}).get("metrics") or {}
    lines = [f"# Vision tower ({config})", "",
             "A tiny VILA-style vision tower (ViT encoder → linear projector to the LLM hidden size, "
             "classifier on the mean projected token) on MNIST, through prune → fine-tune (KD + token "
             "distillation) → ONNX → int8 → profile. Token fidelity: cosine of each test image's "
             "projected tokens (flattened) vs the unpruned tower; mean and 1st percentile.", "",
             f"Outcome: **{'PASSED' if (report.get('outcome') or {}).get('passed') else 'FAILED'}**"
             + (f" — {report['outcome'].get('message')}" if (report.get('outcome') or {}).get('message') else ""),
             ""]
    if "epochs" in base:
        lines.append(f"Baseline: {base['epochs']} epochs, top-1 {_fmt(base.get('top1'))} % "
                     f"(training + evaluation {_fmt(by['baseline'].get('seconds'))} s).")
    prune = (by.get("prune") or {}).get("metrics") or {}
    if prune.get("macs_reduction"):
        lines.append(f"Prune: {prune['macs_reduction']}× fewer MACs ({prune.get('params_reduction')}× fewer params), "
                     f"channel ratio {prune.get('ratio_used')}; projector width "
                     f"{(prune.get('channels') or {}).get('projector', '?')} (the LLM hidden size, never pruned).")
    if wall_s is not None:
        lines.append(f"Whole run (this invocation): {wall_s:.0f} s on {platform.machine()} "
                     f"({report.get('environment', {}) and report['environment'].get('cpu', '') or 'CPU'}).")
    lines += ["", "## Stages", ""]
    lines += _table(["stage", "status", "top-1 %", "MACs", "params", "size", "token cos mean", "token cos p1", "s"],
                    _stage_rows(stages))
    gl = _gate_lines(stages)
    if gl:
        lines += ["", "Gates:", "", *gl]
    lat = report.get("latency") or []
    if lat:
        lines += ["", "## Latency (from report.json)", ""]
        rows = [[r.get("artifact") or r.get("file") or "?", r.get("backend", "?"), str(r.get("batch")),
                 _fmt(r.get("p50_ms"), "ms"), _fmt(r.get("p90_ms"), "ms"), _fmt(r.get("p99_ms"), "ms"),
                 _fmt(r.get("throughput_per_s")), r.get("precision") or "–", _fmt(r.get("top1")),
                 _fmt(r.get("size_bytes"), "size")] for r in lat]
        lines += _table(["artifact", "backend", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "precision",
                         "top-1 %", "size"], rows)
    sp = report.get("speedup") or []
    if sp:
        lines += ["", "## Realized speedup vs the unpruned baseline (same backend, same batch)", ""]
        rows = [[r.get("artifact") or r.get("role") or "?", r.get("backend", "?"), str(r.get("batch")),
                 _fmt(r.get("speedup")), _fmt(r.get("mac_ratio")), _fmt(r.get("efficiency")),
                 r.get("flag") or ""] for r in sp]
        lines += _table(["artifact", "backend", "batch", "speedup", "MAC ratio", "efficiency", "flag"], rows)
    env = report.get("environment") or {}
    if env:
        lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()
                                                  if isinstance(v, (str, int, float)) and k != "cpu_flags")[:600]]
    lines += ["", "Timings come from a shared 2-core machine: other processes compete for it, so treat "
              "absolute latencies as indicative and compare rows of the same run only.", ""]
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--no-run", action="store_true", help="only write the table from an existing report.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    run_name = Path(args.config).stem
    wall = None
    rc = 0
    if not args.no_run:
        cmd = [sys.executable, "-m", "pipeline", "run", "--config", args.config, "--runs", args.runs]
        for s in args.overrides:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        wall = time.perf_counter() - t0
    report_path = ROOT / args.runs / run_name / "report.json"
    if not report_path.is_file():
        print(f"bench_vit: {report_path} not found (run without --no-run first)", file=sys.stderr)
        return rc or 1
    write_markdown(json.loads(report_path.read_text()), Path(args.out), wall_s=wall, config=args.config)
    print(f"wrote {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
