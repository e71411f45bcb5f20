"""Every stage of the pipeline, in order. Start reading here (the list is at the bottom).

A stage declares the config keys it reads (they may depend on the mode: `prune.ratio` only under
`target = "ratio"`), the earlier stages it reads and whether it reads the dataset. It gets exactly
that (anything else raises ContractError), writes only into `ctx.out`, and returns an Output. Its
gate is a separate function of its metrics, so changing a gate re-evaluates it without a rerun.
Heavy libraries are imported inside the stages.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from edgerun.io import atomic_write, write_json
from pipeline import gate as gates
from pipeline import modelio
from pipeline.errors import PipelineError
from pipeline.package import ENGINE_OPTION_KEYS, package_keys, package_stage
from pipeline.records import Artifact
from pipeline.runner import Context, Output, Stage


def model_keys(cfg) -> list[str]:
    """What building the model reads: the name only when no factory replaces it."""
    keys = ["model.factory", "model.kwargs", "model.num_classes"]
    return keys if cfg.model.factory else [*keys, "model.name"]


def _baseline(ctx: Context):
    return modelio.load_state_fresh(ctx.cfg, ctx.path("baseline", "model.pt"))


def _pruned(ctx: Context, stage: str):
    from pipeline.prune import load_pruned
    return load_pruned(modelio.build(ctx.cfg.model, ctx.cfg.data), modelio.example_input(ctx.cfg.data),
                       ctx.path(stage)).eval()


def _teacher_tokens(ctx: Context) -> dict | None:
    """The unpruned model's test outputs, for token fidelity of encoders; None for plain classifiers."""
    if "tokens" not in json.loads(ctx.path("baseline", "model.json").read_text())["outputs"]:
        return None
    return {"tokens": np.load(ctx.path("baseline", "test_tokens.npy"))}


def _np_write(path, save, *args, **kwargs) -> None:
    """numpy's savers through the one atomic writer (given a path, they would append .npy/.npz to it)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            save(f, *args, **kwargs)
    atomic_write(path, write)


# ---------------------------------------------------------------- 1 baseline

def baseline_keys(cfg):
    keys = [*model_keys(cfg), "model.weights", "data.reference_batch"]
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
    if "tokens" in outs:
        _np_write(ctx.out / "test_tokens.npy", np.save, outs["tokens"])
    metrics, _ = modelio.task_metrics(outs, data.test.labels)
    gap = modelio.train_eval_gap(model, data.x_train, data.train.labels)
    if gap is not None and abs(gap) > TRAIN_EVAL_GAP:
        notices.append(f"train-mode vs eval-mode top-1 differ by {gap:+.1f} pt: BatchNorm running statistics have "
                       "not settled (raise BatchNorm momentum, train longer, or recompute the statistics)")
    # The reference batch: a fixed, seeded slice of the test set that every parity check reuses.
    rng = np.random.default_rng(cfg.run.seed)
    idx = np.sort(rng.permutation(len(data.test.labels))[:cfg.data.reference_batch])
    arrays = {"inputs": data.x_test[idx], "labels": data.test.labels[idx],
              **{f"out_{k}": v[idx] for k, v in outs.items()}}
    _np_write(ctx.out / "reference.npz", np.savez, **arrays)
    write_json(ctx.out / "model.json", {"model": cfg.model.factory or cfg.model.name, "kwargs": cfg.model.kwargs,
                                        "outputs": list(modelio.output_names(model))})
    metrics.update(**modelio.count(model, cfg.data), size_bytes=(ctx.out / "model.pt").stat().st_size,
                   chance_top1=round(100.0 / cfg.model.num_classes, 4), train_eval_gap=gap, **trained)
    return Output(metrics=metrics, notices=tuple(notices),
                  artifacts=(Artifact("baseline-torch", "torch", "model.pt", label="baseline (torch)"),))


TRAIN_EVAL_GAP = 10.0   # pt: beyond this the baseline's BatchNorm statistics are reported as unsettled


def baseline_gate(m, inputs, cfg):
    floor = cfg.baseline.min_top1 if cfg.baseline.min_top1 >= 0 else m["chance_top1"] + 10.0
    check = gates.limit_check("top1_vs_chance", m["top1"], round(floor, 4), at_least=True)
    hint = (f"chance is {m['chance_top1']:.1f} % for {round(100 / m['chance_top1'])} classes: every later gate would "
            "compare against a baseline that learned nothing; train longer or fix the model, or baseline.gate=warn")
    return gates.gate(cfg.baseline.gate, dataclasses.replace(check, hint=hint))


# ---------------------------------------------------------------- 2 prune

FINETUNE_TRAIN_KEYS = ("finetune.lr", "finetune.batch_size", "finetune.optimizer", "finetune.schedule",
                       "finetune.kd_temperature", "finetune.kd_weight", "finetune.token_weight", "finetune.val_size",
                       "finetune.device", "finetune.nproc")
_LATENCY_KEYS = ("prune.latency_batch", "prune.latency_threads")
PRUNE_TARGET_KEYS = {"ratio": ("prune.ratio", "prune.global_pruning"), "macs": ("prune.macs", "prune.global_pruning"),
                     "latency_ms": ("prune.latency_ms", *_LATENCY_KEYS), "speedup": ("prune.speedup", *_LATENCY_KEYS)}


def prune_keys(cfg):
    p = cfg.prune
    keys = [*model_keys(cfg), "prune.target", "prune.importance", "prune.round_to",
            "prune.max_layer_ratio", "prune.iterative_steps", "prune.head_ratio", "prune.ignored_layers",
            *PRUNE_TARGET_KEYS[p.target]]
    if p.round_to == 0 or p.target in ("latency_ms", "speedup"):   # auto rounding / which runtime to time on
        keys.append("run.target")
    if p.iterative_steps > 1:
        keys.append("finetune.between_steps_epochs")
        if cfg.finetune.between_steps_epochs > 0:
            keys += FINETUNE_TRAIN_KEYS
    return keys


TAYLOR_IMAGES = 512   # images whose gradients rank channels for Taylor importance


def prune(ctx: Context) -> Output:
    from pipeline.prune import LATENCY_TARGETS, latency_backend, prune_model, resolve_round_to, save_pruned
    cfg, data, p = ctx.cfg, ctx.data, ctx.cfg.prune
    model = _baseline(ctx)
    target_args = {k.split(".")[1]: getattr(p, k.split(".")[1]) for k in PRUNE_TARGET_KEYS[p.target]}
    round_to = resolve_round_to(p.round_to, cfg.run.target if p.round_to == 0 else "")
    if p.target in LATENCY_TARGETS:
        target_args.update(latency_runtime=latency_backend(cfg.run.target), log=ctx.log)
    between = None
    if p.iterative_steps > 1 and cfg.finetune.between_steps_epochs > 0:
        teacher = _baseline(ctx)

        def between(step, m):
            ctx.log(f"  fine-tune between steps ({step + 1}/{p.iterative_steps - 1})")
            finetune_model(ctx, m, teacher, epochs=cfg.finetune.between_steps_epochs, early_stop=False)
    taylor = None
    if p.importance == "taylor":
        import torch
        n = min(len(data.train.labels), TAYLOR_IMAGES)
        xs, ys = torch.from_numpy(data.x_train[:n]), torch.from_numpy(data.train.labels[:n])
        taylor = [(xs[i:i + 64], ys[i:i + 64]) for i in range(0, n, 64)]
    model, info = prune_model(model, modelio.example_input(cfg.data), target=p.target, importance=p.importance,
                              round_to=round_to, max_layer_ratio=p.max_layer_ratio,
                              iterative_steps=p.iterative_steps, ignored_layers=p.ignored_layers,
                              head_ratio=p.head_ratio, between_steps=between, taylor_batches=taylor,
                              seed=cfg.run.seed, **target_args)
    save_pruned(model, info["history"], ctx.out)
    metrics, _ = modelio.task_metrics(modelio.torch_outputs(model, data.x_test), data.test.labels, _teacher_tokens(ctx))
    counts = _pruned_counts(ctx, model)
    base = ctx.record("baseline").metrics
    metrics.update(**counts, params_reduction=round(base["params"] / counts["params"], 3), round_to_used=round_to,
                   **{k: info.get(k) for k in ("ratio_used", "channels", "heads", "unwrapped", "latency_search")
                      if k in info})
    if "latency_tables" in info:   # the measured tables are part of the stage's output
        write_json(ctx.out / "latency_table.json", {"search": info["latency_search"], "tables": info["latency_tables"]})
    return Output(metrics=metrics)


def _pruned_counts(ctx: Context, model) -> dict:
    """MACs (both conventions), params, weights size and the MAC reductions against the baseline."""
    base = ctx.record("baseline").metrics
    counts = modelio.count(model, ctx.cfg.data)
    size = sum(f.stat().st_size for f in ctx.out.iterdir() if f.suffix in (".pt", ".safetensors"))
    return {**counts, "size_bytes": size, "macs_reduction": round(base["macs"] / counts["macs"], 3),
            "ops_tp_reduction": round(base["ops_tp"] / counts["ops_tp"], 3)}


def _drop_gate(section: str, parent: str):
    def check(m, inputs, cfg):
        s = getattr(cfg, section)
        return gates.gate(s.gate, gates.drop_check("top1", m["top1"], inputs[parent].metrics["top1"], s.max_drop))
    return check


# ---------------------------------------------------------------- 3 fine-tune

def finetune_keys(cfg):
    return [*model_keys(cfg), *FINETUNE_TRAIN_KEYS, "finetune.epochs", "finetune.early_stop"]


def finetune_model(ctx: Context, student, teacher, *, epochs: float, early_stop: bool) -> dict:
    """Distil ``teacher`` into ``student``; early stopping looks at a held-out slice of the TRAIN split."""
    from pipeline.train import train, train_ddp
    f, data = ctx.cfg.finetune, ctx.data
    n = min(f.val_size, len(data.train.labels) // 5)
    perm = np.random.default_rng(ctx.cfg.run.seed + 1).permutation(len(data.train.labels))
    val = (data.x_train[perm[:n]], data.train.labels[perm[:n]])
    x, y = data.x_train[perm[n:]], data.train.labels[perm[n:]]
    # Stop once the student matches the teacher on the same held-out slice: comparing with the
    # teacher's *test* top-1 would stop too early, as held-out train images are easier.
    target = modelio.task_metrics(modelio.torch_outputs(teacher, val[0]), val[1])[0]["top1"] if early_stop else None
    kwargs = dict(epochs=epochs, lr=f.lr, batch_size=f.batch_size, kd_temperature=f.kd_temperature,
                  kd_weight=f.kd_weight, schedule=f.schedule, optimizer=f.optimizer, seed=ctx.cfg.run.seed,
                  early_stop_top1=target, val=val, device=f.device, token_weight=f.token_weight,
                  progress="fine-tune")
    if f.nproc > 1:
        return train_ddp(student, teacher, x, y, nproc=f.nproc, **kwargs)
    return train(student, teacher, x, y, **kwargs)


def finetune(ctx: Context) -> Output:
    from pipeline.prune import save_pruned
    cfg, data = ctx.cfg, ctx.data
    teacher, student = _baseline(ctx), _pruned(ctx, "prune")
    info = finetune_model(ctx, student, teacher, epochs=cfg.finetune.epochs, early_stop=cfg.finetune.early_stop)
    history = json.loads(ctx.path("prune", "pruning_history.json").read_text())["history"]
    save_pruned(student, history, ctx.out)
    metrics, _ = modelio.task_metrics(modelio.torch_outputs(student, data.x_test), data.test.labels,
                                      _teacher_tokens(ctx))
    metrics.update(**_pruned_counts(ctx, student),
                   **{k: info[k] for k in ("epochs_run", "steps", "stopped_early") if k in info})
    return Output(metrics=metrics,
                  artifacts=(Artifact("pruned-torch", "torch", "", label="pruned + fine-tuned (torch)"),))


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
    model = _pruned(ctx, "finetune")
    onnx_path = ctx.out / "model.onnx"
    info = write(model, onnx_path)
    ref = np.load(ctx.path("baseline", "reference.npz"))
    ort_ref = modelio.onnx_outputs(onnx_path, ref["inputs"])
    par = compare_outputs(modelio.torch_outputs(model, ref["inputs"]), ort_ref)
    metrics, _ = modelio.task_metrics(modelio.onnx_outputs(onnx_path, data.x_test), data.test.labels,
                                      _teacher_tokens(ctx))
    fm = ctx.record("finetune").metrics
    metrics.update(size_bytes=onnx_path.stat().st_size, macs=fm["macs"], ops_tp=fm["ops_tp"], params=fm["params"],
                   opset=info["opset"], parity={"max_abs": par["max_abs"], "min_mean_cosine": par["min_mean_cosine"]})
    artifacts = [Artifact("onnx-fp32", "onnx", "model.onnx", "fp32", "ONNX fp32")]
    if e.fp16:
        fp16 = ctx.out / "model_fp16.onnx"
        to_fp16(onnx_path, fp16)
        p16 = compare_outputs(ort_ref, modelio.onnx_outputs(fp16, ref["inputs"]))
        m16, _ = modelio.task_metrics(modelio.onnx_outputs(fp16, data.x_test), data.test.labels)
        metrics["fp16"] = {"top1": m16["top1"], "size_bytes": fp16.stat().st_size,
                           "parity_vs_fp32": {"max_abs": p16["max_abs"], "min_mean_cosine": p16["min_mean_cosine"]}}
        artifacts.append(Artifact("onnx-fp16", "onnx", "model_fp16.onnx", "fp16", "ONNX fp16", top1=m16["top1"]))
    if cfg.profile.baseline_onnx:   # the unpruned reference, so that speedups compare ONNX with ONNX
        base = ctx.out / "baseline_fp32.onnx"
        write(_baseline(ctx), base)
        mb, _ = modelio.task_metrics(modelio.onnx_outputs(base, data.x_test), data.test.labels)
        metrics["baseline_onnx_top1"] = mb["top1"]
        artifacts.append(Artifact("baseline-onnx", "onnx", "baseline_fp32.onnx", "fp32",
                                  "baseline ONNX fp32 (unpruned)", top1=mb["top1"]))
    return Output(metrics=metrics, artifacts=tuple(artifacts))


def export_gate(m, inputs, cfg):
    e = cfg.export
    return gates.gate(e.gate, gates.drop_check("top1", m["top1"], inputs["finetune"].metrics["top1"], e.max_drop),
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
    return quantize_artifacts(ctx, teacher=_teacher_tokens(ctx))


def quantize_gate(m, inputs, cfg):
    q = cfg.quantize
    checks = [gates.drop_check("top1", m["top1"], m["fp32_top1"], q.max_drop),
              gates.limit_check("agreement_with_fp32", m["agreement_with_fp32"], q.min_agreement, at_least=True)]
    if "token_cos_vs_fp32" in m:
        checks.append(gates.limit_check("token_cos_mean_vs_fp32", m["token_cos_vs_fp32"]["token_cos_mean"],
                                        q.min_cosine, at_least=True))
    if "kernels_vs_unfused" in m:   # the int8 kernels this CPU ran against the Q/DQ arithmetic (saturation)
        checks.append(gates.limit_check("kernels_vs_unfused_agreement", m["kernels_vs_unfused"]["agreement"],
                                        q.min_agreement, at_least=True))
    for name, form in (m.get("forms") or {}).items():   # the TensorRT form is gated like the CPU form
        checks.append(gates.drop_check(f"top1 ({name})", form["top1"], m["fp32_top1"], q.max_drop))
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
    return _baseline(ctx) if located.artifact.role == "baseline-torch" else _pruned(ctx, "finetune")


# ---------------------------------------------------------------- the list

GATE_KEYS = ("gate", "max_drop")
STAGES = [
    Stage("baseline", 3, baseline, baseline_keys, uses_data=True, gate=baseline_gate,
          gate_config=("baseline.gate", "baseline.min_top1")),
    Stage("prune", 2, prune, prune_keys, ("baseline",), uses_data=True, gate=_drop_gate("prune", "baseline"),
          gate_config=("prune.gate", "prune.max_drop")),
    Stage("finetune", 3, finetune, finetune_keys, ("baseline", "prune"), uses_data=True,
          gate=_drop_gate("finetune", "baseline"), gate_config=("finetune.gate", "finetune.max_drop")),
    Stage("export_onnx", 2, export_onnx, export_keys, ("baseline", "finetune"), uses_data=True, gate=export_gate,
          gate_config=("export.gate", "export.max_drop", "export.max_abs", "export.min_cosine")),
    Stage("quantize", 3, quantize, quantize_keys, ("baseline", "export_onnx"), uses_data=True, gate=quantize_gate,
          gate_config=("quantize.gate", "quantize.max_drop", "quantize.min_agreement", "quantize.min_cosine"),
          environment=quantize_environment),
    Stage("engine", 2, engine, engine_keys, ("export_onnx", "quantize"), uses_data=True,
          gate=_drop_gate("engine", "export_onnx"), gate_config=("engine.gate", "engine.max_drop"),
          environment=engine_environment),
    Stage("profile", 3, profile, profile_keys, ("baseline", "finetune", "export_onnx", "quantize", "engine"),
          environment=profile_environment),
    Stage("package", 3, package_stage, package_keys,
          ("baseline", "prune", "finetune", "export_onnx", "quantize", "engine", "profile"), uses_data=True,
          folder="deploy"),
]
