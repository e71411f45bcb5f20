"""The VLM's quantize stage, as NVILA deploys it: the vision tower W8A8 (calib/vision.py: NNCF INT8 Q/DQ, the
onnxruntime form that ships here and the TensorRT-valid form, each checked) and the decoder's weights INT4
(calib/int4.py: NNCF INT4 with AWQ and scale estimation on the decoder's real inputs — token embeddings with the
images' tokens in place, pipeline/vlm_calib.py). Gate: the quantized files' exact-match drop against the
unpruned VLM, overall and per question type, next-token agreement, and the tower's per-token cosine."""
from __future__ import annotations

import shutil

import numpy as np

from pipeline import gate as gates
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.tasks import named
from pipeline.vlm import io

QUANT_DIR = "files"        # the shipped files: INT8 vision (onnxruntime form) + INT4 decoder (MatMulNBits)
TRT_DIR = "trt"            # the TensorRT-valid forms: vision Q/DQ (signed symmetric), INT4 blocked DequantizeLinear
CALIB_IMAGES = 256


def quantize_keys(cfg):
    return ["vlm.vision_w8a8", "decoder.int4_group", "decoder.awq", "decoder.calib_prompts", "decoder.trt_form",
            "decoder.accuracy_level", "decoder.max_new_tokens", "quantize.calib_size", "profile.threads"]


def quantize(ctx: Context) -> Output:
    from calib.int4 import check_int4_form, compress_int4
    from calib.vision import quantize_vision
    from edgerun.vlm import DECODER, VISION
    from pipeline.vlm.prune import calibration_batches
    from pipeline.vlm_calib import decoder_feeds
    from pipeline.vlm_train import image_bank, pixel_norm
    cfg, d, data = ctx.cfg, ctx.cfg.decoder, ctx.data
    vlm, tok = io.load_vlm(ctx.path("finetune", io.MODEL_DIR))
    norm = pixel_norm(vlm)
    src = ctx.path("export_onnx", io.FILES_DIR)
    out, trt = ctx.out / QUANT_DIR, ctx.out / TRT_DIR
    shutil.copytree(src, out)
    (out / DECODER).unlink()
    record = {}
    if cfg.vlm.vision_w8a8:
        calib = image_bank(data.data.train_images[:min(CALIB_IMAGES, cfg.quantize.calib_size)], *norm).numpy()
        ctx.log(f"  vision tower to W8A8 on {len(calib)} images")
        (out / VISION).unlink()
        ort = quantize_vision(src / VISION, out / VISION, calib, target="onnxruntime")
        record["vision"] = {"onnxruntime": ort.fidelity.__dict__}
        if d.trt_form:
            trt.mkdir()
            tq = quantize_vision(src / VISION, trt / VISION, calib, target="tensorrt")
            record["vision"]["tensorrt"] = tq.fidelity.__dict__
    feeds = None
    if d.awq:
        batches = calibration_batches(vlm, tok, data.train, image_bank(data.data.train_images, *norm), cfg.run.seed)
        feeds = decoder_feeds(vlm, batches, max_feeds=d.calib_prompts)
    ctx.log(f"  decoder weights to INT4 (group {d.int4_group}{', AWQ + scale estimation' if d.awq else ''})")
    info = compress_int4(src / DECODER, out / DECODER, form="ort", group_size=d.int4_group, dataset=feeds,
                         awq=d.awq, scale_estimation=d.awq, accuracy_level=d.accuracy_level)
    record["decoder"] = {"ort": {k: info[k] for k in ("matmuls", "bytes_before", "bytes_after", "probe")}}
    problems = check_int4_form(out / DECODER, "ort", group_size=d.int4_group)
    if d.trt_form:
        trt.mkdir(exist_ok=True)
        t_info = compress_int4(src / DECODER, trt / DECODER, form="trt", group_size=d.int4_group, dataset=feeds,
                               awq=d.awq, scale_estimation=d.awq)
        record["decoder"]["trt"] = {k: t_info[k] for k in ("matmuls", "bytes_after")}
        problems += check_int4_form(trt / DECODER, "trt", group_size=d.int4_group)
    ctx.log("  scoring the quantized files with the runtime")
    metrics, answers = io.measure_files(out, data.test, data.data.test_images,
                                        np.load(ctx.path("baseline", io.TEST_NEXT)), d.max_new_tokens,
                                        threads=cfg.profile.threads or 1)
    io.write_answers(ctx.out / io.ANSWERS, answers)
    metrics = {"task": "vlm", **metrics, "quantized": record, "form_problems": problems,
               "size_bytes": sum(f.stat().st_size for f in out.iterdir())}
    pruned = io.pruned_parts(ctx.record("finetune").metrics.get("pruned") or {})
    tower = "W8A8" if cfg.vlm.vision_w8a8 else "FP32"
    arts = [Artifact("onnx-int4", "onnx", QUANT_DIR, label=f"{tower} tower + INT4 decoder, {pruned}")]
    if d.trt_form:
        arts.append(Artifact("tensorrt-form", "onnx", TRT_DIR, label="TensorRT forms (not run here)"))
    return Output(metrics=metrics, artifacts=tuple(arts))


def quantize_gate(m, inputs, cfg):
    task, d = named(m["task"]), cfg.decoder
    ref = inputs["baseline"].metrics
    checks = [task.drop_check(m[task.metric], ref[task.metric], cfg.quantize.max_drop),
              *task.per_kind_checks(m, ref, cfg.quantize.max_drop),
              *task.quality_checks(m, ref, min_agreement=d.min_agreement, max_perplexity_ratio=d.max_perplexity_ratio),
              gates.limit_check("form problems", len(m.get("form_problems", [])), 0, at_least=False)]
    for form, fid in (m.get("quantized", {}).get("vision") or {}).items():
        checks.append(gates.limit_check(f"vision token cosine ({form})", fid["cos_mean"], cfg.vlm.min_cosine,
                                        at_least=True))
    return gates.gate(cfg.quantize.gate, *checks)
