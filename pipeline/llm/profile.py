"""The decoder's profile stage: time to first token (a prefill of decoder.prefill_tokens) and decode time per
token (decoder.decode_past cached) at batch 1 on onnxruntime CPU, for every decoder file of the run against the
unpruned FP32 file, with the timing protocol of the CNNs (interleaved rounds, fresh processes, spread; see
edgerun/timing.py); file sizes beside them, and each file's peak resident memory running the same prefill and
decode in a fresh process of its own (edgerun/decode_memory.py says what the peak includes)."""
from __future__ import annotations

from edgerun.io import write_json
from pipeline.runner import Context, Output

PROFILE_FILE = "profile.json"
ORDER = ("baseline-onnx", "onnx-fp32", "baseline-int4", "onnx-int4")   # the INT4 TensorRT form is not timed here


def profile_keys(cfg):
    return ["decoder.prefill_tokens", "decoder.decode_past", "profile.processes", "profile.rounds",
            "profile.threads", "profile.block_ms", "run.threads"]


def run_files(ctx: Context, order) -> dict:
    """{role: (path, label)} of the export and quantize stages' artifacts whose role is in ``order``."""
    files = {}
    for stage in ("export_onnx", "quantize"):
        rec = ctx.record(stage)
        for art in rec.artifacts if rec.status != "skipped" else ():
            if art.role in order:
                files[art.role] = (ctx.path(stage, art.file), art.label)
    return files


def time_parts(ctx: Context, files: dict, names: list, parts, rows: dict) -> dict:
    """Each ``(key, workload, tokens)`` of ``parts`` timed for the ``names`` of ``files`` against baseline-onnx in
    one interleaved comparison per part (profile.processes fresh processes); ``rows[name][key]`` gets its ms,
    speed-up, p10-p90 and reproducibility. Returns {key: the comparison's record}."""
    from edgerun.timing import Spec, SpecItem, repeat_in_processes
    cfg, p = ctx.cfg, ctx.cfg.profile
    items = tuple(SpecItem(r, str(files[r][0]), "onnxruntime-cpu") for r in names)
    timings = {}
    for key, workload, tokens in parts:
        spec = Spec(items, reference="baseline-onnx", batches=(1,), input_shape=(), block_ms=p.block_ms,
                    threads=p.threads or cfg.run.threads, rounds=p.rounds, workload=workload, tokens=tokens)
        ctx.log(f"  timing {key} ({tokens} tokens) of {len(items)} models in {p.processes} processes")
        (rep,) = repeat_in_processes(spec, p.processes, log=ctx.log)
        timings[key] = rep.to_json()
        for r in names:
            pair = rep.pair(r)
            rows[r][key] = {"ms": round(pair.p50_ms, 4), "speedup": round(1 / pair.median, 3),
                            "p10_p90": [round(1 / pair.p90, 3), round(1 / pair.p10, 3)],
                            "reproducible": pair.reproducible}
    return timings


def profile(ctx: Context) -> Output:
    cfg, p = ctx.cfg, ctx.cfg.profile
    files = run_files(ctx, ORDER)
    if "baseline-onnx" not in files:
        return Output(status="skipped", reason="no unpruned ONNX to compare with (profile.baseline_onnx = false)")
    names = [r for r in ORDER if r in files]
    rows = {r: {"label": files[r][1], "size_bytes": files[r][0].stat().st_size} for r in names}
    timings = time_parts(ctx, files, names, (("prefill", "prefill", cfg.decoder.prefill_tokens),
                                             ("decode", "decode", cfg.decoder.decode_past)), rows)
    from edgerun.decode_memory import peak_rss
    threads = p.threads or cfg.run.threads
    for r in names:
        mem = peak_rss(files[r][0], prefill_tokens=cfg.decoder.prefill_tokens, decode_past=cfg.decoder.decode_past,
                       threads=threads)
        rows[r]["peak_rss_mib"], rows[r]["import_rss_mib"] = mem.peak_rss_mib, mem.import_rss_mib
        ctx.log(f"  peak resident memory of {r}: {mem.peak_rss_mib:.1f} MiB ({mem.import_rss_mib:.1f} MiB before "
                "the file is opened)")
    for r in names:
        rows[r]["ttft_ms"] = rows[r]["prefill"]["ms"]
        rows[r]["decode_tokens_per_s"] = round(1000.0 / rows[r]["decode"]["ms"], 2)
        rows[r]["size_ratio"] = round(rows["baseline-onnx"]["size_bytes"] / rows[r]["size_bytes"], 3)
    metrics = {"rows": rows, "prefill_tokens": cfg.decoder.prefill_tokens, "decode_past": cfg.decoder.decode_past,
               "batch": 1, "backend": "onnxruntime-cpu", "threads": p.threads or cfg.run.threads,
               "timings": timings}
    write_json(ctx.out / PROFILE_FILE, metrics)
    return Output(metrics=metrics)
