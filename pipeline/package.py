"""The package stage: the deploy bundle, which is all a target needs.

The bundle holds the shipped model files with their external data, the runtime package `edgerun/`
(no torch, no pipeline), a small labelled sample of the test set so that the commands printed
under "Next:" work as written, the static TensorRT pre-flight of every ONNX file, and the engine
recipe (build_engine.sh) only for a source file that TensorRT accepts. Every file is listed with
its sha256 in manifest.json: the runtime refuses a bundle holding anything else.

Before the run may pass, the bundle proves it runs: its own runtime, in a fresh process inside the
bundle, runs the `Next:` infer command on its sample, and its predictions must be the pipeline's.
"""
from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np

from edgerun.io import atomic_write, copy_file, hash_json, sha256_file, write_json
from edgerun.machine import library_versions
from pipeline import tasks
from pipeline.data import PROJECT_ROOT
from pipeline.engine_stage import ENGINE_OPTION_KEYS, engine_options, engine_source
from pipeline.errors import PipelineError
from pipeline.profile_stage import PROFILE_FILE
from pipeline.records import StageRecord
from pipeline.runner import Context, Output

TRT_MAJORS = (10, 11)
SAMPLE_SIZE = 256
SHIPPED_STAGES = ("export_onnx", "quantize", "engine")
NOT_SHIPPED_ROLES = ("baseline-onnx",)   # the unpruned reference is for measuring, not for deploying
MANIFEST_FORMAT = 4                      # edgerun.bundle.FORMAT: every file listed, the task's metric named
RUNTIME = PROJECT_ROOT / "edgerun"
RUNTIME_PATTERNS = ("*.py", "*.sh", "*.json")   # the runtime's code, scripts and tables; no caches
# The `Next:` block's infer command (pipeline/cli.py prints it), run in the bundle before PASSED.
NEXT_INFER = ("infer", "--bundle", ".", "--input", "sample/images-idx3-ubyte.gz", "--format", "json")
MIN_AGREEMENT = 0.99    # the bundle's predictions vs the pipeline's: input rounding may flip a borderline one
BUNDLE_RUN_TIMEOUT_S = 600


def runtime_files() -> list[Path]:
    """What of edgerun/ a bundle ships, and so what its fingerprint holds: nothing else is copied."""
    return sorted(p for pattern in RUNTIME_PATTERNS for p in RUNTIME.glob(pattern) if p.is_file())


def package_environment() -> dict:
    """What the package stage copies besides its inputs' files: the runtime's content, by sha256.

    The runner adds a stage's ``environment`` to its fingerprint (Stage(..., environment=...)), so
    a change to edgerun/ packages again.
    """
    return {"runtime_sha256": hash_json({p.name: sha256_file(p) for p in runtime_files()})}


def package_keys(cfg):
    return ["package.backend", "package.objective", "package.batch", "run.target", *ENGINE_OPTION_KEYS,
            "engine.source"]


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file, gzip-compressed with a fixed timestamp so the bundle is byte-reproducible: uint8 when
    every value fits (images, MNIST's labels), else big-endian int32 (labels of more than 256 classes)."""
    if array.dtype.kind not in "ui":
        raise PipelineError(f"IDX sample: expected integer values, got {array.dtype}")
    small = array.size == 0 or (array.min() >= 0 and array.max() <= 255)
    code, dtype = (0x08, np.uint8) if small else (0x0C, np.dtype(">i4"))
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return gzip.compress(header + np.ascontiguousarray(array, dtype=dtype).tobytes(), mtime=0)


def sample_indices(ctx: Context) -> np.ndarray:
    return np.sort(np.random.default_rng(ctx.cfg.run.seed).permutation(len(ctx.data.test.labels))[:SAMPLE_SIZE])


def _sample(ctx: Context, bundle: Path) -> dict:
    test = ctx.data.test
    idx = sample_indices(ctx)
    images = test.images[idx]
    images = images[:, 0] if images.shape[1] == 1 else images   # MNIST's own layout for 1 channel
    atomic_write(bundle / "sample" / "images-idx3-ubyte.gz", _idx_bytes(images))
    atomic_write(bundle / "sample" / "labels-idx1-ubyte.gz", _idx_bytes(test.labels[idx]))
    return {"images": "sample/images-idx3-ubyte.gz", "labels": "sample/labels-idx1-ubyte.gz", "n": int(len(idx)),
            "note": f"{len(idx)} seeded test images with their labels, for checking the bundle on the target"}


def _preflight(bundle: Path, files: dict) -> dict:
    from edgerun.preflight import check_onnx
    out = {}
    for name, meta in files.items():
        if meta["kind"] == "onnx":
            out[name] = {str(m): check_onnx(bundle / name, m).to_json() for m in TRT_MAJORS}
    return out


def _engine_recipe(ctx: Context, bundle: Path, preflight: dict, files: dict) -> dict:
    """build_engine.sh and its generated arguments (listed in ``files``), only for a source that passes
    the pre-flight."""
    from edgerun.trt import script_path
    from export.trt_options import write_build_files
    try:
        source = engine_source(ctx).name
    except PipelineError as e:
        return {"offered": False, "reason": str(e)}
    results = preflight.get(source, {})
    majors = [m for m, r in results.items() if r.get("ok")]
    if not majors:
        first = next((i for r in results.values() for i in r.get("issues", [])), None)
        return {"offered": False, "source": source,
                "reason": f"{source} fails the TensorRT pre-flight" + (f" ({first})" if first else "")}
    cfg = ctx.cfg
    written = write_build_files(bundle, engine_options(cfg), onnx_name=source, engine_name="model.engine",
                                input_name="input", input_shape=(cfg.data.channels, *cfg.data.size),
                                precision=cfg.engine.source)
    copy_file(script_path(), bundle / "build_engine.sh")
    (bundle / "build_engine.sh").chmod(0o755)
    for path in [*written, bundle / "build_engine.sh"]:
        files[path.name] = {"kind": "script" if path.suffix == ".sh" else "build", "sha256": sha256_file(path)}
    return {"offered": True, "source": source, "script": "build_engine.sh",
            "trt_majors": sorted(int(m) for m in majors),
            "note": "NOT executed here (no TensorRT/GPU on this machine): build on the target"}


def _on_target(target: str, recipe: dict, chosen: dict) -> dict:
    if target == "cpu":
        return {"file": chosen.get("file"), "how": "as chosen here: measured on this machine's CPU"}
    if recipe.get("offered"):
        return {"file": "model.engine", "how": f"bash build_engine.sh builds it from {recipe['source']} on the "
                f"{target}; not measured here (no TensorRT/GPU)"}
    return {"file": chosen.get("file"), "how": f"no TensorRT build offered ({recipe.get('reason')}): onnxruntime"}


def package_stage(ctx: Context) -> Output:
    from pipeline.choose import choose_variant
    cfg, bundle = ctx.cfg, ctx.out
    files = {}
    for stage in SHIPPED_STAGES:
        rec = ctx.record(stage)
        for art in rec.artifacts if rec.status != "skipped" else ():
            if art.role in NOT_SHIPPED_ROLES:
                continue
            src = ctx.path(stage, art.file)
            copy_file(src, bundle / art.file)
            files[art.file] = {"kind": art.kind, "precision": art.precision, "role": art.role, "label": art.label,
                               "stage": stage, "score": _score(art, rec),
                               "sha256": sha256_file(bundle / art.file)}
            for name, kind in _loaded_with(src, art.file, art.kind):
                copy_file(src.parent / PurePosixPath(name).name, bundle / name)
                files[name] = {"kind": kind, "stage": stage, "sha256": sha256_file(bundle / name)}
    # The runtime package is the only code the bundle ships: numpy + onnxruntime or TensorRT run it.
    for src in runtime_files():
        copy_file(src, bundle / "edgerun" / src.name)
        files[f"edgerun/{src.name}"] = {"kind": "runtime", "sha256": sha256_file(bundle / "edgerun" / src.name)}
    sample = _sample(ctx, bundle)
    for key in ("images", "labels"):
        files[sample[key]] = {"kind": "sample", "sha256": sha256_file(bundle / sample[key])}
    preflight = _preflight(bundle, files)
    recipe = _engine_recipe(ctx, bundle, preflight, files)
    records: list[StageRecord] = [ctx.record(n) for n in ctx.stage.reads]
    profile = _measured(ctx)
    shipped = {n for n, m in files.items() if m["kind"] in ("onnx", "engine")}
    chosen = choose_variant(records, profile.get("latency") or [], cfg.package, shipped)
    chosen["on_target"] = _on_target(cfg.run.target, recipe, chosen)
    write_json(bundle / "manifest.json", {
        "format": MANIFEST_FORMAT,
        "model": _model_json(ctx),
        "input": {"name": "input", "shape": ["batch", cfg.data.channels, *cfg.data.size], "dtype": "float32",
                  "layout": "NCHW", "normalisation": {"scale": 1 / 255, "mean": list(cfg.data.mean),
                                                      "std": list(cfg.data.std)}},
        "labels": ctx.data.train.classes,
        "target": cfg.run.target,
        "files": files,
        "chosen": chosen,
        "sample": sample,
        "preflight": preflight,
        "engine_recipe": recipe,
        "lineage": {r.name: r.fingerprint.get("config", {}) for r in records},
        "libraries": library_versions(),
        "verified": _verified(ctx),
        "int8_form": _int8_forms(ctx),
        "metric": tasks.of_run(records).describe().to_json(),
    })
    listing = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    unlisted = sorted(set(listing) - set(files) - {"manifest.json"})
    if unlisted:   # the runtime would refuse this bundle: a bug here, not the user's
        raise PipelineError(f"package: {bundle}/{unlisted[0]} was written but not listed in manifest.json")
    ran = bundle_runs(ctx, bundle)
    return Output(metrics={"files": [f for f in listing if not f.startswith("edgerun/")], "chosen": chosen,
                           "engine_recipe": recipe, "bundle_runs": ran,
                           "preflight": {f: {m: r["ok"] for m, r in res.items()} for f, res in preflight.items()}})


def _score(art, rec: StageRecord) -> float | None:
    """An artifact's figure in the task's metric: its own (a side file), else its stage's."""
    score = art.score if art.score is not None else tasks.score_of(rec.metrics)
    return None if score is None else score.value


def _loaded_with(src: Path, name: str, kind: str) -> list[tuple[str, str]]:
    """(bundle name, kind) of the files loading the artifact ``name`` reads: an ONNX file's external
    data, an engine's sidecar. Each is copied beside it and listed."""
    folder = PurePosixPath(name).parent
    if kind == "engine":
        return [(f"{name}.json", "sidecar")] if src.with_name(src.name + ".json").is_file() else []
    if kind != "onnx":
        return []
    import onnx

    from edgerun.verify import external_locations
    out = []
    for location in external_locations(onnx.load(str(src), load_external_data=False)):
        if PurePosixPath(location).name != location:   # export writes data beside the model, never elsewhere
            raise PipelineError(f"{src}: external data {location!r} is not a file beside the model: refused")
        out.append(((folder / location).as_posix(), "onnx-data"))
    return out


def _measured(ctx: Context) -> dict:
    """The profile's measurements from its output file: what the package's fingerprint holds."""
    path = ctx.path("profile", PROFILE_FILE)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: this profile result predates it; re-time with `make profile` "
                            "(or --force profile)") from None


def bundle_runs(ctx: Context, bundle: Path) -> dict:
    """The `Next:` infer command, run by the bundle's own runtime in a fresh process inside the bundle
    (-B: no bytecode cache written into it), on its sample; its predictions must be the pipeline's."""
    command = f"python3 -m edgerun {' '.join(NEXT_INFER)}"
    try:
        p = subprocess.run([sys.executable, "-B", "-m", "edgerun", *NEXT_INFER], cwd=bundle, capture_output=True,
                           text=True, timeout=BUNDLE_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PipelineError(f"the bundle does not run: `{command}` gave no answer in {BUNDLE_RUN_TIMEOUT_S} s") \
            from None
    if p.returncode != 0:
        lines = [ln for ln in (p.stdout + "\n" + p.stderr).splitlines() if ln.strip()] or ["(no message)"]
        last = next((ln for ln in lines if ln.startswith("FAILED")), lines[-1]).removeprefix("FAILED | error: ")
        raise PipelineError(f"the bundle does not run: `{command}` failed: {last}")
    doc = json.loads(p.stdout)
    task = tasks.of_run([ctx.record(n) for n in ctx.stage.reads])
    got, figures = task.bundle_answers(doc)
    out = {"command": command, "model": doc["model_file"], "backend": doc["backend"], "count": doc["count"],
           **figures}
    if not doc["model_file"].endswith(".onnx"):
        return {**out, "agreement": None, "note": "an engine: compared with nothing here (no TensorRT)"}
    from pipeline import modelio
    x = ctx.data.x_test[sample_indices(ctx)]
    want = task.answers(modelio.onnx_outputs(bundle / doc["model_file"], x))
    agreement = float((got == want).mean()) if got.shape == want.shape else 0.0
    if agreement < MIN_AGREEMENT:
        raise PipelineError(f"the bundle runs but answers otherwise: `{command}` with {doc['model_file']} agrees "
                            f"with the pipeline on {agreement:.1%} of its {len(want)} sample images "
                            f"(at least {MIN_AGREEMENT:.0%} expected): its normalisation or labels differ")
    return {**out, "agreement": round(agreement, 4)}


def _model_json(ctx: Context) -> dict:
    import json
    return json.loads(ctx.path("baseline", "model.json").read_text())


def _int8_forms(ctx: Context) -> dict:
    """Per INT8 role, the weight form the quantize stage wrote and why (calib.int8form): the runtime
    warns where a full-range CPU form meets a CPU whose int8 kernels saturate."""
    q = ctx.record("quantize")
    if q.status not in ("ran", "cached"):
        return {}
    forms = {"onnx-int8": q.metrics.get("int8_form"),
             "onnx-int8-trt": ((q.metrics.get("forms") or {}).get("tensorrt") or {}).get("int8_form")}
    return {role: form for role, form in forms.items() if isinstance(form, dict)}


def _verified(ctx: Context) -> dict:
    """What ran where: the report and manifest must never claim a path that did not execute."""
    engine = ctx.record("engine")
    return {
        "onnxruntime_cpu": "accuracy, parity and latency measured on this machine",
        "tensorrt_preflight": "static check of every ONNX file against TensorRT's documented ONNX support (no GPU)",
        "tensorrt": ("engine built and gated on this machine" if engine.status in ("ran", "cached")
                     else "NOT executed: no TensorRT/GPU here; build_engine.sh builds it on the target"),
    }
