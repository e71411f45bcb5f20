"""Runs stages in order: fingerprints, cache, atomic stage folders, --from/--until/--force, one lock.

A stage writes only into the temporary folder it is given. The runner renames that folder into
place after the stage and its gate succeed, so a folder without `.tmp`/`.failed` is always finished.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from pipeline.config import Config
from pipeline.errors import GateFailed, PipelineError

LIBRARIES = ("torch", "torch-pruning", "onnx", "onnxruntime", "onnxruntime-gpu", "nncf", "numpy",
             "polygraphy", "onnxconverter-common", "tensorrt")
RECORD = "stage.json"


@dataclass(frozen=True)
class Stage:
    name: str
    version: int                      # bump when the stage's code changes what it writes
    config: tuple[str, ...]           # config sections (or section.key) that change its output
    reads: tuple[str, ...]            # earlier stages whose folders it reads
    fn: Callable[["Context"], "Result"]
    folder: str = ""                  # defaults to NN_name
    environment: Callable[[], dict] | None = None  # extra fingerprint facts (GPU, TensorRT version)


@dataclass
class Result:
    metrics: dict = field(default_factory=dict)
    gate: dict | None = None
    status: str = "ran"               # ran | skipped
    reason: str = ""
    artifacts: dict = field(default_factory=dict)  # file name -> {"kind", "precision", ...}


@dataclass
class Context:
    cfg: Config
    run_dir: Path
    out: Path
    records: dict                     # stage name -> its stage.json of this run
    folders: dict                     # stage name -> its finished folder
    data: object                      # pipeline.stages.Data, loaded lazily
    log: Callable[[str], None]

    def path(self, stage: str, name: str = "") -> Path:
        folder = self.folders[stage]
        return folder / name if name else folder


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def library_versions() -> dict:
    out = {}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def file_table(folder: Path) -> dict:
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != RECORD}


def intact(folder: Path, record: dict) -> bool:
    """Every recorded file is there with its size; sizes catch truncation, hashing all is too slow
    for big engines on every rerun."""
    for name, meta in record.get("files", {}).items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != meta["size"]:
            return False
    return True


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise PipelineError(f"{run_dir}: another run is using this run folder (pid {owner}); "
                                    "wait for it or use --run NAME") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


class Runner:
    def __init__(self, cfg: Config, stages: list[Stage], run_dir: Path, data, *, data_identity: Callable[[], str],
                 log: Callable[[str], None] = print):
        self.cfg, self.stages, self.run_dir, self.data = cfg, stages, run_dir, data
        self.data_identity, self.log = data_identity, log
        self.records: dict[str, dict] = {}  # this run's records so far, also after a failure
        self.folder = {s.name: run_dir / (s.folder or f"{i + 1:02d}_{s.name}") for i, s in enumerate(stages)}

    def fingerprint(self, stage: Stage, records: dict) -> dict:
        return {
            "stage": stage.name,
            "version": stage.version,
            "config": {key: self._config_value(key) for key in stage.config},
            # What an input stage wrote, not only how it was asked to: a rerun that writes other bytes
            # (a nondeterministic kernel, say) must rerun its readers.
            "inputs": {name: hash_json([records[name]["fingerprint_hash"], records[name]["files"]])
                       for name in stage.reads},
            "data": self.data_identity(),
            "libraries": library_versions(),
            "environment": stage.environment() if stage.environment else {},
        }

    def _config_value(self, key: str):
        """``section`` or ``section.key``: only what changes the stage's output belongs here."""
        section, _, name = key.partition(".")
        values = self.cfg.section(section)
        return values[name] if name else values

    def select(self, start: str | None, until: str | None, force) -> tuple[set, set]:
        names = [s.name for s in self.stages]
        for opt, value in (("--from", start), ("--until", until)):
            if value is not None and value not in names:
                raise PipelineError(f"{opt} {value!r}: no such stage (stages: {', '.join(names)})")
        for f in force or ():
            if f not in names:
                raise PipelineError(f"--force {f!r}: no such stage (stages: {', '.join(names)})")
        lo = names.index(start) if start else 0
        hi = names.index(until) if until else len(names) - 1
        if lo > hi:
            raise PipelineError(f"--from {start} comes after --until {until}")
        selected = set(names[lo:hi + 1])
        forced = selected if force == [] else set(force or ())
        return selected, forced

    def run(self, start=None, until=None, force=None) -> list[dict]:
        """Returns the stage records in order; raises GateFailed / PipelineError."""
        selected, forced = self.select(start, until, force)
        records = self.records = {}
        with run_lock(self.run_dir):
            for i, stage in enumerate(self.stages):
                if stage.name not in selected and records and self._after_selection(stage, selected):
                    break
                records[stage.name] = self._one(i, stage, records, selected, forced)
        return [records[s.name] for s in self.stages if s.name in records]

    def _after_selection(self, stage: Stage, selected: set) -> bool:
        names = [s.name for s in self.stages]
        last = max(names.index(n) for n in selected)
        return names.index(stage.name) > last

    def _one(self, i: int, stage: Stage, records: dict, selected: set, forced: set) -> dict:
        final = self.folder[stage.name]
        fp = self.fingerprint(stage, records)
        fp_hash = hash_json(fp)
        label = f"[{i + 1}/{len(self.stages)}] {stage.name}"
        old = read_record(final)
        fresh = old is not None and old.get("fingerprint_hash") == fp_hash and intact(final, old)
        if fresh and stage.name not in forced:
            self.log(f"{label}: cached ({_summary(old)})")
            return {**old, "status": "cached" if old["status"] != "skipped" else "skipped"}
        if stage.name not in selected:
            raise PipelineError(f"stage {stage.name} has no up-to-date result in {final} "
                                f"and is outside --from/--until: run it first")
        tmp = final.with_name(final.name + ".tmp")
        failed = final.with_name(final.name + ".failed")
        for stale in (tmp, failed):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.log(f"{label}: running")
        ctx = Context(self.cfg, self.run_dir, tmp, records, self.folder, self.data, self.log)
        t0 = time.perf_counter()
        # A crash here leaves only the .tmp folder, which never counts as finished.
        result = stage.fn(ctx)
        seconds = round(time.perf_counter() - t0, 3)
        record = {
            "name": stage.name, "status": result.status, "reason": result.reason, "seconds": seconds,
            "metrics": result.metrics, "gate": result.gate, "artifacts": result.artifacts,
            "fingerprint": fp, "fingerprint_hash": fp_hash, "files": file_table(tmp),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        gate = result.gate
        if gate and not gate["passed"] and gate.get("mode", "fail") == "fail":
            record["status"] = "failed"
            write_json(tmp / RECORD, record)
            os.replace(tmp, failed)
            self.log(f"{label}: FAILED gate ({_summary(record)})")
            raise GateFailed(gate_message(stage.name, gate), record)
        write_json(tmp / RECORD, record)
        trash = final.with_name(final.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        if final.exists():
            os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
        self.log(f"{label}: {result.status} in {seconds:.1f} s ({_summary(record)})")
        return record


def gate_message(stage: str, gate: dict) -> str:
    bad = next((c for c in gate.get("checks", [gate]) if not c["passed"]), gate)
    if "drop" in bad and bad.get("drop") is not None:
        return (f"stage {stage}: {bad['metric']} dropped {bad['drop']:.3f} pt "
                f"({bad['reference']:.3f} -> {bad['value']:.3f}) > max_drop {bad['max_drop']} pt")
    return f"stage {stage}: {bad['metric']} = {bad['value']:.6g} violates its limit {bad['limit']}"


def _summary(record: dict) -> str:
    if record.get("status") == "skipped":
        return f"skipped: {record.get('reason')}"
    m = record.get("metrics", {})
    parts = []
    if "top1" in m:
        parts.append(f"top1 {m['top1']:.2f} %")
    if "macs" in m:
        parts.append(f"MACs {m['macs']:,}")
    if "size_bytes" in m:
        parts.append(f"{m['size_bytes'] / 1024:.0f} KiB")
    return ", ".join(parts) or "done"
