"""Where a cold `make deploy` spends its training time: torch intra-op threads on a shared machine.

    python -m benchmarks.bench_cold [--repeats 3] [--steps 60]

A training step of the default SimpleCNN (unpruned, 16/32 channels, batch 64, Adam, cross-entropy) and
of its shipped width (conv widths 2/8), timed in fresh processes at 1 and 2 intra-op threads, quiet and
with two busy-loop processes beside it (what `(while :; do :; done) &` twice does), the four cases
interleaved per repeat. Reports the median ms per step and min-max over the repeats, with the CPU and
the load average; writes benchmarks/cold_start.md. pipeline.train.training_threads picks the threads
the pipeline trains with from this. A measurement, not a timed test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "cold_start.md"
WORKER = """
import json, sys, time, torch
import torch.nn.functional as F
from pipeline.models.cnn import SimpleCNN
threads, channels, steps = int(sys.argv[1]), tuple(json.loads(sys.argv[2])), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
m = SimpleCNN(channels=channels)
opt = torch.optim.Adam(m.parameters(), 1e-3)
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
def step():
    loss = F.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step()
for _ in range(5):
    step()
t = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps((time.perf_counter() - t) / steps * 1000))
"""
BUSY = "import time\nend = time.time() + 900\nwhile time.time() < end:\n    pass\n"
WIDTHS = {"unpruned (16, 32)": (16, 32), "shipped (2, 8)": (2, 8)}


def step_ms(threads: int, channels: tuple[int, int], steps: int) -> float:
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads), json.dumps(channels), str(steps)], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=900)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    from edgerun.machine import cpu_name, load_average, usable_cores
    results: dict[tuple, list[float]] = {}
    loads = {"quiet": [], "2 busy loops": []}
    for _ in range(args.repeats):
        for load in loads:
            busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2 if load != "quiet" else 0)]
            try:
                time.sleep(1.0 if busy else 0.0)
                for width, ch in WIDTHS.items():
                    for threads in (1, 2):
                        results.setdefault((load, width, threads), []).append(step_ms(threads, ch, args.steps))
                loads[load].append(load_average()[0])
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
    lines = ["# Cold start: torch training threads on a shared machine", "",
             f"Measured {datetime.date.today()} by `make bench-cold` on {cpu_name()} ({usable_cores()} usable cores), "
             f"torch CPU; ms per training step (batch 64, Adam), median of {args.repeats} fresh processes "
             f"(min-max), {args.steps} steps each after 5 warm-up steps. 1-minute load average after each block: "
             + "; ".join(f"{k} {v}" for k, v in loads.items()) + ".", "",
             "| load | model | 1 thread | 2 threads | 2 threads / 1 thread |", "|---|---|---|---|---|"]
    for load in loads:
        for width in WIDTHS:
            one, two = results[(load, width, 1)], results[(load, width, 2)]
            cell = [f"{np.median(v):.1f} ms ({min(v):.1f}-{max(v):.1f})" for v in (one, two)]
            lines.append(f"| {load} | {width} | {cell[0]} | {cell[1]} | {np.median(two) / np.median(one):.2f}x |")
    lines += ["", "The pipeline trains with `max(1, usable cores - 1)` threads (pipeline.train.training_threads): "
              "on this 2-core machine, one."]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
