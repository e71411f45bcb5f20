"""`make bench-vila`: VILA's system on MNIST against the issue's targets, written to benchmarks/vila.md.

    python -m benchmarks.bench_vila                            # the deploy run (cached stages reused) + findings
    python -m benchmarks.bench_vila --findings-seeds 0 1 --findings-scale 0.5
    python -m benchmarks.bench_vila --skip-findings --set vlm.step2_steps=800
    python -m benchmarks.bench_vila --skip-findings --report runs/vila-s1/report.json   # a finished run, as it is

(a) VILA's three findings (benchmarks/vila_findings.py: LLM frozen vs unfrozen in step 2, interleaved vs
captions-only pre-training, step 3 with and without text-only data), per seed with their spread.
(b) The compression table from one run of configs/vila-mnist.toml: exact-match per question type of the unpruned
VLM and of each compressed variant (all scored with the runtime on the same held-out records), the whole answer's
latency and each part's against the unpruned FP32 VLM (one interleaved comparison in fresh processes:
edgerun.timing), and the sizes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/vila-mnist.toml"
OUT = ROOT / "benchmarks" / "vila.md"
FINDINGS = ROOT / "benchmarks" / "vila_findings.json"
TARGETS = {"digit": 97.0, "two_image": 92.0, "few_shot": 90.0, "text": 97.0}


def _isa() -> str:
    from edgerun.machine import cpu_flags
    flags = cpu_flags()
    return "AVX-512/VNNI" if "avx512_vnni" in flags else "AVX-512" if "avx512f" in flags else \
        "AVX2" if "avx2" in flags else "no AVX2"


def compression_md(report: dict, cfg_note: str) -> list[str]:
    sec = report["vlm"]
    stages = {s["stage"]: s for s in sec["stages"]}
    base, shipped = stages["baseline"], stages.get("quantize") or stages["export_onnx"]
    kinds = sorted(base["per_kind"])
    p = sec.get("profile")
    shipped_label = list(p["rows"].values())[-1]["label"] if p and p.get("rows") else "the shipped files"
    lines = [f"## (b) Compression: {shipped_label}", "", cfg_note, "",
             "| question type | baseline (torch) | target | met | shipped (runtime) | drop (pt) | ≤ 1 pt |",
             "|---|---:|---:|:-:|---:|---:|:-:|"]
    for k in kinds:
        b, s = base["per_kind"][k], shipped["per_kind"].get(k)
        t = TARGETS.get(k)
        drop = None if s is None else b - s
        lines.append(f"| {k} | {b:.2f} | {'–' if t is None else f'{t:.0f}'} | "
                     f"{'–' if t is None else ('yes' if b >= t else '**no**')} | {'–' if s is None else f'{s:.2f}'} | "
                     f"{'–' if drop is None else f'{drop:.2f}'} | "
                     f"{'–' if drop is None else ('yes' if drop <= 1.0 else '**no**')} |")
    p = sec.get("profile")
    if p:
        lines += ["", f"Latency at batch {p['batch']}, {p['backend']}, {p['threads']} thread(s): the whole answer = "
                  f"the images of the bundle's template with the most images encoded, its prompt prefilled, "
                  f"{p['new_tokens']} new tokens; median of fresh processes, p10–p90 of the per-round ratios.", "",
                  "| variant | whole answer | vs unpruned (target ≥ 3x) | vision | prefill | decode step | size | "
                  "size ratio (target ≥ 5x) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for role, r in p["rows"].items():
            a = r["answer"]
            lines.append(f"| {r['label'] or role} | {a['ms']:.2f} ms | {a['speedup']:.2f}x ({a['p10_p90'][0]:.2f}–"
                         f"{a['p10_p90'][1]:.2f}) | {r['vision']['speedup']:.2f}x | {r['prefill']['speedup']:.2f}x | "
                         f"{r['decode']['speedup']:.2f}x | {r['size_bytes'] / 1024:.0f} KiB | {r['size_ratio']:.2f}x |")
    return lines


def _profile_load(report: dict) -> tuple:
    """The 1-minute load averages the run's profile recorded before its comparisons: (lowest, highest)."""
    prof = next((s for s in report["stages"] if s["name"] == "profile"), {})
    loads = [c["load_before"][0] for t in (prof.get("metrics", {}).get("timings") or {}).values()
             for c in t.get("comparisons", ()) if c.get("load_before")]
    return (min(loads), max(loads)) if loads else ()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="bench-vila", help="run name under runs/ (cached stages are reused)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value for the run")
    ap.add_argument("--skip-findings", action="store_true", help="keep benchmarks/vila_findings.json as it is")
    ap.add_argument("--findings-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--findings-scale", type=float, default=0.5)
    ap.add_argument("--report", help="write (b) from this finished run's report.json instead of running the config")
    a = ap.parse_args(argv)
    from edgerun.io import atomic_write, write_json
    if a.report:
        try:
            report = json.loads(Path(a.report).read_text())
            passed, message, run_name = report["summary"]["passed"], report["summary"]["message"], report["run"]
            _ = report["vlm"]["stages"]   # what compression_md reads: a classifier's or a decoder's report has none
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"bench_vila --report {a.report}: not a VLM run's report.json ({type(e).__name__}: "
                             f"{e})") from None
        overrides = [f"(as recorded in {a.report})"]
    else:
        import pipeline
        result = pipeline.run(CONFIG, a.overrides, run_name=a.run, runs=ROOT / "runs")
        report = json.loads((result.run_dir / "report.json").read_text())
        passed, message, run_name, overrides = result.passed, result.message, result.run_dir.name, a.overrides
    if not a.skip_findings:
        from benchmarks.vila_findings import findings, write_md
        found = findings(tuple(a.findings_seeds), scale=a.findings_scale)
        write_json(FINDINGS, found)
        write_md(found, FINDINGS.with_suffix(".md"))
    from edgerun.machine import cpu_name, load_average
    load = (_profile_load(report) if a.report else load_average()) or ()
    note = (f"Run `{run_name}` of {CONFIG}{' with ' + ' '.join(overrides) if overrides else ''}: "
            f"{'PASSED' if passed else 'FAILED: ' + str(message)}; {cpu_name()} ({_isa()}), load average "
            f"{('–' if a.report else ' ').join(f'{x:.2f}' for x in load) or 'unknown'} "
            f"{'while it profiled (1-minute)' if a.report else 'at the end'}.")
    lines = ["# VILA on MNIST: the three findings and the compressed VLM (benchmarks/bench_vila.py)", ""]
    if FINDINGS.with_suffix(".md").is_file():
        lines += ["## (a) VILA's findings", ""] + FINDINGS.with_suffix(".md").read_text().splitlines()[1:] + [""]
    lines += compression_md(report, note)
    atomic_write(OUT, "\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
