"""Output parity between two runs of a model (torch vs ONNX, FP32 vs FP16, ONNX vs TensorRT).

Plain numpy rather than Polygraphy's comparator: Polygraphy's CompareFunc works on RunResults
from its own runners and its cosine metric (CompareFunc in 0.53.6 has simple, indices and
perceptual_metrics; the cosine compare func flattens the whole output) gives one number per
output, while the gates here need the cosine of every sample (row) to catch one broken sample
in a batch, from plain dicts produced by torch, onnxruntime or TensorRT alike. The zero-vector
convention follows Polygraphy's: both zero → 1, one zero → 0.
"""
from __future__ import annotations

import numpy as np

from export.errors import ExportError


def compare_outputs(reference: dict, candidate: dict) -> dict:
    """Compare two {output name: array} dicts of the same names and shapes.

    Returns {"outputs": {name: {"max_abs", "mean_abs", "mean_cosine", "min_cosine"}},
    "max_abs": worst max_abs, "min_mean_cosine": worst mean_cosine}. Cosines are per sample:
    each array is flattened to (rows = first dimension, everything else). A NaN or Inf in either
    counts as the worst match (max_abs inf, cosine -1), so that any gate on these numbers fails.
    """
    if set(reference) != set(candidate) or not reference:
        raise ExportError(f"compare_outputs: output names differ (reference: "
                          f"{', '.join(sorted(reference)) or 'none'}; candidate: "
                          f"{', '.join(sorted(candidate)) or 'none'})")
    per_output = {}
    for name in reference:
        ref = np.asarray(reference[name], dtype=np.float64)
        cand = np.asarray(candidate[name], dtype=np.float64)
        if ref.shape != cand.shape:
            raise ExportError(f"compare_outputs: output '{name}' has shape {ref.shape} in the "
                              f"reference but {cand.shape} in the candidate")
        per_output[name] = _compare(ref, cand)
    return {
        "outputs": per_output,
        "max_abs": max(m["max_abs"] for m in per_output.values()),
        "min_mean_cosine": min(m["mean_cosine"] for m in per_output.values()),
    }


def _compare(ref: np.ndarray, cand: np.ndarray) -> dict:
    if ref.size == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "mean_cosine": 1.0, "min_cosine": 1.0}
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(ref - cand)
    diff[~np.isfinite(diff)] = np.inf
    rows_ref = ref.reshape(len(ref), -1) if ref.ndim else ref.reshape(1, 1)
    rows_cand = cand.reshape(rows_ref.shape)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        norm_ref = np.linalg.norm(rows_ref, axis=1)
        norm_cand = np.linalg.norm(rows_cand, axis=1)
        cosine = np.sum(rows_ref * rows_cand, axis=1) / (norm_ref * norm_cand)
    cosine = np.where((norm_ref == 0) & (norm_cand == 0), 1.0, cosine)
    cosine = np.where((norm_ref == 0) != (norm_cand == 0), 0.0, cosine)
    cosine = np.clip(np.nan_to_num(cosine, nan=-1.0), -1.0, 1.0)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
    }
