"""Every stage of the pipeline, in order. Start reading here (the list is at the bottom).

A stage declares the config keys it reads (they may depend on the mode: `prune.ratio` only under
`target = "ratio"`), the earlier stages it reads and whether it reads the dataset. It gets exactly
that (anything else raises ContractError), writes only into `ctx.out`, and returns an Output. Its
gate is a separate function of its metrics, so changing a gate re-evaluates it without a rerun.
Heavy libraries are imported inside the stages.
"""
from __future__ import annotations

import numpy as np

from edgerun.io import write_json
from pipeline import gate as gates
from pipeline import modelio
from pipeline.errors import PipelineError
from pipeline.finetune_stage import finetune, finetune_gate, finetune_keys
from pipeline.package import ENGINE_OPTION_KEYS, package_environment, package_keys, package_stage
from pipeline.prune_stage import prune, prune_keys
from pipeline.records import Artifact
from pipeline.runner import Context, Output, Stage
from pipeline.stage_io import (
    drop_gate,
    load_baseline,
    load_pruned_model,
    model_keys,
    np_write,
    task_of,
    teacher_outputs,
)
from pipeline.tasks import named, resolve

# ---------------------------------------------------------------- 1 baseline

def baseline_keys(cfg):
    # task.kind is read here only: the baseline resolves the task and records it; later stages read the record
    keys = [*model_keys(cfg), "task.kind", "model.weights", "data.reference_batch"]
    if cfg.model.weights:
        return [*keys, "model.unsafe_pickle", "model.weights_strict"]
    return [*keys, "baseline.epochs", "baseline.lr", "baseline.batch_size", "baseline.schedule"]


def baseline(ctx: Context) -> Output:
    import torch

    from pipeline.data import resolve_root
    from pipeline.models import probe_model
    cfg, data = ctx.cfg, ctx.data
    torch.manual_seed(cfg.run.seed)  # the initial weights too, so a rerun trains the same model
    model = modelio.build(cfg.model, cfg.data)
    probe_model(model, cfg.data.channels, tuple(cfg.data.size), cfg.model.num_classes)  # before any training
    notices = []
    if cfg.model.weights:
        loaded = modelio.load_state(model, resolve_root(cfg.model.weights), unsafe_pickle=cfg.model.unsafe_pickle,
                                    strict=cfg.model.weights_strict)
        trained = {"weights": cfg.model.weights, "weights_load": loaded}
        if any(loaded.values()):
            counts = ", ".join(f"{len(v)} {k}" for k, v in loaded.items())
            notices.append(f"model.weights loaded non-strictly: {counts}")
    else:
        from pipeline.train import train
        ctx.log(f"  training {cfg.model.factory or cfg.model.name} for {cfg.baseline.epochs} epochs "
                f"on {len(data.train.labels)} images")
        info = train(model, None, data.x_train, data.train.labels, epochs=cfg.baseline.epochs, lr=cfg.baseline.lr,
                     batch_size=cfg.baseline.batch_size, seed=cfg.run.seed, schedule=cfg.baseline.schedule,
                     progress="baseline")
        trained = {"epochs": cfg.baseline.epochs, "losses": info["losses"]}
    modelio.save_weights(model, ctx.out / "model.pt")
    outs = modelio.torch_outputs(model, data.x_test)
    task = resolve(cfg.task.kind, outs)
    for name in task.keeps:   # what later stages compare against (an encoder's tokens)
        np_write(ctx.out / f"test_{name}.npy", np.save, outs[name])
    metrics = {"task": task.kind, **task.metrics(outs, data.test.labels)}
    gap = modelio.train_eval_gap(model, data.x_train, data.train.labels)
    if gap is not None and abs(gap) > TRAIN_EVAL_GAP:
        notices.append(f"train-mode vs eval-mode top-1 differ by {gap:+.1f} pt: BatchNorm running statistics have "
                       "not settled (raise BatchNorm momentum, train longer, or recompute the statistics)")
    # The reference batch: a fixed, seeded slice of the test set that every parity check reuses.
    rng = np.random.default_rng(cfg.run.seed)
    idx = np.sort(rng.permutation(len(data.test.labels))[:cfg.data.reference_batch])
    arrays = {"inputs": data.x_test[idx], "labels": data.test.labels[idx],
              **{f"out_{k}": v[idx] for k, v in outs.items()}}
    np_write(ctx.out / "reference.npz", np.savez, **arrays)
    write_json(ctx.out / "model.json", {"model": cfg.model.factory or cfg.model.name, "kwargs": cfg.model.kwargs,
                                        "outputs": list(modelio.output_names(model))})
    metrics.update(**modelio.count(model, cfg.data), size_bytes=(ctx.out / "model.pt").stat().st_size,
                   **task.baseline_extras(outs), train_eval_gap=gap, **trained)
    return Output(metrics=metrics, notices=tuple(notices),
                  artifacts=(Artifact("baseline-torch", "torch", "model.pt", label="baseline (torch)"),))


TRAIN_EVAL_GAP = 10.0   # pt: beyond this the baseline's BatchNorm statistics are reported as unsettled


def baseline_gate(m, inputs, cfg):
    check = named(m["task"]).baseline_check(m, cfg.baseline.min_top1 if cfg.baseline.min_top1 >= 0 else None)
    return gates.gate(cfg.baseline.gate, check) if check is not None else None


# ---------------------------------------------------------------- 4 export

def export_keys(cfg):
    return [*model_keys(cfg), "export.opset", "export.example_batch", "export.slim", "export.fp16",
            "profile.baseline_onnx"]


def export_onnx(ctx: Context) -> Output:
    from export.fp16 import to_fp16
    from export.onnx_export import export_onnx as to_onnx
    from export.parity import compare_outputs
    cfg, data, e = ctx.cfg, ctx.data, ctx.cfg.export

    def write(model, path):
        return to_onnx(model, modelio.example_input(cfg.data, e.example_batch), path, opset=e.opset,
                       output_names=modelio.output_names(model), slim=e.slim, example_batch=e.example_batch)
    model = load_pruned_model(ctx, "finetune")
    onnx_path = ctx.out / "model.onnx"
    info = write(model, onnx_path)
    ref = np.load(ctx.path("baseline", "reference.npz"))
    ort_ref = modelio.onnx_outputs(onnx_path, ref["inputs"])
    par = compare_outputs(modelio.torch_outputs(model, ref["inputs"]), ort_ref)
    task = task_of(ctx)
    metrics = {"task": task.kind, **task.metrics(modelio.onnx_outputs(onnx_path, data.x_test), data.test.labels,
                                                 teacher_outputs(ctx))}
    fm = ctx.record("finetune").metrics
    metrics.update(size_bytes=onnx_path.stat().st_size, macs=fm["macs"], ops_tp=fm["ops_tp"], params=fm["params"],
                   opset=info["opset"], parity={"max_abs": par["max_abs"], "min_mean_cosine": par["min_mean_cosine"]})
    artifacts = [Artifact("onnx-fp32", "onnx", "model.onnx", "fp32", "ONNX fp32")]
    if e.fp16:
        fp16 = ctx.out / "model_fp16.onnx"
        to_fp16(onnx_path, fp16)
        p16 = compare_outputs(ort_ref, modelio.onnx_outputs(fp16, ref["inputs"]))
        m16 = task.metrics(modelio.onnx_outputs(fp16, data.x_test), data.test.labels)
        metrics["fp16"] = {**m16, "size_bytes": fp16.stat().st_size,
                           "parity_vs_fp32": {"max_abs": p16["max_abs"], "min_mean_cosine": p16["min_mean_cosine"]}}
        artifacts.append(Artifact("onnx-fp16", "onnx", "model_fp16.onnx", "fp16", "ONNX fp16", **task.shown(m16)))
    if cfg.profile.baseline_onnx:   # the unpruned reference, so that speedups compare ONNX with ONNX
        base = ctx.out / "baseline_fp32.onnx"
        write(load_baseline(ctx), base)
        mb = task.metrics(modelio.onnx_outputs(base, data.x_test), data.test.labels)
        metrics["baseline_onnx"] = mb
        artifacts.append(Artifact("baseline-onnx", "onnx", "baseline_fp32.onnx", "fp32",
                                  "baseline ONNX fp32 (unpruned)", **task.shown(mb)))
    return Output(metrics=metrics, artifacts=tuple(artifacts))


def export_gate(m, inputs, cfg):
    e, task = cfg.export, named(m["task"])
    return gates.gate(e.gate, task.drop_check(m[task.metric], inputs["finetune"].metrics[task.metric], e.max_drop),
                      gates.limit_check("parity_max_abs", m["parity"]["max_abs"], e.max_abs, at_least=False),
                      gates.limit_check("parity_min_mean_cosine", m["parity"]["min_mean_cosine"], e.min_cosine,
                                        at_least=True))


# ---------------------------------------------------------------- 5 quantize

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
    from pipeline.quantize_stage import quantize_artifacts
    return quantize_artifacts(ctx, task_of(ctx), teacher=teacher_outputs(ctx))


def quantize_gate(m, inputs, cfg):
    q, task = cfg.quantize, named(m["task"])
    checks = [task.drop_check(m[task.metric], m[f"fp32_{task.metric}"], q.max_drop),
              gates.limit_check("agreement_with_fp32", m["agreement_with_fp32"], q.min_agreement, at_least=True)]
    checks += task.fidelity_checks(m, q.min_cosine)
    if "kernels_vs_unfused" in m:   # the int8 kernels this CPU ran against the Q/DQ arithmetic (saturation)
        checks.append(gates.limit_check("kernels_vs_unfused_agreement", m["kernels_vs_unfused"]["agreement"],
                                        q.min_agreement, at_least=True))
    for name, form in (m.get("forms") or {}).items():   # the TensorRT form is gated like the CPU form
        checks.append(task.drop_check(form[task.metric], m[f"fp32_{task.metric}"], q.max_drop, label=name))
    return gates.gate(q.gate, *checks)


def quantize_environment() -> dict:
    """The int8 weight range the onnxruntime form takes on this CPU: a run folder moved to a CPU whose
    int8 kernels differ quantizes again."""
    from calib.int8form import weight_form
    return {"int8_weights": weight_form("onnxruntime", None)[1]["weights"]}


# ---------------------------------------------------------------- 6 engine

def engine_environment() -> dict:
    from edgerun.trt import trt_version_info
    return trt_version_info() or {"tensorrt": None}


def engine(ctx: Context) -> Output:
    from edgerun.trt import trt_version_info
    e = ctx.cfg.engine
    trt = trt_version_info()
    if trt is None:
        reason = ("TensorRT and a CUDA GPU are not available on this machine; the bundle's build_engine.sh "
                  "builds the engine on the target")
        if e.required:
            raise PipelineError(f"engine.required = true, but {reason}")
        return Output(status="skipped", reason=reason)
    from pipeline.engine_stage import build_and_check  # NOT executed here: no TensorRT/GPU on these machines
    return build_and_check(ctx, trt)


def engine_keys(cfg):
    return [*ENGINE_OPTION_KEYS, "engine.required", "engine.source"]


# ---------------------------------------------------------------- 7 profile

def profile_environment() -> dict:
    from edgerun.machine import cpu_name, simd_block
    return {"cpu": cpu_name(), "simd_block": simd_block(), **engine_environment()}


def profile_keys(cfg):
    threads = ["run.threads"] if cfg.profile.threads == 0 else []   # run.threads is the fallback only
    return [*model_keys(cfg), "profile", *threads, "data.channels", "data.size"]


def profile(ctx: Context) -> Output:
    from pipeline.profile_stage import profile_run
    return profile_run(ctx, load_torch=lambda located: _load_torch(ctx, located))


def _load_torch(ctx: Context, located):
    return load_baseline(ctx) if located.artifact.role == "baseline-torch" else load_pruned_model(ctx, "finetune")


# ---------------------------------------------------------------- the list

GATE_KEYS = ("gate", "max_drop")
STAGES = [
    Stage("baseline", 3, baseline, baseline_keys, uses_data=True, gate=baseline_gate,
          gate_config=("baseline.gate", "baseline.min_top1")),
    Stage("prune", 3, prune, prune_keys, ("baseline",), uses_data=True, gate=drop_gate("prune", "baseline"),
          gate_config=("prune.gate", "prune.max_drop")),
    Stage("finetune", 4, finetune, finetune_keys, ("baseline", "prune"), uses_data=True,
          gate=finetune_gate, gate_config=("finetune.gate", "finetune.max_drop", "prune.goal")),
    Stage("export_onnx", 2, export_onnx, export_keys, ("baseline", "finetune"), uses_data=True, gate=export_gate,
          gate_config=("export.gate", "export.max_drop", "export.max_abs", "export.min_cosine")),
    Stage("quantize", 3, quantize, quantize_keys, ("baseline", "export_onnx"), uses_data=True, gate=quantize_gate,
          gate_config=("quantize.gate", "quantize.max_drop", "quantize.min_agreement", "quantize.min_cosine"),
          environment=quantize_environment),
    Stage("engine", 2, engine, engine_keys, ("export_onnx", "quantize"), uses_data=True,
          gate=drop_gate("engine", "export_onnx"), gate_config=("engine.gate", "engine.max_drop"),
          environment=engine_environment),
    Stage("profile", 4, profile, profile_keys, ("baseline", "finetune", "export_onnx", "quantize", "engine"),
          environment=profile_environment),
    Stage("package", 3, package_stage, package_keys,
          ("baseline", "prune", "finetune", "export_onnx", "quantize", "engine", "profile"), uses_data=True,
          folder="deploy", environment=package_environment),
]
