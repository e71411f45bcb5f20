"""The one progress display for long loops: a rich bar on a terminal, a line every few seconds in a log.

Either way it shows elapsed time and an ETA, so fine-tuning is never minutes of silence in CI or `tee`.
"""
from __future__ import annotations

import sys
import time

LOG_EVERY_S = 5.0


class Progress:
    def __init__(self, label: str, total: int, *, stream=None, clock=time.monotonic):
        self.label, self.total, self.stream, self.clock = label, max(1, int(total)), stream or sys.stderr, clock
        self.t0 = self.last = clock()
        self.done, self.info = 0, ""
        self.bar = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar
            self.bar = Bar(TextColumn(f"  {label}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                           console=Console(file=self.stream), transient=True)
            self.task = self.bar.add_task(label, total=self.total, info="")
            self.bar.start()

    def line(self) -> str:
        elapsed = self.clock() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        return (f"  {self.label}: {self.done}/{self.total} ({100 * self.done // self.total} %) "
                f"{_mmss(elapsed)} elapsed, ETA {_mmss(eta)}{'  ' + self.info if self.info else ''}")

    def update(self, done: int, info: str = "") -> None:
        self.done, self.info = min(int(done), self.total), info
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, info=info)
        elif self.clock() - self.last >= LOG_EVERY_S:
            self.last = self.clock()
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        print(self.line(), file=self.stream, flush=True)   # the final state, in logs and on terminals alike


def _mmss(seconds: float) -> str:
    if seconds != seconds:   # NaN: nothing done yet
        return "--:--"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"
