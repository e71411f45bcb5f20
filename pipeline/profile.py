"""Latency of every artifact on every backend present: warm-up, then fixed iterations or a time budget."""
from __future__ import annotations

import os
import platform
import time

import numpy as np


def measure(fn, *, warmup: int, iters: int, time_budget_s: float = 0.0) -> dict:
    """Times ``fn()``; returns milliseconds. A time budget caps iterations, never below 5."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < iters:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
        if time_budget_s and time.perf_counter() - start > time_budget_s and len(times) >= 5:
            break
    a = np.asarray(times)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "std_ms": float(a.std()),
            "iters": len(times)}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _ort_backends() -> list[tuple[str, tuple]]:
    from export.runners import available_ort_providers
    have = available_ort_providers()
    out = [("onnxruntime-cpu", ("CPUExecutionProvider",))]
    if "CUDAExecutionProvider" in have:
        out.append(("onnxruntime-cuda", ("CUDAExecutionProvider", "CPUExecutionProvider")))
    return out


def profile_artifacts(ctx, artifacts: list[dict]) -> tuple[list[dict], dict]:
    p, cfg = ctx.cfg.profile, ctx.cfg
    threads = p.threads or cfg.run.threads
    shape = (cfg.data.channels, *cfg.data.size)
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, *shape), dtype=np.float32) for b in p.batches}
    rows = []
    for art in artifacts:
        for backend, run_fn in _runners(ctx, art, threads):
            for b in p.batches:
                stats = measure(lambda: run_fn(inputs[b]), warmup=p.warmup, iters=p.iters, time_budget_s=p.time_budget_s)
                rows.append({"artifact": art["label"], "file": art["name"], "stage": art["stage"],
                             "precision": art.get("precision"), "backend": backend, "batch": b, **stats,
                             "throughput_per_s": b * 1000.0 / stats["p50_ms"], "top1": art.get("top1"),
                             "size_bytes": _size(art["path"])})
                ctx.log(f"  {art['label']:<28} {backend:<17} batch {b:<3} p50 {stats['p50_ms']:.3f} ms")
    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads or "default",
           "platform": platform.platform(), "peak_rss_mb": round(peak_rss_mb(), 1),
           "copies_included": "TensorRT timings include host<->device copies (Polygraphy runner)"}
    return rows, env


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if f.endswith((".pt", ".safetensors")))
    return os.path.getsize(path)


def _runners(ctx, art: dict, threads: int):
    """(backend name, callable(batch) ) for each backend present that can run this artifact."""
    kind = art["kind"]
    if kind == "torch" and ctx.cfg.profile.torch:
        import torch
        from pipeline import stages
        if threads:
            torch.set_num_threads(threads)
        model = stages.load_baseline(ctx) if art["stage"] == "baseline" else stages.load_pruned_from(ctx, art["stage"])

        def run(x, m=model):
            with torch.inference_mode():
                m(torch.from_numpy(x))
        yield "torch-cpu", run
    elif kind == "onnx":
        from export.runners import OrtRunner
        for backend, providers in _ort_backends():
            runner = OrtRunner(art["path"], providers=providers, threads=threads)
            name = runner.input_names[0]
            yield backend, (lambda x, r=runner, n=name: r.infer({n: x}))
    elif kind == "engine":
        from export.tensorrt import TrtEngineRunner
        runner = TrtEngineRunner(art["path"])
        runner.__enter__()
        name = runner.input_names[0]
        yield "tensorrt", (lambda x, r=runner, n=name: r.infer({n: x}))
