"""The Python API: what `edgepipe run` does, callable from a notebook.

    from pipeline import run
    result = run("configs/cpu.toml", overrides=["prune.macs=0.2"])
    result.passed, result.record("finetune").metrics, result.bundle

User errors raise EdgeError subclasses (one line each); a failed gate returns a RunResult with
``passed = False`` and the failed stage's record. An argument of the wrong type (a dict where a
path goes, a string where the list of overrides goes) raises ``ArgumentTypeError``, a
PipelineError and a TypeError, naming the argument and the type expected.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgerun.io import write_json
from pipeline.config import Config, read_config
from pipeline.errors import GateFailed, PipelineError
from pipeline.records import StageRecord

ALWAYS_READ = ("run.name", "run.threads", "run.seed")   # read by the runner itself, not by one stage


class ArgumentTypeError(PipelineError, TypeError):
    """pipeline.run() or load() was given an argument of the wrong type; the message names it."""


def _is_path(v) -> bool:
    return isinstance(v, (str, os.PathLike)) and not isinstance(v, bytes) and str(v) != ""


def _strings(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


# argument -> (test, what is expected); None is allowed where the default is None.
_ARGUMENTS = {
    "config": (lambda v: _is_path(v) or isinstance(v, Config), "a path to a TOML file (str or Path) or a Config"),
    "overrides": (_strings, "a list of 'section.key=value' strings"),
    "run_name": (lambda v: v is None or isinstance(v, str), "a run folder name (str) or None"),
    "runs": (_is_path, "a folder path (str or Path)"),
    "start": (lambda v: v is None or isinstance(v, str), "a stage name (str) or None"),
    "until": (lambda v: v is None or isinstance(v, str), "a stage name (str) or None"),
    "force": (lambda v: v is None or _strings(v), "a list of stage names or None"),
    "log": (callable, "a function taking one str"),
}


def _check_arguments(function: str, **given) -> None:
    for name, value in given.items():
        test, expected = _ARGUMENTS[name]
        if not test(value):
            raise ArgumentTypeError(f"{function}(): {name} must be {expected}, got {type(value).__name__} "
                                    f"{value!r:.60}")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    config: Config
    records: tuple[StageRecord, ...]
    passed: bool
    message: str = ""
    failed_stage: str | None = None
    warnings: tuple[str, ...] = ()
    reads: dict = dataclasses.field(default_factory=dict)  # stage -> config keys it read (the stages that ran)

    def record(self, name: str) -> StageRecord | None:
        return next((r for r in self.records if r.name == name), None)

    @property
    def report(self) -> Path:
        return self.run_dir / "report.md"

    @property
    def bundle(self) -> Path | None:
        rec = self.record("package")
        return self.run_dir / "deploy" if rec is not None and rec.status in ("ran", "cached") else None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ignored_keys(cfg: Config, explicit: frozenset[str]) -> list[str]:
    """Keys the config file or --set gave that no stage reads with this configuration."""
    from pipeline.contract import expand
    from pipeline.stages import stages_for
    from pipeline.vlm import DATA_READS, data_keys_unread, is_vlm
    read = set(ALWAYS_READ) | (set(DATA_READS) if is_vlm(cfg) else set())   # what the run's data reads itself
    for s in stages_for(cfg):
        read |= set(s.keys(cfg)) | set(expand(cfg, s.gate_config))
    if is_vlm(cfg):
        read -= data_keys_unread(cfg)
    return sorted(k for k in explicit if k not in read)


def load(config: str | Path | Config, overrides=(), run_name: str | None = None) -> tuple[Config, list[str]]:
    """The config (from a TOML path or given as is) and a warning per ignored key."""
    _check_arguments("load", config=config, overrides=overrides, run_name=run_name)
    cfg, ignored = _load(config, overrides, run_name)
    return cfg, [_warning(k) for k in ignored]


def _warning(key: str) -> str:
    return f"config: {key} is set but not read with this configuration (ignored)"


def _load(config, overrides, run_name) -> tuple[Config, list[str]]:
    """The config and the keys it sets that no stage reads (ignored_keys)."""
    if isinstance(config, Config):   # built in code: the same meaning checks as a file gets
        from pipeline.config_check import check
        cfg, explicit = config, frozenset()
        check(cfg, Path("Config"))
    else:
        cfg, explicit = read_config(config, list(overrides))
    if run_name is not None:
        if ("/" in run_name or "\0" in run_name or run_name.startswith(".") or not run_name.strip()
                or len(run_name.encode()) > 255):
            raise PipelineError(f"--run {run_name!r}: must be a plain folder name")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=run_name))
    return cfg, ignored_keys(cfg, explicit)


def run(config: str | Path | Config, overrides=(), *, run_name: str | None = None, runs: str | Path = "runs",
        start: str | None = None, until: str | None = None, force: list[str] | None = None,
        log: Callable[[str], None] = _stderr) -> RunResult:
    _check_arguments("run", config=config, overrides=overrides, run_name=run_name, runs=runs, start=start,
                     until=until, force=force, log=log)
    from pipeline.data import Data
    from pipeline.llm import is_decoder
    from pipeline.llm.lm import TextData
    from pipeline.report import write_report
    from pipeline.runner import Runner, run_lock
    from pipeline.stages import stages_for
    from pipeline.vlm import is_vlm
    from pipeline.vlm.io import VLMRunData
    cfg, ignored = _load(config, overrides, run_name)
    warnings = [_warning(k) for k in ignored]
    for w in warnings:
        log(f"warning: {w}")
    if cfg.run.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(cfg.run.threads))
    run_dir = Path(runs) / cfg.run.name
    data = VLMRunData(cfg) if is_vlm(cfg) else TextData(cfg) if is_decoder(cfg) else Data(cfg)
    stages = stages_for(cfg)
    runner = Runner(cfg, stages, run_dir, data, data_identity=data.identity, store=Path(runs) / ".store", log=log)
    order = [s.name for s in stages]
    log(f"run {run_dir}")

    def report(outcome: dict) -> None:
        write_json(run_dir / "config.json", {**cfg.to_dict(), "ignored_keys": ignored})
        write_report(run_dir, list(runner.records.values()), cfg, stage_order=order, outcome=outcome)
    # Everything below writes into the run folder: only under its lock. A run refused by the lock
    # writes nothing, not even a report (that would overwrite the report of the run holding it).
    with run_lock(run_dir):
        try:
            records = runner.run(start, until, force, locked=True)
        except GateFailed as e:
            report({"passed": False, "message": str(e), "stage": e.record.name})
            return RunResult(run_dir, cfg, tuple(runner.records.values()), False, str(e), e.record.name,
                             tuple(warnings), _reads(runner))
        except BaseException as e:
            # A user error or an interrupt must not leave the previous run's report claiming success.
            message = str(e) if not isinstance(e, KeyboardInterrupt) else "interrupted"
            try:
                report({"passed": False, "message": message})
            except Exception:  # noqa: BLE001 - the original error is the one to show
                pass
            raise
        report({"passed": True})
    return RunResult(run_dir, cfg, tuple(records), True, warnings=tuple(warnings), reads=_reads(runner))


def _reads(runner) -> dict:
    return {name: frozenset(view.seen) for name, view in runner.views.items()}
