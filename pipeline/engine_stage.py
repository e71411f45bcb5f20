"""The engine stage's work where TensorRT is present: build, then gate the engine on the test set.

NOT executed on hardware in this project: no machine here has TensorRT or a GPU. Written against the
documented APIs of TensorRT 10 and 11 (see export/trt_build.py); its plumbing is tested with fakes.
"""
from __future__ import annotations

import numpy as np

from pipeline.package import engine_options, engine_source
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.tasks import named


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
