"""What several stages read and write the same way: the model's keys, the baseline and pruned
models from earlier stages' folders, the unpruned model's kept outputs, the run's task, numpy files through the one
atomic writer, the pruned model's counts, and the task metric's drop gate."""
from __future__ import annotations

import numpy as np

from edgerun.io import atomic_write
from pipeline import gate as gates
from pipeline import modelio
from pipeline.runner import Context
from pipeline.tasks import named

LADDER_KEYS = ("prune.target", "prune.backoff", "prune.widths", "prune.from_record")   # what has_ladder reads


def model_keys(cfg) -> list[str]:
    """What building the model reads: the name only when no factory replaces it."""
    keys = ["model.factory", "model.kwargs", "model.num_classes"]
    return keys if cfg.model.factory else [*keys, "model.name"]


def load_baseline(ctx: Context):
    return modelio.load_state_fresh(ctx.cfg, ctx.path("baseline", "model.pt"))


def load_pruned_model(ctx: Context, stage: str, sub: str = ""):
    """The pruned model a stage saved in its folder (or in ``sub`` below it): structure replayed, weights loaded."""
    from pipeline.prune import load_pruned
    folder = ctx.path(stage, sub) if sub else ctx.path(stage)
    return load_pruned(modelio.build(ctx.cfg.model, ctx.cfg.data), modelio.example_input(ctx.cfg.data),
                       folder).eval()


def task_of(ctx: Context):
    """The run's task, as the baseline stage resolved it (`task.kind`, or the task claiming its outputs)."""
    return named(ctx.record("baseline").metrics["task"])


def teacher_outputs(ctx: Context) -> dict | None:
    """The unpruned model's test outputs that the task keeps for fidelity (`Task.keeps`); None if none."""
    keeps = task_of(ctx).keeps
    return {k: np.load(ctx.path("baseline", f"test_{k}.npy")) for k in keeps} if keeps else None


SHIPPED_EXPORT_KEYS = ("export.opset", "export.example_batch", "export.slim")   # what shipped_exporter reads


def shipped_exporter(cfg):
    """``(model, path) -> info``: the one exporter of the file that ships (export.onnx_export with the export
    section's settings). The export stage writes model.onnx with it; the latency search verifies with it."""
    from export.onnx_export import export_onnx
    e = cfg.export

    def write(model, path):
        return export_onnx(model, modelio.example_input(cfg.data, e.example_batch), path, opset=e.opset,
                           output_names=modelio.output_names(model), slim=e.slim, example_batch=e.example_batch)
    return write


def np_write(path, save, *args, **kwargs) -> None:
    """numpy's savers through the one atomic writer (given a path, they would append .npy/.npz to it)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            save(f, *args, **kwargs)
    atomic_write(path, write)


def pruned_counts(ctx: Context, model) -> dict:
    """MACs (both conventions), params, weights size and the MAC reductions against the baseline."""
    base = ctx.record("baseline").metrics
    counts = modelio.count(model, ctx.cfg.data)
    size = sum(f.stat().st_size for f in ctx.out.iterdir() if f.suffix in (".pt", ".safetensors"))
    return {**counts, "size_bytes": size, "macs_reduction": round(base["macs"] / counts["macs"], 3),
            "ops_tp_reduction": round(base["ops_tp"] / counts["ops_tp"], 3)}


def drop_gate(section: str, parent: str):
    """The gate of ``section``: the task metric's drop against the ``parent`` stage's, at most ``section.max_drop``."""
    def check(m, inputs, cfg):
        s, task = getattr(cfg, section), named(m["task"])
        return gates.gate(s.gate, task.drop_check(task.value(m), task.value(inputs[parent].metrics), s.max_drop))
    return check


def replaying(cfg) -> bool:
    widths, record = cfg.prune.widths, cfg.prune.from_record   # both read: the stages declare both
    return bool(widths or record)


def has_ladder(cfg) -> bool:
    """Whether the prune stage may hand the fine-tune stage more than one pick to try."""
    p = cfg.prune
    latency, backoff, replay = p.target in ("latency_ms", "speedup"), p.backoff > 0, replaying(cfg)
    return latency and backoff and not replay
