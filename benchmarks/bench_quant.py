"""INT8 on the CPU, measured: NNCF as-is vs int32 Gemm bias vs mixed (stem in FP32), against FP32.

    python -m benchmarks.bench_quant [--onnx runs/cpu/04_export_onnx/model.onnx] [--processes 3]

For each model: FP32; NNCF's onnxruntime Q/DQ as it comes (``int32_bias=False``); the same with
the classifier Gemm's bias fed as int32 through DequantizeLinear (onnxruntime fuses QGemm); that
plus the single-channel stem conv kept in FP32; and the TensorRT form (signed symmetric int8), whose
CPU time is shown but whose point is the pre-flight column. Speedups are measured, not derived from
MACs: onnxruntime CPU, batch 1, 1 intra-op thread, every model interleaved in blocks of >= 30 ms
(edgerun.timing), median of per-round ratios to FP32, in ``--processes`` fresh processes. Top-1 is
on the full MNIST test set. Without a pipeline run, the models are the default pruned widths
(conv 4, 9) and the unpruned SimpleCNN (16, 32), trained here for one epoch (``--epochs``).
Writes benchmarks/quant_mnist.md and benchmarks/quant_mnist.json.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import numpy as np

from calib import build_calibration_set, load_calibration_set, quantize_onnx, single_input_channel_convs
from edgerun.errors import EdgeError
from edgerun.io import atomic_write, sha256_file, write_json
from edgerun.pixels import normalise
from edgerun.readers import load_mnist

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ONNX = Path("runs/cpu/04_export_onnx/model.onnx")
MEAN, STD = 0.1307, 0.3081  # the pipeline's MNIST normalisation
PRUNED, UNPRUNED = (4, 9), (16, 32)
MAX_DROP = 0.003  # SimpleCNN widths: the default recipe's 10x-MAC prune, and the seed


def normalize(x: np.ndarray) -> np.ndarray:
    return normalise(x, (MEAN,), (STD,))


def make_dev_onnx(path: Path, mnist: Path, channels: tuple[int, int], epochs: float, seed: int = 0) -> None:
    """Train SimpleCNN(channels) on MNIST train for ``epochs``; export it as the pipeline does (dynamic batch)."""
    import torch

    from export.onnx_export import export_onnx
    from pipeline.models.cnn import SimpleCNN

    torch.manual_seed(seed)
    x, y = load_mnist(mnist, "train")
    x, y = torch.from_numpy(normalize(x)), torch.from_numpy(y)
    model = SimpleCNN(channels=channels)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    steps = int(len(x) * epochs) // 128
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    export_onnx(model.eval(), torch.zeros(2, 1, 28, 28), path)


def top1(path, x: np.ndarray, y: np.ndarray) -> float:
    from edgerun.ort import OrtRunner
    with OrtRunner(path, threads=1) as r:
        name = r.input_names[0]
        pred = np.concatenate([next(iter(r.infer({name: x[i:i + 500]}).values())).argmax(1)
                               for i in range(0, len(x), 500)])
    return float((pred == y).mean())


def variants(src: Path, work: Path, calib: np.ndarray) -> dict[str, dict]:
    """name -> quantize_onnx's info for each INT8 variant of ``src``."""
    stem = single_input_channel_convs(src)
    recipes = {
        "int8 NNCF as-is": {"int32_bias": False},
        "int8 + int32 Gemm bias": {},
        "int8 mixed (stem FP32) + int32 bias": {"keep_fp32": stem},
        "int8 TensorRT form": {"target": "tensorrt"},
    }
    out = {}
    for i, (name, kwargs) in enumerate(recipes.items()):
        print(f"  quantizing {src.name}: {name} ...", flush=True)
        out[name] = quantize_onnx(src, work / f"{src.stem}_v{i}.onnx", calib, **kwargs)
    return out


def measure(paths: dict[str, Path], processes: int, rounds: int) -> dict[str, dict]:
    """name -> ratio to FP32 (median over processes of per-round medians) and per-call ms."""
    from edgerun.timing import Spec, SpecItem, repeat_in_processes

    names = {n: f"m{i}" for i, n in enumerate(paths)}
    spec = Spec(tuple(SpecItem(names[n], str(p), "onnxruntime-cpu") for n, p in paths.items()),
                reference=names["FP32"], batches=(1,), input_shape=(1, 28, 28), threads=1, rounds=rounds)
    (rep,) = repeat_in_processes(spec, processes, log=print)
    out = {}
    for n, key in names.items():
        r = rep.pair(key)
        out[n] = {"ratio": round(r.median, 4), "p10": round(r.p10, 4), "p90": round(r.p90, 4),
                  "speedup": round(1 / r.median, 3), "p50_ms": round(r.p50_ms, 5), "spread": round(r.spread, 3),
                  "reproducible": r.reproducible}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_quant", description=__doc__.split("\n")[0])
    p.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="the pipeline's pruned FP32 ONNX (default: "
                   "%(default)s; without it, one is trained here with the default pruned widths)")
    p.add_argument("--mnist", type=Path, default=ROOT / "data" / "mnist")
    p.add_argument("--calib-n", type=int, default=256, help="calibration images (default: %(default)s)")
    p.add_argument("--epochs", type=float, default=1.0, help="training of the stand-in models (default: 1)")
    p.add_argument("--processes", type=int, default=3, help="timing processes (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_quant"), help="models and calibration set")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "quant_mnist", help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    try:
        return run(args, list(sys.argv[1:] if argv is None else argv))
    except EdgeError as e:
        print(f"FAILED | {e}")
        return 1


def run(args, argv: list[str]) -> int:
    import nncf
    import onnxruntime as ort

    from edgerun.machine import load_average
    from edgerun.preflight import check_onnx

    nncf.set_log_level(30)  # warnings only
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    x_train, y_train = load_mnist(args.mnist, "train")
    x_test, y_test = load_mnist(args.mnist, "test")
    test_x = normalize(x_test)
    info = build_calibration_set(x_train, y_train, args.calib_n, args.seed, work / "calib.npz", split="train")
    calib = normalize(load_calibration_set(info["path"], expect_shape=(1, 28, 28))[0])

    models = {}
    if args.onnx.is_file():
        models[f"pipeline model ({args.onnx})"] = args.onnx
    else:
        print(f"{args.onnx} not found: training stand-ins with the default pruned widths", flush=True)
        path = work / "simplecnn_4_9.onnx"
        make_dev_onnx(path, args.mnist, PRUNED, args.epochs, args.seed)
        models[f"SimpleCNN {PRUNED} (default pruned widths, trained {args.epochs:g} epoch here)"] = path
    path = work / "simplecnn_16_32.onnx"
    make_dev_onnx(path, args.mnist, UNPRUNED, args.epochs, args.seed)
    models[f"SimpleCNN {UNPRUNED} (unpruned, trained {args.epochs:g} epoch here)"] = path

    load_before = load_average()
    results = []
    for label, src in models.items():
        qs = variants(src, work, calib)
        paths = {"FP32": src, **{n: Path(q["path"]) for n, q in qs.items()}}
        print(f"  timing {src.name} in {args.processes} processes ...", flush=True)
        timing = measure(paths, args.processes, args.rounds)
        rows = []
        for name, path in paths.items():
            q = qs.get(name, {})
            trt = check_onnx(path, 10)
            rows.append({"variant": name, "top1": top1(path, test_x, y_test), **timing[name],
                         "size_bytes": os.path.getsize(path), "qdq_nodes": q.get("qdq", {}).get("nodes", 0),
                         "int32_bias": q.get("int32_bias", []), "keep_fp32": q.get("keep_fp32", []),
                         "trt10_preflight": "pass" if trt else f"fail ({len(trt.issues)} issues: "
                                                                f"{', '.join(sorted({i.rule for i in trt.issues}))})"})
        results.append({"model": label, "onnx": str(src), "onnx_sha256": sha256_file(src), "rows": rows})

    result = {
        "command": " ".join(["python -m benchmarks.bench_quant", *argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores, flags: {_cpu_flags()}",
        "load_average": {"before": load_before, "after": load_average()},
        "versions": {"nncf": nncf.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "timing": f"onnxruntime CPUExecutionProvider, batch 1, 1 intra-op thread, {args.rounds} interleaved rounds "
                  f"of >= 30 ms blocks per process, {args.processes} fresh processes; ratio = median over "
                  "processes of the median per-round time ratio to FP32; speedup = 1 / ratio",
        "calibration": {"n": info["n"], "sha256": info["sha256"], "seed": args.seed, "split": "train"},
        "n_test": len(y_test), "results": results,
    }
    write_json(f"{args.out}.json", result)
    atomic_write(f"{args.out}.md", markdown(result))
    print(markdown(result))
    print(f"PASSED | wrote {args.out}.md and {args.out}.json")
    return 0


def markdown(result: dict) -> str:
    lines = ["# INT8 on the CPU: NNCF as-is vs int32 Gemm bias vs mixed (onnxruntime, MNIST)", "",
             f"- {result['date']}, `{result['command']}`",
             f"- CPU: {result['cpu']}; onnxruntime {result['versions']['onnxruntime']}, "
             f"nncf {result['versions']['nncf']}",
             f"- Timing: {result['timing']}. 1-min load average {result['load_average']['before']} -> "
             f"{result['load_average']['after']} (the machine is shared: ratios, not absolute times, are the result).",
             f"- Top-1 on the full MNIST test set ({result['n_test']} images); calibration: "
             f"{result['calibration']['n']} class-stratified training images "
             f"(seed {result['calibration']['seed']}).", ""]
    for m in result["results"]:
        fp32 = m["rows"][0]
        lines += [f"## {m['model']}", "", f"`{m['onnx']}` (sha256 {m['onnx_sha256'][:12]}…)", "",
                  "| variant | top-1 % | Δ vs FP32 (pt) | speedup vs FP32 (p10–p90 over rounds) | p50 ms "
                  "| process spread "
                  "| size KB | TensorRT 10 pre-flight |", "|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| {r['variant']} | {r['top1'] * 100:.2f} | {(r['top1'] - fp32['top1']) * 100:+.2f} "
                         f"| {r['speedup']:.2f}x ({1 / r['p90']:.2f}–{1 / r['p10']:.2f}) | {r['p50_ms']:.4f} "
                         f"| {r['spread']:.2f} "
                         f"| {r['size_bytes'] / 1024:.0f} | {r['trt10_preflight']} |")
        onnxruntime_rows = [r for r in m["rows"][1:] if r["variant"] != "int8 TensorRT form"]
        fit = [r for r in onnxruntime_rows if r["top1"] >= fp32["top1"] - MAX_DROP and r["speedup"] > 1]
        best = max(fit, key=lambda r: r["speedup"], default=None)
        if best:
            verdict = (f"Fastest variant within {MAX_DROP * 100:.1f} pt of FP32: {best['variant']} "
                       f"({best['speedup']:.2f}x).")
        else:
            verdict = "No INT8 variant is faster than FP32 here: on this CPU, ship FP32."
        lines += ["", verdict, ""]
    lines += ["Speedup > 1: faster than FP32 on this CPU. The TensorRT form's CPU time says nothing about a GPU: its "
              "row is about Q/DQ validity (signed int8, zero point 0) and accuracy."]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return ", ".join(f for f in wanted if f" {f}" in flags) or "none of avx2/avx512"


if __name__ == "__main__":
    sys.exit(main())
