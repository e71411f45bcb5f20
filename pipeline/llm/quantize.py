"""The decoder's quantize stage: INT4 weights with NNCF (calib/int4.py: symmetric, blocked by decoder.int4_group;
AWQ and scale estimation from the task's prompts; INT8 for the embedding and the head) in onnxruntime's form
(MatMulNBits) and, for TensorRT, the blocked symmetric DequantizeLinear form, each checked statically and judged
with the runtime's generation loop. The unpruned file is compressed too (INT4 alone), for the profile's
comparison of what pruning adds."""
from __future__ import annotations

import numpy as np

from pipeline import gate as gates
from pipeline.llm import lm
from pipeline.llm.export import BASELINE_ONNX
from pipeline.llm.stage_io import measure_onnx
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.tasks import named

ORT_FILE, TRT_FILE, BASELINE_INT4 = "model_int4.onnx", "model_int4_trt.onnx", "baseline_int4.onnx"


def quantize_keys(cfg):
    keys = ["quantize.enabled"]
    if not cfg.quantize.enabled:
        return keys
    keys += ["decoder.int4_group", "decoder.awq", "decoder.trt_form", "decoder.accuracy_level",
             "decoder.max_new_tokens", "decoder.eval_prompts", "profile.baseline_onnx"]
    return [*keys, "decoder.calib_prompts"] if cfg.decoder.awq else keys


def calibration_feeds(tok, records: list[dict], n: int) -> list[dict]:
    """Prefill feeds of ``n`` training prompts (one per feed, as generation sees them), nothing cached."""
    out = []
    for ids in lm.prompt_ids(tok, records[:n]):
        t = len(ids)
        out.append({"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, t), np.int64),
                    "position_ids": np.arange(t, dtype=np.int64)[None]})
    return out


def quantize(ctx: Context) -> Output:
    from calib.int4 import compress_int4
    cfg, d = ctx.cfg, ctx.cfg.decoder
    if not cfg.quantize.enabled:
        return Output(status="skipped", reason="quantize.enabled = false")
    _, tok = lm.load_model(ctx.path("finetune", lm.MODEL_DIR))
    src = ctx.path("export_onnx", "model.onnx")
    raw = calibration_feeds(tok, ctx.data.train, d.calib_prompts) if d.awq else None
    options = dict(group_size=d.int4_group, dataset=_with_past(src, raw), awq=d.awq, scale_estimation=d.awq)
    info = compress_int4(src, ctx.out / ORT_FILE, form="ort", accuracy_level=d.accuracy_level, **options)
    metrics, _ = measure_onnx(ctx, ctx.out / ORT_FILE, tok)
    metrics = {"task": "generate", **metrics, "size_bytes": (ctx.out / ORT_FILE).stat().st_size, "int4": info}
    artifacts = [Artifact("onnx-int4", "onnx", ORT_FILE, "int4", "ONNX INT4 (MatMulNBits)")]
    if d.trt_form:
        trt = compress_int4(src, ctx.out / TRT_FILE, form="trt", **options)
        tm, _ = measure_onnx(ctx, ctx.out / TRT_FILE, tok)
        metrics["trt_form"] = {**tm, "size_bytes": (ctx.out / TRT_FILE).stat().st_size, "int4": trt}
        artifacts.append(Artifact("onnx-int4-trt", "onnx", TRT_FILE, "int4", "ONNX INT4 for TensorRT (blocked Q/DQ)"))
    if cfg.profile.baseline_onnx:
        base = ctx.path("export_onnx", BASELINE_ONNX)
        compress_int4(base, ctx.out / BASELINE_INT4, form="ort", accuracy_level=d.accuracy_level,
                      **{**options, "dataset": _with_past(base, raw)})
        bm, _ = measure_onnx(ctx, ctx.out / BASELINE_INT4, tok)
        metrics["baseline_int4"] = bm
        artifacts.append(Artifact("baseline-int4", "onnx", BASELINE_INT4, "int4", "baseline ONNX INT4 (unpruned)"))
    return Output(metrics=metrics, artifacts=tuple(artifacts))


def _with_past(path, feeds):
    """The feeds with the file's empty past tensors (every graph input is fed)."""
    if feeds is None:
        return None
    from edgerun.generate import DecoderSession
    s = DecoderSession(path)
    return [{**f, **s.empty_past(1)} for f in feeds]


def quantize_gate(m, inputs, cfg):
    task, q, d = named(m["task"]), cfg.quantize, cfg.decoder
    ref = inputs["export_onnx"].metrics
    checks = [task.drop_check(m[task.metric], ref[task.metric], q.max_drop),
              *task.quality_checks(m, inputs["baseline"].metrics, min_agreement=d.min_agreement,
                                   max_perplexity_ratio=d.max_perplexity_ratio)]
    if "trt_form" in m:
        checks.append(task.drop_check(m["trt_form"][task.metric], ref[task.metric], q.max_drop, "TensorRT form"))
    return gates.gate(q.gate, *checks)
