"""The export stage: the fine-tuned model to ONNX with the one exporter, its parity with torch on the
reference batch, the task's metrics of the ONNX file, and optional FP16 and unpruned-baseline ONNX files."""
from __future__ import annotations

import numpy as np

from pipeline import gate as gates
from pipeline import modelio
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.stage_io import (
    SHIPPED_EXPORT_KEYS,
    load_baseline,
    load_pruned_model,
    model_keys,
    shipped_exporter,
    task_of,
    teacher_outputs,
)
from pipeline.tasks import named


def export_keys(cfg):
    return [*model_keys(cfg), *SHIPPED_EXPORT_KEYS, "export.fp16", "profile.baseline_onnx"]


def export_onnx(ctx: Context) -> Output:
    from export.fp16 import to_fp16
    from export.parity import compare_outputs
    cfg, data, e = ctx.cfg, ctx.data, ctx.cfg.export
    write = shipped_exporter(cfg)
    model = load_pruned_model(ctx, "finetune")
    onnx_path = ctx.out / "model.onnx"
    info = write(model, onnx_path)
    ref = np.load(ctx.path("baseline", "reference.npz"))
    ort_ref = modelio.onnx_outputs(onnx_path, ref["inputs"])
    par = compare_outputs(modelio.torch_outputs(model, ref["inputs"]), ort_ref)
    task = task_of(ctx)
    metrics = {"task": task.kind, **task.metrics(modelio.onnx_outputs(onnx_path, data.x_test), data.test.labels,
                                                 teacher_outputs(ctx))}
    fm = ctx.record("finetune").metrics
    metrics.update(size_bytes=onnx_path.stat().st_size, macs=fm["macs"], ops_tp=fm["ops_tp"], params=fm["params"],
                   opset=info["opset"], parity={"max_abs": par["max_abs"], "min_mean_cosine": par["min_mean_cosine"]})
    artifacts = [Artifact("onnx-fp32", "onnx", "model.onnx", "fp32", "ONNX fp32")]
    if e.fp16:
        fp16 = ctx.out / "model_fp16.onnx"
        to_fp16(onnx_path, fp16)
        p16 = compare_outputs(ort_ref, modelio.onnx_outputs(fp16, ref["inputs"]))
        m16 = task.metrics(modelio.onnx_outputs(fp16, data.x_test), data.test.labels)
        metrics["fp16"] = {**m16, "size_bytes": fp16.stat().st_size,
                           "parity_vs_fp32": {"max_abs": p16["max_abs"], "min_mean_cosine": p16["min_mean_cosine"]}}
        artifacts.append(Artifact("onnx-fp16", "onnx", "model_fp16.onnx", "fp16", "ONNX fp16", **task.shown(m16)))
    if cfg.profile.baseline_onnx:   # the unpruned reference, so that speedups compare ONNX with ONNX
        base = ctx.out / "baseline_fp32.onnx"
        write(load_baseline(ctx), base)
        mb = task.metrics(modelio.onnx_outputs(base, data.x_test), data.test.labels)
        metrics["baseline_onnx"] = mb
        artifacts.append(Artifact("baseline-onnx", "onnx", "baseline_fp32.onnx", "fp32",
                                  "baseline ONNX fp32 (unpruned)", **task.shown(mb)))
    return Output(metrics=metrics, artifacts=tuple(artifacts))


def export_gate(m, inputs, cfg):
    e, task = cfg.export, named(m["task"])
    return gates.gate(e.gate, task.drop_check(task.value(m), task.value(inputs["finetune"].metrics), e.max_drop),
                      gates.limit_check("parity_max_abs", m["parity"]["max_abs"], e.max_abs, at_least=False),
                      gates.limit_check("parity_min_mean_cosine", m["parity"]["min_mean_cosine"], e.min_cosine,
                                        at_least=True))
