"""Typed, frozen records that travel between the runner, the stages, profiling and the report.

They are serialised only at the JSON edge (``to_json`` / ``from_json``): stage.json and
report.json keep the field names they always had. A stage record carries a ``seal``: the hash of
everything it says except what is judged again on reuse (its gate), so a metric edited by hand in
stage.json is noticed and the stage reruns instead of being reused with the edited number.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath

from edgerun.io import hash_json, sha256_file

RECORD = "stage.json"          # a finished stage folder's record, beside the files it lists
MAX_RECORD_BYTES = 16 << 20   # a stage record is a few kB: a larger "record" is not one we wrote

# Roles in the lineage of a run. The realized-speedup table compares each with its parent.
ROLES = ("baseline-torch", "pruned-torch", "baseline-onnx", "onnx-fp32", "onnx-fp16", "onnx-int8",
         "onnx-int8-trt", "engine-fp32", "engine-fp16", "engine-int8")


@dataclass(frozen=True)
class Score:
    """A task's figure of one model: its metric's key (the task's `metric`) and value. How it is named,
    written and which way is better is the task's (pipeline.tasks: `describe`)."""
    metric: str
    value: float

    @classmethod
    def from_json(cls, d) -> "Score | None":
        if d is None:
            return None
        if not isinstance(d, dict) or not isinstance(d.get("metric"), str) or not isinstance(d.get("value"),
                                                                                           (int, float)):
            raise ValueError("artifact score: expected {metric, value}")
        return cls(d["metric"], d["value"])


@dataclass(frozen=True)
class Metric:
    """How a task's figure is named, written and ranked (a task's `describe()`): report.json's and the
    manifest's ``metric``, so the report and the runtime read it without the task registry."""
    kind: str                     # the task's kind ("classify")
    name: str                     # its key in a stage's metrics (the task's `metric`)
    label: str                    # what text calls it ("top-1")
    unit: str = ""                # after a value (" %")
    drop_unit: str = ""           # after a difference (" pt")
    higher_is_better: bool = True
    decimals: int = 2
    bounds: tuple[float, float] | None = None   # the metric's range, if any (a percent: 0..100)
    min_span: float = 0.0         # a plot axis at least this tall

    def text(self, value: float | None, na: str = "–") -> str:
        return na if value is None else f"{value:.{self.decimals}f}{self.unit}"

    def diff(self, value: float | None, na: str = "–") -> str:
        return na if value is None else f"{value:.{self.decimals}f}{self.drop_unit}"

    def best(self, values):
        values = [v for v in values if v is not None]
        return (max if self.higher_is_better else min)(values, default=None)

    def worse_by(self, value: float, reference: float) -> float:
        """How far ``value`` falls short of ``reference`` (positive: worse), in the task's direction."""
        return reference - value if self.higher_is_better else value - reference

    def to_json(self) -> dict:
        d = asdict(self)
        d["bounds"] = None if self.bounds is None else list(self.bounds)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Metric":
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        if kept.get("bounds") is not None:
            kept["bounds"] = tuple(kept["bounds"])
        return cls(**kept)


@dataclass(frozen=True)
class Artifact:
    """One model file a stage produced. ``file`` is relative to the stage folder ('' = the folder)."""
    role: str                   # one of ROLES
    kind: str                   # torch | onnx | engine | calibration
    file: str
    precision: str = "fp32"
    label: str = ""
    stage: str = ""             # filled in by the runner
    score: Score | None = None  # when it differs from the stage's own (an FP16 side file)
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Artifact":
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        return cls(**{**kept, "score": Score.from_json(kept.get("score"))})


@dataclass(frozen=True)
class Located:
    """An artifact and where it lies now, with the facts profiling needs about it."""
    artifact: Artifact
    path: Path
    score: Score | None
    macs: int | None


@dataclass(frozen=True)
class Check:
    """One comparison of a gate: a drop against a reference, or a value against a limit."""
    metric: str
    value: float
    passed: bool
    reference: float | None = None
    drop: float | None = None
    max_drop: float | None = None
    limit: str | None = None
    hint: str | None = None     # what the number means and what to do, for the one-line message

    def __bool__(self) -> bool:
        return self.passed

    def message(self) -> str:
        if self.drop is not None:
            text = (f"{self.metric} dropped {self.drop:.3f} pt ({self.reference:.3f} -> {self.value:.3f}), "
                    f"limit {self.max_drop} pt")
        else:
            text = f"{self.metric} = {self.value:.6g}, limit {self.limit}"
        return f"{text} ({self.hint})" if self.hint and not self.passed else text

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("reference", "drop")}


@dataclass(frozen=True)
class GateResult:
    """The checks after a stage. Truthy when every check passed; ``mode`` warn never stops a run."""
    mode: str                   # fail | warn
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(self.checks)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def stops(self) -> bool:
        return not self.passed and self.mode == "fail"

    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if not c), None)

    def summary(self) -> str:
        """One line for the console and the report: ``pass``, ``FAIL: ...`` or ``warn-only fail: ...``."""
        bad = self.first_failure()
        if bad is None:
            head = self.checks[0]
            return f"pass ({head.message()})" if head.drop is not None or head.limit else "pass"
        return f"{'FAIL' if self.mode == 'fail' else 'failed, warn only'}: {bad.message()}"

    def to_json(self) -> dict:
        head = self.checks[0]
        return {"passed": self.passed, "mode": self.mode, "metric": head.metric, "value": head.value,
                "reference": head.reference, "drop": head.drop, "max_drop": head.max_drop,
                "summary": self.summary(), "checks": [c.to_json() for c in self.checks]}

    @classmethod
    def from_json(cls, d: dict | None) -> "GateResult | None":
        if not d:
            return None
        names = {f.name for f in fields(Check)}
        return cls(d["mode"], tuple(Check(**{k: v for k, v in c.items() if k in names}) for c in d["checks"]))


@dataclass(frozen=True)
class StageRecord:
    """What a stage did: the contents of its stage.json."""
    name: str
    status: str                          # ran | cached | skipped | failed
    seconds: float | None = None
    metrics: dict = field(default_factory=dict)
    gate: GateResult | None = None
    artifacts: tuple[Artifact, ...] = ()
    reason: str = ""
    fingerprint: dict = field(default_factory=dict)
    fingerprint_hash: str = ""
    files: dict = field(default_factory=dict)   # relative name -> {"size", "sha256"}
    finished_at: str = ""
    notices: tuple[str, ...] = ()
    seal: str = ""                       # as read from stage.json; to_json writes the computed one
    # CPU time of the stage's process and the children it waited for: on a loaded machine the wall clock says
    # little about what the stage costs; this is about what one quiet core would take (training uses one thread)
    cpu_seconds: float | None = None

    def artifact(self, role: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.role == role), None)

    def with_status(self, status: str, **changes) -> "StageRecord":
        return replace(self, status=status, **changes)

    def computed_seal(self) -> str:
        """The hash of what the record says. Left out: the gate (judged again on every reuse) and the
        status beyond 'skipped or not' (ran / cached / failed are the runner's view of the same result).
        A plain hash: it catches an edit, not a forger who recomputes it (who could rewrite the files too)."""
        d = asdict(self)
        for k in ("gate", "status", "seal"):
            d.pop(k)
        if d["cpu_seconds"] is None:   # records written before it was measured keep their seals
            d.pop("cpu_seconds")
        d["skipped"] = self.status == "skipped"
        d["artifacts"] = [a.to_json() for a in self.artifacts]
        return hash_json(d)

    @property
    def authentic(self) -> bool:
        """The stored seal matches the content, and the fingerprint matches its hash."""
        return self.seal == self.computed_seal() and hash_json(self.fingerprint) == self.fingerprint_hash

    def to_json(self) -> dict:
        d = asdict(self)
        d["gate"] = None if self.gate is None else self.gate.to_json()   # a failed gate is falsy
        d["artifacts"] = [a.to_json() for a in self.artifacts]
        d["notices"] = list(self.notices)
        d["seal"] = self.computed_seal()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StageRecord":
        """Raises KeyError / TypeError / ValueError on a record that is not this structure."""
        if not isinstance(d, dict) or not isinstance(d["name"], str) or not isinstance(d.get("metrics", {}), dict):
            raise ValueError("not a stage record")
        files = d.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v for v in files.values()):
            raise ValueError("stage record: bad file table")
        if not all(_inside(name) for name in files):   # a name like ../../x would hash a file elsewhere
            raise ValueError("stage record: a file name that leaves the stage folder")
        return cls(name=d["name"], status=d["status"], seconds=d.get("seconds"), metrics=d.get("metrics") or {},
                   gate=GateResult.from_json(d.get("gate")),
                   artifacts=tuple(Artifact.from_json(a) for a in d.get("artifacts") or ()),
                   reason=d.get("reason", ""), fingerprint=d.get("fingerprint", {}),
                   fingerprint_hash=d.get("fingerprint_hash", ""), files=files,
                   finished_at=d.get("finished_at", ""), notices=tuple(d.get("notices") or ()),
                   seal=d.get("seal", ""), cpu_seconds=d.get("cpu_seconds"))


def _inside(name) -> bool:
    p = PurePosixPath(name) if isinstance(name, str) else None
    return p is not None and bool(p.parts) and not p.is_absolute() and ".." not in p.parts and "\0" not in name


# ---------------------------------------------------------------- a stage folder against its record

def file_table(folder: Path) -> dict:
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != RECORD}


def entry_problems(folder: Path, record: StageRecord) -> tuple[list[str], list[str]]:
    """(changed, unlisted): recorded files that are missing, not regular files or whose bytes differ
    (sha256); and anything else in the folder that is not a folder (a file, a link, a FIFO)."""
    changed = []
    for name, meta in record.files.items():
        try:
            st = os.lstat(folder / name)
        except OSError:
            changed.append(name)
            continue
        # lstat first: a link is not the file that was recorded, and hashing a FIFO never returns.
        if not stat.S_ISREG(st.st_mode) or st.st_size != meta["size"] or sha256_file(folder / name) != meta["sha256"]:
            changed.append(name)
    unlisted = []
    for dirpath, dirs, files in os.walk(folder):   # links to folders are in dirs, not entered
        for name in (*files, *(d for d in dirs if os.path.islink(os.path.join(dirpath, d)))):
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            if rel != RECORD and rel not in record.files:
                unlisted.append(rel)
    return changed, sorted(unlisted)


def changed_files(folder: Path, record: StageRecord) -> list[str]:
    """Recorded files that are missing or whose bytes differ (sha256), plus files that appeared."""
    changed, unlisted = entry_problems(folder, record)
    return changed + unlisted


def read_record(folder: Path) -> StageRecord | None:
    path = folder / RECORD
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD_BYTES:
            return None   # a link, a FIFO or a huge file is not a record this runner wrote
        return StageRecord.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None   # not the structure we write: treated as not done, the stage reruns
