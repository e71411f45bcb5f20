"""`edgepipe` (also `python -m pipeline`): run the pipeline, show its config, and the runtime's verbs.

Exit codes: 0 passed, 1 user error (one line, no traceback unless --debug; usage errors too),
2 a failed gate or check. The last line printed is always `PASSED | ...` or `FAILED | ...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time

from edgerun import __version__
from edgerun.cli import UsageError, _Parser, add_verbs, dispatch, printable_stdio
from edgerun.errors import EdgeError
from pipeline import tasks
from pipeline.config import Config
from pipeline.llm import report as llm_report
from pipeline.vlm import report as vlm_report

# the config's sections, in its order (pipeline.config.Config is the one list; a stdlib read, no torch)
SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
STAGE_NAMES = ("baseline", "prune", "finetune", "export_onnx", "quantize", "engine", "profile", "package")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    ap = _Parser(prog="edgepipe", description=__doc__.splitlines()[0], parents=[common],
                 epilog=f"stages, in order: {', '.join(STAGE_NAMES)}. config sections: {', '.join(SECTIONS)}.")
    ap.add_argument("--version", action="version", version=f"edgepipe {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="VERB", parser_class=_Parser)
    r = sub.add_parser("run", parents=[common], help="run the stages of a target config",
                       epilog=f"stages, in order: {', '.join(STAGE_NAMES)}")
    _config_args(r)
    r.add_argument("--run", dest="run_name", help="run folder name under --runs (default: the config's name)")
    r.add_argument("--runs", default="runs", help="where run folders and the shared stage store live")
    r.add_argument("--from", dest="start", metavar="STAGE", help="first stage to run (earlier ones must be cached)")
    r.add_argument("--until", metavar="STAGE", help="last stage to run")
    r.add_argument("--force", nargs="*", metavar="STAGE", help="rerun these stages (no names: every selected stage)")
    c = sub.add_parser("config", parents=[common], help="config tools")
    csub = c.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    show = csub.add_parser("show", parents=[common], help="print the resolved config, defaults included (JSON)")
    _config_args(show)
    add_verbs(sub)
    for verb in ("infer", "check", "benchmark", "record"):
        if verb in sub.choices:
            sub.choices[verb].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                           help="show tracebacks")
    return ap


def _config_args(p) -> None:
    p.add_argument("--config", default="configs/cpu.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")


def _terminate(signum, frame):
    raise KeyboardInterrupt   # SIGTERM ends like Ctrl-C: finished stages kept, resumable


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    printable_stdio()
    debug = "--debug" in argv
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return _run(args)
        if args.command == "config":
            return _config_show(args)
        return dispatch(args)
    except UsageError as e:
        print(f"FAILED | error: {e}", flush=True)
        return 1
    except EdgeError as e:
        if debug:
            raise
        print(f"FAILED | error: {e}", flush=True)
        return 1
    except KeyboardInterrupt:
        print("FAILED | interrupted: finished stages are kept; rerun to resume", flush=True)
        return 130


def _config_show(args) -> int:
    from pipeline.api import load
    cfg, warnings = load(args.config, args.overrides)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(json.dumps(cfg.to_dict(), indent=2))
    print(f"PASSED | {args.config} resolved ({len(warnings)} ignored keys)")
    return 0


def _run(args) -> int:
    from pipeline.api import run
    from pipeline.runner import cpu_seconds
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = run(args.config, args.overrides, run_name=args.run_name, runs=args.runs, start=args.start,
                 until=args.until, force=args.force)
    print(f"run folder:  {result.run_dir}\nreport:      {result.report}\nreport json: {result.run_dir / 'report.json'}")
    if not result.passed:
        print(f"FAILED | gate: {result.message}", flush=True)
        return 2
    counts = {s: sum(r.status == s for r in result.records) for s in ("ran", "cached", "skipped")}
    if result.bundle is not None:
        family = next((f for f in (llm_report, vlm_report) if f.is_run(result)), None)
        print(family.next_block(result) if family is not None else _next_block(result))
    print(f"PASSED | {len(result.records)} stages: {counts['ran']} ran, {counts['cached']} cached, "
          f"{counts['skipped']} skipped in {time.perf_counter() - t0:.1f} s ({cpu_seconds() - c0:.0f} s of CPU)"
          f"{_headline(result)} | {result.run_dir}",
          flush=True)
    return 0


def _headline(result) -> str:
    family = next((f for f in (llm_report, vlm_report) if f.is_run(result)), None)
    if family is not None:
        return family.headline(result)
    pkg = result.record("package")
    chosen = (pkg.metrics.get("chosen") or {}) if pkg else {}
    task = tasks.of_run(result.records)
    if chosen.get("file"):
        value = chosen.get(task.metric)
        what = [task.brief(value)] if value is not None else []
        return f" | ship {chosen['file']}" + (f" ({', '.join(what + _speed(result))})" if what else "")
    top = [r for r in result.records if task.score(r.metrics) is not None]
    return f" | final {task.brief(top[-1].metrics[task.metric])} ({top[-1].name})" if top else ""


def _speed(result) -> list[str]:
    """The shipped file's measured speedup with its spread, and the load the search measured under:
    the report's summary, so the last line and the report cannot disagree."""
    try:
        s = json.loads((result.run_dir / "report.json").read_text())["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    sp, load = s.get("speedup") or {}, (s.get("widths") or {}).get("load") or {}
    if sp.get("speedup") is None:
        return []
    # A caveat (e.g. process medians 1.2x apart under load) is said beside the number, never instead of it.
    caveats = "".join(f" [{c}]" for c in sp.get("caveats") or ())
    out = [f"{sp['speedup']:.2f}x vs the unpruned ONNX at batch {sp['batch']}, p10-p90 "
           f"{sp.get('speedup_p10') or 0:.2f}-{sp.get('speedup_p90') or 0:.2f}, {sp.get('processes') or 1} process(es)"
           + caveats]
    if load:
        out.append(f"load {load.get('start')}-{load.get('max')} while searching")
    return out


def _next_block(result) -> str:
    """What to ship and the exact commands on the target (they use the bundle's own sample)."""
    pkg = result.record("package").metrics
    chosen, recipe = pkg.get("chosen") or {}, pkg.get("engine_recipe") or {}
    bundle = result.bundle
    lines = ["", "Next:", f"  ship the folder {bundle}/ (chosen here: {chosen.get('file')}; on the target: "
             f"{(chosen.get('on_target') or {}).get('file')})",
             "  on the target (python3 with numpy and onnxruntime; TensorRT from JetPack for the engine):",
             f"    cd {bundle.name}"]
    if recipe.get("offered"):
        lines.append("    bash build_engine.sh          # pre-flight, trtexec build + timing, sidecar "
                     "(NOT executed here: no TensorRT)")
    lines += ["    python3 -m edgerun infer --bundle . --input sample/images-idx3-ubyte.gz --format json",
              "    python3 -m edgerun benchmark .", ""]
    return "\n".join(lines)
