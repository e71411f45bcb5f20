"""Progress bars for long loops (rich), quiet when the output is not a terminal."""
from __future__ import annotations

import sys


def step_progress(label: str):
    """A ``progress(epoch, step, steps, loss)`` callback; on a non-terminal it prints every 10 %."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                       TimeRemainingColumn(), transient=True)
        state = {}

        def update(epoch, step, steps, loss):
            if epoch not in state:
                if not state:
                    bar.start()
                state[epoch] = bar.add_task(f"  {label} epoch {epoch + 1}", total=steps, info="")
            bar.update(state[epoch], completed=step, info=f"loss {loss:.4f}")
            if step == steps:
                bar.remove_task(state[epoch])
                print(f"  {label} epoch {epoch + 1}: loss {loss:.4f}", file=sys.stderr)
        return update

    def plain(epoch, step, steps, loss):
        if step == steps or step % max(1, steps // 10) == 0:
            print(f"  {label} epoch {epoch + 1}: {100 * step // steps:3d} % loss {loss:.4f}", file=sys.stderr, flush=True)
    return plain
