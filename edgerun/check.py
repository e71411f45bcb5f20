"""The `check` verb: the static TensorRT pre-flight (edgerun.preflight) of an ONNX file or a bundle.

Exit codes: 0 every file passes for every major, 2 a file fails (like a failed gate), 1 a user error.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from edgerun.bundle import MANIFEST, verify_file
from edgerun.errors import EdgeError, brief
from edgerun.preflight import MAJORS, PreflightError, check_onnx
from edgerun.verify import load_verified, verify_model

EXIT_FAILED = 2     # a failed check is like a failed gate (exit 2); 1 stays for user errors

def bundle_onnx_files(folder: str | os.PathLike) -> list[Path]:
    """The .onnx files a bundle's build files (engine.env, trtexec_args_trt*.txt) name, else all of them."""
    folder = Path(folder)
    root = folder.resolve()
    named = []
    env = folder / "engine.env"
    try:
        if env.is_file():
            for line in env.read_text().splitlines():
                if line.startswith("ONNX="):
                    named += shlex.split(line[len("ONNX="):])
        for args in sorted(folder.glob("trtexec_args_trt*.txt")):
            named += [a.split("=", 1)[1] for a in args.read_text().split() if a.startswith("--onnx=")]
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: shlex on unbalanced quotes
        raise PreflightError(f"{folder}: cannot read its build files ({brief(e)})") from None
    if not named:
        files = sorted(folder.glob("*.onnx"))
        if not files:
            raise PreflightError(f"{folder}: no .onnx file in this folder and no build file naming one")
        return files
    out = []
    for n in dict.fromkeys(named):
        path = (folder / n).resolve()
        if not path.is_relative_to(root):
            raise PreflightError(f"{folder}: build file names {n!r}, which is outside the bundle")
        if not path.is_file():
            raise PreflightError(f"{folder}: build file names {n!r}, which is not in the bundle")
        out.append(path)
    return out


def verified_files(path: Path) -> list[Path]:
    """The ONNX files to check; inside a bundle (a folder with manifest.json), verified first: the
    bundle holds nothing unlisted, and each file (with its external data) and each build file that
    names them matches the manifest."""
    folder = path if path.is_dir() else path.parent
    if not (folder / MANIFEST).is_file():
        return bundle_onnx_files(path) if path.is_dir() else [path]
    manifest = load_verified(folder)
    if not path.is_dir():
        return [verify_model(manifest, path.name)]
    for build in [folder / "engine.env", *sorted(folder.glob("trtexec_args_trt*.txt"))]:
        if build.exists():
            verify_file(folder, manifest, build.name)
    root = folder.resolve()
    return [verify_model(manifest, f.relative_to(root).as_posix()) for f in bundle_onnx_files(folder)]


def add_check_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check", help="static TensorRT pre-flight of an ONNX file or a bundle (no GPU)",
                              description=__doc__.split("\n")[0])
    p.add_argument("path", help="an .onnx file, or a bundle folder (checks the ONNX its build files name)")
    p.add_argument("--trt-major", type=int, nargs="+", choices=MAJORS, default=list(MAJORS), metavar="10|11",
                   help="TensorRT major version(s) to check against (default: 10 11)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run_check)
    return p


def run_check(args) -> int:
    """0 when every file passes for every major, EXIT_FAILED (one line per issue) otherwise."""
    try:
        files = verified_files(Path(args.path))
        results = [check_onnx(f, major) for f in files for major in args.trt_major]
    except EdgeError as e:
        print(f"FAILED | error: {e}")
        return 1   # a user error (unreadable file, bad bundle), not a failed check
    failed = [r for r in results if not r]
    if args.format == "json":
        print(json.dumps({"passed": not failed, "results": [r.to_json() for r in results]}, indent=2))
        return EXIT_FAILED if failed else 0
    for r in results:
        print(r.summary())
        for issue in r.issues:
            print(f"  {r.name} TensorRT {r.trt_major}: {issue.line()}")
        for note in r.notes:
            print(f"  note: {note}")
    checked = f"{len(files)} ONNX file(s) x TensorRT {'/'.join(map(str, args.trt_major))}"
    if failed:
        n = sum(len(r.issues) for r in failed)
        print(f"FAILED | {n} issue(s) in {len(failed)} of {len(results)} checks ({checked})")
        return EXIT_FAILED
    print(f"PASSED | {checked}: nothing contradicts TensorRT's documented ONNX support")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m edgerun.check PATH [--trt-major ...]``: the check verb on its own."""
    parser = argparse.ArgumentParser(prog="python -m edgerun.check")
    add_check_parser(parser.add_subparsers(dest="verb", required=True))
    import sys
    args = parser.parse_args(["check", *(sys.argv[1:] if argv is None else argv)])
    return run_check(args)


if __name__ == "__main__":
    raise SystemExit(main())
