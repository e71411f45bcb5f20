"""INT8 quantization benchmark on MNIST: calibration size × target × plain / accuracy-controlled.

    python -m benchmarks.bench_quant [--onnx runs/cpu/04_export_onnx/model.onnx]
    python -m benchmarks.bench_quant --make-dev-onnx runs/bench_quant/dev_fp32.onnx   # no pipeline run yet

For each calibration size (64 / 256 / 1024 training images, class-stratified, seeded) and target
(onnxruntime: NNCF defaults; tensorrt: signed symmetric int8) it quantizes the FP32 ONNX plainly
and with accuracy control, then measures top-1 on the full 10k test set, the drop vs FP32, the
onnxruntime CPU latency at batch 1 and 64 (p50 after warm-up, all models in one process, measured
in interleaved rounds so that load from elsewhere hits them alike) and the file size. Writes
benchmarks/quant_mnist.md and benchmarks/quant_mnist.json.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from calib import (CalibError, build_calibration_set, load_calibration_set, quantize_onnx,
                   quantize_onnx_with_accuracy_control)
from calib.sources import load_mnist

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ONNX = Path("runs/cpu/04_export_onnx/model.onnx")
MEAN, STD = 0.1307, 0.3081  # the pipeline's MNIST normalisation
N_VAL = 2000  # accuracy-control validation: the last training images, never in a calibration set


def normalize(x: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def make_dev_onnx(path: Path, mnist: Path, seed: int = 0) -> None:
    """Train the pipeline's SimpleCNN for one epoch on MNIST train and export it (dynamic batch)."""
    import torch

    from pipeline.models.cnn import SimpleCNN

    torch.manual_seed(seed)
    x, y = load_mnist(mnist, "train")
    x, y = torch.from_numpy(normalize(x)), torch.from_numpy(y)
    model = SimpleCNN()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    perm = torch.randperm(len(x))
    for i in range(0, len(x), 128):
        idx = perm[i:i + 128]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model.eval(), torch.zeros(1, 1, 28, 28), str(path), dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def session(path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def top1(sess, x: np.ndarray, y: np.ndarray) -> float:
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).mean())


def latency_p50(sessions: dict, x: np.ndarray, warmup: int, rounds: int, reps: int) -> dict:
    """p50 ms per model; each round times every model in turn, so drift spreads over all of them."""
    times = {k: [] for k in sessions}
    for k, s in sessions.items():
        name = s.get_inputs()[0].name
        for _ in range(warmup):
            s.run(None, {name: x})
    for _ in range(rounds):
        for k, s in sessions.items():
            name = s.get_inputs()[0].name
            for _ in range(reps):
                t = time.perf_counter()
                s.run(None, {name: x})
                times[k].append(time.perf_counter() - t)
    return {k: round(float(np.median(v)) * 1e3, 4) for k, v in times.items()}


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def markdown(result: dict) -> str:
    fp = result["fp32"]
    lines = [
        "# INT8 quantization on MNIST (NNCF → Q/DQ ONNX, onnxruntime CPU)", "",
        f"- FP32 model: `{result['onnx']}` (sha256 {result['onnx_sha256'][:12]}…), "
        f"{result['date']}, `{result['command']}`",
        f"- CPU: {result['cpu']}, onnxruntime {result['versions']['onnxruntime']} "
        f"CPUExecutionProvider, intra-op threads {result['threads']}; nncf {result['versions']['nncf']}",
        f"- Top-1 on the full MNIST test set ({result['n_test']} images). Calibration: class-stratified "
        f"training images (seed {result['seed']}). Accuracy control: max drop {result['max_drop'] * 100:.2f} pt "
        f"on {result['n_val']} held-out training images.",
        f"- Latency: p50 of single runs after {result['latency']['warmup']} warm-up runs, all models in one "
        "process, timed in interleaved rounds; 1-min load average "
        f"{result['load_average_1min']['before']} → {result['load_average_1min']['after']} "
        "(above ~2, other work shared the 2 cores while timing).", "",
        "| calib n | target | method | top-1 % | Δ vs FP32 (pt) | p50 b=1 ms | p50 b=64 ms | size KB "
        "| Q/DQ nodes (uint8) | reverted to float | quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| – | – | FP32 | {fp['top1'] * 100:.2f} | – | {fp['p50_ms_b1']:.3f} | {fp['p50_ms_b64']:.3f} "
        f"| {fp['size_bytes'] / 1024:.0f} | – | – | – |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['n_calib']} | {r['target']} | {r['method']} | {r['top1'] * 100:.2f} | {r['drop_pt']:+.2f} "
            f"| {r['p50_ms_b1']:.3f} | {r['p50_ms_b64']:.3f} | {r['size_bytes'] / 1024:.0f} "
            f"| {r['qdq']['nodes']} ({r['qdq']['uint8']}) | {', '.join(r['reverted']) or '–'} | {r['seconds']:.1f} |")
    slow1 = [r for r in result["rows"] if r["p50_ms_b1"] > fp["p50_ms_b1"]]
    slow64 = [r for r in result["rows"] if r["p50_ms_b64"] > fp["p50_ms_b64"]]
    lines += ["", "Δ is INT8 minus FP32 (negative = lost accuracy).",
              f"INT8 slower than FP32 on this CPU: {len(slow1)} of {len(result['rows'])} models at batch 1 "
              f"(FP32 {fp['p50_ms_b1']:.3f} ms), {len(slow64)} of {len(result['rows'])} at batch 64 "
              f"(FP32 {fp['p50_ms_b64']:.3f} ms). CPU latency here says nothing about TensorRT on a GPU: "
              "the tensorrt rows are about Q/DQ validity and accuracy."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_quant", description=__doc__.split("\n")[0])
    p.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="FP32 ONNX model (default: %(default)s)")
    p.add_argument("--make-dev-onnx", type=Path, metavar="PATH",
                   help="train SimpleCNN for 1 epoch, export it to PATH, and exit")
    p.add_argument("--mnist", type=Path, default=ROOT / "data" / "mnist")
    p.add_argument("--sizes", default="64,256,1024", help="calibration sizes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-drop", type=float, default=0.003, help="accuracy control, fraction (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_quant"), help="calibration sets and models")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "quant_mnist", help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    if args.make_dev_onnx:
        make_dev_onnx(args.make_dev_onnx, args.mnist, args.seed)
        print(f"PASSED | wrote {args.make_dev_onnx}")
        return 0
    if not args.onnx.is_file():
        print(f"FAILED | {args.onnx}: FP32 ONNX not found; run `make deploy` first (or pass --onnx PATH)")
        return 1
    try:
        return run(args)
    except CalibError as e:
        print(f"FAILED | {e}")
        return 1


def run(args) -> int:
    import nncf
    import onnx
    import onnxruntime as ort

    nncf.set_log_level(30)  # warnings only: accuracy control's INFO lines would bury the table
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    x_train, y_train = load_mnist(args.mnist, "train")
    x_test, y_test = load_mnist(args.mnist, "test")
    pool_x, pool_y = x_train[:-N_VAL], y_train[:-N_VAL]
    val_x, val_y = normalize(x_train[-N_VAL:]), y_train[-N_VAL:]
    test_x = normalize(x_test)

    models, rows = {"fp32": args.onnx}, []
    for n in sizes:
        calib_info = build_calibration_set(pool_x, pool_y, n, args.seed, work / f"calib_{n}.npz", split="train")
        calib = normalize(load_calibration_set(calib_info["path"], expect_shape=(1, 28, 28), n=n)[0])
        for target in ("onnxruntime", "tensorrt"):
            for method in ("plain", "accuracy_control"):
                key = f"{n}_{target}_{method}"
                dst = work / f"int8_{key}.onnx"
                print(f"quantizing {key} ...", flush=True)
                if method == "plain":
                    info = quantize_onnx(args.onnx, dst, calib, target=target)
                    info["reverted"] = []
                else:
                    info = quantize_onnx_with_accuracy_control(args.onnx, dst, calib, val_x, val_y,
                                                               target=target, max_drop=args.max_drop)
                models[key] = dst
                rows.append({"key": key, "n_calib": n, "target": target, "method": method,
                             "calib_sha256": calib_info["sha256"], "per_class": calib_info["per_class"],
                             "qdq": info["qdq"], "reverted": info["reverted"], "seconds": info["seconds"]})

    print("measuring accuracy and latency ...", flush=True)
    load_before = os.getloadavg()[0]
    sessions = {k: session(v, args.threads) for k, v in models.items()}
    acc = {k: top1(s, test_x, y_test) for k, s in sessions.items()}
    lat = {"warmup": 20, "b1": {"rounds": 20, "reps": 25}, "b64": {"rounds": 10, "reps": 5}}
    p50_b1 = latency_p50(sessions, test_x[:1], lat["warmup"], **lat["b1"])
    p50_b64 = latency_p50(sessions, test_x[:64], lat["warmup"], **lat["b64"])
    for r in rows:
        k = r.pop("key")
        r.update(top1=acc[k], drop_pt=round((acc[k] - acc["fp32"]) * 100, 2), p50_ms_b1=p50_b1[k],
                 p50_ms_b64=p50_b64[k], size_bytes=os.path.getsize(models[k]), path=str(models[k]))

    result = {
        "command": " ".join(["python -m benchmarks.bench_quant", *args.argv]),
        "onnx": str(args.onnx), "onnx_sha256": sha256(args.onnx),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores", "threads": args.threads,
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "versions": {"nncf": nncf.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "seed": args.seed, "max_drop": args.max_drop, "n_val": N_VAL, "n_test": len(y_test), "latency": lat,
        "fp32": {"top1": acc["fp32"], "p50_ms_b1": p50_b1["fp32"], "p50_ms_b64": p50_b64["fp32"],
                 "size_bytes": os.path.getsize(args.onnx)},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"PASSED | wrote {args.out}.md and {args.out}.json")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
