"""Which INT8 weight range is exact on the CPU that runs the model, and a check of the kernels that ran.

onnxruntime fuses uint8-activation x int8-weight Q/DQ into QLinearConv, QGemm and MatMulInteger
(u8s8). On x86 without VNNI or AMX those kernels multiply with vpmaddubsw, which adds two u8*s8
products into an int16 and saturates at 32767: two full-range products reach 2 * 255 * 127 = 64770,
so the sum is clipped and the output silently wrong (seen on an AVX2-only AMD EPYC: a QGemm's logits
1.37 away from the unfused model's). With weights quantized to half the range, |q| <= 64 (NNCF's
overflow fix), two products reach at most 2 * 255 * 64 = 32640 <= 32767: exact on every CPU, for one
bit of weight resolution. VNNI (vpdpbusd) and AMX accumulate in int32 and ARM widens first: the full
range is exact there. TensorRT runs on a GPU, whose int8 dot products accumulate in int32.

The unfused form (Q/DQ evaluated as DequantizeLinear -> float op -> QuantizeLinear, onnxruntime with
graph optimizations off) is the arithmetic ONNX defines; ``kernel_parity`` compares the fused
kernels with it on this machine, so whatever the flags say, a wrong kernel is measured, not assumed.
"""
from __future__ import annotations

import platform

import numpy as np

from calib.errors import CalibError
from edgerun.machine import INT32_DOT_FLAGS, cpu_flags, int16_int8_dot

REDUCED = "reduced_range_7bit"
FULL = "full_range"
WEIGHT_BOUND = 64   # |q| of an int8 weight in the reduced form: 2 * 255 * 64 <= 32767 (module docstring)


def weight_form(target: str, reduce_range: bool | None, *, flags: frozenset[str] | None = None,
                arch: str | None = None) -> tuple[bool, dict]:
    """(whether to quantize weights to |q| <= 64, {"weights", "reason"} for the record).

    ``reduce_range`` None decides from the CPU: for onnxruntime, reduced on x86 without VNNI/AMX;
    for TensorRT, full range. ``flags``/``arch`` stand in for this machine's (tests).
    """
    if reduce_range is not None and not isinstance(reduce_range, bool):
        raise CalibError(f"reduce_range must be True, False or None (decide from the CPU), got {reduce_range!r}")
    if reduce_range is not None:
        return reduce_range, {"weights": REDUCED if reduce_range else FULL, "reason": "asked for (reduce_range)"}
    if target == "tensorrt":
        return False, {"weights": FULL, "reason": "TensorRT: GPU int8 dot products accumulate in int32"}
    if int16_int8_dot(flags, arch):
        return True, {"weights": REDUCED,
                      "reason": "x86 without VNNI/AMX: u8s8 kernels sum product pairs in int16 (saturates)"}
    flags = cpu_flags() if flags is None else flags
    have = [f for f in INT32_DOT_FLAGS if f in flags]
    where = have[0] if have else f"{arch or platform.machine()} (not x86)"
    return False, {"weights": FULL, "reason": f"{where}: int8 dot products accumulate in int32"}


def int8_weight_max(model) -> int:
    """The largest |q| of the constant int8 tensors that DequantizeLinear nodes read (the weights)."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    weights = [inits[n.input[0]] for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    return max((int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max())
                for t in weights if t.data_type == TensorProto.INT8 and np.prod(t.dims) > 0), default=0)


def reduce_weight_range(model) -> list[str]:
    """Bring every constant int8 weight a DequantizeLinear reads within |q| <= 64, in place; returns their names.

    For the weights NNCF's overflow fix leaves at full range (depthwise convs are not among its op
    types). Per scale: q' = round(q * 64 / max|q|), s' = s * max|q| / 64: two roundings, so a weight
    may land 0.75 of the new step from its float value instead of 0.5. A weight whose tensor or scale
    something else reads, or whose zero point is not 0, is left for the caller's bound check to refuse.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users: dict[str, int] = {}
    for n in g.node:
        for name in n.input:
            users[name] = users.get(name, 0) + 1
    done = []
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or n.input[1] not in inits:
            continue
        weight, scale = inits[n.input[0]], inits[n.input[1]]
        if weight.data_type != TensorProto.INT8 or users[weight.name] > 1 or users[scale.name] > 1:
            continue
        zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] in inits else np.zeros(1)
        q = numpy_helper.to_array(weight).astype(np.float64)
        s = numpy_helper.to_array(scale)
        if zp.any() or q.size == 0 or np.abs(q).max() <= WEIGHT_BOUND:
            continue
        if s.size == 1:
            peak = np.abs(q).max().reshape(s.shape)
        else:   # per channel along the DequantizeLinear's axis
            axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 1) % q.ndim
            peak = np.abs(q).max(axis=tuple(i for i in range(q.ndim) if i != axis)).reshape(s.shape)
        ratio = np.maximum(peak, WEIGHT_BOUND) / WEIGHT_BOUND     # channels already within the bound keep theirs
        shape = [1] * q.ndim
        if s.size > 1:
            shape[axis] = s.size
        q_new = np.clip(np.round(q / ratio.reshape(shape)), -WEIGHT_BOUND, WEIGHT_BOUND).astype(np.int8)
        weight.CopyFrom(numpy_helper.from_array(q_new, weight.name))
        scale.CopyFrom(numpy_helper.from_array((s * ratio).astype(s.dtype), scale.name))
        done.append(n.name)
    return done


def outputs(path_or_bytes, x: np.ndarray, *, fused: bool, batch: int = 256) -> dict[str, np.ndarray]:
    """The model's outputs over ``x`` in batches: ``fused`` = as deployed (all graph optimizations),
    else the unfused Q/DQ arithmetic ONNX defines (no graph optimization at all)."""
    from edgerun.ort import run_onnx

    return run_onnx(path_or_bytes, x, batch_size=batch, graph_optimization=fused)


def kernel_parity(fused: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    """``outputs(fused=True)`` (the kernels this CPU runs) against ``outputs(fused=False)`` (the Q/DQ arithmetic).

    Scored on the output named "logits", else the last one: max_abs, relative (max_abs over the
    largest reference value) and agreement (% of equal argmax). Requantization rounds differ by a
    step here and there (relative ~5e-4 on a small CNN); a saturating kernel was ~5e-2.
    """
    key = "logits" if "logits" in reference else list(reference)[-1]
    a, b = fused[key].astype(np.float64), reference[key].astype(np.float64)
    max_abs = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    agree = float((a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)).mean() * 100)
    return {"max_abs": round(max_abs, 6), "relative": round(max_abs / scale, 6) if scale else None,
            "agreement": round(agree, 4), "n": len(a)}
