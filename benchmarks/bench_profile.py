"""Does the measurement protocol hold on a shared machine? Naive p50 quotients vs interleaved ratios.

    python -m benchmarks.bench_profile [--batches 1,64] [--processes 3] [--rounds 25] [--block-ms 30]
                                       [--threads 1] [--load 0]

The project's MNIST CNN (pipeline.models.cnn.SimpleCNN, channels 16/32, random weights: latency does
not depend on their values) and the same network pruned to channels 8/16 (what channel pruning
leaves: 4x fewer MACs in conv2), both exported to ONNX with the pipeline's exporter. Then, at each
batch, in ``--processes`` fresh processes each:

* naive: p50 of A's calls, then p50 of B's calls (edgerun.timing.measure, one after the other),
  and their quotient: what a profile without the protocol compares;
* protocol: edgerun.timing.compare, interleaved blocks >= ``--block-ms``, ``--rounds`` rounds,
  median of per-round ratios (edgerun.timing.repeat_in_processes).

and, in this process, the same comparison of the two torch models three times (the profile compares
torch models in-process). Reports per batch the spread (max / min) across processes of the
absolute p50s, of the naive quotients and of the protocol's medians; ``--load N`` starts N busy
processes (numpy matmuls) for the duration, to see it under load. Writes ``--out``.md and .json
(default benchmarks/profile_repeatability). A measurement of the measurement, not a timed test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "profile_repeatability"   # .md and .json
CHANNELS = {"baseline": (16, 32), "pruned": (8, 16)}


def build_models(folder: Path):
    """(torch models, ONNX paths, MACs) of the baseline and the pruned CNN."""
    import torch

    from export.onnx_export import export_onnx
    from pipeline.models.cnn import SimpleCNN
    from pipeline.prune import count_macs
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    models, paths, macs = {}, {}, {}
    for name, ch in CHANNELS.items():
        m = SimpleCNN(channels=ch).eval()
        models[name], paths[name] = m, folder / f"{name}.onnx"
        export_onnx(m, x, paths[name])
        macs[name] = count_macs(m, x[:1])[0]
    return models, paths, macs


def naive_worker(paths: dict, batch: int, threads: int, iters: int) -> dict:
    """One fresh process: p50 of every model's calls, one model after the other."""
    from edgerun.sessions import open_session
    from edgerun.timing import measure
    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), dtype=np.float32)
    out = {}
    for name, path in paths.items():
        s = open_session(path, "onnxruntime-cpu", threads=threads)
        try:
            out[name] = measure(lambda s=s: s.run(x), warmup=10, iters=iters).p50_ms
        finally:
            s.close()
    return out


def _naive_in_fresh_process(paths, batch, threads, iters) -> dict:
    code = ("import json, sys; from benchmarks.bench_profile import naive_worker; "
            f"print(json.dumps(naive_worker({json.dumps({k: str(v) for k, v in paths.items()})}, {batch}, "
            f"{threads}, {iters})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def _busy(stop) -> None:
    a = np.random.default_rng(0).standard_normal((256, 256))
    while not stop.is_set():
        a = np.tanh(a @ a)


def _spread(values) -> float:
    return float(max(values) / min(values))


def measure_batch(paths, models, batch: int, args) -> dict:
    import torch

    from edgerun.timing import Spec, SpecItem, compare, repeat_in_processes
    naive = [_naive_in_fresh_process(paths, batch, args.threads, args.iters) for _ in range(args.processes)]
    naive_q = [n["pruned"] / n["baseline"] for n in naive]
    spec = Spec((SpecItem("baseline", str(paths["baseline"]), "onnxruntime-cpu"),
                 SpecItem("pruned", str(paths["pruned"]), "onnxruntime-cpu")), "baseline", (batch,), (1, 28, 28),
                threads=args.threads, block_ms=args.block_ms, rounds=args.rounds)
    (rep,) = repeat_in_processes(spec, args.processes)
    pair = rep.pair("pruned")
    torch.set_num_threads(args.threads)
    x = torch.randn(batch, 1, 28, 28)
    with torch.inference_mode():
        runs = {n: (lambda m=m: m(x)) for n, m in models.items()}
        torch_cmp = [compare(runs, reference="baseline", block_ms=args.block_ms, rounds=args.rounds)
                     for _ in range(3)]
    torch_medians = [c.ratio("pruned").median for c in torch_cmp]
    return {
        "batch": batch,
        "naive": {"baseline_p50_ms": [n["baseline"] for n in naive], "pruned_p50_ms": [n["pruned"] for n in naive],
                  "quotient": naive_q, "quotient_spread": _spread(naive_q),
                  "baseline_p50_spread": _spread([n["baseline"] for n in naive])},
        "protocol": {"process_medians": list(pair.process_medians), "median": pair.median, "p10": pair.p10,
                     "p90": pair.p90, "spread": pair.spread, "reproducible": pair.reproducible,
                     "remeasured": rep.remeasured, "first_spread": rep.first_spread,
                     "pruned_p50_ms": pair.p50_ms, "baseline_p50_ms": pair.to_p50_ms,
                     "baseline_block_p50_spread": _spread([float(np.median(c.per_call_ms("baseline")))
                                                           for c in rep.comparisons]),
                     "calls_per_block": [list(c.calls_per_block) for c in rep.comparisons],
                     "load": [[c.load_before, c.load_after] for c in rep.comparisons]},
        "torch_in_process": {"medians": torch_medians, "spread": _spread(torch_medians),
                             "p10": [c.ratio("pruned").p10 for c in torch_cmp],
                             "p90": [c.ratio("pruned").p90 for c in torch_cmp]},
    }


def _remeasured(p: dict) -> str:
    if not p["remeasured"]:
        return ""
    first = p.get("first_spread")
    return f" (re-measured; first attempt's spread {first:.2f})" if first else " (re-measured)"


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# Profile repeatability: naive p50 quotients vs the interleaved protocol", "",
             f"`{r['command']}` ({r['date']}). {m['cpu']}, {m['usable_cores']} usable cores, SIMD "
             f"{', '.join(m['simd']) or 'none'} (block {m['simd_block']}); threads {r['threads']}; "
             f"{r['load_processes']} extra busy process(es) started by the benchmark. Load average before "
             f"{r['load_before']}, after {r['load_after']} (other agents share this machine).", "",
             f"Models: SimpleCNN 16/32 channels ({r['macs']['baseline']:,} MACs) vs 8/16 "
             f"({r['macs']['pruned']:,} MACs, MAC ratio {r['macs']['baseline'] / r['macs']['pruned']:.2f}), ONNX on "
             f"onnxruntime CPU. Each figure comes from {r['processes']} fresh processes: *naive* = p50 of "
             f"{r['iters']} calls of one model, then of the other, and their quotient; *protocol* = "
             f"edgerun.timing.compare ({r['rounds']} rounds, blocks >= {r['block_ms']} ms, order alternating), "
             "median of per-round ratios. Ratio = pruned time / baseline time (< 1: pruned is faster). "
             "Spread = max / min across processes; the protocol accepts <= 1.2.", "",
             "| batch | baseline p50 per process (ms) | p50 spread | naive quotient per process | naive spread | "
             "protocol median per process | protocol spread | p10–p90 (pooled) | reproducible | "
             "torch in-process medians | torch spread |",
             "|---:|---|---:|---|---:|---|---:|---|---|---|---:|"]
    for b in r["batches"]:
        n, p, t = b["naive"], b["protocol"], b["torch_in_process"]
        lines.append(
            f"| {b['batch']} | {', '.join(f'{v:.4f}' for v in n['baseline_p50_ms'])} | "
            f"{n['baseline_p50_spread']:.2f} | "
            f"{', '.join(f'{v:.3f}' for v in n['quotient'])} | {n['quotient_spread']:.2f} | "
            f"{', '.join(f'{v:.3f}' for v in p['process_medians'])} | {p['spread']:.2f} | "
            f"{p['p10']:.3f}–{p['p90']:.3f} | {p['reproducible']}{_remeasured(p)} | "
            f"{', '.join(f'{v:.3f}' for v in t['medians'])} | {t['spread']:.2f} |")
    lines += ["", "Reading: compare *naive spread* with *protocol spread* on the same row. The absolute p50 "
              "moves with the machine's load; a ratio of two p50s taken at different moments inherits that; "
              "the interleaved ratio sees the load on both sides of each round. The torch column is "
              "the in-process comparison the profile uses for torch models (one process, three repeats)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--block-ms", type=float, default=30.0)
    ap.add_argument("--iters", type=int, default=200, help="naive: timed calls per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--load", type=int, default=0, help="busy processes to start while measuring")
    ap.add_argument("--out", default=str(OUT), help="output path without suffix (.md and .json are written)")
    argv_used = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    from edgerun.machine import load_average, machine

    batches = [int(b) for b in args.batches.split(",")]
    stop = mp.Event()
    busy = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(args.load)]
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_profile_") as tmp:
        models, paths, macs = build_models(Path(tmp))
        for p in busy:
            p.start()
        try:
            results = []
            for b in batches:
                print(f"batch {b}: {args.processes} naive + {args.processes} protocol processes", file=sys.stderr,
                      flush=True)
                results.append(measure_batch(paths, models, b, args))
        finally:
            stop.set()
            for p in busy:
                p.join(timeout=5)
    result = {"command": "python -m benchmarks.bench_profile" + (f" {' '.join(argv_used)}" if argv_used else ""),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine().to_json(),
              "threads": args.threads, "processes": args.processes, "rounds": args.rounds, "block_ms": args.block_ms,
              "iters": args.iters, "load_processes": args.load, "load_before": load_before,
              "load_after": load_average(), "macs": macs, "batches": results}
    from edgerun.io import atomic_write, write_json
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    md = to_markdown(result)
    atomic_write(out.with_suffix(".md"), md)
    print(md)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
