"""The profile stage's work: every model artifact of the run, located and timed by pipeline.profile."""
from __future__ import annotations

import dataclasses

from pipeline.records import Located
from pipeline.runner import Context, Output

TIMED_KINDS = ("torch", "onnx", "engine")


def located_artifacts(ctx: Context) -> list[Located]:
    base_macs = ctx.record("baseline").metrics.get("macs")
    out = []
    for stage in ctx.stage.reads:
        rec = ctx.record(stage)
        for art in rec.artifacts if rec.status != "skipped" else ():
            if art.kind not in TIMED_KINDS:
                continue
            macs = base_macs if art.role.startswith("baseline") else rec.metrics.get("macs")
            out.append(Located(art, ctx.path(stage, art.file), art.top1 if art.top1 is not None else rec.top1, macs))
    return out


def profile_run(ctx: Context, load_torch) -> Output:
    from pipeline.profile import ProfileOptions, profile_artifacts
    p, cfg = ctx.cfg.profile, ctx.cfg
    values = {f.name: getattr(p, f.name) for f in dataclasses.fields(ProfileOptions)}
    values["threads"] = values["threads"] or cfg.run.threads
    result = profile_artifacts(located_artifacts(ctx), input_shape=(cfg.data.channels, *cfg.data.size),
                               options=ProfileOptions(**values), load_torch=load_torch, log=ctx.log)
    return Output(metrics=result.to_json())
