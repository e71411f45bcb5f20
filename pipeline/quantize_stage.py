"""The quantize stage's work: a calibration set from the train split, NNCF INT8 for the CPU with INT8
only where it pays (``quantize.keep_fp32``), and the TensorRT form (symmetric signed int8 Q/DQ)
beside it when the CPU form is not valid for TensorRT.

"auto" quantizes the model once per candidate set of FP32 layers (all INT8; convs that read the
image; the Gemm classifier; both), measures each against the FP32 ONNX with edgerun.timing
(calib.choose_quantized_layers) and keeps the fastest within ``quantize.max_drop`` on a held-out
TRAIN slice. When no variant beats FP32, the fastest one is still written (the profile measures it
and the package stage ships FP32 by its objective) and the metrics say ``pays: false``.

The TensorRT form stays fully quantized: TensorRT fuses Q/DQ pairs into its own INT8 kernels and
chooses per layer itself at build time; onnxruntime CPU timings say nothing about a Jetson.

Correct on every CPU: the onnxruntime form's weights use half the int8 range where this CPU's int8
kernels would saturate (calib.int8form; the record's ``int8_form`` says which and why), and its
gate reads this machine's own outputs: FP32 and INT8 run here, and the fused kernels that ran are
compared with the unfused Q/DQ arithmetic (``kernels_vs_unfused``). A TensorRT form is scored with
the unfused arithmetic, the one a GPU computes, not with whatever int8 kernels this CPU has.
"""
from __future__ import annotations

import numpy as np

from pipeline import gate as gates
from pipeline import modelio
from pipeline.errors import PipelineError
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.stage_io import task_of, teacher_outputs
from pipeline.tasks import named


def _val_slice(ctx: Context, n: int):
    """The last ``n`` train images (normalized) and labels: accuracy for choices, never the test set."""
    data = ctx.data
    n = min(len(data.train.labels), n)
    return data.x_train[-n:], data.train.labels[-n:]


def _task_score(task, labels):
    """calib's score: the task's gated metric (its own units: top-1 in percent for a classifier) of outputs
    on the validation rows ``rows`` (all of them by default; NNCF's accuracy control scores subsets)."""
    def score(outputs, rows=None):
        return task.metrics(outputs, labels if rows is None else labels[rows])[task.metric]
    return score


def candidates(src) -> dict[str, tuple[str, ...]]:
    """Named sets of nodes to keep in FP32: calib's defaults, the convs that read the image, and both ends."""
    from calib import qdq
    from calib.layers import default_candidates
    model, _ = qdq._as_model(src)
    out = dict(default_candidates(model))
    inputs = {i.name for i in model.graph.input}
    stem = tuple(n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] in inputs)
    if stem and stem != out.get("stem_fp32"):
        out["input_conv_fp32"] = stem
    ends = tuple(dict.fromkeys([*out.get("stem_fp32", stem), *out.get("gemm_fp32", ())]))
    if ends and ends not in out.values():
        out["stem_gemm_fp32"] = ends
    return out


def _choose(ctx: Context, src, dst, images) -> dict:
    """keep_fp32 = "auto": measure every candidate, write the winner (or the fastest) to ``dst``."""
    from calib.layers import choose_quantized_layers
    from calib.quantize import quantize_onnx
    q = ctx.cfg.quantize
    if q.choose_val_size < 1 or q.choose_batch < 1:
        raise PipelineError(f"quantize.choose_val_size and quantize.choose_batch must be >= 1, "
                            f"got {q.choose_val_size} and {q.choose_batch}")
    x_val, y_val = _val_slice(ctx, q.choose_val_size)
    threads = ctx.cfg.profile.threads or ctx.cfg.run.threads
    task = task_of(ctx)
    # The task's own units (percent top-1), as quantize.max_drop and the gate: no conversion to fractions.
    choice = choose_quantized_layers(src, dst, ctx.data.norm(images), x_val, _task_score(task, y_val),
                                     max_drop=q.max_drop, higher_is_better=task.higher_is_better,
                                     target="onnxruntime", candidates=candidates(src), threads=threads,
                                     batch=q.choose_batch, work_dir=ctx.out)
    variants = {v.name: v for v in choice.variants}
    if choice.path is None:
        # No variant pays: write the fastest within the drop (else the most accurate), labelled as such.
        fit = sorted((v for v in choice.variants if v.within_drop), key=lambda v: v.ratio)
        written = fit[0] if fit else min(choice.variants, key=lambda v: v.drop)
    else:
        written = variants[choice.chosen]
    info = quantize_onnx(src, dst, ctx.data.norm(images), target="onnxruntime", keep_fp32=written.keep_fp32)
    info["layer_choice"] = {
        "mode": "auto", "chosen": choice.chosen, "written": written.name, "pays": choice.path is not None,
        "keep_fp32": list(written.keep_fp32), "measured": choice.measured,
        f"fp32_val_{task.metric}": round(choice.fp32_score, 4), "fp32_p50_ms": round(choice.fp32_p50_ms, 4),
        "val": f"last {len(y_val)} images of the train split (never the test split)",
        "candidates": [{"name": v.name, "keep_fp32": list(v.keep_fp32), f"val_{task.metric}": round(v.score, 4),
                        "drop_pt": round(v.drop, 3), "ratio_vs_fp32": round(v.ratio, 4),
                        "ratio_p10": round(v.ratio_p10, 4), "ratio_p90": round(v.ratio_p90, 4),
                        "p50_ms": round(v.p50_ms, 4), "within_drop": v.within_drop} for v in choice.variants]}
    return info


def _quantize(ctx: Context, src, dst, images, target: str) -> dict:
    from calib.quantize import quantize_onnx, quantize_onnx_with_accuracy_control
    q, data = ctx.cfg.quantize, ctx.data
    model_type = q.model_type or None
    if q.accuracy_control:
        x_val, y_val = _val_slice(ctx, 1000)
        task = task_of(ctx)
        return quantize_onnx_with_accuracy_control(src, dst, data.norm(images), x_val, _task_score(task, y_val),
                                                   max_drop=q.max_drop, higher_is_better=task.higher_is_better,
                                                   target=target, model_type=model_type)
    if target == "tensorrt":   # fully quantized whatever keep_fp32 says (module docstring)
        return quantize_onnx(src, dst, data.norm(images), target=target, model_type=model_type)
    if q.keep_fp32 == "auto":
        return _choose(ctx, src, dst, images)
    keep = tuple(q.keep_fp32_nodes) if q.keep_fp32 == "listed" else ()
    if q.keep_fp32 == "listed" and not keep:
        raise PipelineError('quantize.keep_fp32 = "listed" needs ONNX node names in quantize.keep_fp32_nodes')
    info = quantize_onnx(src, dst, data.norm(images), target=target, model_type=model_type, keep_fp32=keep)
    info["layer_choice"] = {"mode": q.keep_fp32, "keep_fp32": list(keep)}
    return info


SCORED = {"onnxruntime": "the fused kernels onnxruntime runs on this CPU (as deployed)",
          "tensorrt": "unfused Q/DQ arithmetic (onnxruntime, no graph optimization)"}


def _outputs(path, x, target: str) -> dict:
    """The deployed outputs of the onnxruntime form; the unfused Q/DQ arithmetic of the TensorRT form."""
    from calib.int8form import outputs
    return modelio.onnx_outputs(path, x) if target == "onnxruntime" else outputs(path, x, fused=False)


def quantize_artifacts(ctx: Context, task, teacher: dict | None) -> Output:
    from calib.calibset import build_calibration_set, load_calibration_set
    from calib.int8form import kernel_parity, outputs
    from export.parity import compare_outputs
    cfg, data, q = ctx.cfg, ctx.data, ctx.cfg.quantize
    calib = build_calibration_set(data.train.images, data.train.labels, q.calib_size, cfg.run.seed,
                                  ctx.out / "calib.npz", split="train")
    images, _ = load_calibration_set(ctx.out / "calib.npz", expect_shape=(cfg.data.channels, *cfg.data.size))
    src, dst = ctx.path("export_onnx", "model.onnx"), ctx.out / "model_int8.onnx"
    info = _quantize(ctx, src, dst, images, q.target)
    fp32 = modelio.onnx_outputs(src, data.x_test)
    fp32_metrics = task.metrics(fp32, data.test.labels)
    int8 = _outputs(dst, data.x_test, q.target)
    metrics = {"task": task.kind, **task.metrics(int8, data.test.labels, teacher), **task.fidelity_vs_fp32(int8, fp32)}
    ref = np.load(ctx.path("baseline", "reference.npz"))
    par = compare_outputs(modelio.onnx_outputs(src, ref["inputs"]), _outputs(dst, ref["inputs"], q.target))
    fm = ctx.record("export_onnx").metrics
    metrics.update(size_bytes=dst.stat().st_size, macs=fm["macs"], ops_tp=fm["ops_tp"], params=fm["params"],
                   **{f"fp32_{task.metric}": fp32_metrics[task.metric]},
                   agreement_with_fp32=task.agreement(int8, fp32),
                   calibration={k: calib[k] for k in ("n", "sha256", "seed", "per_class")},
                   target=q.target, scored=SCORED[q.target], qdq=info.get("qdq"), reverted=info.get("reverted"),
                   int32_bias=info.get("int32_bias"), keep_fp32=info.get("keep_fp32"),
                   layer_choice=info.get("layer_choice"), int8_form=info.get("int8_form"),
                   parity_vs_fp32={"max_abs": par["max_abs"], "min_mean_cosine": par["min_mean_cosine"]})
    if q.target == "onnxruntime":
        metrics["kernels_vs_unfused"] = kernel_parity(int8, outputs(dst, data.x_test, fused=False))
    artifacts = [Artifact("onnx-int8", "onnx", "model_int8.onnx", "int8", f"ONNX int8 ({q.target} Q/DQ)"),
                 Artifact("calibration", "calibration", "calib.npz", "", "calibration set")]
    if q.target == "onnxruntime" and q.tensorrt_form:
        trt = ctx.out / "model_int8_trt.onnx"
        trt_info = _quantize(ctx, src, trt, images, "tensorrt")
        int8_t = _outputs(trt, data.x_test, "tensorrt")
        mt = task.metrics(int8_t, data.test.labels)
        metrics["forms"] = {"tensorrt": {**mt, "size_bytes": trt.stat().st_size,
                                         "agreement_with_fp32": task.agreement(int8_t, fp32),
                                         "qdq": trt_info.get("qdq"), "int8_form": trt_info.get("int8_form"),
                                         "scored": SCORED["tensorrt"]}}
        artifacts.append(Artifact("onnx-int8-trt", "onnx", "model_int8_trt.onnx", "int8",
                                  "ONNX int8 (TensorRT Q/DQ, fully quantized)", **task.shown(mt)))
    return Output(metrics=metrics, artifacts=tuple(artifacts))


# ---------------------------------------------------------------- keys, run, gate

def quantize_keys(cfg):
    q = cfg.quantize
    if not q.enabled:
        return ["quantize.enabled"]
    keys = ["quantize.enabled", "quantize.target", "quantize.calib_size", "quantize.accuracy_control",
            "quantize.model_type"]
    if q.target == "onnxruntime":
        keys.append("quantize.tensorrt_form")
    if q.accuracy_control:
        return [*keys, "quantize.max_drop"]
    if q.target == "tensorrt":   # always fully quantized (pipeline/quantize_stage.py says why)
        return keys
    keys.append("quantize.keep_fp32")
    if q.keep_fp32 == "listed":
        keys.append("quantize.keep_fp32_nodes")
    elif q.keep_fp32 == "auto":
        # Timed like the profile stage: its thread count, else run.threads.
        keys += ["quantize.max_drop", "quantize.choose_val_size", "quantize.choose_batch", "profile.threads"]
        if cfg.profile.threads == 0:
            keys.append("run.threads")
    return keys


def quantize(ctx: Context) -> Output:
    q = ctx.cfg.quantize
    if not q.enabled:
        return Output(status="skipped", reason="quantize.enabled = false")
    return quantize_artifacts(ctx, task_of(ctx), teacher=teacher_outputs(ctx))


def quantize_gate(m, inputs, cfg):
    q, task = cfg.quantize, named(m["task"])
    fp32 = task.value(m, f"fp32_{task.metric}")
    checks = [task.drop_check(task.value(m), fp32, q.max_drop),
              gates.limit_check("agreement_with_fp32", m["agreement_with_fp32"], q.min_agreement, at_least=True)]
    checks += task.fidelity_checks(m, q.min_cosine)
    if "kernels_vs_unfused" in m:   # the int8 kernels this CPU ran against the Q/DQ arithmetic (saturation)
        checks.append(gates.limit_check("kernels_vs_unfused_agreement", m["kernels_vs_unfused"]["agreement"],
                                        q.min_agreement, at_least=True))
    for name, form in (m.get("forms") or {}).items():   # the TensorRT form is gated like the CPU form
        checks.append(task.drop_check(task.value(form), fp32, q.max_drop, label=name))
    return gates.gate(q.gate, *checks)


def quantize_environment() -> dict:
    """The int8 weight range the onnxruntime form takes on this CPU: a run folder moved to a CPU whose
    int8 kernels differ quantizes again."""
    from calib.int8form import weight_form
    return {"int8_weights": weight_form("onnxruntime", None)[1]["weights"]}
