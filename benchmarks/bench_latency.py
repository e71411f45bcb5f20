"""Realized latency of pruning and INT8, measured side by side: `make bench-latency`.

    python -m benchmarks.bench_latency [--quick] [--runs /tmp/bench-latency-runs] [--processes 3]

For each workload (the default CNN, configs/cpu.toml; the compute-bound ResNet, configs/resnet-cpu.toml)
the pipeline runs once per variant up to the quantize stage, in one runs folder, so the baseline (and
every stage whose inputs did not change) is trained once and reused from the stage cache:

* uniform pruning to the workload's MAC budget with round_to 1, 8 and 16;
* the latency-driven search (prune.target = "speedup", pipeline/prune_latency.py) when it exists;
* on the config's own recipe: INT8 NNCF as-is (float Gemm bias), INT8 fixed (int32 bias -> QGemm,
  everything quantized), and the quantize stage's per-layer choice (keep_fp32 = "auto").

Every ONNX file of a workload, plus its unpruned FP32 export, is timed in one interleaved
comparison (edgerun.timing.repeat_in_processes: onnxruntime CPU, 1 thread, batch 1 = the deployment
batch, >= 25 rounds of >= 30 ms blocks, >= 3 fresh processes). Speedup = unpruned FP32 time / variant
time (median of per-process medians of per-round ratios); a ratio whose per-process medians spread
more than 1.2x is flagged. Efficiency = speedup / MAC ratio. Top-1 is on the workload's test subset.
Writes benchmarks/latency.md and benchmarks/latency.json (under --quick: latency_quick.*).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {"cnn": "configs/cpu.toml", "resnet": "configs/resnet-cpu.toml"}
MAC_KEEP = {"cnn": 0.1, "resnet": 0.2}       # uniform variants' MAC budget (the configs' own)
SPEEDUP = {"cnn": 4.0, "resnet": 5.0}        # the latency-driven search's goal
QUICK = ["data.train_subset=1500", "data.test_subset=300", "baseline.epochs=1", "finetune.epochs=0.2",
         "finetune.max_drop=100", "quantize.calib_size=32", "quantize.gate=warn", "quantize.choose_val_size=200",
         "prune.gate=warn", "finetune.gate=warn"]
CNN_SPEEDUP, CNN_TOP1 = 4.0, 98.29           # the default-CNN target (the seed experiment's top-1)
TARGETS = ("compute-bound: speedup >= 0.9 x MAC ratio at >= 4x fewer MACs; pruning + INT8 >= 15x faster than "
           "the unpruned FP32 ONNX at batch 1 within 1 pt of the baseline's top-1; default CNN: >= 4.0x at batch 1 "
           "at top-1 >= 98.29 %, the shipped INT8 not slower than FP32")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny subsets, few rounds, one process")
    ap.add_argument("--runs", default="/tmp/bench-latency-runs", help="runs folder (the stage cache lives here)")
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--no-latency-search", action="store_true", help="leave out the latency-driven search rows")
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    return ap.parse_args(argv)


def has_latency_search() -> bool:
    from pipeline.config import CHOICES
    return "speedup" in CHOICES["prune.target"] and (ROOT / "pipeline" / "prune_latency.py").is_file()


def variant_overrides(wl: str, search: bool = True) -> dict[str, list[str]]:
    uniform = ["prune.target=macs", f"prune.macs={MAC_KEEP[wl]}", "prune.max_layer_ratio=1.0", "quantize.enabled=false"]
    out = {f"uniform round_to {r}": [*uniform, f"prune.round_to={r}"] for r in (1, 8, 16)}
    if search and has_latency_search():
        out["latency search"] = ["prune.target=speedup", f"prune.speedup={SPEEDUP[wl]}", "quantize.enabled=false"]
    out["config recipe"] = ["quantize.keep_fp32=auto"]   # the INT8 rows are built on this one
    return out


def stage_dir(run_dir: Path, name: str) -> Path:
    return next(run_dir.glob(f"[0-9][0-9]_{name}"))


def run_variant(config: str, overrides: list[str], name: str, runs: Path):
    import pipeline
    t = time.perf_counter()
    result = pipeline.run(config, overrides, run_name=name, runs=runs, until="quantize", log=lambda m: None)
    if not result.passed:
        log(f"  {name}: {result.message}")
    recs = {r.name: r for r in result.records}
    secs = {n: r.seconds for n, r in recs.items()}
    log(f"  {name}: {time.perf_counter() - t:.0f} s ({', '.join(f'{n} {s:.0f}' for n, s in secs.items() if s)})")
    return result, recs


def unpruned_onnx(result, path: Path) -> None:
    """The baseline, exported as the export stage exports (dynamic batch): the speedups' reference."""
    from export.onnx_export import export_onnx
    from pipeline import modelio
    cfg = result.config
    model = modelio.load_state_fresh(cfg, stage_dir(result.run_dir, "baseline") / "model.pt").eval()
    export_onnx(model, modelio.example_input(cfg.data, 2), path, opset=cfg.export.opset,
                output_names=modelio.output_names(model))


def int8_extras(result, work: Path) -> dict[str, Path]:
    """NNCF as-is (float Gemm bias) and fixed (int32 bias), both fully quantized, from the recipe's FP32 ONNX."""
    from calib import load_calibration_set, quantize_onnx
    from pipeline.data import normalize
    cfg = result.config
    src = stage_dir(result.run_dir, "export_onnx") / "model.onnx"
    images, _ = load_calibration_set(stage_dir(result.run_dir, "quantize") / "calib.npz")
    calib = normalize(images, cfg.data.mean, cfg.data.std)
    out = {}
    for name, bias in (("INT8 NNCF as-is", False), ("INT8 fixed (int32 bias)", True)):
        out[name] = Path(quantize_onnx(src, work / f"{name.split()[1]}.onnx", calib, int32_bias=bias)["path"])
    return out


def top1(path: Path, data) -> float:
    from pipeline import modelio
    from pipeline.tasks import Classify
    return Classify().metrics(modelio.onnx_outputs(path, data.x_test), data.test.labels)["top1"]


def bench_workload(wl: str, args, runs: Path) -> dict:
    from edgerun import timing
    from edgerun.errors import EdgeError
    from pipeline.data import Data
    config = str(ROOT / WORKLOADS[wl])
    extra = QUICK if args.quick else []
    files: dict[str, Path] = {}
    rows: dict[str, dict] = {}
    recipe = None
    for label, ov in variant_overrides(wl, not args.no_latency_search).items():
        try:
            result, recs = run_variant(config, [*extra, *ov], f"{wl}-{label.replace(' ', '-')}", runs)
        except EdgeError as e:   # one variant that cannot be built is a row, not the end of the bench
            log(f"  {label}: {e}")
            rows[f"{label} (FP32)"] = {"error": str(e)}
            continue
        if "export_onnx" not in recs or recs["export_onnx"].status not in ("ran", "cached"):
            rows[f"{label} (FP32)"] = {"error": result.message}
            continue
        fm = recs["finetune"].metrics
        files[f"{label} (FP32)"] = stage_dir(result.run_dir, "export_onnx") / "model.onnx"
        rows[f"{label} (FP32)"] = {"macs": fm["macs"], "top1": recs["export_onnx"].metrics["top1"],
                                   "prune_target": result.config.prune.target, "round_to": result.config.prune.round_to}
        if label == "config recipe":
            recipe = (result, recs)
    base_rec = recipe[1]["baseline"].metrics
    work = runs / f"{wl}-bench"
    work.mkdir(parents=True, exist_ok=True)
    ref = work / "unpruned.onnx"
    unpruned_onnx(recipe[0], ref)
    data = Data(recipe[0].config)
    files = {"unpruned FP32": ref, **files}
    rows["unpruned FP32"] = {"macs": base_rec["macs"], "top1": top1(ref, data)}
    q = recipe[1]["quantize"]
    if q.status in ("ran", "cached"):
        for name, path in int8_extras(recipe[0], work).items():
            files[name] = path
            rows[name] = {"macs": recipe[1]["finetune"].metrics["macs"], "top1": top1(path, data)}
        files["INT8 per-layer (auto)"] = stage_dir(recipe[0].run_dir, "quantize") / "model_int8.onnx"
        rows["INT8 per-layer (auto)"] = {"macs": recipe[1]["finetune"].metrics["macs"], "top1": q.metrics["top1"],
                                         "layer_choice": q.metrics.get("layer_choice")}
    cfg = recipe[0].config
    spec = timing.Spec(tuple(timing.SpecItem(n, str(p), "onnxruntime-cpu") for n, p in files.items()),
                       reference="unpruned FP32", batches=(1,), input_shape=(cfg.data.channels, *cfg.data.size),
                       threads=1, block_ms=30.0, rounds=args.rounds)
    log(f"  timing {len(files)} models in {args.processes} process(es)")
    rep = timing.repeat_in_processes(spec, args.processes, log=log)[0]
    parent = "config recipe (FP32)"
    for name in files:   # rows with an error have no file
        pr = rep.pair(name)
        r = rows[name]
        mac_ratio = base_rec["macs"] / r["macs"]
        speedup = 1.0 / pr.median
        r.update(mac_ratio=round(mac_ratio, 3), speedup=round(speedup, 3),
                 speedup_p10_p90=[round(1 / pr.p90, 3), round(1 / pr.p10, 3)], spread=round(pr.spread, 3),
                 reproducible=pr.reproducible, p50_ms=round(pr.p50_ms, 4), ref_p50_ms=round(pr.to_p50_ms, 4),
                 efficiency=round(speedup / mac_ratio, 3), drop_pt=round(rows["unpruned FP32"]["top1"] - r["top1"], 3))
        if name.startswith("INT8"):
            vs = rep.pair(name, parent)
            r["speedup_vs_fp32_parent"] = round(1.0 / vs.median, 3)
            r["vs_parent_reproducible"] = vs.reproducible
    loads = [c.load_before for c in rep.comparisons] + [c.load_after for c in rep.comparisons]
    return {"workload": wl, "config": WORKLOADS[wl], "overrides": extra, "rows": rows,
            "processes": rep.processes, "remeasured": rep.remeasured, "load_average": loads,
            "stage_seconds": {n: r.seconds for n, r in recipe[1].items()}}


def targets(results: dict) -> list[str]:
    out = []
    res = results.get("resnet")
    if res:
        rows = res["rows"]
        pruned = [(n, r) for n, r in rows.items() if n.endswith("(FP32)") and r.get("mac_ratio", 0) >= 4]
        ok = [n for n, r in pruned if r["speedup"] >= 0.9 * r["mac_ratio"]]
        out.append(f"- ResNet, realized speedup >= 0.9 x MAC ratio at >= 4x fewer MACs: "
                   f"{'MET by ' + ', '.join(ok) if ok else 'NOT MET'} (of {len(pruned)} pruned variants >= 4x)")
        int8 = [(n, r) for n, r in rows.items() if n.startswith("INT8") and "speedup" in r]
        hit = [n for n, r in int8 if r["speedup"] >= 15 and r["drop_pt"] <= 1.0]
        best = max((r["speedup"] for _, r in int8), default=0)
        out.append(f"- ResNet, pruning + INT8 >= 15x faster than unpruned FP32 within 1 pt: "
                   f"{'MET by ' + ', '.join(hit) if hit else f'NOT MET (best {best:.2f}x)'}")
    cnn = results.get("cnn")
    if cnn:
        done = [(n, r) for n, r in cnn["rows"].items() if "speedup" in r and n != "unpruned FP32"]
        hit = [n for n, r in done if r["speedup"] >= CNN_SPEEDUP and r["top1"] >= CNN_TOP1]
        near = ", ".join(f"{n} {r['speedup']:.2f}x at {r['top1']:.2f} %" for n, r in done
                         if r["speedup"] >= CNN_SPEEDUP)
        out.append(f"- CNN, >= {CNN_SPEEDUP}x at batch 1 at top-1 >= {CNN_TOP1} %: "
                   f"{'MET by ' + ', '.join(hit) if hit else 'NOT MET'} (>= {CNN_SPEEDUP}x: {near or 'none'})")
        r = cnn["rows"].get("INT8 per-layer (auto)")
        if r:
            lc = r.get("layer_choice") or {}
            if r["speedup_vs_fp32_parent"] >= 1.0:
                verdict = "MET: the INT8 form is not slower"
            elif not lc.get("pays", True):
                verdict = ("INT8 is slower, and the stage says so (pays=false): the default ships INT8 only if "
                           "package picks it by measured p50, which it should not")
            else:
                verdict = "NOT MET: the stage chose an INT8 form that is slower here"
            out.append(f"- CNN, shipped INT8 not slower than FP32: {verdict} (auto choice {lc.get('chosen')!r}, "
                       f"measured {r['speedup_vs_fp32_parent']:.3f}x vs its FP32 parent)")
    flagged = [f"{wl}/{n}" for wl, res in results.items() for n, r in res["rows"].items()
               if r.get("reproducible") is False]
    out.append(f"- every speedup passes max/min <= 1.2 across processes: "
               f"{'yes' if not flagged else 'NO, flagged: ' + ', '.join(flagged)}")
    return out


def markdown(meta: dict, results: dict) -> str:
    lines = ["# Realized latency: pruning variants and INT8, side by side", "",
             f"Measured {meta['date']} on {meta['cpu']} (shared 2-core machine; load averages below), "
             f"onnxruntime CPU, 1 intra-op thread, batch 1 (the deployment batch), "
             f">= {meta['rounds']} interleaved rounds of >= 30 ms blocks in {meta['processes']} fresh processes "
             "(edgerun.timing). Speedup = unpruned FP32 ONNX time / variant time (median of per-process "
             "medians), p10-p90 over all rounds; spread = max/min of the process medians (> 1.2: flagged). "
             "Efficiency = speedup / MAC ratio. Top-1 on the workload's test subset."
             + (" **--quick smoke run: tiny subsets, numbers mean nothing.**" if meta["quick"] else ""), "",
             f"Targets: {TARGETS}.", "", *targets(results), ""]
    for wl, res in results.items():
        lines += [f"## {wl} ({res['config']})", "",
                  f"Load average before/after each process: {res['load_average']}; remeasured: {res['remeasured']}.",
                  "", "| variant | MACs ratio | speedup | p10-p90 | spread | efficiency | p50 ms (ref ms) | top-1 "
                  "| drop pt |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in res["rows"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'][:80]} |||||||| ")
                continue
            flag = "" if r["reproducible"] is not False else " (FLAGGED)"
            lo, hi = r["speedup_p10_p90"]
            lines.append(f"| {name} | {r['mac_ratio']:.2f}x | {r['speedup']:.2f}x{flag} | {lo:.2f}-{hi:.2f} | "
                         f"{r['spread']:.3f} | {r['efficiency']:.2f} | "
                         f"{r['p50_ms']:.3f} ({r['ref_p50_ms']:.3f}) | {r['top1']:.2f} | {r['drop_pt']:+.2f} |")
        for name, r in res["rows"].items():
            if "speedup_vs_fp32_parent" in r:
                lines.append(f"\n{name}: {r['speedup_vs_fp32_parent']:.3f}x vs its FP32 parent (config recipe).")
        lc = res["rows"].get("INT8 per-layer (auto)", {}).get("layer_choice")
        if lc:
            lines.append(f"\nPer-layer choice: chosen {lc['chosen']!r} (written {lc['written']!r}, pays={lc['pays']}); "
                         + "; ".join(f"{c['name']} ratio {c['ratio_vs_fp32']:.3f} drop {c['drop_pt']:+.2f} pt"
                                     for c in lc["candidates"]) + f". {lc['measured']}.")
        lines.append(f"\nStage seconds (config recipe, cached stages show their first run): {res['stage_seconds']}\n")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from edgerun.errors import EdgeError
    from edgerun.io import atomic_write, write_json
    from edgerun.machine import cpu_name
    args = parse_args(argv)
    if args.quick:
        args.processes, args.rounds = min(args.processes, 1), min(args.rounds, 5)
    runs = Path(args.runs)
    t = time.perf_counter()
    try:
        results = {}
        for wl in args.workloads:
            log(f"{wl}: {WORKLOADS[wl]}")
            results[wl] = bench_workload(wl, args, runs)
    except EdgeError as e:
        log(f"bench-latency: {e}")
        return 1
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "quick": args.quick,
            "processes": args.processes, "rounds": args.rounds, "seconds": round(time.perf_counter() - t, 1)}
    stem = "latency_quick" if args.quick else "latency"
    out = Path(args.out)
    write_json(out / f"{stem}.json", {"meta": meta, "targets": targets(results), "results": results})
    atomic_write(out / f"{stem}.md", markdown(meta, results))
    log(f"wrote {out / stem}.md/.json in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
