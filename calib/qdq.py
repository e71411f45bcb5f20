"""Look at, check and fix the QuantizeLinear/DequantizeLinear (Q/DQ) nodes of an ONNX model.

TensorRT accepts only signed INT8 Q/DQ with zero point 0; onnxruntime also runs uint8 and
asymmetric ones. NNCF's ONNX output quantizes non-negative activations (after ReLU) as uint8
with zero point 0, so ``rewrite_uint8_to_int8`` turns those into the TensorRT form; for
onnxruntime, ``quantize_gemm_bias`` gives Gemms the int32 bias that lets them fuse into QGemm.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from calib.errors import CalibError
from edgerun import preflight

QDQ_OPS = preflight.QDQ_OPS
TARGETS = ("onnxruntime", "tensorrt")


def load_onnx(path: str | os.PathLike):
    """An ONNX ModelProto, checked by onnx.checker; CalibError naming the file if it is not one."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise CalibError(f"{path}: ONNX model not found")
    try:
        model = onnx.load(str(path))
    # ValidationError: onnx.load refuses external data that points outside the model's folder.
    except (DecodeError, OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as e:
        raise CalibError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "checker failed"
        raise CalibError(f"{path}: not a valid ONNX model ({first})") from None
    return model


def _as_model(path_or_model, name: str | None = None):
    """(model, label for messages)."""
    if isinstance(path_or_model, (str, os.PathLike)):
        return load_onnx(path_or_model), name or str(path_or_model)
    return path_or_model, name or f"ONNX model {path_or_model.graph.name or '<unnamed>'}"


def inspect_qdq(path_or_model) -> list[dict]:
    """One dict per QuantizeLinear/DequantizeLinear node, in graph order (for reports).

    Keys: name, op, input, output, dtype ("int8", "uint8", ...), zero_point (sorted unique values,
    None if not a constant), zero_point_zero, scale_shape, granularity ("per_tensor" /
    "per_channel" / "per_block"), axis (None for per-tensor), on_weight. The reading itself is
    edgerun.preflight's, the one the TensorRT check uses.
    """
    model, _ = _as_model(path_or_model)
    out = []
    for q in preflight.qdq_nodes(model):
        d = asdict(q)
        d.update(zero_point=None if q.zero_point is None else list(q.zero_point), zero_point_zero=q.zero_point_zero,
                 scale_shape=None if q.scale_shape is None else list(q.scale_shape))
        out.append(d)
    return out


def summary(entries: list[dict]) -> dict:
    """Counts over ``inspect_qdq``'s list, for reports."""
    count = lambda pred: sum(1 for e in entries if pred(e))  # noqa: E731
    return {
        "nodes": len(entries),
        "quantize": count(lambda e: e["op"] == "QuantizeLinear"),
        "dequantize": count(lambda e: e["op"] == "DequantizeLinear"),
        "int8": count(lambda e: e["dtype"] == "int8"),
        "uint8": count(lambda e: e["dtype"] == "uint8"),
        "nonzero_zero_point": count(lambda e: not e["zero_point_zero"]),
        "per_tensor": count(lambda e: e["granularity"] == "per_tensor"),
        "per_channel": count(lambda e: e["granularity"] == "per_channel"),
        "per_block": count(lambda e: e["granularity"] == "per_block"),
    }


def validate_qdq(path_or_model, target: str, *, name: str | None = None) -> dict:
    """Check the Q/DQ nodes for ``target``; returns ``summary``, raises CalibError listing offenders.

    tensorrt: edgerun.preflight's Q/DQ rules (signed int8, zero point 0, per-tensor activation
    scales, per-channel weight scales on the output axis). onnxruntime: anything goes.
    ``name`` replaces the path (or graph name) in messages.
    """
    if target not in TARGETS:
        raise CalibError(f"Q/DQ target must be one of {', '.join(TARGETS)}, got {target!r}")
    model, label = _as_model(path_or_model, name)
    entries = inspect_qdq(model)
    if target == "tensorrt":
        issues = preflight.qdq_issues(model)
        if issues:
            nodes = list(dict.fromkeys(i.node for i in issues))
            shown = "; ".join(f"{i.node} ({i.detail})" for i in issues[:preflight.SHOWN])
            more = f"; and {len(issues) - preflight.SHOWN} more" if len(issues) > preflight.SHOWN else ""
            raise CalibError(f"{label}: {len(nodes)} of {len(entries)} Q/DQ nodes are not valid for TensorRT: "
                             f"{shown}{more}")
    return summary(entries)


def rewrite_uint8_to_int8(model) -> list[str]:
    """Turn uint8 zero-point-0 Q/DQ into int8 zero-point-0 in place; returns the rewritten node names.

    uint8 [0, 255]·s and int8 [-128, 127]·s' cover the same non-negative range when
    s' = s·255/127: the activation keeps its range and loses one bit, as TensorRT's own symmetric
    INT8 does. Only constant zero points and scales used by nothing else are touched; anything
    else (asymmetric, shared scales, uint8 weights) is left for ``validate_qdq`` to report.
    """
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    qdq = [n for n in g.node if n.op_type in QDQ_OPS and len(n.input) > 2 and n.input[2] in inits]
    consumers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def zero_uint8(name):
        t = inits[name]
        return t.data_type == onnx.TensorProto.UINT8 and not numpy_helper.to_array(t).any()

    zps = {n.input[2] for n in qdq if zero_uint8(n.input[2])}
    while True:  # drop zero points whose scale or tensors are shared with something we do not rewrite
        keep = set()
        for zp in zps:
            nodes = [n for n in qdq if n.input[2] == zp]
            ok = all(n.input[1] in inits for n in nodes)
            for n in nodes:
                scale_users = consumers.get(n.input[1], [])
                ok &= all(u.op_type in QDQ_OPS and len(u.input) > 2 and u.input[2] in zps for u in scale_users)
                if n.op_type == "QuantizeLinear":
                    outs = consumers.get(n.output[0], [])
                    ok &= all(u.op_type == "DequantizeLinear" and u.input[2:3] == [zp] for u in outs)
                else:
                    ok &= n.input[0] not in inits  # a uint8 weight would need its data re-quantized
            if ok:
                keep.add(zp)
        if keep == zps:
            break
        zps = keep

    rewritten, scales, retype = [], set(), set(zps)
    for n in qdq:
        if n.input[2] in zps:
            rewritten.append(n.name)
            scales.add(n.input[1])
            if n.op_type == "QuantizeLinear":
                retype.add(n.output[0])
    for name in zps:
        t = inits[name]
        t.CopyFrom(numpy_helper.from_array(np.zeros(tuple(t.dims), np.int8), name))
    for name in scales:
        t = inits[name]
        s = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array((s * (255.0 / 127.0)).astype(s.dtype), name))
    # The stored types must follow, or onnxruntime rejects the model on load.
    for v in list(g.value_info) + list(g.input) + list(g.output):
        if v.name in retype and v.type.HasField("tensor_type"):
            v.type.tensor_type.elem_type = onnx.TensorProto.INT8
    return rewritten


# Ops between a DequantizeLinear and a Gemm that move values without changing them: the Gemm's
# input still carries that DequantizeLinear's scale.
_SCALE_KEEPING = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
_INT32 = np.iinfo(np.int32)


def quantize_gemm_bias(model) -> list[str]:
    """Feed each Gemm's float bias through an int32 DequantizeLinear, in place; returns the Gemm names.

    NNCF leaves a Gemm's bias in float, and onnxruntime then keeps the Gemm in FP32 with a run-time
    weight DequantizeLinear. With bias = DQ(int32 round(b / (s_x * s_w)), s_x * s_w, 0) it fuses
    the Gemm into QGemm (the form of onnxruntime's own quantizer). Measured on an AVX-512 CPU: the
    unpruned CNN went from 0.86x to 1.58x of FP32, outputs equal to 1.5e-7. For onnxruntime only:
    TensorRT's DequantizeLinear takes no int32 (keep float bias there). A Gemm is left as it is
    unless: its input comes (through reshapes) from a per-tensor DequantizeLinear, its weight is a
    constant int8 DequantizeLinear with zero point 0, alpha = beta = 1, and the int32 fits.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, int] = {}
    for n in g.node:
        for name in n.input:
            users[name] = users.get(name, 0) + 1

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def dq_scale(name, weight: bool):
        """The constant scale of the DequantizeLinear producing ``name`` (None if it is not one we can use)."""
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or (node.input[0] in inits) != weight:
            return None
        scale = const(node.input[1])
        zp = const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1, np.int8)
        if scale is None or zp is None or zp.any() or (weight and const(node.input[0]).dtype != np.int8):
            return None
        return scale

    rewritten = []
    for gemm in list(g.node):
        if gemm.op_type != "Gemm" or len(gemm.input) < 3 or gemm.input[2] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            continue
        x, chain = gemm.input[0], []
        while x in producer and producer[x].op_type in _SCALE_KEEPING:
            chain.insert(0, producer[x])
            x = producer[x].input[0]
        s_x, s_w, bias = dq_scale(x, weight=False), dq_scale(gemm.input[1], weight=True), const(gemm.input[2])
        if s_x is None or s_w is None or s_x.size != 1 or bias.ndim != 1 or s_w.size not in (1, bias.size):
            continue
        if s_w.size > 1:  # per-channel: the scales must run along the output (N) axis of the weight
            w_dq = producer[gemm.input[1]]
            axis = next((helper.get_attribute_value(a) for a in w_dq.attribute if a.name == "axis"), 1) % 2
            if axis != (0 if attrs.get("transB", 0) else 1):
                continue
        scale = (s_x.reshape(()) * np.broadcast_to(s_w.reshape(-1), bias.shape)).astype(np.float32)
        q = np.round(bias.astype(np.float64) / scale)
        if not np.all(np.isfinite(q)) or q.min() < _INT32.min or q.max() > _INT32.max:
            continue
        if chain and not _move_dq_down(g, producer[x], chain, users):
            continue
        base = f"{gemm.name or gemm.output[0]}_bias"
        g.initializer.extend([numpy_helper.from_array(q.astype(np.int32), f"{base}_int32"),
                              numpy_helper.from_array(scale, f"{base}_scale"),
                              numpy_helper.from_array(np.zeros(bias.shape, np.int32), f"{base}_zero_point")])
        dq = helper.make_node("DequantizeLinear", [f"{base}_int32", f"{base}_scale", f"{base}_zero_point"],
                              [f"{base}_dq"], name=f"DequantizeLinear_{base}", axis=0)
        old = gemm.input[2]
        gemm.input[2] = dq.output[0]
        g.node.insert(list(g.node).index(gemm), dq)
        if users.get(old) == 1:  # nothing else reads the float bias
            g.initializer.remove(inits.pop(old))
        rewritten.append(gemm.name)
    return rewritten


def _move_dq_down(g, dq, chain: list, users: dict) -> bool:
    """DQ -> Flatten/Reshape/... -> Gemm becomes Flatten/Reshape/... -> DQ -> Gemm, in place.

    onnxruntime fuses QGemm only when a DequantizeLinear feeds the Gemm directly (it moves DQ past
    a Reshape itself, not past a Flatten). A per-tensor DQ commutes with ops that only move values,
    so the result is exact. Done only when nothing else reads the tensors in between.
    """
    if any(users.get(t, 0) != 1 for t in [dq.output[0], *(n.output[0] for n in chain[:-1])]):
        return False
    quantized, dequantized, last = dq.input[0], dq.output[0], chain[-1]
    chain[0].input[0] = quantized
    dq.input[0] = last.output[0]
    for n in list(g.node):  # the Gemm now reads the DQ's output under the old name of the chain's end
        for i, name in enumerate(n.input):
            if name == last.output[0] and n is not dq:
                n.input[i] = dequantized
    g.node.remove(dq)
    g.node.insert(list(g.node).index(last) + 1, dq)
    # The moved tensors now hold int8/uint8 and the DQ's output a new shape: drop what the file says of them.
    moved = {dequantized, *(n.output[0] for n in chain)}
    for v in [v for v in g.value_info if v.name in moved]:
        g.value_info.remove(v)
    return True
