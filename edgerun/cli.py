"""`python -m edgerun VERB` (infer, check, benchmark, record, generate, eval): the runtime's command line, also
mounted by `edgepipe`.

Exit codes: 0 passed, 1 user error (one `FAILED | error: ...` line on stdout, no traceback unless
--debug; argparse usage errors too), 2 a failed check. Each verb lives in its own module, imported
when the parser is built; a verb whose module (or one of its libraries) is missing here stays
listed and answers with one line saying why, so `infer` works on a device without the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from edgerun import __version__
from edgerun.errors import EdgeError

# verb -> (module, parser builder, runner)
VERBS = {
    "infer": ("edgerun.infer", "add_infer_parser", "run_infer"),
    "check": ("edgerun.check", "add_check_parser", "run_check"),
    "benchmark": ("edgerun.benchmark", "add_benchmark_parser", "run_benchmark"),
    "record": ("edgerun.trt", "add_record_parser", "run_record"),
    "generate": ("edgerun.generate_cli", "add_generate_parser", "run_generate"),
    "eval": ("edgerun.vlm_cli", "add_eval_parser", "run_eval"),
}
RUN = "edgerun_run"  # the argparse attribute that holds the chosen verb's runner


class UsageError(EdgeError):
    """A command line argparse refused (exit 1, like every user error)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit 2, which here means "a check failed"
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: {message}")


def add_verbs(subparsers) -> dict[str, str]:
    """Mount every verb on ``subparsers``; returns {verb: why it is unavailable} for the missing ones.

    Run the parsed arguments with ``dispatch(args)``.
    """
    missing = {}
    for verb, (module, add, run) in VERBS.items():
        try:
            mod = importlib.import_module(module)
            add_parser, runner = getattr(mod, add), getattr(mod, run)
        except (ImportError, AttributeError) as e:
            missing[verb] = f"{module}: {e}"
            p = subparsers.add_parser(verb, help=f"(not available here: {e})", add_help=False)
            _answer_anything(p, _unavailable(verb, missing[verb]))
            continue
        add_parser(subparsers)
        subparsers.choices[verb].set_defaults(**{RUN: runner})
    return missing


def _answer_anything(parser: argparse.ArgumentParser, run) -> None:
    """Make a stub verb take whatever follows it: its answer is always "not available", never a
    usage error about options it cannot know. Options added to it later (edgepipe adds --debug)
    are accepted, and swallowed like the rest."""
    def parse_known_args(args=None, namespace=None):
        namespace = namespace if namespace is not None else argparse.Namespace()
        setattr(namespace, RUN, run)
        return namespace, []
    parser.parse_known_args = parse_known_args


def _unavailable(verb: str, why: str):
    def run(args) -> int:
        raise EdgeError(f"`{verb}` is not available in this edgerun ({why})")
    return run


def dispatch(args) -> int | None:
    """Run the verb ``args`` was parsed for; None when it is not one of add_verbs' verbs."""
    run = getattr(args, RUN, None)
    if run is None:
        return None
    printable_stdio()
    return int(run(args))


def printable_stdio() -> None:
    """A terminal that cannot show a character ("≤", "→", a label's accent) gets an escape, not a crash:
    PYTHONIOENCODING=ascii, a C locale on an old Python, a serial console."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m edgerun", description="Run deploy bundles on this machine: infer, check, "
                                                       "benchmark, record, generate, eval.")
    ap.add_argument("--version", action="version", version=f"edgerun {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    add_verbs(ap.add_subparsers(dest="command", required=True, metavar="VERB"))
    return ap


def main(argv=None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    printable_stdio()
    try:
        args = build_parser().parse_args(argv)
        return dispatch(args)
    except EdgeError as e:
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
        print("FAILED | interrupted", flush=True)
        return 130
    except BrokenPipeError:   # `... | head`: the reader left; say nothing more
        sys.stderr.close()
        return 1
