"""`python -m pipeline infer`: predictions from a deploy bundle, without torch.

TensorRT runs the engine when TensorRT and the engine are there; otherwise onnxruntime runs the
chosen ONNX with the best provider present (TensorRT, CUDA, then CPU).
"""
from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np

from calib.errors import CalibError
from calib.sources import IMAGE_SUFFIXES, load_image_folder, read_idx, read_image
from pipeline.data import normalize
from pipeline.errors import PipelineError


def load_inputs(path: Path, manifest: dict) -> tuple[np.ndarray, list[str] | None]:
    _, c, h, w = manifest["input"]["shape"]
    try:
        if path.is_dir():
            images, names = _read_folder(path, (h, w), c)
        else:
            images = read_idx(path)
            if images.ndim == 3:
                images = images[:, None]
            names = None
    except CalibError as e:
        raise PipelineError(str(e)) from None
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, h, w) or images.dtype != np.uint8:
        raise PipelineError(f"{path}: images are {images.dtype} {tuple(images.shape[1:])}, "
                            f"the bundle expects uint8 {(c, h, w)}")
    return images, names


def _read_folder(path: Path, size, channels) -> tuple[np.ndarray, list[str]]:
    """A flat folder of images (sorted by name), or an ImageFolder tree of class subfolders."""
    if any(p.is_dir() for p in path.iterdir()):
        images, _, _ = load_image_folder(path, size, channels)
        return images, None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PipelineError(f"{path}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    out = [read_image(f, size, channels) for f in files]
    return np.stack(out), [f.name for f in files]


def pick_model(bundle: Path, manifest: dict, requested: str | None) -> tuple[Path, str]:
    files = manifest.get("files", {})
    if requested:
        if requested not in files:
            raise PipelineError(f"{bundle}: no model {requested!r} in the bundle (has {', '.join(sorted(files))})")
        return bundle / requested, files[requested]["kind"]
    from export.tensorrt import trt_version_info
    if "model.engine" in files and trt_version_info() is not None:
        return bundle / "model.engine", "engine"
    chosen = (manifest.get("chosen") or {}).get("file") or "model.onnx"
    if chosen not in files or files[chosen]["kind"] != "onnx":
        chosen = "model.onnx"
    return bundle / chosen, "onnx"


def _runner(path: Path, kind: str):
    if kind == "engine":
        from export.tensorrt import TrtEngineRunner
        return TrtEngineRunner(path), "tensorrt"
    from export.runners import OrtRunner, available_ort_providers
    have = available_ort_providers()
    providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have]
    providers.append("CPUExecutionProvider")
    return OrtRunner(path, providers=tuple(providers)), f"onnxruntime ({providers[0]})"


def open_bundle(path: Path, tmp: Path) -> Path:
    """A bundle folder, or a .tar(.gz) of one unpacked safely: no member may land outside ``tmp``."""
    if path.is_dir():
        return path
    if not path.is_file():
        raise PipelineError(f"{path}: bundle not found")
    import tarfile
    try:
        with tarfile.open(path) as tar:
            # The "data" filter refuses absolute paths, '..', links out of the folder and devices.
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        detail = "; ".join(str(e).splitlines()) or type(e).__name__
        raise PipelineError(f"{path}: refused or unreadable bundle archive ({detail})") from None
    found = [p.parent for p in tmp.rglob("manifest.json")]
    if len(found) != 1:
        raise PipelineError(f"{path}: the archive must hold exactly one bundle (manifest.json), found {len(found)}")
    return found[0]


def infer(args) -> int:
    import tempfile
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        return _infer(args, open_bundle(Path(args.bundle), Path(tmp)))


def _infer(args, bundle: Path) -> int:
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        raise PipelineError(f"{bundle}: not a deploy bundle (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        norm = manifest["input"]["normalisation"]
        shape = manifest["input"]["shape"]
        if not (isinstance(shape, list) and len(shape) == 4 and
                all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:])):
            raise ValueError(f"input.shape must be [batch, C, H, W] with positive C, H, W, got {shape!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{manifest_path}: unreadable manifest ({e})") from None
    if args.batch_size <= 0:
        raise PipelineError(f"--batch-size must be > 0, got {args.batch_size}")
    images, names = load_inputs(Path(args.input), manifest)
    x = normalize(images, norm["mean"], norm["std"])
    path, kind = pick_model(bundle, manifest, args.model)
    runner, backend = _runner(path, kind)
    labels = manifest.get("labels") or []
    preds, times = [], []
    with runner:
        name = runner.input_names[0]
        for i in range(0, len(x), args.batch_size):
            t = time.perf_counter()
            out = runner.infer({name: x[i:i + args.batch_size]})
            times.append((time.perf_counter() - t) * 1000)
            logits = out.get("logits", list(out.values())[-1])
            preds.append(np.asarray(logits).argmax(1))
    pred = np.concatenate(preds)
    for j, p in enumerate(pred[:args.limit]):
        print(f"{names[j] if names else j}\t{labels[p] if p < len(labels) else p}")
    total = sum(times)
    print(f"{len(pred)} images with {path.name} on {backend}: {total:.1f} ms in {len(times)} batches of "
          f"≤{args.batch_size} ({total / len(pred):.3f} ms/image, host↔device copies included)")
    counts = np.bincount(pred, minlength=len(labels) or 1)
    print(f"PASSED | {len(pred)} predictions; per class: {counts.tolist()}")
    return 0
