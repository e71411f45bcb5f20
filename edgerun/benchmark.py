"""`edgepipe benchmark BUNDLE`: latency of every model in a deploy bundle on every backend present.

Run on the target. For each ONNX file (onnxruntime CPU, plus the CUDA / TensorRT execution
providers where this onnxruntime has them) and each engine (TensorRT, where it is importable) at
each batch: warm-up calls, then timed calls of one batch each with edgerun.timing's one timer
(p50/p90/p99, mean, std; throughput = batch / p50). Inputs are random host arrays of the
manifest's input dtype and outputs come back to the host, so GPU times include host<->device copies.

Ratios: the files on one backend are also compared with edgerun.timing's protocol (interleaved
blocks >= ``--block-ms``, ``--rounds`` rounds, in ``--processes`` fresh processes) against the
bundle's fp32 ONNX (else the first file) on that backend; ratio = time / reference time.

The bundle (a folder, or a .tar/.tar.gz of one) is read through edgerun.bundle: manifest
validated, every model's sha256 checked before it is loaded.

Writes ``--output`` (default ``<bundle>/benchmark.json``; for an archive ``<archive>.benchmark.json``):
``bundle``, ``machine`` (edgerun.machine.Machine: CPU, SIMD, cores, load, GPU, Jetson nvpmodel/clocks), ``libraries``,
``method``, ``latency`` rows (artifact, file, role, precision, backend, batch, p50_ms, p90_ms,
p99_ms, mean_ms, std_ms, min_ms, max_ms, iters, throughput_per_s, threads, notes), ``ratios``
(backend, batch, artifact, reference, ratio, p10, p90, processes, reproducible, p50_ms,
reference_p50_ms) and ``not_measured``. Last line on stdout: ``PASSED | ...`` or ``FAILED | ...``.

Also: ``open_session`` and ``backends_for``, which the timing worker and pipeline.profile share.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerun.errors import EdgeError
from edgerun.io import write_json
from edgerun.machine import library_versions, machine
from edgerun.sessions import GPU_BACKENDS, BenchmarkError, backends_for, open_session
from edgerun.timing import Repeated, Spec, SpecItem, compare, measure, repeat_in_processes

# ---------------------------------------------------------------- the bundle

@dataclass(frozen=True)
class BundleModel:
    file: str
    path: Path
    kind: str          # onnx | engine
    role: str
    precision: str
    label: str


@dataclass(frozen=True)
class BundleModels:
    models: tuple[BundleModel, ...]
    input_shape: tuple[int, ...]     # one sample, without the batch
    dtype: str                       # float32 | float16


def read_bundle(folder: Path) -> BundleModels:
    """The model files of an opened bundle: manifest validated, each file's sha256 checked (edgerun.bundle)."""
    from edgerun.verify import load_verified, verify_model
    manifest = load_verified(folder)
    models = []
    for name in manifest.models():
        f = manifest.files[name]
        precision = f.precision or "fp32"
        models.append(BundleModel(name, verify_model(manifest, name), f.kind, f"{f.kind}-{precision}",
                                  precision, f.label or name))
    if not models:
        raise BenchmarkError(f"{folder}/manifest.json: no ONNX or engine file listed under files")
    i = manifest.input
    return BundleModels(tuple(models), (i.channels, i.height, i.width), i.dtype)


def _reference(models: list[BundleModel]) -> BundleModel:
    return next((m for m in models if m.kind == "onnx" and m.precision == "fp32"), models[0])


# ---------------------------------------------------------------- the verb

def add_benchmark_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("benchmark", help="latency of a deploy bundle's models on this machine",
                              description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="a deploy bundle folder (with manifest.json)")
    p.add_argument("--output", help="where to write the JSON (default: BUNDLE/benchmark.json)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=100, help="timed calls per file x backend x batch")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--rounds", type=int, default=25, help="protocol rounds for ratios (0: no ratios)")
    p.add_argument("--block-ms", type=float, default=30.0)
    p.add_argument("--processes", type=int, default=3, help="fresh processes for the ratios")
    p.set_defaults(func=run_benchmark)
    return p


MAX_BATCH_SIZES = 16
MAX_INPUT_BYTES = 1 << 30   # all batches' random inputs together: 1 GiB (a Jetson Nano has 4 GiB in all)
# (low, high) of each count: an absurd value is a typo, refused before it runs for days
BOUNDS = {"--iters": (1, 100_000), "--warmup": (0, 10_000), "--threads": (0, 1024), "--rounds": (0, 1000),
          "--processes": (1, 32)}
MAX_BLOCK_MS = 10_000.0


def _batches(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        out = ()
    if not out or any(b < 1 for b in out):
        raise BenchmarkError(f"--batches {text!r}: expected positive integers separated by commas, e.g. 1,8")
    if len(set(out)) != len(out) or len(out) > MAX_BATCH_SIZES:
        raise BenchmarkError(f"--batches {text!r}: expected at most {MAX_BATCH_SIZES} different batch sizes")
    return out


def _check_sizes(batches: tuple[int, ...], found: BundleModels) -> None:
    """Refuse before allocating: the random inputs of every batch are held at once."""
    one = math.prod(found.input_shape) * np.dtype(found.dtype).itemsize
    need = sum(batches) * one
    if need > MAX_INPUT_BYTES:
        raise BenchmarkError(f"--batches {','.join(map(str, batches))}: the inputs alone would take "
                             f"{need / (1 << 30):.1f} GiB ({one} bytes per input); at most "
                             f"{MAX_INPUT_BYTES >> 30} GiB: choose smaller batches")


def run_benchmark(args) -> int:
    """The verb: 0 when every backend present was measured; errors are EdgeError (the CLI prints one line)."""
    batches = _batches(args.batches)
    for flag, (low, high) in BOUNDS.items():
        value = getattr(args, flag[2:])
        if not low <= value <= high:
            raise BenchmarkError(f"{flag} {value}: expected an integer >= {low} and <= {high}")
    if not (math.isfinite(args.block_ms) and 0 < args.block_ms <= MAX_BLOCK_MS):
        raise BenchmarkError(f"--block-ms {args.block_ms}: expected a positive number of milliseconds, "
                             f"at most {MAX_BLOCK_MS:.0f}")
    from edgerun.bundle import open_bundle
    given = Path(args.bundle)
    out = Path(args.output) if args.output else \
        given / "benchmark.json" if given.is_dir() else given.with_name(given.name + ".benchmark.json")
    with tempfile.TemporaryDirectory(prefix="edgerun_benchmark_") as tmp:   # an archive is unpacked here
        folder = open_bundle(given, tmp)
        found = read_bundle(folder)
        _check_sizes(batches, found)
        return _benchmark(found, batches, out, args)


def _benchmark(found: BundleModels, batches: tuple[int, ...], out: Path, args) -> int:
    models, shape = found.models, found.input_shape
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, *shape), dtype=np.float32).astype(found.dtype) for b in batches}
    here = machine()
    rows, skipped, ratios = [], [], []
    by_backend: dict[str, list[BundleModel]] = {}
    for m in models:
        for backend in backends_for(m.kind) or [None]:
            if backend is None:
                skipped.append({"artifact": m.label, "backend": "-", "batch": None,
                                "reason": f"no backend for {m.kind} files here (TensorRT/onnxruntime missing)"})
                continue
            try:
                s = open_session(m.path, backend, threads=args.threads, batches=batches, input_shape=shape)
            except EdgeError as e:
                if backend not in GPU_BACKENDS:
                    raise
                skipped.append({"artifact": m.label, "backend": backend, "batch": None, "reason": str(e)})
                continue
            try:
                for b in batches:
                    lo, hi = s.batch_range or (1, 1 << 30)
                    if not lo <= b <= hi:
                        skipped.append({"artifact": m.label, "backend": backend, "batch": b,
                                        "reason": f"outside the engine's batch range {lo}..{hi}"})
                        continue
                    st = measure(lambda s=s, x=inputs[b]: s.run(x), warmup=max(1, args.warmup), iters=args.iters,
                                 sync=s.sync)
                    rows.append({"artifact": m.label, "file": m.file, "role": m.role, "precision": m.precision,
                                 "backend": backend, "batch": b, **st.to_json(),
                                 "throughput_per_s": b * 1000.0 / st.p50_ms, "threads": s.threads,
                                 "notes": list(s.notes) or None})
            finally:
                s.close()
            by_backend.setdefault(backend, []).append(m)
    if not rows:   # nothing ran (no onnxruntime, no TensorRT): a PASSED line would claim a measurement
        raise BenchmarkError("nothing measured: " + "; ".join(sorted({f"{n['artifact']} on {n['backend']}: "
                                                                       f"{n['reason']}" for n in skipped}))[:400])
    if args.rounds > 0:
        measured = {(r["file"], r["backend"], r["batch"]) for r in rows}
        for backend, ms in by_backend.items():
            common = tuple(b for b in batches if all((m.file, backend, b) in measured for m in ms))
            if len(ms) > 1 and common:
                ratios += _ratios(backend, ms, common, found, args)
    write_json(out, {
        "bundle": str(Path(args.bundle).resolve()), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": here.to_json(), "libraries": library_versions(RUNTIME_LIBRARIES),
        "method": {"warmup": args.warmup, "iters": args.iters, "threads": args.threads or "default",
                   "timer": "time.perf_counter, gc disabled while timing",
                   "input": f"random {found.dtype}, host numpy",
                   "throughput": "batch / p50", "ratios": {"rounds": args.rounds, "block_ms": args.block_ms,
                                                          "processes": args.processes}},
        "latency": rows, "ratios": ratios, "not_measured": skipped})
    _print_table(rows, ratios, skipped)
    print(f"PASSED | {len(rows)} latency rows ({len(by_backend)} backend(s), batches "
          f"{','.join(map(str, batches))}), {len(ratios)} ratios -> {out}", flush=True)
    return 0


def _ratios(backend: str, models: list[BundleModel], batches, found: BundleModels, args) -> list[dict]:
    """Each file against the reference on one backend, at the batches every one of them ran."""
    ref = _reference(models)
    if args.processes > 1:
        spec = Spec(tuple(SpecItem(m.file, str(m.path.resolve()), backend) for m in models), ref.file, batches,
                    found.input_shape, threads=args.threads, block_ms=args.block_ms, rounds=args.rounds,
                    dtype=found.dtype)
        reps = repeat_in_processes(spec, args.processes)
    else:
        reps = _in_process(backend, models, ref, batches, found, args)
    out = []
    for rep in reps:
        for m in models:
            if m is ref:
                continue
            p = rep.pair(m.file)
            out.append({"backend": backend, "batch": rep.batch, "artifact": m.label, "reference": ref.label,
                        "ratio": p.median, "p10": p.p10, "p90": p.p90, "processes": p.processes,
                        "reproducible": p.reproducible, "spread": p.spread, "p50_ms": p.p50_ms,
                        "reference_p50_ms": p.to_p50_ms, "remeasured": rep.remeasured})
    return out


def _in_process(backend, models, ref, batches, found: BundleModels, args) -> tuple[Repeated, ...]:
    sessions = {m.file: open_session(m.path, backend, threads=args.threads, batches=batches,
                                     input_shape=found.input_shape) for m in models}
    try:
        rng = np.random.default_rng(0)
        reps = []
        for b in batches:
            x = rng.standard_normal((b, *found.input_shape), dtype=np.float32).astype(found.dtype)
            runs = {n: (lambda s=s, x=x: s.run(x)) for n, s in sessions.items()}
            reps.append(Repeated(b, (compare(runs, reference=ref.file, block_ms=args.block_ms,
                                             rounds=args.rounds),)))
        return tuple(reps)
    finally:
        for s in sessions.values():
            s.close()


RUNTIME_LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "polygraphy")


def _print_table(rows, ratios, skipped) -> None:
    print(f"{'artifact':<32} {'backend':<20} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'per s':>10}")
    for r in rows:
        print(f"{r['artifact'][:32]:<32} {r['backend']:<20} {r['batch']:>5} {r['p50_ms']:>9.4f} "
              f"{r['p90_ms']:>9.4f} {r['p99_ms']:>9.4f} {r['throughput_per_s']:>10.1f}")
    for r in ratios:
        rep = {True: ", reproducible", False: ", NOT reproducible", None: ", not checked"}[r["reproducible"]]
        print(f"  {r['artifact']} / {r['reference']} on {r['backend']} at batch {r['batch']}: time ratio "
              f"{r['ratio']:.3f} (p10-p90 {r['p10']:.3f}-{r['p90']:.3f}, {r['processes']} process(es){rep})")
    for s in skipped:
        print(f"  not measured: {s['artifact']} on {s['backend']}"
              + (f" at batch {s['batch']}" if s["batch"] else "") + f": {s['reason']}")


def main(argv=None) -> int:
    """``python -m edgerun.benchmark BUNDLE ...`` (the same verb as ``python -m edgerun benchmark``)."""
    ap = argparse.ArgumentParser(prog="python -m edgerun.benchmark")
    sub = ap.add_subparsers(dest="command", required=True)
    add_benchmark_parser(sub)
    args = ap.parse_args(["benchmark", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except EdgeError as e:
        print(f"FAILED | error: {e}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
