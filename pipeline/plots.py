"""The report's PNG plots (matplotlib's Agg canvas: no display needed), drawn from report.json's content.

A plot must never fail a run: one that cannot be drawn is left out and its error recorded in
``report["plot_errors"]``.
"""
from __future__ import annotations

import math
from pathlib import Path

from edgerun.io import atomic_write
from pipeline import report_fmt as fmt
from pipeline.profile_speedup import BACKEND_ORDER
from pipeline.records import ROLES, Metric
from pipeline.report_summary import metric_of

PLOTS = {"plot_pareto.png": "{Label} vs p50 latency at the smallest batch (the Pareto view)",
         "plot_latency.png": "p50 latency per artifact and batch (whisker: p99)",
         "plot_stages.png": "MACs (both conventions), parameters and file size per stage"}
COLORS = {"torch-cpu": "#1f77b4", "onnxruntime-cpu": "#ff7f0e", "torch-cuda": "#2ca02c",
          "onnxruntime-cuda": "#d62728", "onnxruntime-tensorrt": "#9467bd", "tensorrt": "#8c564b"}
# The Pareto plot's axis for the task's figure is at least its Metric's min_span tall (a classifier's:
# 2 pt). Matplotlib fits the axis to the data, so 98.5 % vs 98.6 % would fill the height and a 0.1 pt
# difference would look like a cliff.


def caption(name: str, metric: Metric) -> str:
    """A plot's caption, naming the task's figure where the plot shows it."""
    label = metric.label[:1].upper() + metric.label[1:]
    return PLOTS.get(name, name).replace("{Label}", label)


def row_order(r: dict):
    """Backends in BACKEND_ORDER, then roles in lineage order (pipeline.records.ROLES)."""
    return (BACKEND_ORDER.index(r["backend"]) if r.get("backend") in BACKEND_ORDER else 99,
            ROLES.index(r["role"]) if r.get("role") in ROLES else 99, str(r.get("artifact")), r.get("batch") or 0)


def write_plots(folder, report: dict) -> list[str]:
    """Writes the plots next to report.md (each atomically); returns the names written."""
    try:
        from matplotlib.figure import Figure  # noqa: F401  (matplotlib absent: a report without plots)
    except ImportError:
        return []
    written = []
    for name, draw in (("plot_pareto.png", plot_pareto), ("plot_latency.png", plot_latency),
                       ("plot_stages.png", plot_stages)):
        try:
            fig = draw(report)
            if fig is None:
                continue
            atomic_write(Path(folder) / name,
                         lambda tmp, f=fig: f.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        except Exception as e:
            report.setdefault("plot_errors", []).append(f"{name}: {type(e).__name__}: {e}")
            continue
        written.append(name)
    return written


def _short(label: str) -> str:
    return (str(label).replace(" (torch)", "").replace(" (onnxruntime Q/DQ)", "").replace(" (unpruned)", "")
            .replace(" (TensorRT Q/DQ)", " TRT Q/DQ").replace(" (tensorrt Q/DQ)", " TRT Q/DQ")
            .replace("pruned + fine-tuned", "pruned"))


def score_limits(values: list[float], metric: Metric) -> tuple[float, float]:
    """The task figure's axis: the data with a margin, at least ``metric.min_span`` tall, within the
    metric's bounds (a percent: 0..100) where it has them."""
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.2, (metric.min_span - (hi - lo)) / 2)
    lo, hi = lo - pad, hi + pad
    if metric.bounds is None:
        return (lo, hi) if hi > lo else (lo - 1.0, hi + 1.0)
    floor, ceiling = metric.bounds
    if hi > ceiling:
        lo, hi = lo - (hi - ceiling), ceiling
    if lo < floor:
        lo, hi = floor, min(ceiling, hi - lo + floor)
    return lo, hi


def _lead(v: float) -> int:
    """The leading digit of a positive number (minor log ticks 2, 3, 5 get labels)."""
    return int(round(v / 10 ** math.floor(math.log10(v)))) if v > 0 else 0


def _label_offsets(points: list[tuple[float, float]], labels: list[str]) -> list[float]:
    """Vertical label offsets (points) so that labels of nearby markers do not overlap: a label moves to
    the next free slot (6, -12, -24, 18, ... points) when an earlier label whose text spans the same
    horizontal stretch uses that slot. ``points`` are (log10 latency, top-1)."""
    if not points:
        return []
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xr, yr = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    slots = [6.0, -12.0, -24.0, 18.0, -36.0, 30.0, -48.0]
    char = 0.0095  # width of one 8-point character as a fraction of a 9-inch axis (the x span ~ 0.8 of it)
    placed: list[tuple[float, float, float, float]] = []   # (left, right, v, offset)
    out = []
    for (x, y), label in zip(points, labels, strict=True):
        u, v = (x - min(xs)) / xr * 0.8, (y - min(ys)) / yr
        right = u + len(label) * char + 0.03  # + the 7-point gap before the text and some air
        off = slots[-1]
        for off in slots:
            if not any(u < pr and pl < right and abs((v + off / 300.0) - (pv + po / 300.0)) < 0.05
                       for pl, pr, pv, po in placed):
                break
        placed.append((u, right, v, off))
        out.append(off)
    return out


def plot_pareto(report: dict):
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
    m = metric_of(report)
    y = m.name
    lat = [r for r in report.get("latency") or [] if r.get(y) is not None and r.get("p50_ms")]
    if not lat:
        return None
    b = min(r["batch"] for r in lat)
    rows = sorted((r for r in lat if r["batch"] == b), key=lambda r: r["p50_ms"])
    shipped = (report.get("summary") or {}).get("shipped") or {}
    fig = Figure(figsize=(9, 5.2))
    ax = fig.add_subplot()
    backends = sorted({r["backend"] for r in rows}, key=lambda x: BACKEND_ORDER.index(x) if x in BACKEND_ORDER else 99)
    for backend in backends:
        pts = [r for r in rows if r["backend"] == backend]
        color = COLORS.get(backend, "#333333")
        ax.scatter([r["p50_ms"] for r in pts], [r[y] for r in pts], s=55, color=color, label=backend, zorder=3)
        front = []
        for r in pts:  # sorted by latency: on the front if more accurate than every faster one
            if not front or m.worse_by(front[-1][y], r[y]) > 0:
                front.append(r)
        if len(front) > 1:
            ax.step([r["p50_ms"] for r in front], [r[y] for r in front], where="post", color=color,
                    alpha=0.5, linestyle="--", zorder=2)
    labels = [_short(r["artifact"]) for r in rows]
    offsets = _label_offsets([(math.log10(r["p50_ms"]), r[y]) for r in rows], labels)
    for r, label, off in zip(rows, labels, offsets, strict=True):
        color = COLORS.get(r["backend"], "#333333")
        ax.annotate(label, (r["p50_ms"], r[y]), textcoords="offset points",
                    xytext=(7, off), fontsize=8, color=color)
        if (shipped.get("file"), shipped.get("backend"), shipped.get("batch")) == (r.get("file"), r["backend"], b):
            ax.scatter([r["p50_ms"]], [r[y]], s=220, facecolors="none", edgecolors="black", zorder=4,
                       label=f"shipped ({shipped['file']})")
    ax.set_xscale("log")
    ax.margins(x=0.15)
    ax.set_ylim(*score_limits([r[y] for r in rows], m))
    span = math.log10(rows[-1]["p50_ms"]) - math.log10(rows[0]["p50_ms"])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if span <= 1.5 and _lead(v) in (2, 3, 5) else ""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(f"p50 latency at batch {b} (ms, log scale)")
    tall = f"; axis at least {m.min_span:g}{m.drop_unit} tall" if m.min_span else ""
    ax.set_ylabel(f"{m.label}{' accuracy' if m.higher_is_better else ''} ({m.unit.strip() or m.name}{tall})")
    ax.set_title(f"{'Accuracy' if m.higher_is_better else m.label} vs latency at batch {b}: "
                 f"{'up' if m.higher_is_better else 'down'} and to the left is better (dashed: Pareto front)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_latency(report: dict):
    """A dot per artifact x backend at its p50, a line to its p99, a tick at p90; log scale over wide ranges."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
    lat = sorted((r for r in report.get("latency") or [] if r.get("p50_ms") and r.get("p99_ms")), key=row_order)
    if not lat:
        return None
    batches = sorted({r["batch"] for r in lat})
    keys = list(dict.fromkeys((r["artifact"], r["backend"]) for r in lat))
    busy = {(r["artifact"], r["backend"]) for r in lat if r.get("oversubscribed")}
    fig = Figure(figsize=(4.2 * len(batches) + 2.5, 0.42 * len(keys) + 1.8))
    axes = fig.subplots(1, len(batches), sharey=True, squeeze=False)[0]
    by = {(r["artifact"], r["backend"], r["batch"]): r for r in lat}
    for ax, b in zip(axes, batches, strict=True):
        here = [(y, by[(a, k, b)], COLORS.get(k, "#333333")) for y, (a, k) in enumerate(keys) if (a, k, b) in by]
        lo = min(r["p50_ms"] for _, r, _ in here)
        hi = max(r["p99_ms"] for _, r, _ in here)
        log = hi / max(lo, 1e-9) > 20
        for y, r, c in here:
            ax.plot([r["p50_ms"], r["p99_ms"]], [y, y], color=c, linewidth=1.5, alpha=0.7)
            if r.get("p90_ms") is not None:
                ax.plot([r["p90_ms"]], [y], marker="|", markersize=10, color=c)
            ax.plot([r["p50_ms"]], [y], marker="o", markersize=7, color=c)
            ax.annotate(fmt.sig3(r["p50_ms"]), (r["p99_ms"], y), textcoords="offset points", xytext=(5, -3), fontsize=7)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlim(lo / 1.6, hi * 4)
        else:  # a linear time axis starts at 0 so that bar-like comparisons are not exaggerated
            ax.set_xlim(0, hi * 1.3)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("ms" + (" (log scale)" if log else "") + ": dot p50, tick p90, line end p99")
        ax.grid(True, axis="x", which="major", alpha=0.3)
    axes[0].set_yticks(list(range(len(keys))))
    axes[0].set_yticklabels([f"{_short(a)} [{k}]" + (" (oversubscribed)" if (a, k) in busy else "")
                             for a, k in keys], fontsize=8)
    axes[0].set_ylim(len(keys) - 0.5, -0.5)
    fig.suptitle("Latency per artifact and backend (label: p50 ms)")
    return fig


STAGE_FIGURES = (("macs", "MACs (conv/linear)", 1e6, "M"), ("ops_tp", "ops (torch-pruning)", 1e6, "M"),
                 ("params", "parameters", 1e3, "K"), ("size_bytes", "file size", 1024, "KiB"))


def stage_items(report: dict) -> list[tuple[str, dict]]:
    """(label, metrics) per stage that ran or was cached and counted something, in stage order; a side
    file a stage reports in a sub-dict with its own size (export's ``fp16``) gets its own bar."""
    keys = [k for k, *_ in STAGE_FIGURES]
    items = []
    for s in report.get("stages") or []:
        m = s.get("metrics") or {}
        if s.get("status") not in ("ran", "cached") or not any(m.get(k) is not None for k in keys):
            continue
        items.append((s["name"], m))
        for sub, v in m.items():
            if isinstance(v, dict) and v.get("size_bytes") is not None:
                items.append((f"{s['name']} {sub}", {**{k: m.get(k) for k in keys}, **v}))
    return items


def plot_stages(report: dict):
    from matplotlib.figure import Figure
    items = stage_items(report)
    figures = [f for f in STAGE_FIGURES if any(m.get(f[0]) is not None for _, m in items)]
    if not items or not figures:
        return None
    fig = Figure(figsize=(4.3 * len(figures), 0.45 * len(items) + 2.0))
    axes = fig.subplots(1, len(figures), sharey=True, squeeze=False)[0]
    ys = list(range(len(items)))
    for ax, (key, title, scale, unit) in zip(axes, figures, strict=True):
        vals = [(m.get(key) or 0) / scale for _, m in items]
        ax.barh(ys, vals, color=["#7f7f7f" if j == 0 else "#1f77b4" for j in ys])
        base = vals[0] or None
        for y, v in zip(ys, vals, strict=True):
            if v:
                rel = f" ({v / base:.0%})" if base and y else ""
                ax.text(v, y, f" {v:,.0f} {unit}{rel}" if v >= 100 else f" {v:.3g} {unit}{rel}", va="center",
                        fontsize=8)
        ax.set_title(title)
        ax.set_xlabel(unit)
        ax.set_xlim(0, max(vals + [1e-9]) * 1.45)  # bars start at 0: lengths compare honestly
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([label for label, _ in items])
    axes[0].invert_yaxis()
    fig.suptitle("What each stage left (percent of the first stage); MACs and torch-pruning ops are different counts")
    return fig
