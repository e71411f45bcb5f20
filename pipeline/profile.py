"""Latency of every artifact on every backend present, and what it means next to the baseline.

What is measured, and how (the report repeats this for its reader):

* Artifacts: the unpruned torch baseline, the pruned + fine-tuned torch model, the unpruned
  baseline exported to ONNX fp32 here (so that ONNX-vs-ONNX ratios compare like with like), the
  pipeline's ONNX fp32 / fp16 / int8 files and a TensorRT engine when one was built.
* Backends: torch-cpu always; torch-cuda, onnxruntime-cuda, onnxruntime-tensorrt and tensorrt only
  where CUDA / the provider / TensorRT are present (imported lazily; these branches have NOT run on
  a GPU in this project).
* Timing: warm-up calls, then timed calls of one batch each (``time.perf_counter``, the garbage
  collector off while timing). ``iters`` calls, or fewer when ``time_budget_s`` runs out (never
  fewer than ``min_iters``). With ``rounds`` > 1 every session stays open and the calls are split
  into interleaved rounds (artifact A, B, C, A, B, C, ...), so that load from other processes hits
  every artifact alike; the samples of all rounds are pooled. Inputs are host numpy arrays and
  outputs come back to the host: GPU timings include host<->device copies.
* Statistics: p50/p90/p99 (numpy linear interpolation, so p50 <= p90 <= p99), mean, std, min,
  max; throughput = batch / p50; ``p50_spread_pct`` = spread of the per-round p50s.
* Memory: ``load_rss_mb`` is the growth of the process's resident set (psutil RSS) from just
  before the model / session was created to just after it was created; ``rss_delta_mb`` is that
  growth measured again after warm-up and the timed calls at that batch (activations, onnxruntime's
  arena). It is sampled, not continuous; allocator caches and memory freed by an earlier artifact
  and reused make it approximate (glibc ``malloc_trim`` runs between artifacts), and the first
  artifact on a backend also carries that library's one-time set-up (thread pools, kernels). tracemalloc would
  miss onnxruntime's native allocations entirely, so it is not used. GPU: torch's
  ``max_memory_allocated`` for torch-cuda; the device-wide ``nvidia-smi`` used-memory delta for
  onnxruntime CUDA/TensorRT and TensorRT (includes other processes; absent on a Jetson).
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

GPU_BACKENDS = ("torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
BASELINE_ONNX = "baseline_fp32.onnx"
BASELINE_ONNX_LABEL = "baseline ONNX fp32 (unpruned)"

# The lineage used for the realized-speedup table: which artifact each one should beat.
PARENT = {"pruned-torch": "baseline-torch", "onnx-fp32": "baseline-onnx", "onnx-fp16": "onnx-fp32",
          "onnx-int8": "onnx-fp32"}
ROLE_ORDER = ("baseline-torch", "pruned-torch", "baseline-onnx", "onnx-fp32", "onnx-fp16", "onnx-int8",
              "engine-fp32", "engine-fp16", "engine-int8")
BACKEND_ORDER = ("torch-cpu", "onnxruntime-cpu", "torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt",
                 "tensorrt")


# ---------------------------------------------------------------- timing

def summarize(times_ms) -> dict:
    """Statistics of per-call times in milliseconds."""
    a = np.asarray(times_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("summarize: no samples")
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(a.mean()), "std_ms": float(a.std()),
            "min_ms": float(a.min()), "max_ms": float(a.max()), "iters": int(a.size)}


def time_calls(fn: Callable[[], object], *, iters: int, time_budget_s: float = 0.0, min_iters: int = 5,
               clock: Callable[[], float] = time.perf_counter, sync: Callable[[], object] | None = None,
               ) -> tuple[list[float], str]:
    """Times calls of ``fn``; returns (milliseconds per call, what stopped it: "iters" | "time_budget").

    ``iters`` > 0 caps the calls; ``time_budget_s`` > 0 stops once that much time has passed and at
    least ``min_iters`` calls were made (with ``iters`` = 0 the budget alone decides). ``sync`` runs
    inside the timed region after each call (``torch.cuda.synchronize`` for asynchronous GPU work).
    """
    if iters <= 0 and time_budget_s <= 0:
        raise ValueError("time_calls: give iters > 0 or time_budget_s > 0")
    times: list[float] = []
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        while True:
            t = clock()
            fn()
            if sync is not None:
                sync()
            end = clock()
            times.append((end - t) * 1000.0)
            if iters > 0 and len(times) >= iters:
                return times, "iters"
            if time_budget_s > 0 and end - start >= time_budget_s and len(times) >= min_iters:
                return times, "time_budget"
    finally:
        if gc_was_on:
            gc.enable()


def measure(fn, *, warmup: int, iters: int, time_budget_s: float = 0.0, min_iters: int = 5,
            clock: Callable[[], float] = time.perf_counter, sync: Callable[[], object] | None = None) -> dict:
    """Warm-up calls, then timed calls of ``fn()`` (see time_calls); statistics in milliseconds.

    Returns p50/p90/p99/mean/std/min/max in ms, ``iters`` (calls timed), ``stopped_by`` and
    ``total_s`` (time spent in the timed calls).
    """
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    times, stopped = time_calls(fn, iters=iters, time_budget_s=time_budget_s, min_iters=min_iters,
                                clock=clock, sync=sync)
    return {**summarize(times), "stopped_by": stopped, "total_s": float(sum(times) / 1000.0)}


# ---------------------------------------------------------------- machine facts

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """The process's peak resident set so far (ru_maxrss; KiB on Linux)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """The process's current resident set in MiB (psutil; /proc/self/statm without it)."""
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return float("nan")


def trim_heap() -> None:
    """Give freed heap back to the OS (glibc), so the next artifact's RSS delta starts clean."""
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_command(cmd: list[str], timeout: float = 5.0) -> str | None:
    """stdout+stderr of ``cmd`` (trimmed) if the program exists; None otherwise. Never raises."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except Exception as e:  # timeout, permissions: record, never fail the profile
        return f"({cmd[0]} failed: {type(e).__name__})"
    text = (p.stdout + ("\n" + p.stderr if p.stderr.strip() else "")).strip()
    if p.returncode != 0:
        text = f"(exit {p.returncode}) {text}"
    return text[:2000]


def jetson_info() -> dict | None:
    """Power mode and clocks on a Jetson (``nvpmodel -q``, ``jetson_clocks --show``); None elsewhere."""
    release = None
    with contextlib.suppress(OSError):
        release = Path("/etc/nv_tegra_release").read_text().splitlines()[0].strip()
    nvp = run_command(["nvpmodel", "-q"])
    clocks = run_command(["jetson_clocks", "--show"])
    if release is None and nvp is None and clocks is None:
        return None
    return {"l4t_release": release, "nvpmodel": nvp, "jetson_clocks": clocks}


def gpu_info() -> dict | None:
    """Name, driver, memory and clocks of GPU 0 from nvidia-smi, else from the CUDA driver; None if none."""
    smi = run_command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
                       "power.limit", "--format=csv,noheader"])
    if smi and not smi.startswith("("):
        first = smi.splitlines()[0]
        keys = ("name", "driver", "memory_total", "clock_sm", "clock_mem", "power_limit")
        return dict(zip(keys, (v.strip() for v in first.split(","))))
    with contextlib.suppress(Exception):
        from export.tensorrt import _cuda_device
        dev = _cuda_device()
        if dev:
            return {"name": dev[0], "compute_capability": dev[1]}
    return None


def gpu_used_mb() -> float | None:
    """Device-wide used memory of GPU 0 (nvidia-smi), or None."""
    out = run_command(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"])
    try:
        return float(out.splitlines()[0]) if out else None
    except (ValueError, IndexError):
        return None


def physical_cores() -> int | None:
    with contextlib.suppress(Exception):
        import psutil
        return psutil.cpu_count(logical=False)
    return None


def library_versions() -> dict:
    from importlib import metadata

    from pipeline.runner import library_versions as pipeline_libraries
    out = pipeline_libraries()
    for name in ("psutil", "matplotlib"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def environment(threads: int) -> dict:
    """Everything that changes a latency number, recorded beside it."""
    env = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "physical_cores": physical_cores(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads or "default",
        "ort_intra_op_threads": threads or f"default ({physical_cores() or os.cpu_count()}: one per physical core)",
        "platform": platform.platform(), "python": platform.python_version(),
        "libraries": library_versions(),
    }
    if "torch" in sys.modules:
        import torch
        env["torch_threads"] = torch.get_num_threads()
    with contextlib.suppress(Exception):
        from export.runners import available_ort_providers
        env["ort_providers"] = available_ort_providers()
    with contextlib.suppress(OSError, AttributeError):
        env["load_avg_start"] = [round(v, 2) for v in os.getloadavg()]
    env["gpu"] = gpu_info()
    env["jetson"] = jetson_info()
    return env


# ---------------------------------------------------------------- artifacts and backends

def role(art: dict) -> str:
    """What an artifact is in the lineage: baseline-torch, pruned-torch, baseline-onnx, onnx-<p>, engine-<p>."""
    if art.get("role"):
        return art["role"]
    kind, prec = art.get("kind") or _kind(art), art.get("precision") or "fp32"
    if kind == "torch":
        return "baseline-torch" if art.get("stage") == "baseline" else "pruned-torch"
    if kind == "onnx":
        return "baseline-onnx" if art.get("stage") == "profile" else f"onnx-{prec}"
    return f"{kind}-{prec}"


def _kind(art: dict) -> str | None:
    """The kind of an artifact from an older latency row that did not record it."""
    backend, name = art.get("backend") or "", art.get("file") or art.get("name") or ""
    if backend.startswith("torch") or name.endswith((".pt", ".safetensors")):
        return "torch"
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith((".engine", ".plan")) or backend == "tensorrt":
        return "engine"
    return None


def backends_for(kind: str, *, torch_enabled: bool = True) -> list[str]:
    """The backends present on this machine that can run an artifact of this kind."""
    if kind == "torch":
        if not torch_enabled:
            return []
        out = ["torch-cpu"]
        with contextlib.suppress(Exception):
            import torch
            if torch.cuda.is_available():
                out.append("torch-cuda")
        return out
    if kind == "onnx":
        from export.runners import available_ort_providers
        have = available_ort_providers()
        out = ["onnxruntime-cpu"]
        if "CUDAExecutionProvider" in have:
            out.append("onnxruntime-cuda")
        if "TensorrtExecutionProvider" in have and _trt_info() is not None:
            out.append("onnxruntime-tensorrt")
        return out
    if kind == "engine":
        return ["tensorrt"] if _trt_info() is not None else []
    return []


def _trt_info():
    with contextlib.suppress(Exception):
        from export.tensorrt import trt_version_info
        return trt_version_info()
    return None


@dataclass
class Session:
    """One artifact opened on one backend: ``run(batch)``; ``close()`` frees it."""
    run: Callable[[np.ndarray], object]
    close: Callable[[], None] = lambda: None
    sync: Callable[[], object] | None = None
    threads: int | None = None
    gpu_peak_mb: Callable[[], float | None] | None = None
    batch_range: tuple[int, int] | None = None   # engines: the optimisation profile's min/max batch
    notes: list = field(default_factory=list)


def open_session(ctx, art: dict, backend: str, threads: int, batches) -> Session:
    """Loads ``art`` on ``backend``. GPU branches are written against the documented APIs, untested here."""
    kind = art["kind"]
    if kind == "torch":
        return _open_torch(ctx, art, backend, threads)
    if kind == "onnx":
        return _open_ort(ctx, art, backend, threads, batches)
    if kind == "engine" and backend == "tensorrt":
        return _open_trt(ctx, art)
    raise ValueError(f"{art['label']}: no backend {backend!r} for kind {kind!r}")


def _open_torch(ctx, art: dict, backend: str, threads: int) -> Session:
    import torch

    from pipeline import stages
    if threads:
        torch.set_num_threads(threads)
    model = stages.load_baseline(ctx) if art["stage"] == "baseline" else stages.load_pruned_from(ctx, art["stage"])
    if backend == "torch-cpu":
        def run(x, m=model):
            with torch.inference_mode():
                return m(torch.from_numpy(x))
        return Session(run=run, threads=torch.get_num_threads())
    if backend == "torch-cuda":  # UNTESTED here: no GPU in this project's machines
        dev = torch.device("cuda")
        model = model.to(dev)
        torch.cuda.reset_peak_memory_stats(dev)

        def run_cuda(x, m=model):
            with torch.inference_mode():
                out = m(torch.from_numpy(x).to(dev))
                outs = out if isinstance(out, (tuple, list)) else (out,)
                return [o.cpu() for o in outs]  # host copy: same contract as the other GPU runners

        def close(m=model):
            del m
            torch.cuda.empty_cache()
        return Session(run=run_cuda, close=close, sync=torch.cuda.synchronize, threads=torch.get_num_threads(),
                       gpu_peak_mb=lambda: torch.cuda.max_memory_allocated(dev) / 2**20,
                       notes=["includes host->device input and device->host output copies"])
    raise ValueError(f"torch backend {backend!r}")


def _open_ort(ctx, art: dict, backend: str, threads: int, batches) -> Session:
    from export.runners import OrtRunner
    cleanup = []
    notes = []
    if backend == "onnxruntime-cpu":
        providers = ["CPUExecutionProvider"]
    elif backend == "onnxruntime-cuda":  # UNTESTED here
        providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        notes.append("includes host<->device copies (numpy in, numpy out)")
    elif backend == "onnxruntime-tensorrt":  # UNTESTED here
        from export.tensorrt import ort_tensorrt_provider_options
        trt = _trt_info()
        cache = tempfile.mkdtemp(prefix="ort_trt_cache_")
        cleanup.append(lambda: shutil.rmtree(cache, ignore_errors=True))
        cfg = ctx.cfg
        # Precision comes from the ONNX itself (FP16 tensors, Q/DQ): no trt_fp16/int8 flags.
        providers = ort_tensorrt_provider_options(trt["major"], cache_dir=cache, min_batch=min(batches),
                                                  opt_batch=sorted(batches)[len(batches) // 2],
                                                  max_batch=max(batches), input_name="input",
                                                  input_shape=(cfg.data.channels, *cfg.data.size))
        notes.append("TensorRT EP engine built on first use (in warm-up); includes host<->device copies")
    else:
        raise ValueError(f"onnxruntime backend {backend!r}")
    runner = OrtRunner(art["path"], providers=providers, threads=threads)
    if backend != "onnxruntime-cpu" and runner.providers[0] != (providers[0][0] if isinstance(providers[0], tuple)
                                                               else providers[0]):
        notes.append(f"onnxruntime placed the session on {runner.providers}")
    name = runner.input_names[0]

    def close():
        runner.__exit__(None, None, None)
        for c in cleanup:
            c()
    ort_threads = threads or physical_cores() or os.cpu_count()
    return Session(run=lambda x: runner.infer({name: x}), close=close, threads=ort_threads, notes=notes)


def _open_trt(ctx, art: dict) -> Session:  # UNTESTED here: no TensorRT/GPU in this project's machines
    from export.tensorrt import TrtEngineRunner
    runner = TrtEngineRunner(art["path"]).__enter__()
    name = runner.input_names[0]
    e = ctx.cfg.engine
    return Session(run=lambda x: runner.infer({name: x}), close=lambda: runner.__exit__(None, None, None),
                   batch_range=(e.min_batch, e.max_batch),
                   notes=["includes host<->device copies (Polygraphy TrtRunner)"])


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if f.endswith((".pt", ".safetensors")))
    return os.path.getsize(path)


def _macs(ctx, art: dict) -> int | None:
    """MACs of the network inside an artifact: the baseline's or the pruned model's."""
    recs = ctx.records
    if role(art) in ("baseline-torch", "baseline-onnx"):
        return (recs.get("baseline") or {}).get("metrics", {}).get("macs")
    m = (recs.get(art["stage"]) or {}).get("metrics", {}).get("macs")
    return m if m is not None else (recs.get("finetune") or {}).get("metrics", {}).get("macs")


def export_baseline_onnx(ctx) -> dict | None:
    """The unpruned baseline as ONNX fp32 in the profile stage's folder, for ONNX-vs-ONNX ratios."""
    from export.onnx_export import export_onnx
    from pipeline import stages
    cfg = ctx.cfg
    path = Path(ctx.out) / BASELINE_ONNX
    if not path.is_file():
        model = stages.load_baseline(ctx)
        export_onnx(model, stages.example_input(cfg), path, opset=cfg.export.opset,
                    output_names=stages.output_names(model), slim=cfg.export.slim)
    base = (ctx.records.get("baseline") or {}).get("metrics", {})
    return {"kind": "onnx", "precision": "fp32", "label": BASELINE_ONNX_LABEL, "stage": "profile",
            "name": BASELINE_ONNX, "path": str(path), "top1": base.get("top1"), "role": "baseline-onnx",
            "top1_note": "the torch baseline's top-1 (same network; not re-measured in ONNX)"}


# ---------------------------------------------------------------- the profile

def profile_artifacts(ctx, artifacts: list[dict]) -> tuple[list[dict], dict]:
    """Latency rows (one per artifact x backend x batch) and the environment they were measured in."""
    p, cfg = ctx.cfg.profile, ctx.cfg
    threads = p.threads or cfg.run.threads
    rounds = max(1, int(getattr(p, "rounds", 3)))
    batches = tuple(p.batches)
    shape = (cfg.data.channels, *cfg.data.size)
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, *shape), dtype=np.float32) for b in batches}
    env = environment(threads)
    skipped: list[dict] = []
    torch_threads_before = _torch_threads()

    artifacts = [dict(a) for a in artifacts]
    if getattr(p, "baseline_onnx", True) and not any(role(a) == "baseline-onnx" for a in artifacts):
        try:
            artifacts.append(export_baseline_onnx(ctx))
        except Exception as e:  # a model the exporter cannot handle must not cost the whole profile
            skipped.append({"artifact": BASELINE_ONNX_LABEL, "backend": "-", "batch": None,
                            "reason": f"export failed: {str(e).splitlines()[0][:200]}"})
            ctx.log(f"  {BASELINE_ONNX_LABEL}: export failed, ONNX ratios fall back to the torch baseline ({e})")
    artifacts.sort(key=lambda a: ROLE_ORDER.index(role(a)) if role(a) in ROLE_ORDER else len(ROLE_ORDER))

    specs = [(art, backend) for art in artifacts
             for backend in backends_for(art["kind"], torch_enabled=p.torch)]
    if p.iters > 0:
        rounds = min(rounds, p.iters)
    # p.iters calls in all, spread over the rounds (the first rounds take the remainder)
    per_round = [p.iters // rounds + (r < p.iters % rounds) for r in range(rounds)] if p.iters > 0 else [0] * rounds
    budget = p.time_budget_s / rounds if p.time_budget_s else 0.0
    min_iters = max(1, math.ceil(5 / rounds))

    entries = []  # one per opened (artifact, backend)

    def open_one(art, backend):
        trim_heap()
        before = rss_mb()
        gpu_before = gpu_used_mb() if backend in GPU_BACKENDS and backend != "torch-cuda" else None
        try:
            s = open_session(ctx, art, backend, threads, batches)
        except Exception as e:
            if backend in GPU_BACKENDS:  # optional backends: record why, keep going
                skipped.append({"artifact": art["label"], "backend": backend, "batch": None,
                                "reason": f"could not open: {str(e).splitlines()[0][:200]}"})
                ctx.log(f"  {art['label']:<30} {backend:<20} not measured: {e}")
                return None
            raise
        entry = {"art": art, "backend": backend, "session": s, "rss_before": before, "gpu_before": gpu_before,
                 "load_rss_mb": rss_mb() - before, "samples": {}, "round_p50": {}, "stopped_by": {},
                 "rss_delta": {}, "gpu_mb": {}, "batches": []}
        for b in batches:
            lo, hi = s.batch_range or (1, 1 << 30)
            if not lo <= b <= hi:
                skipped.append({"artifact": art["label"], "backend": backend, "batch": b,
                                "reason": f"outside the engine's batch range {lo}..{hi}"})
                continue
            entry["batches"].append(b)
            run = s.run
            for _ in range(max(p.warmup, 1)):  # at least one call: TensorRT EP builds here, memory peaks here
                run(inputs[b])
                if s.sync:
                    s.sync()
            _sample_memory(entry, b)
        return entry

    def time_round(entry, r: int, warm: int):
        s = entry["session"]
        for b in entry["batches"]:
            x = inputs[b]
            for _ in range(warm):
                s.run(x)
            times, stopped = time_calls(lambda: s.run(x), iters=per_round[r], time_budget_s=budget,
                                        min_iters=min_iters, sync=s.sync)
            entry["samples"].setdefault(b, []).extend(times)
            entry["round_p50"].setdefault(b, []).append(float(np.median(times)))
            entry["stopped_by"][b] = stopped

    # Memory is sampled in open_one, after the warm-up at each batch and before the next artifact
    # opens: later samples would include every session opened since.
    if rounds == 1:  # one artifact at a time: lowest memory, no interleaving
        for art, backend in specs:
            entry = open_one(art, backend)
            if entry is not None:
                try:
                    time_round(entry, 0, 0)
                finally:
                    entry["session"].close()
                entries.append(entry)
    else:  # all sessions open, rounds interleaved so that outside load spreads over every artifact
        try:
            for art, backend in specs:
                entry = open_one(art, backend)
                if entry is not None:
                    entries.append(entry)
            for r in range(rounds):
                for entry in entries:
                    time_round(entry, r, 0 if r == 0 else min(2, p.warmup))
        finally:
            for entry in entries:
                entry["session"].close()
    trim_heap()
    if "torch" in sys.modules:
        import torch
        env["torch_threads"] = torch.get_num_threads()
        if torch_threads_before:
            torch.set_num_threads(torch_threads_before)  # set_num_threads is process-wide: put it back

    rows = []
    for entry in entries:
        art, backend, s = entry["art"], entry["backend"], entry["session"]
        for b in entry["batches"]:
            stats = summarize(entry["samples"][b])
            rp = entry["round_p50"][b]
            row = {"artifact": art["label"], "file": art["name"], "stage": art["stage"], "kind": art["kind"],
                   "role": role(art), "precision": art.get("precision"), "backend": backend, "batch": b, **stats,
                   "throughput_per_s": b * 1000.0 / stats["p50_ms"], "stopped_by": entry["stopped_by"][b],
                   "rounds": len(rp), "round_p50_ms": [round(v, 6) for v in rp],
                   "p50_spread_pct": round(100.0 * (max(rp) - min(rp)) / stats["p50_ms"], 2) if len(rp) > 1 else None,
                   "top1": art.get("top1"), "size_bytes": _size(art["path"]), "macs": _macs(ctx, art),
                   "threads": s.threads, "load_rss_mb": _r(entry["load_rss_mb"]),
                   "rss_delta_mb": _r(entry["rss_delta"].get(b)), "gpu_mb": _r(entry["gpu_mb"].get(b)),
                   "notes": s.notes or None}
            rows.append(row)
            ctx.log(f"  {art['label']:<30} {backend:<16} batch {b:<3} p50 {stats['p50_ms']:.3f} ms "
                    f"p99 {stats['p99_ms']:.3f} ms ({stats['iters']} calls)")
    with contextlib.suppress(OSError, AttributeError):
        env["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    env.update({
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "method": {"warmup": p.warmup, "iters": p.iters, "time_budget_s": p.time_budget_s, "rounds": rounds,
                   "timer": "time.perf_counter, gc disabled while timing", "input": "random float32, host numpy",
                   "throughput": "batch / p50", "memory": "psutil RSS growth around session creation and runs"},
        "copies_included": "GPU timings (torch-cuda, onnxruntime CUDA/TensorRT, TensorRT via Polygraphy) "
                           "include host<->device copies",
        "not_measured": skipped,
    })
    return rows, env


def _torch_threads() -> int | None:
    if "torch" not in sys.modules:
        return None
    import torch
    return torch.get_num_threads()


def _r(v, nd=2):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), nd)


def _sample_memory(entry, b):
    entry["rss_delta"][b] = max(entry["rss_delta"].get(b, float("-inf")), rss_mb() - entry["rss_before"])
    s = entry["session"]
    if s.gpu_peak_mb is not None:
        with contextlib.suppress(Exception):
            entry["gpu_mb"][b] = s.gpu_peak_mb()
    elif entry["gpu_before"] is not None:
        now = gpu_used_mb()
        if now is not None:
            entry["gpu_mb"][b] = now - entry["gpu_before"]


# ---------------------------------------------------------------- what the numbers mean

def speedup_table(rows: list[dict], tolerance: float = 0.05) -> list[dict]:
    """Realized speedup of each latency row against the unpruned baseline, beside the ideal (MAC ratio).

    ``speedup`` = reference p50 / p50 (> 1: faster), against the baseline of the same backend family
    on the same backend (torch models: the torch baseline; ONNX models: the baseline exported to ONNX
    fp32; TensorRT engines: that ONNX on onnxruntime-tensorrt, where measured). ``vs_torch_cpu`` is the
    ratio to the torch baseline on torch-cpu. ``mac_ratio`` = baseline MACs / artifact MACs is what
    pruning alone would give if latency followed MACs; ``efficiency`` = speedup / mac_ratio.
    A row is flagged when it is more than ``tolerance`` slower than its parent (pruned vs unpruned,
    fp16/int8 vs fp32) on the same backend and batch.
    """
    by = {(r.get("role") or role(r), r["backend"], r["batch"]): r for r in rows}
    base_macs = next((r.get("macs") for r in rows if (r.get("role") or role(r)) == "baseline-torch"
                      and r.get("macs")), None) or \
        next((r.get("macs") for r in rows if (r.get("role") or role(r)) == "baseline-onnx" and r.get("macs")), None)
    out = []
    for r in sorted(rows, key=_row_order):
        rl = r.get("role") or role(r)
        backend, b = r["backend"], r["batch"]
        ref = None
        if backend.startswith("torch"):
            ref = by.get(("baseline-torch", backend, b))
        elif backend.startswith("onnxruntime"):
            ref = by.get(("baseline-onnx", backend, b))
        elif backend == "tensorrt":
            ref = by.get(("baseline-onnx", "onnxruntime-tensorrt", b))
        torch_cpu = by.get(("baseline-torch", "torch-cpu", b))
        parent_role = PARENT.get(rl)
        parent = by.get((parent_role, backend, b)) if parent_role else None
        p50 = r["p50_ms"]
        macs = r.get("macs")
        mac_ratio = base_macs / macs if base_macs and macs else None
        speedup = ref["p50_ms"] / p50 if ref else None
        vs_parent = parent["p50_ms"] / p50 if parent else None
        slower = None if parent is None else p50 > parent["p50_ms"] * (1.0 + tolerance)
        flag = None
        if slower:
            flag = (f"slower than its parent {parent['artifact']} on {backend} at batch {b}: "
                    f"{p50:.4g} ms vs {parent['p50_ms']:.4g} ms ({p50 / parent['p50_ms']:.2f}x the time)")
        out.append({
            "artifact": r["artifact"], "role": rl, "backend": backend, "batch": b, "p50_ms": p50,
            "reference": ref["artifact"] if ref else None, "reference_backend": ref["backend"] if ref else None,
            "reference_p50_ms": ref["p50_ms"] if ref else None,
            "speedup": _r(speedup, 4),
            "vs_torch_cpu": _r(torch_cpu["p50_ms"] / p50, 4) if torch_cpu else None,
            "macs": macs, "mac_ratio": _r(mac_ratio, 4),
            "efficiency": _r(speedup / mac_ratio, 4) if speedup and mac_ratio else None,
            "parent": parent["artifact"] if parent else None, "parent_p50_ms": parent["p50_ms"] if parent else None,
            "vs_parent": _r(vs_parent, 4), "slower_than_parent": slower, "flag": flag,
        })
    return out


def _row_order(r):
    rl = r.get("role") or role(r)
    return (BACKEND_ORDER.index(r["backend"]) if r["backend"] in BACKEND_ORDER else 99,
            ROLE_ORDER.index(rl) if rl in ROLE_ORDER else 99, r["artifact"], r["batch"])
