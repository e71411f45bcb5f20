"""Command line: `python -m pipeline run ...` and `python -m pipeline infer ...`.

Exit codes: 0 passed, 1 user error (one line, no traceback unless --debug), 2 a gate failed.
The last line printed is always `PASSED | ...` or `FAILED | ...`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.errors import GateFailed, PipelineError


def _user_errors() -> tuple:
    """Errors that are the user's input, from our libraries too (imported lazily: they are light)."""
    from calib.errors import CalibError
    from export.errors import ExportError
    return PipelineError, CalibError, ExportError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the stages of a target config")
    r.add_argument("--config", default="configs/cpu.toml")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    r.add_argument("--run", dest="run_name", help="run folder name under --runs (default: the config's name)")
    r.add_argument("--runs", default="runs", help="where run folders live")
    r.add_argument("--from", dest="start", help="first stage to run (earlier ones must be cached)")
    r.add_argument("--until", help="last stage to run")
    r.add_argument("--force", nargs="*", metavar="STAGE", help="rerun these stages (no names: every selected stage)")
    i = sub.add_parser("infer", help="predict with a deploy bundle (TensorRT if present, else onnxruntime)")
    i.add_argument("--bundle", required=True)
    i.add_argument("--input", required=True, help="an IDX file (.gz or not) or a folder of images")
    i.add_argument("--model", help="file in the bundle to run (default: the chosen variant)")
    i.add_argument("--batch-size", type=int, default=64)
    i.add_argument("--limit", type=int, default=10, help="predictions to print")
    args = ap.parse_args(argv)
    debug = args.debug
    try:
        if args.command == "run":
            return _run(args)
        from pipeline.infer import infer
        return infer(args)
    except GateFailed as e:
        print(f"FAILED | gate: {e.args[0]}", flush=True)
        return 2
    except _user_errors() as e:
        if debug:
            raise
        print(f"FAILED | error: {e}", flush=True)
        return 1
    except OSError as e:
        # Disk full, read-only folder, permissions: the user's environment, not a bug.
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"FAILED | error: {where}{e.strerror or e}", flush=True)
        return 1
    except KeyboardInterrupt:
        print("FAILED | interrupted: finished stages are kept; rerun to resume", flush=True)
        return 130


def _run(args) -> int:
    from pipeline.config import load_config
    from pipeline.report import write_report
    from pipeline.runner import Runner
    from pipeline.stages import STAGES, Data
    import dataclasses

    cfg = load_config(args.config, args.overrides)
    if args.run_name:
        if "/" in args.run_name or args.run_name.startswith("."):
            raise PipelineError(f"--run {args.run_name!r}: must be a plain folder name")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=args.run_name))
    if cfg.run.threads:
        import os
        os.environ.setdefault("OMP_NUM_THREADS", str(cfg.run.threads))
    run_dir = Path(args.runs) / cfg.run.name
    data = Data(cfg)
    runner = Runner(cfg, STAGES, run_dir, data, data_identity=data.identity,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    print(f"run {run_dir} (config {args.config})", file=sys.stderr, flush=True)
    try:
        records = runner.run(args.start, args.until, args.force)
    except GateFailed as e:
        failed = e.args[1]
        write_report(run_dir, [*runner.records.values(), failed], cfg,
                     outcome={"passed": False, "message": e.args[0], "stage": failed["name"]})
        print(f"report: {run_dir / 'report.md'}", flush=True)
        raise
    write_report(run_dir, records, cfg, outcome={"passed": True})
    counts = {s: sum(r["status"] == s for r in records) for s in ("ran", "cached", "skipped")}
    last = records[-1]
    print(f"run folder: {run_dir}\nreport:     {run_dir / 'report.md'}\nreport json:{run_dir / 'report.json'}")
    if (run_dir / "deploy").is_dir() and last["name"] == "package":
        print(f"bundle:     {run_dir / 'deploy'}")
    top = [r for r in records if r.get("metrics", {}).get("top1") is not None]
    headline = f" | final top1 {top[-1]['metrics']['top1']:.2f} % ({top[-1]['name']})" if top else ""
    print(f"PASSED | {len(records)} stages: {counts['ran']} ran, {counts['cached']} cached, "
          f"{counts['skipped']} skipped in {time.perf_counter() - t0:.1f} s{headline} | {run_dir}", flush=True)
    return 0
