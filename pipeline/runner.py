"""Runs stages in order: contracts, fingerprints, a content-verified cache, a shared store, gates.

A stage writes only into the temporary folder it is given; the runner renames it into place after
the stage ran, so a folder without `.tmp`/`.failed` is always finished. Every file's sha256 is
recorded and verified before reuse. A finished result is also kept in a content-addressed store
shared by every run folder (`<runs>/.store/<stage>-<fingerprint>`), so a new run folder or an
override toggled back reuses it. Gates are evaluated after every stage, on fresh and on cached
results alike: a gate's settings are not part of the fingerprint, so relaxing one never reruns.

A stage may checkpoint inside its run (``Context.checkpoint``) into ``<run>/.checkpoints/<stage>-<fp>/``:
not the ``.tmp`` folder a rerun clears, so only a rerun with the SAME fingerprint finds them; they go
once the stage finished.

What is reused is verified whole: the record's seal (a metric edited by hand), its fingerprint
against the one recomputed now, and the folder holding exactly the files the record lists, as
regular files (an added file, such as a planted ``onnxruntime.py`` that a bundle would import, a
link or a special file refuses the entry). The lock and the runner's writes never follow a link.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from edgerun.io import hash_json, refuse_link, write_json
from edgerun.machine import library_versions
from pipeline import tasks
from pipeline.config import Config
from pipeline.contract import ConfigView, expand, fingerprint_values
from pipeline.errors import ContractError, GateFailed, PipelineError
from pipeline.records import RECORD, Artifact, GateResult, StageRecord, entry_problems, file_table, read_record
from pipeline.records import changed_files as changed_files  # where tests and tools have imported it from

# What the dataset (pipeline.data.Data) is made from: a stage that reads it depends on all of these.
DATA_KEYS = ("data.kind", "data.root", "data.size", "data.channels", "data.mean", "data.std", "data.train_subset",
             "data.test_subset", "model.num_classes", "run.seed")


@dataclass(frozen=True)
class Output:
    """What a stage function returns; the runner adds everything else."""
    metrics: dict = field(default_factory=dict)
    artifacts: tuple[Artifact, ...] = ()
    status: str = "ran"               # ran | skipped
    reason: str = ""
    notices: tuple[str, ...] = ()


GateFn = Callable[[dict, dict, ConfigView], "GateResult | None"]


@dataclass(frozen=True)
class Stage:
    name: str
    version: int                                   # bump when the stage's code changes what it writes
    fn: Callable[["Context"], Output]
    config: tuple[str, ...] | Callable[[Config], Iterable[str]] = ()  # keys it reads (may depend on the mode)
    reads: tuple[str, ...] = ()                    # earlier stages whose folders and records it reads
    uses_data: bool = False                        # reads the dataset: DATA_KEYS join its keys
    gate: GateFn | None = None                     # (metrics, input records, view of gate_config) -> GateResult
    gate_config: tuple[str, ...] = ()
    environment: Callable[[], dict] | None = None  # machine facts that change its output (GPU, TensorRT)
    folder: str = ""                               # defaults to NN_name
    measures: bool = False                         # its metrics name the task ("task") and hold its metric

    def keys(self, cfg: Config) -> tuple[str, ...]:
        declared = self.config(cfg) if callable(self.config) else self.config
        return expand(cfg, (*declared, *(DATA_KEYS if self.uses_data else ())))


class Context:
    """A stage's view of the run: its config keys, its input stages, its output folder."""

    def __init__(self, stage: Stage, cfg: ConfigView, out: Path, inputs: dict, data, log, *,
                 checkpoints: Path | None = None, fingerprint: str = ""):
        self.stage, self.cfg, self.out, self.log = stage, cfg, out, log
        self._inputs = inputs          # name -> (folder, StageRecord)
        self._data = data
        self._checkpoints, self._fingerprint = checkpoints, fingerprint

    def checkpoint(self, name: str) -> tuple[Path, str] | None:
        """(file, key) a training run ``name`` of this stage checkpoints into (the key names the fingerprint: a file
        moved from elsewhere is refused); None in a Context built by hand."""
        if self._checkpoints is None or not self._fingerprint:
            return None
        if not name or "/" in name or name.startswith("."):
            raise ContractError(f"stage {self.stage.name}: checkpoint name {name!r} is not a plain file name")
        return self._checkpoints / name, f"{self.stage.name}-{self._fingerprint}/{name}"

    def _input(self, name: str):
        if name not in self._inputs:
            raise ContractError(f"stage {self.stage.name} read stage {name!r} without declaring it in reads")
        return self._inputs[name]

    def path(self, stage: str, name: str = "") -> Path:
        folder = self._input(stage)[0]
        return folder / name if name else folder

    def record(self, stage: str) -> StageRecord:
        return self._input(stage)[1]

    @property
    def data(self):
        if not self.stage.uses_data:
            raise ContractError(f"stage {self.stage.name} read the dataset without declaring uses_data")
        self.cfg.seen.update(DATA_KEYS)
        return self._data


@contextlib.contextmanager
def io_edge(path: Path, what: str):
    """The runner's own file operations are an I/O edge: an OSError there is the user's folder, one line."""
    try:
        yield
    except OSError as e:
        raise PipelineError(f"{path}: cannot {what} ({e.strerror or e})") from None


def remove(path: Path) -> None:
    """A stale entry, whatever it is (a folder, or a file where a folder should be)."""
    with io_edge(path, "remove this stale entry"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """The run folder's lock: held for the whole run, before anything is written into the folder."""
    with io_edge(run_dir, "create the run folder"):
        refuse_link(run_dir, "use it as the run folder")
        run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    with io_edge(lock, "open the run folder's lock file"):
        refuse_link(lock, "open it as the lock file")
        # O_NOFOLLOW: a link planted as .lock must never get another file truncated and a pid written in.
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:   # a hard link writes into the other name's file
            what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
            raise PipelineError(f"{lock}: not a plain lock file ({what}); remove it and run again")
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


def _copy_tree(src: Path, dst: Path) -> None:
    """Copies, not hard links: a file edited in place in a run folder must not damage the store's copy."""
    shutil.copytree(src, dst)


class Runner:
    def __init__(self, cfg: Config, stages: list[Stage], run_dir: Path, data, *, data_identity: Callable[[], str],
                 store: Path | None = None, log: Callable[[str], None] = print):
        self.cfg, self.stages, self.run_dir, self.data = cfg, stages, run_dir, data
        self.data_identity, self.store, self.log = data_identity, store, log
        self.records: dict[str, StageRecord] = {}   # this run's records so far, also after a failure
        self.views: dict[str, ConfigView] = {}      # what each stage that ran actually read
        self.folder = {s.name: run_dir / (s.folder or f"{i + 1:02d}_{s.name}") for i, s in enumerate(stages)}

    # ------------------------------------------------------------ fingerprints

    def fingerprint(self, stage: Stage) -> dict:
        return {
            "stage": stage.name,
            "version": stage.version,
            # Which code: the decoder's, the VLM's and the CNN's stage of one name share name, version and maybe
            # keys; a record one of them wrote must never be reused by another.
            "code": f"{stage.fn.__module__}.{stage.fn.__qualname__}",
            "config": fingerprint_values(self.cfg, stage.keys(self.cfg), self.data_identity),
            # What an input stage wrote, not only how it was asked to: other bytes rerun its readers.
            "inputs": {name: hash_json([self.records[name].fingerprint_hash, self.records[name].files])
                       for name in stage.reads},
            "libraries": library_versions(),
            "environment": stage.environment() if stage.environment else {},
        }

    # ------------------------------------------------------------ selection

    def select(self, start: str | None, until: str | None, force) -> tuple[set, set]:
        names = [s.name for s in self.stages]
        for opt, value in (("--from", start), ("--until", until), *(("--force", f) for f in force or ())):
            if value is not None and value not in names:
                raise PipelineError(f"{opt} {value!r}: no such stage (stages: {', '.join(names)})")
        lo = names.index(start) if start else 0
        hi = names.index(until) if until else len(names) - 1
        if lo > hi:
            raise PipelineError(f"--from {start} comes after --until {until}")
        selected = set(names[lo:hi + 1])
        forced = selected if force == [] else set(force or ())
        return selected, forced

    def run(self, start=None, until=None, force=None, *, locked: bool = False) -> list[StageRecord]:
        """Returns the stage records in order; raises GateFailed / PipelineError. ``locked``: the
        caller holds run_lock(run_dir) already (the API, which writes the report under it too)."""
        selected, forced = self.select(start, until, force)
        last = max(i for i, s in enumerate(self.stages) if s.name in selected)
        self.records = {}
        with contextlib.nullcontext() if locked else run_lock(self.run_dir):
            for i, stage in enumerate(self.stages[:last + 1]):
                self.records[stage.name] = self._one(i, stage, stage.name in selected, stage.name in forced)
        return list(self.records.values())

    # ------------------------------------------------------------ one stage

    def _one(self, i: int, stage: Stage, selected: bool, forced: bool) -> StageRecord:
        final = self.folder[stage.name]
        failed = final.with_name(final.name + ".failed")
        fp = self.fingerprint(stage)
        fp_hash = hash_json(fp)
        label = f"[{i + 1}/{len(self.stages)}] {stage.name}"
        if not forced:
            found = self._reusable(stage, fp_hash, final, failed, label)
            if found is not None:
                return self._finish(stage, found[0], found[1], label, cached=True)
        if not selected:
            raise PipelineError(f"stage {stage.name} has no up-to-date result in {final} "
                                f"and is outside --from/--until: run it first")
        tmp = final.with_name(final.name + ".tmp")
        for stale in (tmp, failed):
            remove(stale)
        with io_edge(tmp, "create the stage folder"):
            tmp.mkdir(parents=True)
        self.log(f"{label}: running")
        view = self.views[stage.name] = ConfigView(stage.name, self.cfg, stage.keys(self.cfg))
        inputs = {name: (self.folder[name], self.records[name]) for name in stage.reads}
        t0, c0 = time.perf_counter(), cpu_seconds()
        # A crash or an interrupt here leaves only the .tmp folder, which never counts as finished.
        out = stage.fn(Context(stage, view, tmp, inputs, self.data, self.log,
                               checkpoints=self._checkpoints(stage, fp_hash), fingerprint=fp_hash))
        record = StageRecord(
            name=stage.name, status=out.status, reason=out.reason, seconds=round(time.perf_counter() - t0, 3),
            cpu_seconds=round(cpu_seconds() - c0, 3),
            metrics=out.metrics, artifacts=tuple(replace(a, stage=stage.name) for a in out.artifacts),
            fingerprint=fp, fingerprint_hash=fp_hash, files=file_table(tmp),
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), notices=out.notices)
        for a in record.artifacts:
            if a.file and a.file not in record.files and not (tmp / a.file).is_dir():
                raise ContractError(f"stage {stage.name} declared artifact {a.file!r} but did not write it")
        write_json(tmp / RECORD, record.to_json())
        self._put_in_store(stage, fp_hash, tmp)
        trash = final.with_name(final.name + ".old")
        remove(trash)
        with io_edge(final, "move the finished stage into place"):
            if final.exists() or final.is_symlink():
                os.replace(final, trash)
            os.replace(tmp, final)
        remove(trash)
        self._drop_checkpoints(stage)
        return self._finish(stage, final, record, label, cached=False)

    def _reusable(self, stage: Stage, fp_hash: str, final: Path, failed: Path, label: str):
        """(folder, record) of a verified earlier result with this fingerprint: this run's, a failed
        gate's (the result is sound; only its gate is judged again), or the shared store's."""
        for folder in (final, failed):
            rec = self._verified(stage, folder, fp_hash, label)
            if rec is None:
                continue
            if folder == failed:   # the gate may pass now: the result itself is sound
                remove(final)
                with io_edge(final, "move the stage folder into place"):
                    os.replace(failed, final)
            return final, rec
        entry = self._store_entry(stage, fp_hash)
        if entry is None or not (entry.is_dir() or entry.is_symlink()):
            return None
        rec = self._verified(stage, entry, fp_hash, label)
        if rec is None:
            remove(entry)   # damaged: never serve it again
            return None
        remove(final)
        tmp = final.with_name(final.name + ".tmp")
        remove(tmp)
        with io_edge(final, "copy the stored result into the run folder"):
            _copy_tree(entry, tmp)
            os.replace(tmp, final)
        self.log(f"{label}: reusing the result in {entry}")
        return final, rec

    def _verified(self, stage: Stage, folder: Path, fp_hash: str, label: str) -> StageRecord | None:
        """The record of ``folder`` if the result there is this fingerprint's and intact; else None,
        with a one-line notice when something was there but is refused."""
        where = folder if folder.parent == self.store else folder.name
        if folder.is_symlink():
            self.log(f"{label}: {folder} is a symbolic link, not a stage folder; not reused")
            return None
        rec = read_record(folder)
        if rec is None:
            if (folder / RECORD).exists() or (folder / RECORD).is_symlink():
                self.log(f"{label}: {folder / RECORD} is not a stage record; rerunning")
            return None
        if rec.fingerprint_hash != fp_hash:
            return None
        if not rec.authentic:
            self.log(f"{label}: {folder / RECORD} does not match its seal (edited after it was written?); "
                     f"rerunning")
            return None
        if not self._gate_readable(stage, rec):
            self.log(f"{label}: {folder / RECORD} lacks what its gate reads; rerunning")
            return None
        changed, unlisted = entry_problems(folder, rec)
        if changed:
            self.log(f"{label}: {where}/{changed[0]} changed on disk since it was written "
                     f"(sha256 mismatch{f', {len(changed)} files' if len(changed) > 1 else ''}); rerunning")
            return None
        if unlisted:
            self.log(f"{label}: {where}/{unlisted[0]} is not listed in its stage record (added after the stage "
                     f"ran{f'; {len(unlisted)} such entries' if len(unlisted) > 1 else ''}); not reused")
            return None
        return rec

    def _checkpoints(self, stage: Stage, fp_hash: str) -> Path:
        return self.run_dir / ".checkpoints" / f"{stage.name}-{fp_hash[:24]}"

    def _drop_checkpoints(self, stage: Stage) -> None:
        """The finished stage's checkpoints, this fingerprint's and older ones' (a decoder's are gigabytes)."""
        root = self.run_dir / ".checkpoints"
        if not root.is_dir() or root.is_symlink():
            return
        for entry in root.iterdir():
            if entry.name.startswith(f"{stage.name}-"):
                remove(entry)

    def _store_entry(self, stage: Stage, fp_hash: str) -> Path | None:
        return self.store / f"{stage.name}-{fp_hash[:24]}" if self.store else None

    def _put_in_store(self, stage: Stage, fp_hash: str, folder: Path) -> None:
        entry = self._store_entry(stage, fp_hash)
        if entry is None or entry.exists():
            return
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            _copy_tree(folder, tmp)
            os.replace(tmp, entry)
        except OSError as e:   # the store is an optimisation: a full disk there costs reuse, not the run
            shutil.rmtree(tmp, ignore_errors=True)
            self.log(f"  note: could not add {stage.name} to the shared store {self.store} ({e.strerror or e})")

    def _gate(self, stage: Stage, record: StageRecord) -> GateResult | None:
        if stage.gate is None or record.status == "skipped":
            return None
        view = ConfigView(stage.name, self.cfg, expand(self.cfg, stage.gate_config))
        return stage.gate(record.metrics, {n: self.records[n] for n in stage.reads}, view)

    def _gate_readable(self, stage: Stage, record: StageRecord) -> bool:
        """Whether a stored record holds what its gate reads: a measuring stage's metrics name a task this
        process knows and hold that task's figure (a record from before the task seam, or from a run with a
        task not registered here, does not: then it is not done). The rest of what a gate reads is the
        stage's own format, which its version (in the fingerprint) vouches for."""
        if not stage.measures or stage.gate is None or record.status == "skipped":
            return True
        kind = record.metrics.get("task")
        if not isinstance(kind, str) or kind not in tasks.kinds():
            return False
        return tasks.named(kind).score(record.metrics) is not None

    def _finish(self, stage: Stage, folder: Path, record: StageRecord, label: str, *, cached: bool) -> StageRecord:
        """Evaluate the gate (on fresh and cached results alike) and stop the run if it fails."""
        gate = self._gate(stage, record)
        status = record.status
        if cached and status not in ("skipped",):
            status = "cached"
        record = replace(record, gate=gate, status=status)
        if gate is not None and gate.stops:
            record = replace(record, status="failed")
            failed = folder.with_name(folder.name + ".failed")
            remove(failed)
            write_json(folder / RECORD, record.to_json())
            with io_edge(failed, "keep the failed stage folder"):
                os.replace(folder, failed)
            self.records[stage.name] = record
            self.log(f"{label}: FAILED gate ({_summary(record)})")
            raise GateFailed(gate_message(stage.name, gate), record)
        if not cached:
            write_json(folder / RECORD, replace(record, status=record.status).to_json())
        for notice in record.notices if not cached else ():
            self.log(f"  note: {notice}")
        cpu = f", {record.cpu_seconds:.1f} s of CPU" if record.cpu_seconds is not None else ""
        verb = "cached" if cached else f"{record.status} in {record.seconds:.1f} s{cpu}"
        self.log(f"{label}: {verb} ({_summary(record)})")
        return record


def cpu_seconds() -> float:
    """This process's CPU seconds and its waited-for children's: what work cost apart from the machine's load."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def gate_message(stage: str, gate: GateResult) -> str:
    bad = gate.first_failure()
    return f"stage {stage}: {bad.message()}" if bad is not None else f"stage {stage}: gate failed"


def _summary(record: StageRecord) -> str:
    if record.status == "skipped":
        return f"skipped: {record.reason}"
    m = record.metrics
    parts = []
    task = tasks.of_metrics(m)
    if task is not None and task.score(m) is not None:
        parts.append(task.brief(m[task.metric]))
    if "macs" in m:
        parts.append(f"MACs {m['macs']:,}")
    if "size_bytes" in m:
        parts.append(f"{m['size_bytes'] / 1024:.0f} KiB")
    if record.gate is not None:
        parts.append(f"gate {record.gate.summary()}")
    return ", ".join(parts) or "done"
