"""Peak resident memory of a decoder file at work: one fresh Python process per file (``python -m
edgerun.decode_memory FILE ...``) opens it on onnxruntime's CPU, runs one prefill of N prompt tokens and decode
steps after P cached tokens at batch 1 (the timed workloads, edgerun.decode_timing), and reports its peak
resident set (VmHWM; see _maxrss_mib for why not ru_maxrss).

What the peak includes: the Python interpreter with numpy, onnxruntime and edgerun imported (reported apart
as ``import_rss_mib``, the floor every file shares), the session's weights as onnxruntime holds them after its
graph optimisations (prepacked MatMul weights included), onnxruntime's CPU memory arena at its high-water mark
after these runs, and the feeds (the KV cache of P tokens) and outputs. A process per file, because a peak is a
high-water mark: a larger file opened first in the same process would mask the smaller one's.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgerun.errors import EdgeError

DECODE_STEPS = 4      # the arena reaches its high-water mark on the first steps; a few more cost milliseconds


class PeakMemoryError(EdgeError):
    """A peak memory measurement that could not be made."""


@dataclass(frozen=True)
class PeakMemory:
    peak_rss_mib: float      # the process's peak: interpreter, libraries, session, arena, feeds
    import_rss_mib: float    # before the file is opened: the interpreter with the runtime's libraries

    def to_json(self) -> dict:
        return {"peak_rss_mib": self.peak_rss_mib, "import_rss_mib": self.import_rss_mib}


def peak_rss(path: str | Path, *, prefill_tokens: int, decode_past: int, threads: int = 0,
             timeout_s: float = 300.0, python: str = sys.executable) -> PeakMemory:
    """The peak resident memory of a fresh process running ``path``'s prefill and decode workloads."""
    for name, value in (("prefill_tokens", prefill_tokens), ("decode_past", decode_past)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PeakMemoryError(f"peak memory: {name} must be a positive integer, got {value!r}")
    path = Path(path).resolve()
    if not path.is_file():
        raise PeakMemoryError(f"peak memory: {path}: no such file")
    root = Path(__file__).resolve().parents[1]   # -m from the folder holding this package (see edgerun.timing)
    cmd = [python, "-m", "edgerun.decode_memory", str(path), str(prefill_tokens), str(decode_past), str(threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root)
    except subprocess.TimeoutExpired:
        raise PeakMemoryError(f"peak memory of {path.name}: no result within {timeout_s:.0f} s") from None
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()] or ["(no message)"]
        raise PeakMemoryError(f"peak memory of {path.name}: the worker failed (exit {p.returncode}): {lines[-1]}")
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    return PeakMemory(float(doc["peak_rss_mib"]), float(doc["import_rss_mib"]))


def _maxrss_mib() -> float:
    """This process's peak resident set: VmHWM from /proc/self/status, the high-water mark of the address space
    exec gave it. Not getrusage's ru_maxrss there: Linux keeps that across fork + exec, so a worker started by a
    large process (a pipeline with torch loaded: ~700 MiB) would report its parent's size. Elsewhere (no /proc)
    ru_maxrss it is, in bytes on macOS, KiB on other systems."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)           # kB
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1024.0), 1)


def worker(path: str, prefill_tokens: int, decode_past: int, threads: int) -> PeakMemory:
    import onnxruntime  # noqa: F401  (the floor counts the runtime's libraries, as every file needs them)

    from edgerun.decode_timing import decoder_call
    from edgerun.generate import DecoderSession
    floor = _maxrss_mib()
    session = DecoderSession(path, threads=threads)
    try:
        decoder_call(session, "prefill", prefill_tokens)()
        step = decoder_call(session, "decode", decode_past)
        for _ in range(DECODE_STEPS):
            step()
    finally:
        session.runner.__exit__(None, None, None)
    return PeakMemory(_maxrss_mib(), floor)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        path, prefill, past, threads = args[0], int(args[1]), int(args[2]), int(args[3])
    except (IndexError, ValueError):
        print("usage: python -m edgerun.decode_memory FILE PREFILL_TOKENS DECODE_PAST THREADS", file=sys.stderr)
        return 2
    try:
        result = worker(path, prefill, past, threads)
    except EdgeError as e:
        print(f"{e}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
