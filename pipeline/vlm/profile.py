"""The VLM's profile stage: end-to-end answer latency at batch 1 on onnxruntime CPU (the images encoded, the
prompt prefilled, decoder.max_new_tokens new tokens) and each part of it (vision, prefill, one decode step with
decoder.decode_past cached), for every VLM of the run against the unpruned FP32 one, with the timing protocol of
the other models (interleaved rounds, fresh processes, spread; edgerun/timing.py, edgerun/vlm_timing.py); the
files' sizes beside them."""
from __future__ import annotations

from edgerun.io import write_json
from pipeline.runner import Context, Output

PROFILE_FILE = "profile.json"
ORDER = ("baseline-onnx", "onnx-fp32", "onnx-int4")
PARTS = (("answer", "vlm-answer"), ("vision", "vlm-vision"), ("prefill", "vlm-prefill"), ("decode", "vlm-decode"))


def profile_keys(cfg):
    return ["decoder.max_new_tokens", "decoder.decode_past", "profile.processes", "profile.rounds",
            "profile.threads", "profile.block_ms", "run.threads"]


def profile(ctx: Context) -> Output:
    from edgerun.timing import Spec, SpecItem, repeat_in_processes
    cfg, p = ctx.cfg, ctx.cfg.profile
    folders = {}
    for stage in ("export_onnx", "quantize"):
        rec = ctx.record(stage)
        for art in rec.artifacts if rec.status != "skipped" else ():
            if art.role in ORDER:
                folders[art.role] = (ctx.path(stage, art.file), art.label)
    names = [r for r in ORDER if r in folders]
    items = tuple(SpecItem(r, str(folders[r][0]), "onnxruntime-cpu") for r in names)
    rows = {r: {"label": folders[r][1], "size_bytes": sum(f.stat().st_size for f in folders[r][0].iterdir())}
            for r in names}
    threads = p.threads or cfg.run.threads
    timings = {}
    for part, workload in PARTS:
        tokens = cfg.decoder.decode_past if part == "decode" else cfg.decoder.max_new_tokens
        spec = Spec(items, reference="baseline-onnx", batches=(1,), input_shape=(), block_ms=p.block_ms,
                    threads=threads, rounds=p.rounds, workload=workload, tokens=tokens)
        ctx.log(f"  timing {part} of {len(items)} VLMs in {p.processes} processes")
        (rep,) = repeat_in_processes(spec, p.processes, log=ctx.log)
        timings[part] = rep.to_json()
        for r in names:
            pair = rep.pair(r)
            rows[r][part] = {"ms": round(pair.p50_ms, 4), "speedup": round(1 / pair.median, 3),
                             "p10_p90": [round(1 / pair.p90, 3), round(1 / pair.p10, 3)],
                             "reproducible": pair.reproducible}
    for r in names:
        rows[r]["size_ratio"] = round(rows["baseline-onnx"]["size_bytes"] / rows[r]["size_bytes"], 3)
    metrics = {"rows": rows, "new_tokens": cfg.decoder.max_new_tokens, "decode_past": cfg.decoder.decode_past,
               "batch": 1, "backend": "onnxruntime-cpu", "threads": threads, "timings": timings}
    write_json(ctx.out / PROFILE_FILE, metrics)
    return Output(metrics=metrics)
