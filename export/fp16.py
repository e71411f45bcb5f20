"""FP16-typed ONNX, the way precision reaches TensorRT 11 (no FP16 builder flag any more):
a strongly typed network runs each layer at the type of its ONNX tensors.

onnxconverter-common's converter is used (NVIDIA's ModelOpt AutoCast is the heavier
alternative); inputs and outputs stay FP32 so that callers feed and read the same arrays.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from edgerun.io import atomic_write
from export.errors import ExportError, brief
from export.onnx_export import _check, check_onnx


def to_fp16(src, dst, keep_io_types=True) -> dict:
    """Write an FP16 copy of the FP32 ONNX `src` to `dst`; returns dst's info (see check_onnx)."""
    from onnxconverter_common import float16

    src, dst = Path(src), Path(dst)
    check_onnx(src)
    model = onnx.load(str(src))
    _give_outputs_their_own_tensor(model)
    try:
        converted = float16.convert_float_to_float16(model, keep_io_types=keep_io_types)
    except Exception as e:
        raise ExportError(f"{src.name}: FP16 conversion failed ({brief(e)})") from e
    dst.parent.mkdir(parents=True, exist_ok=True)
    result = {}

    def write(tmp: str) -> None:
        onnx.save(converted, tmp)
        result.update(_check(Path(tmp), dst.name))
    atomic_write(dst, write)
    info = result
    info.update(path=str(dst), size_bytes=dst.stat().st_size)
    return info


def _give_outputs_their_own_tensor(model: onnx.ModelProto) -> None:
    # With keep_io_types, onnxconverter-common 1.16 casts a graph output back to FP32 in place,
    # and nodes that also read that tensor inside the graph then get FP32 where they expect FP16
    # (seen on a model returning (embeddings, logits): "Concat: inputs has inconsistent type").
    # Routing each such output through an Identity keeps the inner tensor FP16.
    graph = model.graph
    read_inside = {name for node in graph.node for name in node.input}
    produced = {name for node in graph.node for name in node.output}
    for output in graph.output:
        if output.name not in read_inside or output.name not in produced:
            continue
        inner = f"{output.name}__inner"
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == output.name:
                    node.output[i] = inner
            for i, name in enumerate(node.input):
                if name == output.name:
                    node.input[i] = inner
        graph.node.append(onnx.helper.make_node("Identity", [inner], [output.name]))
