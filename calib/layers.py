"""Which layers to quantize: INT8 variants measured against FP32, the fastest within the accuracy drop.

Accuracy is whatever the caller's ``score`` says: a callable on a model's outputs on the validation
inputs (``{output name: array}``, the whole set) returning one float, ``higher_is_better`` saying
which way a drop points and ``max_drop`` in the score's own units. This library knows no labels and
no task (a classifier's caller passes top-1; pipeline/quantize_stage.py asks the run's task).

Keeping a layer in FP32 can make a model faster on a CPU: onnxruntime's INT8 kernels pay a
quantize/reorder at each FP32/INT8 boundary, and a tiny grayscale stem gains nothing from INT8.
Nothing here assumes INT8 pays: every variant is timed against the FP32 model with edgerun.timing
(interleaved blocks, median of per-round ratios), and when no variant is faster within the drop,
the answer is FP32.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calib import qdq
from calib.errors import CalibError
from calib.quantize import _fp32_value, _score_value, quantize_onnx, single_input_channel_convs


@dataclass(frozen=True)
class Variant:
    name: str
    keep_fp32: tuple[str, ...]
    score: float              # score(outputs) on the validation set, in the score's units
    drop: float               # how much worse than FP32 (score's units; < 0: better), in the score's direction
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
    fp32_score: float
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


def _outputs(runner, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of ``runner`` on ``x``, run in batches of 256, concatenated by name."""
    from edgerun.ort import infer_batched
    return infer_batched(runner, x, 256)


def choose_quantized_layers(src: str | os.PathLike, dst: str | os.PathLike, calib_inputs: np.ndarray,
                            val_inputs: np.ndarray, score: Callable[[dict[str, np.ndarray]], float], *,
                            max_drop: float, higher_is_better: bool = True, target: str = "onnxruntime",
                            candidates: dict[str, tuple[str, ...]] | None = None,
                            threads: int = 1, batch: int = 1, rounds: int = 25, block_ms: float = 30.0,
                            work_dir: str | os.PathLike | None = None,
                            reduce_range: bool | None = None) -> LayerChoice:
    """Quantize ``src`` once per candidate (name -> keep_fp32 node names), measure each, write the winner to ``dst``.

    Accuracy: ``score(outputs)``, ``outputs`` every output of a model on all of ``val_inputs`` (run in
    batches of 256, concatenated by name), against FP32's; a variant is within the drop when it is at
    most ``max_drop`` worse (the score's units; lower scores are worse unless ``higher_is_better`` is
    False). A classifier's caller passes top-1 against its labels, e.g. as a fraction with
    ``max_drop=0.003`` (0.3 pt). The FP32 model's score must be a finite float; it is taken first,
    before anything is quantized. Latency: onnxruntime CPU, ``threads`` intra-op threads, batch
    ``batch`` of validation images, every variant and FP32 interleaved in one process
    (edgerun.timing.compare, ``rounds`` rounds of >= ``block_ms`` blocks). The winner is the lowest
    median ratio to FP32 among the variants within the drop, if that ratio is below 1; else FP32 and
    ``dst`` is not written.
    ``reduce_range``: quantize_onnx's (None: as this CPU needs).
    """
    from edgerun import timing
    from edgerun.io import copy_file

    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < math.inf:
        raise CalibError(f"max_drop must be a number >= 0 in the score's units, got {max_drop!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CalibError(f"batch must be a positive integer, got {batch!r}")
    if not callable(score):
        raise CalibError(f"score: expected a callable on a model's outputs, got {type(score).__name__}")
    x_val = np.asarray(val_inputs, np.float32)
    if x_val.ndim == 0 or len(x_val) < batch:
        raise CalibError(f"val_inputs: expected N >= {batch} inputs, got shape {list(x_val.shape)}")
    model = qdq.load_onnx(src)   # a missing or corrupt file: calib's own one line, before onnxruntime's
    candidates = default_candidates(model) if candidates is None else dict(candidates)
    if not candidates:
        raise CalibError("candidates: expected at least one variant (name -> keep_fp32 node names)")
    sessions = {"fp32": _session(src, threads)}
    scores = {"fp32": _fp32_value(score(_outputs(sessions["fp32"], x_val)))}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        paths = {}
        for name, keep in candidates.items():
            paths[name] = Path(quantize_onnx(src, Path(tmp) / f"{name}.onnx", calib_inputs, target=target,
                                             keep_fp32=tuple(keep), reduce_range=reduce_range)["path"])
        sessions.update((name, _session(p, threads)) for name, p in paths.items())
        scores.update((name, _score_value(score(_outputs(sessions[name], x_val)), f"{name}'s outputs"))
                      for name in candidates)
        feed = {sessions["fp32"].input_names[0]: x_val[:batch]}
        runs = {name: (lambda s=s: s.infer(feed)) for name, s in sessions.items()}   # what the profile stage times
        comparison = timing.compare(runs, reference="fp32", block_ms=block_ms, rounds=rounds)
        variants = []
        for name, keep in candidates.items():
            r = comparison.ratio(name)
            drop = scores["fp32"] - scores[name] if higher_is_better else scores[name] - scores["fp32"]
            # A NaN score (a variant whose outputs are NaN) is never within the drop.
            variants.append(Variant(name, tuple(keep), scores[name], drop, r.median, r.p10, r.p90, r.p50_ms,
                                    bool(drop <= max_drop + 1e-9)))
        fit = sorted((v for v in variants if v.within_drop), key=lambda v: v.ratio)
        best = fit[0] if fit and fit[0].ratio < 1 else None
        if best is not None:
            copy_file(paths[best.name], dst)
    measured = (f"onnxruntime CPU, {threads} thread(s), batch {batch}, {comparison.rounds} interleaved rounds of "
                f">= {block_ms:g} ms blocks in one process; ratio = median of per-round ratios to FP32")
    return LayerChoice(best.name if best else "fp32", best.keep_fp32 if best else (),
                       str(dst) if best else None, scores["fp32"], comparison.ratio("fp32").p50_ms,
                       tuple(variants), measured)
