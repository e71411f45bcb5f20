"""The quantize stage's work: a calibration set from the train split, NNCF INT8 for the CPU, and the
TensorRT form (symmetric signed int8 Q/DQ) beside it when the CPU form is not valid for TensorRT."""
from __future__ import annotations

import numpy as np

from pipeline import modelio
from pipeline.records import Artifact
from pipeline.runner import Context, Output


def _quantize(ctx: Context, src, dst, images, target: str) -> dict:
    from calib.quantize import quantize_onnx, quantize_onnx_with_accuracy_control
    q, data = ctx.cfg.quantize, ctx.data
    model_type = q.model_type or None
    if q.accuracy_control:
        n = min(len(data.train.labels), 1000)
        return quantize_onnx_with_accuracy_control(src, dst, data.norm(images), data.x_train[-n:],
                                                   data.train.labels[-n:], target=target,
                                                   max_drop=q.max_drop / 100.0, model_type=model_type)
    return quantize_onnx(src, dst, data.norm(images), target=target, model_type=model_type)


def quantize_artifacts(ctx: Context, teacher: dict | None) -> Output:
    from calib.calibset import build_calibration_set, load_calibration_set
    from export.parity import compare_outputs
    cfg, data, q = ctx.cfg, ctx.data, ctx.cfg.quantize
    calib = build_calibration_set(data.train.images, data.train.labels, q.calib_size, cfg.run.seed,
                                  ctx.out / "calib.npz", split="train")
    images, _ = load_calibration_set(ctx.out / "calib.npz", expect_shape=(cfg.data.channels, *cfg.data.size))
    src, dst = ctx.path("export_onnx", "model.onnx"), ctx.out / "model_int8.onnx"
    info = _quantize(ctx, src, dst, images, q.target)
    fp32 = modelio.onnx_outputs(src, data.x_test)
    fp32_metrics, fp32_pred = modelio.task_metrics(fp32, data.test.labels)
    int8 = modelio.onnx_outputs(dst, data.x_test)
    metrics, pred = modelio.task_metrics(int8, data.test.labels, teacher)
    if "tokens" in int8:
        metrics["token_cos_vs_fp32"] = modelio.token_fidelity(int8["tokens"], fp32["tokens"])
    ref = np.load(ctx.path("baseline", "reference.npz"))
    par = compare_outputs(modelio.onnx_outputs(src, ref["inputs"]), modelio.onnx_outputs(dst, ref["inputs"]))
    fm = ctx.record("export_onnx").metrics
    metrics.update(size_bytes=dst.stat().st_size, macs=fm["macs"], ops_tp=fm["ops_tp"], params=fm["params"],
                   fp32_top1=fp32_metrics["top1"], agreement_with_fp32=round(float((pred == fp32_pred).mean() * 100), 4),
                   calibration={k: calib[k] for k in ("n", "sha256", "seed", "per_class")},
                   target=q.target, qdq=info.get("qdq"), reverted=info.get("reverted"),
                   int32_bias=info.get("int32_bias"), keep_fp32=info.get("keep_fp32"),
                   parity_vs_fp32={"max_abs": par["max_abs"], "min_mean_cosine": par["min_mean_cosine"]})
    artifacts = [Artifact("onnx-int8", "onnx", "model_int8.onnx", "int8", f"ONNX int8 ({q.target} Q/DQ)"),
                 Artifact("calibration", "calibration", "calib.npz", "", "calibration set")]
    if q.target == "onnxruntime" and q.tensorrt_form:
        trt = ctx.out / "model_int8_trt.onnx"
        trt_info = _quantize(ctx, src, trt, images, "tensorrt")
        mt, pred_t = modelio.task_metrics(modelio.onnx_outputs(trt, data.x_test), data.test.labels)
        metrics["forms"] = {"tensorrt": {"top1": mt["top1"], "size_bytes": trt.stat().st_size,
                                         "agreement_with_fp32": round(float((pred_t == fp32_pred).mean() * 100), 4),
                                         "qdq": trt_info.get("qdq")}}
        artifacts.append(Artifact("onnx-int8-trt", "onnx", "model_int8_trt.onnx", "int8",
                                  "ONNX int8 (TensorRT Q/DQ)", top1=mt["top1"]))
    return Output(metrics=metrics, artifacts=tuple(artifacts))
