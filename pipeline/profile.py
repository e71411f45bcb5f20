"""Latency of every artifact on every backend present, and what it means next to the baseline.

A library: ``profile_artifacts(items, input_shape=, options=, load_torch=, log=) -> Profile``. It
times the artifacts it is given (pipeline.records.Located; the export stage provides the unpruned
baseline ONNX as role "baseline-onnx") and knows nothing of configs, runs or contexts.

What is measured, and how (the report repeats this for its reader):

* Backends: torch-cpu and onnxruntime-cpu always; torch-cuda, onnxruntime-cuda,
  onnxruntime-tensorrt and tensorrt only where present (imported lazily; these branches have NOT
  run on a GPU in this project). Inputs are random float32 host arrays; GPU times include
  host<->device copies.
* Absolute latency (``rows``): each artifact x backend opened once, ``warmup`` calls, then
  ``iters`` timed calls (or fewer when ``time_budget_s`` runs out) per batch, edgerun.timing's
  timer. Absolute times move with the machine's load: they are recorded, not compared.
* Ratios (``speedups``): edgerun.timing's protocol. The artifacts of one backend are compared
  together at each batch: interleaved blocks of >= ``block_ms``, order alternating, ``rounds``
  rounds, median of the per-round ratios with p10-p90, in ``processes`` fresh processes
  (accepted when max/min <= 1.2, else measured again, else ``reproducible`` False). Torch models
  cannot be sent to a worker by path: they are compared in this process (``processes`` 1).
  onnxruntime's TensorRT EP and TensorRT engines are compared together.
* Oversubscription: a row whose threads x concurrent processes exceed the usable cores, or that
  ran more than one thread on a machine whose load average was at or above its cores, carries
  ``oversubscribed`` (why) and is never presented as a speedup.
* Memory: ``load_rss_mb`` = resident-set growth while the session was created, ``rss_delta_mb`` =
  growth by the end of the timed calls at that batch (sampled, approximate: allocator caches,
  library set-up on first use). GPU: torch's ``max_memory_allocated`` (torch-cuda), else the
  device-wide nvidia-smi delta (includes other processes; absent on a Jetson).

Latency row keys (report.json ``latency``): artifact, backend, batch, p50_ms, p90_ms, p99_ms,
throughput_per_s (batch / p50), mean_ms, std_ms, file, precision, <the task's metric>, size_bytes, plus role, kind,
stage, min_ms, max_ms, iters, stopped_by, total_s, threads, macs, load_rss_mb, rss_delta_mb, gpu_mb,
oversubscribed (None or why), notes.

Speedup entry keys (pipeline.profile_speedup.speedup_table): artifact, role, backend, batch, p50_ms
(the row's), reference, reference_backend, speedup (reference time / this time, from the ratio;
1.0 for the reference itself), speedup_p10, speedup_p90, ratio_p50_ms and reference_p50_ms (both
absolute per-call figures inside the comparison), parent, vs_parent (parent time / this time),
vs_parent_p10, vs_parent_p90, parent_p50_ms, slower_than_parent (time ratio > 1 + tolerance),
processes, reproducible (None: one process, not checked), macs, mac_ratio (baseline MACs /
artifact MACs: what latency following MACs would give), efficiency (speedup / mac_ratio),
oversubscribed, flag (text, or None).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgerun import machine as mach
from edgerun.sessions import Session, open_session
from edgerun.sessions import backends_for as _runtime_backends
from edgerun.timing import Repeated, Spec, SpecItem, TimingError, compare, measure, repeat_in_processes
from pipeline.errors import PipelineError
from pipeline.profile_speedup import BACKEND_ORDER, GPU_BACKENDS, PARENT, ROLE_ORDER, role, run_name, speedup_table
from pipeline.records import Located

__all__ = ["BACKEND_ORDER", "GPU_BACKENDS", "PARENT", "ROLE_ORDER", "Profile", "ProfileError", "ProfileOptions",
           "Skipped", "profile_artifacts", "role", "speedup_table"]

LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "tensorrt", "polygraphy", "psutil")


class ProfileError(PipelineError):
    """Bad profile options or inputs."""


@dataclass(frozen=True)
class ProfileOptions:
    batches: tuple[int, ...] = (1, 8, 64)
    warmup: int = 10
    iters: int = 50               # timed calls per artifact x backend x batch (absolute latency)
    time_budget_s: float = 0.0    # > 0: stop each absolute measurement after this many seconds
    threads: int = 0              # torch and onnxruntime intra-op threads; 0: their defaults
    torch: bool = True            # also time the torch models
    rounds: int = 25              # protocol rounds per comparison
    baseline_onnx: bool = True    # the export stage writes the unpruned baseline ONNX (role baseline-onnx)
    slower_tolerance: float = 0.05  # flag an artifact more than this fraction slower than its parent
    block_ms: float = 30.0        # protocol: each block of calls lasts at least this long
    processes: int = 3            # protocol: fresh processes per ONNX/engine comparison (1: in this one)


@dataclass(frozen=True)
class Skipped:
    artifact: str
    backend: str
    batch: int | None
    reason: str

    def to_json(self) -> dict:
        return {"artifact": self.artifact, "backend": self.backend, "batch": self.batch, "reason": self.reason}


@dataclass(frozen=True)
class Profile:
    rows: tuple[dict, ...]
    speedups: tuple[dict, ...]
    comparisons: tuple[Repeated, ...]
    environment: dict
    skipped: tuple[Skipped, ...] = ()

    def to_json(self) -> dict:
        return {"latency": list(self.rows), "speedup": list(self.speedups),
                "comparisons": [c.to_json() for c in self.comparisons], "environment": self.environment,
                "not_measured": [s.to_json() for s in self.skipped]}


@dataclass
class _Timed:
    """One artifact on one backend while it is being profiled."""
    item: Located
    label: str
    backend: str
    session: Session | None = None
    rows: dict = field(default_factory=dict)   # batch -> row


def _check(options: ProfileOptions, input_shape) -> None:
    o = options
    if not o.batches or any(not isinstance(b, int) or b < 1 for b in o.batches):
        raise ProfileError(f"profile batches {o.batches!r}: expected positive integers")
    if o.iters < 0 or o.warmup < 0 or o.time_budget_s < 0 or (o.iters == 0 and o.time_budget_s == 0):
        raise ProfileError(f"profile iters {o.iters}, warmup {o.warmup}, time_budget_s {o.time_budget_s}: "
                           "expected iters > 0 or time_budget_s > 0, none negative")
    if o.rounds < 1 or o.block_ms <= 0 or o.processes < 1 or o.threads < 0:
        raise ProfileError(f"profile rounds {o.rounds}, block_ms {o.block_ms}, processes {o.processes}, threads "
                           f"{o.threads}: expected rounds >= 1, block_ms > 0, processes >= 1, threads >= 0")
    if not input_shape or any(not isinstance(d, int) or d < 1 for d in input_shape):
        raise ProfileError(f"input_shape {input_shape!r}: expected one sample's shape, e.g. (3, 32, 32)")


def _label(item: Located) -> str:
    return item.artifact.label or item.artifact.role


def backends_for(kind: str, *, torch_enabled: bool = True) -> list[str]:
    """The backends present on this machine that run an artifact of this kind."""
    if kind != "torch":
        return _runtime_backends(kind)
    if not torch_enabled:
        return []
    out = ["torch-cpu"]
    with contextlib.suppress(Exception):
        import torch
        if torch.cuda.is_available():
            out.append("torch-cuda")
    return out


def _group(backend: str) -> str:
    """Backends whose artifacts are compared together."""
    return "tensorrt" if backend in ("tensorrt", "onnxruntime-tensorrt") else backend


def profile_artifacts(items: list[Located], *, input_shape: tuple, options: ProfileOptions = ProfileOptions(),
                      load_torch: Callable[[Located], "object"] | None = None, log=print) -> Profile:
    """Latency rows (artifact x backend x batch), protocol ratios, speedups and the environment."""
    o = options
    _check(o, tuple(input_shape))
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, *input_shape), dtype=np.float32) for b in o.batches}
    skipped: list[Skipped] = []
    load_start = mach.load_average()

    order = sorted(items, key=lambda i: ROLE_ORDER.index(i.artifact.role) if i.artifact.role in ROLE_ORDER else 99)
    groups: dict[str, list[_Timed]] = {}
    for it in order:
        kind = it.artifact.kind
        if kind not in ("torch", "onnx", "engine"):
            continue
        if kind == "torch" and (not o.torch or load_torch is None):
            skipped.append(Skipped(_label(it), "torch-*", None, "profile.torch is false" if not o.torch
                                   else "no torch loader given"))
            continue
        found = backends_for(kind, torch_enabled=o.torch)
        if not found:
            skipped.append(Skipped(_label(it), "-", None, f"no backend for {kind} files on this machine"))
        for backend in found:
            group = groups.setdefault(_group(backend), [])
            if any(t.label == _label(it) and t.backend == backend for t in group):
                raise ProfileError(f"artifact label {_label(it)!r} appears twice on {backend}: labels name the "
                                   "rows and the comparisons, so they must be distinct")
            group.append(_Timed(it, _label(it), backend))

    ctx = _Run(o, tuple(input_shape), inputs, load_start, load_torch, skipped, log)
    repeats: list[Repeated] = []
    notes: list[str] = []
    try:
        for group in sorted(groups, key=lambda g: BACKEND_ORDER.index(g) if g in BACKEND_ORDER else 99):
            in_process = group.startswith("torch") or o.processes == 1
            try:
                timed = [t for t in groups[group] if ctx.time_rows(t, keep_open=in_process)]
                repeats += ctx.ratios(timed, in_process, notes)
            finally:
                for t in groups[group]:
                    if t.session is not None:
                        t.session.close()
                        t.session = None
    finally:
        mach.trim_heap()
        if ctx.torch_threads_before:
            import torch
            torch.set_num_threads(ctx.torch_threads_before)  # set_num_threads is process-wide: put it back

    rows = [row for ts in groups.values() for t in ts for row in t.rows.values()]
    rows.sort(key=lambda r: (ROLE_ORDER.index(r["role"]) if r["role"] in ROLE_ORDER else 99,
                             BACKEND_ORDER.index(r["backend"]) if r["backend"] in BACKEND_ORDER else 99, r["batch"]))
    speedups = speedup_table(rows, repeats, tolerance=o.slower_tolerance)
    env = environment(o, load_start, notes, skipped)
    return Profile(tuple(rows), tuple(speedups), tuple(repeats), env, tuple(skipped))


@dataclass
class _Run:
    o: ProfileOptions
    input_shape: tuple
    inputs: dict
    load_start: tuple | None
    load_torch: Callable | None
    skipped: list
    log: Callable
    torch_threads_before: int | None = None

    def open(self, t: _Timed) -> Session:
        if t.item.artifact.kind == "torch":
            model = self.load_torch(t.item)
            if self.torch_threads_before is None:
                self.torch_threads_before = _torch_threads()
            return _open_torch(model, t.backend, self.o.threads)
        return open_session(t.item.path, t.backend, threads=self.o.threads, batches=self.o.batches,
                            input_shape=self.input_shape)

    def time_rows(self, t: _Timed, *, keep_open: bool) -> bool:
        """Opens ``t``, times it at every batch into ``t.rows``; False when an optional backend cannot open it."""
        o = self.o
        mach.trim_heap()
        before = mach.rss_mb()
        gpu_before = mach.gpu_used_mb() if t.backend in GPU_BACKENDS and t.backend != "torch-cuda" else None
        try:
            s = self.open(t)
        except Exception as e:
            if t.backend not in GPU_BACKENDS:
                raise
            self.skipped.append(Skipped(t.label, t.backend, None, f"could not open: {str(e).splitlines()[0][:200]}"))
            self.log(f"  {t.label:<30} {t.backend:<20} not measured: {e}")
            return False
        t.session = s
        load_mb = _minus(mach.rss_mb(), before)
        busy = mach.oversubscribed(s.threads or 1, processes=1, load=self.load_start)
        for b in o.batches:
            lo, hi = s.batch_range or (1, 1 << 30)
            if not lo <= b <= hi:
                self.skipped.append(Skipped(t.label, t.backend, b, f"outside the engine's batch range {lo}..{hi}"))
                continue
            # at least one untimed call: the TensorRT EP builds its engine there, memory peaks there
            st = measure(lambda x=self.inputs[b]: s.run(x), warmup=max(1, o.warmup), iters=o.iters,
                         time_budget_s=o.time_budget_s, sync=s.sync)
            t.rows[b] = self.row(t, s, b, st, load_mb, _minus(mach.rss_mb(), before), self.gpu_mb(s, gpu_before), busy)
            self.log(f"  {t.label:<30} {t.backend:<16} batch {b:<3} p50 {st.p50_ms:.3f} ms p99 {st.p99_ms:.3f} ms "
                     f"({st.iters} calls)" + (f" [oversubscribed: {busy}]" if busy else ""))
        if not keep_open:
            s.close()
            t.session = None
        return True

    @staticmethod
    def gpu_mb(s: Session, gpu_before):
        if s.gpu_peak_mb is not None:
            with contextlib.suppress(Exception):
                return s.gpu_peak_mb()
        return _minus(mach.gpu_used_mb(), gpu_before) if gpu_before is not None else None

    @staticmethod
    def row(t: _Timed, s: Session, b: int, st, load_mb, rss_mb, gpu_mb, busy) -> dict:
        a, it = t.item.artifact, t.item
        return {"artifact": t.label, "backend": t.backend, "batch": b, "p50_ms": st.p50_ms, "p90_ms": st.p90_ms,
                "p99_ms": st.p99_ms, "throughput_per_s": b * 1000.0 / st.p50_ms, "mean_ms": st.mean_ms,
                "std_ms": st.std_ms, "file": a.file or Path(it.path).name, "precision": a.precision,
                **({it.score.metric: it.score.value} if it.score else {}), "size_bytes": _size(Path(it.path)),
                "role": a.role, "kind": a.kind,
                "stage": a.stage, "min_ms": st.min_ms, "max_ms": st.max_ms, "iters": st.iters,
                "stopped_by": st.stopped_by, "total_s": st.total_s, "threads": s.threads, "macs": it.macs,
                "load_rss_mb": _round(load_mb), "rss_delta_mb": _round(rss_mb), "gpu_mb": _round(gpu_mb),
                "oversubscribed": busy, "notes": list(s.notes) or None}

    def ratios(self, timed: list[_Timed], in_process: bool, notes: list) -> list[Repeated]:
        """Interleaved comparisons of one group's artifacts, for each set of batches they all ran."""
        o = self.o
        by_set: dict[tuple, list[int]] = {}
        for b in o.batches:
            members = tuple(t for t in timed if b in t.rows)
            if len(members) > 1:
                by_set.setdefault(tuple(id(t) for t in members), []).append(b)
        out = []
        for ids, batches in by_set.items():
            members = [t for t in timed if id(t) in ids]
            ref = _reference(members)
            names = {id(t): run_name(t.label, t.backend) for t in members}
            if not in_process:
                spec = Spec(tuple(SpecItem(names[id(t)], str(Path(t.item.path).resolve()), t.backend) for t in members),
                            names[id(ref)], tuple(batches), self.input_shape, threads=o.threads, block_ms=o.block_ms,
                            rounds=o.rounds, warmup=min(o.warmup, 3))
                try:
                    reps = repeat_in_processes(spec, o.processes, log=self.log)
                    out += reps
                    for r in reps:
                        self.log(f"  ratios on {members[0].backend} at batch {r.batch}: {r.processes} processes, "
                                 f"{'reproducible' if r.reproducible else 'NOT reproducible'}"
                                 + (" after a second measurement" if r.remeasured else ""))
                    continue
                except TimingError as e:   # keep the profile; the rows say processes = 1
                    notes.append(f"ratios on {members[0].backend} measured in this process: {e}")
                    self.log(f"  {notes[-1]}")
                    for t in members:
                        t.session = self.open(t)
            for b in batches:
                runs = {names[id(t)]: (lambda s=t.session, x=self.inputs[b]: s.run(x)) for t in members}
                out.append(Repeated(b, (compare(runs, reference=names[id(ref)], block_ms=o.block_ms, rounds=o.rounds,
                                                warmup=min(o.warmup, 3)),)))
            self.log(f"  ratios on {members[0].backend} at batch(es) {batches}: in this process")
        return out


def _reference(members: list[_Timed]) -> _Timed:
    """The unpruned baseline of the group, else the first artifact."""
    want = ("baseline-torch", "baseline-onnx")
    return next((t for t in members if t.item.artifact.role in want), members[0])


def _open_torch(model, backend: str, threads: int) -> Session:
    import torch
    if threads:
        torch.set_num_threads(threads)
    model.eval()
    if backend == "torch-cpu":
        def run(x, m=model):
            with torch.inference_mode():
                return m(torch.from_numpy(x))
        return Session(run=run, close=lambda: None, backend=backend, threads=torch.get_num_threads())
    if backend == "torch-cuda":  # UNTESTED here: no GPU in this project's machines
        dev = torch.device("cuda")
        model = model.to(dev)
        torch.cuda.reset_peak_memory_stats(dev)

        def run_cuda(x, m=model):
            with torch.inference_mode():
                out = m(torch.from_numpy(x).to(dev))
                outs = out if isinstance(out, (tuple, list)) else (out,)
                return [o.cpu() for o in outs]  # host copy: same contract as the other GPU runners
        return Session(run=run_cuda, close=torch.cuda.empty_cache, backend=backend, sync=torch.cuda.synchronize,
                       threads=torch.get_num_threads(),
                       gpu_peak_mb=lambda: torch.cuda.max_memory_allocated(dev) / 2**20,
                       notes=("includes host->device input and device->host output copies",))
    raise ProfileError(f"torch backend {backend!r}: expected torch-cpu or torch-cuda")


def environment(o: ProfileOptions, load_start, notes: list, skipped: list) -> dict:
    """Everything that changes a latency number, recorded beside it."""
    env = mach.machine().to_json()
    env.update({
        "threads": o.threads or "default",
        "ort_intra_op_threads": o.threads or f"default ({mach.physical_cores() or os.cpu_count()}: "
                                             "one per physical core)",
        "libraries": mach.library_versions(LIBRARIES), "load_avg_start": load_start,
        "load_avg_end": mach.load_average(),
        "peak_rss_mb": _round(mach.peak_rss_mb(), 1),
        "method": {"warmup": o.warmup, "iters": o.iters, "time_budget_s": o.time_budget_s,
                   "timer": "time.perf_counter, gc disabled while timing", "input": "random float32, host numpy",
                   "throughput": "batch / p50", "memory": "psutil RSS growth around session creation and runs",
                   "ratios": {"rounds": o.rounds, "block_ms": o.block_ms, "processes": o.processes,
                              "order": "alternating each round", "accept": "max/min of process medians <= 1.2",
                              "torch": "in this process (a model cannot be sent to a worker by path)"}},
        "copies_included": "GPU timings (torch-cuda, onnxruntime CUDA/TensorRT, TensorRT via Polygraphy) "
                           "include host<->device copies",
        "notes": notes, "not_measured": [s.to_json() for s in skipped],
    })
    if "torch" in sys.modules:
        import torch
        env["torch_threads"] = torch.get_num_threads()
    with contextlib.suppress(Exception):
        from edgerun.ort import available_ort_providers
        env["ort_providers"] = available_ort_providers()
    return env


def _torch_threads() -> int | None:
    if "torch" not in sys.modules:
        return None
    import torch
    return torch.get_num_threads()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".pt", ".safetensors"))
    return path.stat().st_size if path.is_file() else 0


def _minus(a, b):
    return None if a is None or b is None else a - b


def _round(v, nd=2):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), nd)
