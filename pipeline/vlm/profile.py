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
    from pipeline.llm.profile import run_files, time_parts
    cfg, p = ctx.cfg, ctx.cfg.profile
    folders = run_files(ctx, ORDER)
    names = [r for r in ORDER if r in folders]
    rows = {r: {"label": folders[r][1], "size_bytes": sum(f.stat().st_size for f in folders[r][0].iterdir())}
            for r in names}
    threads = p.threads or cfg.run.threads
    parts = [(part, workload, cfg.decoder.decode_past if part == "decode" else cfg.decoder.max_new_tokens)
             for part, workload in PARTS]
    timings = time_parts(ctx, folders, names, parts, rows)
    for r in names:
        rows[r]["size_ratio"] = round(rows["baseline-onnx"]["size_bytes"] / rows[r]["size_bytes"], 3)
    metrics = {"rows": rows, "new_tokens": cfg.decoder.max_new_tokens, "decode_past": cfg.decoder.decode_past,
               "batch": 1, "backend": "onnxruntime-cpu", "threads": threads, "timings": timings}
    write_json(ctx.out / PROFILE_FILE, metrics)
    return Output(metrics=metrics)
