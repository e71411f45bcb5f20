"""The profile stage's work: every model artifact of the run, located and timed by pipeline.profile.

What it measured is also its output file (PROFILE_FILE), so the stages that read it (package: the
chosen file, its "why") depend on these very numbers: the runner fingerprints a stage's inputs by the
files they wrote, and a new measurement is a new file.
"""
from __future__ import annotations

import dataclasses

from edgerun.io import write_json
from pipeline import tasks
from pipeline.engine_stage import engine_environment
from pipeline.records import Located
from pipeline.runner import Context, Output
from pipeline.stage_io import load_baseline, load_pruned_model, model_keys

TIMED_KINDS = ("torch", "onnx", "engine")
PROFILE_FILE = "profile.json"


def located_artifacts(ctx: Context) -> list[Located]:
    base_macs = ctx.record("baseline").metrics.get("macs")
    out = []
    for stage in ctx.stage.reads:
        rec = ctx.record(stage)
        for art in rec.artifacts if rec.status != "skipped" else ():
            if art.kind not in TIMED_KINDS:
                continue
            macs = base_macs if art.role.startswith("baseline") else rec.metrics.get("macs")
            score = art.score if art.score is not None else tasks.score_of(rec.metrics)
            out.append(Located(art, ctx.path(stage, art.file), score, macs))
    return out


def profile_run(ctx: Context, load_torch) -> Output:
    from pipeline.profile import ProfileOptions, profile_artifacts
    p, cfg = ctx.cfg.profile, ctx.cfg
    values = {f.name: getattr(p, f.name) for f in dataclasses.fields(ProfileOptions)}
    values["threads"] = values["threads"] or cfg.run.threads
    result = profile_artifacts(located_artifacts(ctx), input_shape=(cfg.data.channels, *cfg.data.size),
                               options=ProfileOptions(**values), load_torch=load_torch, log=ctx.log)
    metrics = result.to_json()
    write_json(ctx.out / PROFILE_FILE, metrics)
    return Output(metrics=metrics)


def profile_environment() -> dict:
    from edgerun.machine import cpu_name, simd_block
    return {"cpu": cpu_name(), "simd_block": simd_block(), **engine_environment()}


def profile_keys(cfg):
    threads = ["run.threads"] if cfg.profile.threads == 0 else []   # run.threads is the fallback only
    return [*model_keys(cfg), "profile", *threads, "data.channels", "data.size"]


def profile(ctx: Context) -> Output:
    return profile_run(ctx, load_torch=lambda located: _load_torch(ctx, located))


def _load_torch(ctx: Context, located):
    return load_baseline(ctx) if located.artifact.role == "baseline-torch" else load_pruned_model(ctx, "finetune")
