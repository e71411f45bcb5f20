"""The engine stage: where TensorRT and a GPU are present, build the engine from the chosen ONNX form and
gate it on the test set with the run's task; elsewhere skipped (the bundle's build_engine.sh builds it
on the target), or refused when `engine.required`. Its options and source are what the package stage's
engine recipe uses too.

The build path is NOT executed on hardware in this project: no machine here has TensorRT or a GPU. Written against the
documented APIs of TensorRT 10 and 11 (see export/trt_build.py); its plumbing is tested with fakes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from export.trt_options import EngineOptions
from pipeline.errors import PipelineError
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.tasks import named

ENGINE_OPTION_KEYS = tuple(f"engine.{f.name}" for f in dataclasses.fields(EngineOptions))


def engine_options(cfg) -> EngineOptions:
    return EngineOptions(**{f.name: getattr(cfg.engine, f.name) for f in dataclasses.fields(EngineOptions)})


def engine_source(ctx: Context) -> Path:
    """The ONNX file an engine is built from: for int8, the TensorRT Q/DQ form when there are two."""
    source = ctx.cfg.engine.source
    if source == "int8":
        rec = ctx.record("quantize")
        art = rec.artifact("onnx-int8-trt") or (rec.artifact("onnx-int8") if rec.metrics.get("target") == "tensorrt"
                                                else None)
        if rec.status == "skipped" or art is None:
            raise PipelineError("engine.source = 'int8' needs the TensorRT Q/DQ form (quantize.enabled = true and "
                                "quantize.target = 'tensorrt' or quantize.tensorrt_form = true)")
        return ctx.path("quantize", art.file)
    art = ctx.record("export_onnx").artifact(f"onnx-{source}")
    if art is None:
        raise PipelineError(f"engine.source = {source!r} but export_onnx did not write it (export.fp16 = false?)")
    return ctx.path("export_onnx", art.file)


def build_and_check(ctx: Context, trt: dict) -> Output:
    from edgerun.trt import TrtEngineRunner
    from export.trt_build import build_engine, timing_cache_name
    cfg, data, e = ctx.cfg, ctx.data, ctx.cfg.engine
    src = engine_source(ctx)
    out = ctx.out / "model.engine"
    # The timing cache outlives the stage folder: one per GPU and TensorRT version, beside the run folders.
    cache = ctx.out.parent.parent / ".timing-cache" / timing_cache_name(trt["gpu_name"], trt["version"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    info = build_engine(src, out, engine_options(cfg), input_name="input",
                        input_shape=(cfg.data.channels, *cfg.data.size), precision=e.source, timing_cache=cache)
    with TrtEngineRunner(out) as runner:
        name = runner.input_names[0]
        chunks = [runner.infer({name: data.x_test[i:i + e.max_batch]}) for i in range(0, len(data.x_test), e.max_batch)]
    outputs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    task = named(ctx.record("export_onnx").metrics["task"])   # the task the exported model was gated as
    metrics = {"task": task.kind, **task.metrics(outputs, data.test.labels)}
    metrics.update(size_bytes=out.stat().st_size, tensorrt=trt, build=info, source=src.name)
    return Output(metrics=metrics, artifacts=(Artifact(f"engine-{e.source}", "engine", "model.engine", e.source,
                                                       f"TensorRT engine ({e.source})"),))


def engine_environment() -> dict:
    from edgerun.trt import trt_version_info
    return trt_version_info() or {"tensorrt": None}


def engine(ctx: Context) -> Output:
    from edgerun.trt import trt_version_info
    e = ctx.cfg.engine
    trt = trt_version_info()
    if trt is None:
        reason = ("TensorRT and a CUDA GPU are not available on this machine; the bundle's build_engine.sh "
                  "builds the engine on the target")
        if e.required:
            raise PipelineError(f"engine.required = true, but {reason}")
        return Output(status="skipped", reason=reason)
    return build_and_check(ctx, trt)   # NOT executed here: no TensorRT/GPU on these machines


def engine_keys(cfg):
    return [*ENGINE_OPTION_KEYS, "engine.required", "engine.source"]
