"""W8A8 of a VLM's vision file (pixels -> projected image embeddings), in onnxruntime's and TensorRT's form.

    images = normalise(load_mnist(root, "train")[0][:256])                   # edgerun.pixels / readers
    ort = quantize_vision("vision.onnx", "vision.int8.onnx", images, target="onnxruntime")
    trt = quantize_vision("vision.onnx", "vision.trt.onnx", images, target="tensorrt")   # trt.fidelity.cos_mean

The quantizer is calib.quantize.quantize_onnx (NNCF, model_type "transformer", per-tensor activation
scales), with its post-fixes and checks: target "tensorrt" gives signed symmetric Q/DQ proved by
calib.qdq.validate_qdq; here the file is also put through edgerun.preflight.check_onnx for every TensorRT
major the bundle is checked against (the operators, not only the Q/DQ nodes), and a failing pre-flight
is an error (nothing is written that the engine stage would refuse). NVILA ships its tower as W8A8 beside a
W4A16 decoder (shared/docs/llm-facts.md); the decoder's INT4 is calib.int4.

Fidelity is what the decoder will see: the cosine of every image token's embedding [hidden] against the
FP32 file's on the same images (``val_inputs``), mean / 1st percentile / min over n_images x tokens, plus the
largest |difference|. (pipeline.tasks.encode.token_fidelity flattens each image's tokens into one vector;
per token is the stricter view: one ruined token among 16 barely moves a per-image cosine.)
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from calib.errors import CalibError
from calib.quantize import quantize_onnx

TRT_MAJORS = (10, 11)      # as pipeline/package.py checks the bundle's files
VAL_DEFAULT = 64           # images scored when no val_inputs are given (the first calibration images)


@dataclass(frozen=True)
class TokenCosine:
    """Per-token cosine of the quantized embeddings against FP32's, over ``n_tokens`` tokens of ``n_images``."""
    cos_mean: float
    cos_p1: float
    cos_min: float
    max_abs: float
    n_images: int
    n_tokens: int


@dataclass(frozen=True)
class VisionQuant:
    """One quantized vision file: ``info`` is quantize_onnx's record; ``preflight`` {TensorRT major: issue
    lines} (empty lists: passed; only for target "tensorrt")."""
    path: str
    target: str
    output: str
    fidelity: TokenCosine
    info: dict
    preflight: dict

    def to_json(self) -> dict:
        return asdict(self)


def token_cosine(embeds: np.ndarray, reference: np.ndarray) -> TokenCosine:
    """Per-token cosine of ``embeds`` [n, tokens, hidden] against ``reference`` of the same shape."""
    a, b = np.asarray(embeds, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise CalibError(f"token_cosine: expected two [n, tokens, hidden] arrays of one shape, got {a.shape} "
                         f"and {b.shape}")
    x, y = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
    return TokenCosine(round(float(cos.mean()), 6), round(float(np.percentile(cos, 1)), 6), round(float(cos.min()), 6),
                       round(float(np.abs(a - b).max()), 6), int(a.shape[0]), int(x.shape[0]))


def _embeds_output(outputs: dict, src) -> str:
    shaped = [k for k, v in outputs.items() if np.asarray(v).ndim == 3]
    if len(shaped) != 1:
        raise CalibError(f"{src}: expected one [n, tokens, hidden] output (the projected image embeddings), got "
                         f"{', '.join(f'{k} {list(np.shape(v))}' for k, v in outputs.items())}")
    return shaped[0]


def quantize_vision(src: str | os.PathLike, dst: str | os.PathLike, calib_inputs: np.ndarray, *, target: str,
                    val_inputs: np.ndarray | None = None, subset_size: int | None = None,
                    reduce_range: bool | None = None, threads: int = 1) -> VisionQuant:
    """INT8 Q/DQ of the vision file ``src`` into ``dst`` for ``target`` ("onnxruntime" | "tensorrt").

    ``calib_inputs``: normalised float32 images [N, C, H, W] (edgerun.pixels.normalise); ``val_inputs`` the
    images the fidelity is measured on (default: the first 64 calibration images). ``subset_size`` and
    ``reduce_range`` as calib.quantize.quantize_onnx. ``dst`` is written only when quantize_onnx's checks
    and, for "tensorrt", the TensorRT pre-flight passed."""
    from edgerun.ort import run_onnx

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise CalibError(f"threads must be a positive integer, got {threads!r}")
    val = np.asarray(calib_inputs)[:VAL_DEFAULT] if val_inputs is None else np.asarray(val_inputs)
    if val.ndim != 4 or not len(val) or not np.issubdtype(val.dtype, np.floating):
        raise CalibError(f"val_inputs: expected normalised float images [N, C, H, W], got {val.dtype} "
                         f"{list(val.shape)}")
    val = np.ascontiguousarray(val, np.float32)
    tmp = f"{dst}.unchecked.onnx"
    try:
        info = quantize_onnx(src, tmp, calib_inputs, target=target, model_type="transformer",
                             subset_size=subset_size, reduce_range=reduce_range)
        problems = _trt_preflight(tmp) if target == "tensorrt" else {}
        bad = {m: p for m, p in problems.items() if p}
        if bad:
            major, lines = next(iter(bad.items()))
            raise CalibError(f"{dst} (not written): the TensorRT {major} pre-flight refuses it: {lines[0]} "
                             f"({sum(map(len, bad.values()))} issue(s))")
        reference = run_onnx(str(src), val, batch_size=VAL_DEFAULT, threads=threads)
        name = _embeds_output(reference, src)
        quantized = run_onnx(tmp, val, batch_size=VAL_DEFAULT, threads=threads)[name]
        fidelity = token_cosine(quantized, reference[name])
        if not np.isfinite(quantized).all():
            raise CalibError(f"{dst} (not written): the quantized embeddings are not finite")
        os.replace(tmp, dst)     # same folder: an atomic rename of a file quantize_onnx wrote atomically
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    info["path"] = str(dst)
    return VisionQuant(str(dst), target, name, fidelity, info, problems)


def _trt_preflight(path) -> dict:
    from edgerun.preflight import check_onnx

    return {str(m): [i.line() for i in check_onnx(path, m).issues] for m in TRT_MAJORS}
