"""Which layers to quantize: INT8 variants measured against FP32, the fastest within the accuracy drop.

Keeping a layer in FP32 can make a model faster on a CPU: onnxruntime's INT8 kernels pay a
quantize/reorder at each FP32/INT8 boundary, and a tiny grayscale stem gains nothing from INT8.
Nothing here assumes INT8 pays: every variant is timed against the FP32 model with edgerun.timing
(interleaved blocks, median of per-round ratios), and when no variant is faster within the drop,
the answer is FP32.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calib import qdq
from calib.errors import CalibError
from calib.quantize import quantize_onnx, single_input_channel_convs


@dataclass(frozen=True)
class Variant:
    name: str
    keep_fp32: tuple[str, ...]
    top1: float               # on the validation set, as a fraction
    drop_pt: float            # FP32 top-1 minus this one, in points
    ratio: float              # median per-round latency ratio to FP32 (< 1: faster than FP32)
    ratio_p10: float
    ratio_p90: float
    p50_ms: float             # per call, median over rounds
    within_drop: bool


@dataclass(frozen=True)
class LayerChoice:
    chosen: str                       # a variant's name, or "fp32" when no INT8 variant pays
    keep_fp32: tuple[str, ...]
    path: str | None                  # the chosen INT8 model (None when FP32 is chosen)
    fp32_top1: float
    fp32_p50_ms: float
    variants: tuple[Variant, ...]
    measured: str                     # how the latency was measured


def default_candidates(path_or_model) -> dict[str, tuple[str, ...]]:
    """All INT8; the single-channel stem in FP32; the Gemm classifier(s) in FP32."""
    model, _ = qdq._as_model(path_or_model)
    out = {"all_int8": ()}
    stem = single_input_channel_convs(model)
    if stem:
        out["stem_fp32"] = stem
    gemms = tuple(n.name for n in model.graph.node if n.op_type == "Gemm")
    if gemms:
        out["gemm_fp32"] = gemms
    return out


def _session(path, threads: int):
    from edgerun.ort import OrtRunner
    return OrtRunner(path, threads=threads, inter_threads=1)


def _top1(runner, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 from the output named "logits", else the last one (an encoder returns tokens first)."""
    name = runner.input_names[0]
    outputs = runner.output_names
    logits = "logits" if "logits" in outputs else outputs[-1]
    pred = np.concatenate([runner.infer({name: x[i:i + 256]})[logits].argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).mean())


def choose_quantized_layers(src: str | os.PathLike, dst: str | os.PathLike, calib_inputs: np.ndarray,
                            val_inputs: np.ndarray, val_labels: np.ndarray, *, target: str = "onnxruntime",
                            max_drop: float = 0.003, candidates: dict[str, tuple[str, ...]] | None = None,
                            threads: int = 1, batch: int = 1, rounds: int = 25, block_ms: float = 30.0,
                            work_dir: str | os.PathLike | None = None,
                            reduce_range: bool | None = None) -> LayerChoice:
    """Quantize ``src`` once per candidate (name -> keep_fp32 node names), measure each, write the winner to ``dst``.

    Accuracy: top-1 on (``val_inputs``, ``val_labels``) against FP32's, ``max_drop`` a fraction
    (0.003 = 0.3 pt). Latency: onnxruntime CPU, ``threads`` intra-op threads, batch ``batch`` of
    validation images, every variant and FP32 interleaved in one process (edgerun.timing.compare,
    ``rounds`` rounds of >= ``block_ms`` blocks). The winner is the lowest median ratio to FP32
    among the variants within the drop, if that ratio is below 1; else FP32 and ``dst`` is not written.
    ``reduce_range``: quantize_onnx's (None: as this CPU needs).
    """
    from edgerun import timing
    from edgerun.io import copy_file

    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < 1:
        raise CalibError(f"max_drop must be a fraction in [0, 1), got {max_drop!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CalibError(f"batch must be a positive integer, got {batch!r}")
    x_val, y_val = np.asarray(val_inputs, np.float32), np.asarray(val_labels)
    if len(x_val) < batch or y_val.shape != (len(x_val),):
        raise CalibError(f"val_inputs/val_labels: expected N >= {batch} inputs and N labels, "
                         f"got {list(x_val.shape)} and {list(y_val.shape)}")
    candidates = default_candidates(src) if candidates is None else dict(candidates)
    if not candidates:
        raise CalibError("candidates: expected at least one variant (name -> keep_fp32 node names)")
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        paths = {"fp32": Path(src)}
        for name, keep in candidates.items():
            paths[name] = Path(quantize_onnx(src, Path(tmp) / f"{name}.onnx", calib_inputs, target=target,
                                             keep_fp32=tuple(keep), reduce_range=reduce_range)["path"])
        sessions = {name: _session(p, threads) for name, p in paths.items()}
        top1 = {name: _top1(s, x_val, y_val) for name, s in sessions.items()}
        feed = {sessions["fp32"].input_names[0]: x_val[:batch]}
        runs = {name: (lambda s=s: s.infer(feed)) for name, s in sessions.items()}   # what the profile stage times
        comparison = timing.compare(runs, reference="fp32", block_ms=block_ms, rounds=rounds)
        variants = []
        for name, keep in candidates.items():
            r = comparison.ratio(name)
            drop = (top1["fp32"] - top1[name]) * 100
            variants.append(Variant(name, tuple(keep), top1[name], round(drop, 3), r.median, r.p10, r.p90, r.p50_ms,
                                    drop <= max_drop * 100 + 1e-9))
        fit = sorted((v for v in variants if v.within_drop), key=lambda v: v.ratio)
        best = fit[0] if fit and fit[0].ratio < 1 else None
        if best is not None:
            copy_file(paths[best.name], dst)
    measured = (f"onnxruntime CPU, {threads} thread(s), batch {batch}, {comparison.rounds} interleaved rounds of "
                f">= {block_ms:g} ms blocks in one process; ratio = median of per-round ratios to FP32")
    return LayerChoice(best.name if best else "fp32", best.keep_fp32 if best else (),
                       str(dst) if best else None, top1["fp32"], comparison.ratio("fp32").p50_ms,
                       tuple(variants), measured)
