"""Every stage of the pipeline, in order. Start reading here.

Each stage reads finished folders of earlier stages (``ctx.path``) and writes only into
``ctx.out``; the runner owns paths, caching and atomic renames. Heavy libraries are imported
inside the stages so that `pipeline infer` stays free of torch.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline import gate as gates
from pipeline.config import Config
from pipeline.data import PROJECT_ROOT, load_split, normalize, resolve_root
from pipeline.errors import PipelineError
from pipeline.progress import step_progress
from pipeline.runner import Context, Result, Stage, library_versions, sha256_file, write_json


class Data:
    """The run's images, loaded once per process and only when a stage needs them."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.teacher = None  # the baseline's test outputs, kept for token fidelity of encoders

    def _split(self, split: str, subset: int, classes=None):
        d = self.cfg.data
        return load_split(d.kind, d.root, split, size=d.size, channels=d.channels, subset=subset,
                          seed=self.cfg.run.seed, classes=classes)

    @cached_property
    def train(self):
        return self._split("train", self.cfg.data.train_subset)

    @cached_property
    def test(self):
        return self._split("test", self.cfg.data.test_subset, classes=self.train.classes if
                           self.cfg.data.kind == "imagefolder" else None)

    def norm(self, images: np.ndarray) -> np.ndarray:
        return normalize(images, self.cfg.data.mean, self.cfg.data.std)

    @cached_property
    def x_train(self):
        return self.norm(self.train.images)

    @cached_property
    def x_test(self):
        return self.norm(self.test.images)

    def identity(self) -> str:
        """What the data is, for fingerprints: file hashes for MNIST, names/sizes/mtimes for folders."""
        if getattr(self, "_identity", None) is None:
            d = self.cfg.data
            root = resolve_root(d.root)
            if not root.is_dir():
                raise PipelineError(f"data.root: {root} is not a folder")
            h = hashlib.sha256(json.dumps([d.kind, d.size, d.channels, d.mean, d.std, d.train_subset,
                                           d.test_subset, d.reference_batch, self.cfg.run.seed]).encode())
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p.relative_to(root)}:{st.st_size}:{int(st.st_mtime)}".encode())
                    if d.kind == "mnist":
                        h.update(sha256_file(p).encode())
            self._identity = h.hexdigest()
        return self._identity


# ---------------------------------------------------------------- models

def build(cfg: Config):
    from pipeline.models import build_model
    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("num_classes", cfg.model.num_classes)
    if not cfg.model.factory:
        kwargs.setdefault("in_channels", cfg.data.channels)
    return build_model(cfg.model.factory or cfg.model.name, **kwargs)


def example_input(cfg: Config, batch: int = 1):
    import torch
    return torch.zeros(batch, cfg.data.channels, *cfg.data.size)


def output_names(model) -> tuple[str, ...]:
    """A model may name its outputs (an encoder returns tokens and logits); else one 'logits'."""
    return tuple(getattr(model, "output_names", ("logits",)))


def load_state(model, path: Path, unsafe_pickle: bool = False):
    """Weights only: a checkpoint never runs code when it loads, unless the user says it may."""
    import torch
    if not path.is_file():
        raise PipelineError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as e:  # torch raises many types for a corrupt or pickled file
        hint = ("; if you made this file yourself and it holds a pickled model, "
                "--set model.unsafe_pickle=true loads it (pickle runs code from the file)"
                if "weights_only" in str(e) or "Unsupported global" in str(e) else "")
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise PipelineError(f"{path}: not a weights-only state_dict ({first[:160]}){hint}") from None
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PipelineError(f"{path}: expected a state_dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()
        detail = " ".join(line.strip() for line in first[1:3])[:300]
        raise PipelineError(f"{path}: does not match the model ({detail})") from None
    return model.eval()


def load_baseline(ctx: Context):
    return load_state(build(ctx.cfg), ctx.path("baseline", "model.pt"))


def load_pruned_from(ctx: Context, stage: str):
    from pipeline.prune import load_pruned
    return load_pruned(build(ctx.cfg), example_input(ctx.cfg), ctx.path(stage)).eval()


def torch_outputs(model, x: np.ndarray, batch: int = 500) -> dict[str, np.ndarray]:
    import torch
    names = output_names(model)
    chunks: dict[str, list] = {n: [] for n in names}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(torch.from_numpy(x[i:i + batch]))
            out = out if isinstance(out, (tuple, list)) else (out,)
            for n, o in zip(names, out):
                chunks[n].append(o.numpy())
    return {n: np.concatenate(c) for n, c in chunks.items()}


def onnx_outputs(path: Path, x: np.ndarray, threads: int = 0) -> dict[str, np.ndarray]:
    from export.runners import run_onnx
    return run_onnx(path, x, threads=threads)


def task_metrics(outputs: dict[str, np.ndarray], labels: np.ndarray, teacher: dict | None = None):
    """Top-1 from the logits; for an encoder (a 'tokens' output), token fidelity against the teacher."""
    logits = outputs.get("logits", list(outputs.values())[-1])
    pred = logits.argmax(1)
    metrics = {"top1": round(float((pred == labels).mean() * 100), 4)}
    if teacher is not None and "tokens" in outputs and "tokens" in teacher:
        metrics.update(token_fidelity(outputs["tokens"], teacher["tokens"]))
    return metrics, pred


def token_fidelity(tokens: np.ndarray, reference: np.ndarray) -> dict:
    """Cosine of each image's projected tokens (flattened) against the reference: mean and 1st percentile."""
    a = tokens.reshape(len(tokens), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"token_cos_mean": round(float(cos.mean()), 6), "token_cos_p1": round(float(np.percentile(cos, 1)), 6)}


def teacher_outputs(ctx: Context) -> dict | None:
    """The unpruned model's test-set outputs, for token fidelity; None for plain classifiers."""
    outputs = json.loads(ctx.path("baseline", "model.json").read_text())["outputs"]
    if "tokens" not in outputs:
        return None
    if ctx.data.teacher is None:
        ctx.data.teacher = torch_outputs(load_baseline(ctx), ctx.data.x_test)
    return ctx.data.teacher


def model_size(path: Path) -> int:
    return path.stat().st_size


def count(ctx: Context, model) -> tuple[int, int]:
    from pipeline.prune import count_macs
    macs, params = count_macs(model, example_input(ctx.cfg))
    return int(macs), int(params)


def save_weights(model, path: Path) -> None:
    import torch
    try:
        torch.save(model.state_dict(), path)
    except RuntimeError as e:  # torch reports a failed write (disk full) as RuntimeError
        raise PipelineError(f"{path}: could not write ({str(e).splitlines()[0][:120]}): disk full or not writable?") from None


# ---------------------------------------------------------------- stages

def baseline(ctx: Context) -> Result:
    import torch
    cfg, data = ctx.cfg, ctx.data
    torch.manual_seed(cfg.run.seed)  # the initial weights too, so a rerun trains the same model
    model = build(cfg)
    if cfg.model.weights:
        load_state(model, resolve_root(cfg.model.weights), cfg.model.unsafe_pickle)
        trained = {"weights": cfg.model.weights}
    else:
        from pipeline.train import train_classifier
        ctx.log(f"  training {cfg.model.factory or cfg.model.name} for {cfg.baseline.epochs} epochs "
                f"on {len(data.train.labels)} images")
        losses = train_classifier(model, data.x_train, data.train.labels, epochs=cfg.baseline.epochs,
                                  lr=cfg.baseline.lr, batch_size=cfg.baseline.batch_size, seed=cfg.run.seed,
                                  progress=step_progress("baseline"))
        trained = {"epochs": cfg.baseline.epochs, "losses": losses}
    save_weights(model, ctx.out / "model.pt")
    outs = torch_outputs(model, data.x_test)
    data.teacher = outs if "tokens" in outs else None
    metrics, _ = task_metrics(outs, data.test.labels)
    macs, params = count(ctx, model)
    # The reference batch: a fixed, seeded slice of the test set that every parity check reuses.
    rng = np.random.default_rng(cfg.run.seed)
    idx = np.sort(rng.permutation(len(data.test.labels))[:cfg.data.reference_batch])
    ref_out = {f"out_{k}": v[idx] for k, v in outs.items()}
    np.savez(ctx.out / "reference.npz", inputs=data.x_test[idx], labels=data.test.labels[idx], **ref_out)
    write_json(ctx.out / "model.json", {"model": cfg.model.factory or cfg.model.name,
                                        "kwargs": cfg.model.kwargs, "outputs": list(output_names(model))})
    metrics.update(macs=macs, params=params, size_bytes=model_size(ctx.out / "model.pt"), **trained)
    return Result(metrics=metrics, artifacts={"model.pt": {"kind": "torch", "precision": "fp32",
                                                           "label": "baseline (torch)"}})


def prune(ctx: Context) -> Result:
    from pipeline.prune import prune_model, save_pruned
    cfg, data, p = ctx.cfg, ctx.data, ctx.cfg.prune
    model = load_baseline(ctx)
    base = ctx.records["baseline"]["metrics"]
    between = None
    if p.iterative_steps > 1 and cfg.finetune.between_steps_epochs > 0:
        teacher = load_baseline(ctx)

        def between(step, m):
            ctx.log(f"  fine-tune between steps ({step + 1}/{p.iterative_steps - 1})")
            _finetune(ctx, m, teacher, epochs=cfg.finetune.between_steps_epochs, early_stop=False)
    taylor = None
    if p.importance == "taylor":
        import torch
        n = min(len(data.train.labels), 8 * cfg.finetune.batch_size)
        xs, ys = torch.from_numpy(data.x_train[:n]), torch.from_numpy(data.train.labels[:n])
        taylor = [(xs[i:i + 64], ys[i:i + 64]) for i in range(0, n, 64)]
    model, info = prune_model(model, example_input(cfg), target=p.target, ratio=p.ratio, macs=p.macs,
                              latency_ms=p.latency_ms, latency_batch=p.latency_batch, importance=p.importance,
                              global_pruning=p.global_pruning, round_to=p.round_to,
                              max_layer_ratio=p.max_layer_ratio, iterative_steps=p.iterative_steps,
                              ignored_layers=p.ignored_layers, head_ratio=p.head_ratio,
                              between_steps=between, taylor_batches=taylor,
                              seed=cfg.run.seed)
    save_pruned(model, info["history"], ctx.out)
    metrics, _ = task_metrics(torch_outputs(model, data.x_test), data.test.labels, teacher_outputs(ctx))
    macs, params = count(ctx, model)
    metrics.update(macs=macs, params=params, size_bytes=_weights_size(ctx.out),
                   macs_reduction=round(base["macs"] / macs, 3), params_reduction=round(base["params"] / params, 3),
                   ratio_used=info.get("ratio_used"), channels=info.get("channels"))
    g = gates.gate(p.gate, gates.drop_check("top1", metrics["top1"], base["top1"], p.max_drop))
    return Result(metrics=metrics, gate=g)


def _weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".pt", ".safetensors"))


def _split_val(ctx: Context):
    """Early stopping looks at a held-out slice of the TRAIN split: the test set only gates."""
    data, n = ctx.data, ctx.cfg.finetune.val_size
    n = min(n, len(data.train.labels) // 5)
    perm = np.random.default_rng(ctx.cfg.run.seed + 1).permutation(len(data.train.labels))
    val, tr = perm[:n], perm[n:]
    return (data.x_train[tr], data.train.labels[tr]), (data.x_train[val], data.train.labels[val])


def _finetune(ctx: Context, student, teacher, *, epochs: float, early_stop: bool) -> dict:
    from pipeline.finetune import finetune, finetune_ddp
    f = ctx.cfg.finetune
    (x, y), val = _split_val(ctx)
    # Stop once the student matches the teacher on the same held-out slice: comparing with the
    # teacher's *test* top-1 would stop too early, as held-out train images are easier.
    target = task_metrics(torch_outputs(teacher, val[0]), val[1])[0]["top1"] if early_stop else None
    kwargs = dict(epochs=epochs, lr=f.lr, batch_size=f.batch_size, kd_temperature=f.kd_temperature,
                  kd_weight=f.kd_weight, schedule=f.schedule, optimizer=f.optimizer, seed=ctx.cfg.run.seed,
                  early_stop_top1=target,
                  val=val, device=f.device, token_weight=f.token_weight)
    if f.nproc > 1:
        return finetune_ddp(student, teacher, x, y, nproc=f.nproc, **kwargs)
    return finetune(student, teacher, x, y, **kwargs)


def finetune_stage(ctx: Context) -> Result:
    from pipeline.prune import save_pruned
    cfg, data = ctx.cfg, ctx.data
    teacher = load_baseline(ctx)
    student = load_pruned_from(ctx, "prune")
    info = _finetune(ctx, student, teacher, epochs=cfg.finetune.epochs, early_stop=cfg.finetune.early_stop)
    history = json.loads(ctx.path("prune", "pruning_history.json").read_text())["history"]
    save_pruned(student, history, ctx.out)
    metrics, _ = task_metrics(torch_outputs(student, data.x_test), data.test.labels, teacher_outputs(ctx))
    macs, params = count(ctx, student)
    base = ctx.records["baseline"]["metrics"]
    metrics.update(macs=macs, params=params, size_bytes=_weights_size(ctx.out),
                   macs_reduction=round(base["macs"] / macs, 3),
                   **{k: info[k] for k in ("epochs_run", "steps", "stopped_early") if k in info})
    g = gates.gate(cfg.finetune.gate, gates.drop_check("top1", metrics["top1"], base["top1"], cfg.finetune.max_drop))
    return Result(metrics=metrics, gate=g, artifacts={"pruned": {"kind": "torch", "precision": "fp32",
                                                                 "label": "pruned + fine-tuned (torch)"}})


def _parity_checks(par: dict, max_abs: float | None, min_cosine: float) -> list[dict]:
    checks = []
    if max_abs is not None:
        checks.append(gates.limit_check("parity_max_abs", par["max_abs"], max_abs, at_least=False))
    checks.append(gates.limit_check("parity_min_mean_cosine", par["min_mean_cosine"], min_cosine, at_least=True))
    return checks


def export_onnx_stage(ctx: Context) -> Result:
    from export.fp16 import to_fp16
    from export.onnx_export import export_onnx
    from export.parity import compare_outputs
    cfg, data, e = ctx.cfg, ctx.data, ctx.cfg.export
    model = load_pruned_from(ctx, "finetune")
    names = output_names(model)
    onnx_path = ctx.out / "model.onnx"
    info = export_onnx(model, example_input(cfg), onnx_path, opset=e.opset, output_names=names, slim=e.slim)
    ref = np.load(ctx.path("baseline", "reference.npz"))
    torch_ref = torch_outputs(model, ref["inputs"])
    ort_ref = onnx_outputs(onnx_path, ref["inputs"])
    par = compare_outputs(torch_ref, ort_ref)
    outs = onnx_outputs(onnx_path, data.x_test, cfg.run.threads)
    metrics, _ = task_metrics(outs, data.test.labels, teacher_outputs(ctx))
    metrics.update(size_bytes=model_size(onnx_path), macs=ctx.records["finetune"]["metrics"]["macs"],
                   params=ctx.records["finetune"]["metrics"]["params"], opset=info["opset"],
                   parity={"max_abs": par["max_abs"], "min_mean_cosine": par["min_mean_cosine"]})
    artifacts = {"model.onnx": {"kind": "onnx", "precision": "fp32", "label": "ONNX fp32"}}
    if e.fp16:
        fp16_path = ctx.out / "model_fp16.onnx"
        to_fp16(onnx_path, fp16_path)
        p16 = compare_outputs(ort_ref, onnx_outputs(fp16_path, ref["inputs"]))
        m16, _ = task_metrics(onnx_outputs(fp16_path, data.x_test, cfg.run.threads), data.test.labels)
        metrics["fp16"] = {"top1": m16["top1"], "size_bytes": model_size(fp16_path),
                           "parity_vs_fp32": {"max_abs": p16["max_abs"], "min_mean_cosine": p16["min_mean_cosine"]}}
        artifacts["model_fp16.onnx"] = {"kind": "onnx", "precision": "fp16", "label": "ONNX fp16",
                                        "top1": m16["top1"]}
    parent = ctx.records["finetune"]["metrics"]["top1"]
    g = gates.gate(e.gate, gates.drop_check("top1", metrics["top1"], parent, e.max_drop),
                   *_parity_checks(par, e.max_abs, e.min_cosine))
    return Result(metrics=metrics, gate=g, artifacts=artifacts)


def quantize_stage(ctx: Context) -> Result:
    if not ctx.cfg.quantize.enabled:
        return Result(status="skipped", reason="quantize.enabled = false")
    from calib.calibset import build_calibration_set, load_calibration_set
    from calib.quantize import quantize_onnx, quantize_onnx_with_accuracy_control
    from export.parity import compare_outputs
    cfg, data, q = ctx.cfg, ctx.data, ctx.cfg.quantize
    calib_info = build_calibration_set(data.train.images, data.train.labels, q.calib_size, cfg.run.seed,
                                       ctx.out / "calib.npz", split="train")
    images, _ = load_calibration_set(ctx.out / "calib.npz", expect_shape=(cfg.data.channels, *cfg.data.size))
    src, dst = ctx.path("export_onnx", "model.onnx"), ctx.out / "model_int8.onnx"
    model_type = q.model_type or None
    if q.accuracy_control:
        n = min(len(data.train.labels), 1000)
        info = quantize_onnx_with_accuracy_control(src, dst, data.norm(images), data.x_train[-n:],
                                                   data.train.labels[-n:], target=q.target,
                                                   max_drop=q.max_drop / 100.0, model_type=model_type)
    else:
        info = quantize_onnx(src, dst, data.norm(images), target=q.target, model_type=model_type)
    fp32 = onnx_outputs(src, data.x_test, cfg.run.threads)
    int8 = onnx_outputs(dst, data.x_test, cfg.run.threads)
    fp32_metrics, fp32_pred = task_metrics(fp32, data.test.labels)
    metrics, pred = task_metrics(int8, data.test.labels, teacher_outputs(ctx))
    agreement = round(float((pred == fp32_pred).mean() * 100), 4)
    checks = [gates.drop_check("top1", metrics["top1"], fp32_metrics["top1"], q.max_drop),
              gates.limit_check("agreement_with_fp32", agreement, q.min_agreement, at_least=True)]
    if "tokens" in int8:
        vs_fp32 = token_fidelity(int8["tokens"], fp32["tokens"])
        metrics["token_cos_vs_fp32"] = vs_fp32
        checks.append(gates.limit_check("token_cos_mean_vs_fp32", vs_fp32["token_cos_mean"], q.min_cosine, at_least=True))
    ref = np.load(ctx.path("baseline", "reference.npz"))
    par = compare_outputs(onnx_outputs(src, ref["inputs"]), onnx_outputs(dst, ref["inputs"]))
    metrics.update(size_bytes=model_size(dst), macs=ctx.records["finetune"]["metrics"]["macs"],
                   params=ctx.records["finetune"]["metrics"]["params"], agreement_with_fp32=agreement,
                   calibration={k: calib_info[k] for k in ("n", "sha256", "seed", "per_class")},
                   target=q.target, qdq=info.get("qdq"), reverted=info.get("reverted"),
                   parity_vs_fp32={"max_abs": par["max_abs"], "min_mean_cosine": par["min_mean_cosine"]})
    g = gates.gate(q.gate, *checks)
    return Result(metrics=metrics, gate=g, artifacts={
        "model_int8.onnx": {"kind": "onnx", "precision": "int8", "label": f"ONNX int8 ({q.target} Q/DQ)"},
        "calib.npz": {"kind": "calibration"}})


def engine_environment() -> dict:
    from export.tensorrt import trt_version_info
    return trt_version_info() or {"tensorrt": None}


def engine_stage(ctx: Context) -> Result:
    from export.tensorrt import build_engine, timing_cache_name, trt_version_info
    cfg, e = ctx.cfg, ctx.cfg.engine
    trt = trt_version_info()
    if trt is None:
        reason = "TensorRT and a CUDA GPU are not available on this machine; build on the target with deploy/build_engine.sh"
        if e.required:
            raise PipelineError(f"engine.required = true for target {cfg.run.target}, but {reason}")
        return Result(status="skipped", reason=reason)
    src = _engine_source(ctx)
    engine = ctx.out / "model.engine"
    # The timing cache outlives the stage folder: one per GPU and TensorRT version, beside the runs.
    cache = ctx.run_dir.parent / timing_cache_name(trt["gpu_name"], trt["version"])
    info = build_engine(src, engine, engine_options(cfg, cache))
    from export.tensorrt import TrtEngineRunner
    data = ctx.data
    with TrtEngineRunner(engine) as runner:
        logits = np.concatenate([list(runner.infer({runner.input_names[0]: data.x_test[i:i + e.max_batch]}).values())[-1]
                                 for i in range(0, len(data.x_test), e.max_batch)])
    metrics, _ = task_metrics({"logits": logits}, data.test.labels)
    metrics.update(size_bytes=model_size(engine), tensorrt=trt, build=info)
    parent = ctx.records["export_onnx"]["metrics"]["top1"]
    g = gates.gate(e.gate, gates.drop_check("top1", metrics["top1"], parent, e.max_drop))
    return Result(metrics=metrics, gate=g, artifacts={"model.engine": {"kind": "engine", "precision": e.source,
                                                                       "label": f"TensorRT engine ({e.source})"}})


# engine.source -> the ONNX file the engine is built from
ENGINE_SOURCES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}


def _engine_source(ctx: Context) -> Path:
    e = ctx.cfg.engine
    name = ENGINE_SOURCES[e.source]
    path = ctx.path("quantize" if e.source == "int8" else "export_onnx", name)
    if not path.is_file():
        raise PipelineError(f"engine.source = {e.source!r} but {path} was not produced "
                            f"(quantize.enabled / export.fp16 off?)")
    return path


def engine_options(cfg: Config, timing_cache: Path | None):
    from export.tensorrt import EngineOptions
    e = cfg.engine
    return EngineOptions(min_batch=e.min_batch, opt_batch=e.opt_batch, max_batch=e.max_batch, input_name="input",
                         input_shape=(cfg.data.channels, *cfg.data.size), workspace_mb=e.workspace_mb,
                         builder_optimization_level=e.opt_level, timing_cache=str(timing_cache) if timing_cache else None,
                         dla_core=e.dla_core, gpu_fallback=e.gpu_fallback, hardware_compatibility=e.hardware_compatibility,
                         version_compatible=e.version_compatible, legacy_fp16_flag=e.legacy_fp16_flag,
                         precision=e.source)


def profile_stage(ctx: Context) -> Result:
    from pipeline.profile import profile_artifacts
    rows, env = profile_artifacts(ctx, _artifacts(ctx))
    return Result(metrics={"latency": rows, "environment": env})


def _artifacts(ctx: Context) -> list[dict]:
    """Every model artifact made so far, with the stage that gated it."""
    out = []
    for stage, record in ctx.records.items():
        for name, meta in (record.get("artifacts") or {}).items():
            if meta.get("kind") in ("torch", "onnx", "engine"):
                out.append({**meta, "stage": stage, "name": name,
                            "path": str(ctx.path(stage, name)) if meta["kind"] != "torch" or name == "model.pt"
                            else str(ctx.path(stage)),
                            "top1": meta.get("top1", record["metrics"].get("top1"))})
    return out


def package_stage(ctx: Context) -> Result:
    from export.tensorrt import build_script
    from pipeline.report import choose_variant, write_report
    cfg = ctx.cfg
    bundle = ctx.out
    files = {}
    for stage in ("export_onnx", "quantize", "engine"):
        rec = ctx.records.get(stage)
        if not rec or rec["status"] == "skipped":
            continue
        for name in rec.get("artifacts", {}):
            shutil.copy2(ctx.path(stage, name), bundle / name)
            files[name] = {**rec["artifacts"][name], "stage": stage, "sha256": sha256_file(bundle / name)}
    # The bundle carries the engine builder and `infer` (none of which imports torch), so the target
    # needs only this folder, numpy and TensorRT or onnxruntime.
    for package in ("export", "calib", "pipeline"):
        shutil.copytree(PROJECT_ROOT / package, bundle / package, ignore=shutil.ignore_patterns("__pycache__"))
    script = build_script(ENGINE_SOURCES[cfg.engine.source], "model.engine", engine_options(cfg, None))
    (bundle / "build_engine.sh").write_text(script)
    (bundle / "build_engine.sh").chmod(0o755)
    write_json(bundle / "config.json", cfg.to_dict())
    latency = ctx.records["profile"]["metrics"]["latency"]
    choice = choose_variant(ctx.records, latency, cfg.package, shipped=set(files))
    write_json(bundle / "manifest.json", {
        "model": json.loads(ctx.path("baseline", "model.json").read_text()),
        "input": {"name": "input", "shape": ["batch", cfg.data.channels, *cfg.data.size], "dtype": "float32",
                  "layout": "NCHW", "normalisation": {"scale": 1 / 255, "mean": list(cfg.data.mean),
                                                      "std": list(cfg.data.std)}},
        "labels": ctx.data.train.classes,
        "target": cfg.run.target,
        "files": files,
        "chosen": choice,
        "libraries": library_versions(),
        "verified": _verified(ctx),
    })
    # The bundle's report is written before this stage's record exists: give it the choice now.
    this = {"name": "package", "status": "ran", "seconds": None, "metrics": {"chosen": choice}, "gate": None}
    write_report(bundle, [*ctx.records.values(), this], cfg)
    return Result(metrics={"files": sorted(p.name for p in bundle.iterdir()), "chosen": choice})


def _verified(ctx: Context) -> dict:
    """What ran where: the report and manifest must never claim a path that did not execute."""
    engine = ctx.records.get("engine", {})
    return {
        "onnxruntime_cpu": "accuracy, parity and latency measured on this machine",
        "tensorrt": ("engine built and gated on this machine" if engine.get("status") in ("ran", "cached")
                     else "NOT executed: no TensorRT/GPU here; build_engine.sh builds it on the target"),
    }


STAGES = [
    Stage("baseline", 1, ("data", "model", "baseline", "run.seed"), (), baseline),
    Stage("prune", 1, ("prune", "run.seed", "finetune.between_steps_epochs"), ("baseline",), prune),
    Stage("finetune", 2, ("finetune", "run.seed"), ("baseline", "prune"), finetune_stage),
    Stage("export_onnx", 1, ("export",), ("baseline", "finetune"), export_onnx_stage),
    Stage("quantize", 1, ("quantize", "run.seed"), ("baseline", "export_onnx"), quantize_stage),
    Stage("engine", 1, ("engine",), ("export_onnx", "quantize"), engine_stage, environment=engine_environment),
    Stage("profile", 2, ("profile", "run.threads", "export.opset", "export.slim"), ("baseline", "finetune", "export_onnx", "quantize", "engine"),
          profile_stage, environment=engine_environment),
    Stage("package", 2, ("package", "run.target", "engine"), ("baseline", "export_onnx", "quantize", "engine", "profile"),
          package_stage, folder="deploy"),
]
