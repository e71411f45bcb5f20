"""Look at, check and fix the QuantizeLinear/DequantizeLinear (Q/DQ) nodes of an ONNX model.

TensorRT accepts only signed INT8 Q/DQ with zero point 0; onnxruntime also runs uint8 and
asymmetric ones. NNCF's ONNX output quantizes non-negative activations (after ReLU) as uint8
with zero point 0, so ``rewrite_uint8_to_int8`` turns those into the TensorRT form.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from calib.errors import CalibError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
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


def _constants(model) -> dict:
    """name -> TensorProto for initializers and Constant nodes (where NNCF and exporters put scales)."""
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    return consts


def _elem_types(model, consts) -> dict:
    """name -> ONNX element type for every tensor whose type the file states."""
    types = {name: t.data_type for name, t in consts.items()}
    g = model.graph
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type"):
            types.setdefault(v.name, v.type.tensor_type.elem_type)
    return types


def _type_name(elem_type: int | None) -> str | None:
    import onnx
    return None if elem_type is None else onnx.TensorProto.DataType.Name(elem_type).lower()


def inspect_qdq(path_or_model) -> list[dict]:
    """One dict per QuantizeLinear/DequantizeLinear node, in graph order.

    Keys: name, op, input (the tensor it quantizes), dtype ("int8", "uint8", ...), zero_point
    (sorted unique values, None if not a constant), zero_point_zero (all zero?), scale_shape,
    granularity ("per_tensor" / "per_channel" / "per_block"), axis (None for per-tensor).
    """
    import onnx
    from onnx import numpy_helper

    model, _ = _as_model(path_or_model)
    consts = _constants(model)
    types = _elem_types(model, consts)
    entries = []
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scale = consts.get(node.input[1]) if len(node.input) > 1 else None
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zp_name is not None:
            zp_tensor = consts.get(zp_name)
            dtype = zp_tensor.data_type if zp_tensor is not None else types.get(zp_name)
            values = None if zp_tensor is None else np.unique(numpy_helper.to_array(zp_tensor)).tolist()
        else:
            # ONNX: no zero point means 0; the type is then output_dtype (Q, default uint8) or x's (DQ).
            values = [0]
            if node.op_type == "QuantizeLinear":
                dtype = attrs.get("output_dtype") or onnx.TensorProto.UINT8
            else:
                dtype = types.get(node.input[0])
        if node.op_type == "QuantizeLinear" and dtype is not None:
            types.setdefault(node.output[0], dtype)  # lets a following DQ without zero point find its type
        scale_shape = list(scale.dims) if scale is not None else None
        if scale_shape is None or int(np.prod(scale_shape)) == 1:
            granularity, axis = "per_tensor", None
        elif len(scale_shape) == 1:
            granularity, axis = "per_channel", int(attrs.get("axis", 1))
        else:
            granularity, axis = "per_block", int(attrs.get("axis", 1))
        entries.append({
            "name": node.name, "op": node.op_type, "input": node.input[0],
            "dtype": _type_name(dtype), "zero_point": values,
            "zero_point_zero": values is not None and all(v == 0 for v in values),
            "scale_shape": scale_shape, "granularity": granularity, "axis": axis,
        })
    return entries


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

    tensorrt: every Q/DQ must be signed (not uint8) with zero point 0. onnxruntime: anything goes.
    ``name`` replaces the path (or graph name) in messages.
    """
    if target not in TARGETS:
        raise CalibError(f"Q/DQ target must be one of {', '.join(TARGETS)}, got {target!r}")
    model, label = _as_model(path_or_model, name)
    entries = inspect_qdq(model)
    if target == "tensorrt":
        bad = [e for e in entries if e["dtype"] == "uint8" or not e["zero_point_zero"]]
        if bad:
            shown = ", ".join(f"{e['name']} ({e['dtype']}, zero point {e['zero_point']})" for e in bad[:8])
            more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
            raise CalibError(f"{label}: {len(bad)} of {len(entries)} Q/DQ nodes are not valid for TensorRT "
                             f"(signed int8 with zero point 0 expected): {shown}{more}")
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
