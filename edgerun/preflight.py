"""Static TensorRT pre-flight: would TensorRT's ONNX parser take this model? No GPU, no TensorRT.

Polygraphy's lint needs TensorRT itself; this check needs only onnx and numpy, so it runs on the
build machine, in CI and first thing on the target (``build_engine.sh`` calls ``edgerun check``).
It checks every node against TensorRT's documented ONNX operator support, kept as data in
``trt_onnx_support.json`` (op type, the type of its data input, the restrictions a static check
can decide), the model's opset, and the Q/DQ rules of TensorRT's explicit quantization:

* Q/DQ must be signed INT8 (or FP8/INT4/FP4) with zero point 0: no uint8, no asymmetric ones;
* activation scales per tensor; weight scales per tensor or per channel on the weight's output
  axis (Conv 0, ConvTranspose 1, Gemm 0 with transB=1 else 1, MatMul the last axis).

A pass means "nothing here contradicts the documentation", not "the engine builds": the build on
the target stays the proof. The graph's precision is reported because TensorRT 11 runs every layer
at its ONNX type (an FP32 graph builds FP32 there: there is no --fp16 flag).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgerun.errors import EdgeError, brief

TABLE_PATH = Path(__file__).with_name("trt_onnx_support.json")
MAJORS = (10, 11)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
SHOWN = 8           # issues named in one summary line

# ONNX element type name -> the type names of the table. DOUBLE: TensorRT casts it down to FLOAT.
TRT_TYPES = {"FLOAT": "FP32", "DOUBLE": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "INT32": "INT32",
             "INT64": "INT64", "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL", "FLOAT8E4M3FN": "FP8",
             "INT4": "INT4", "FLOAT4E2M1": "FP4"}
QDQ_TYPES = ("int8", "float8e4m3fn", "int4", "float4e2m1")   # what TensorRT quantizes to
# Where a weight's output channels are, per consuming op and weight input slot.
WEIGHT_AXIS = {"Conv": lambda node, rank: 0, "ConvTranspose": lambda node, rank: 1,
               "Gemm": lambda node, rank: 0 if _attr(node, "transB", 0) else 1,
               "MatMul": lambda node, rank: rank - 1}


class PreflightError(EdgeError):
    """A model or bundle the pre-flight cannot read, or a bad argument."""


@dataclass(frozen=True)
class Issue:
    node: str       # node name (or "#index" for an unnamed node, "<model>" for the whole graph)
    op_type: str
    rule: str       # unknown-op, unsupported-op, custom-op, type, attribute, opset, qdq-type, zero-point, ...
    detail: str

    def line(self) -> str:
        return f"{self.node} ({self.op_type}) {self.rule}: {self.detail}" if self.op_type else \
            f"{self.node} {self.rule}: {self.detail}"


@dataclass(frozen=True)
class Preflight:
    """The result of one check; truthy when it passed."""
    name: str
    trt_major: int
    table_version: str
    precision: str              # e.g. "fp32", "fp16+fp32", "int8 Q/DQ + fp32"
    issues: tuple[Issue, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.issues

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        verdict = "pre-flight passed" if self.ok else f"{len(self.issues)} issue(s)"
        return f"{self.name}: TensorRT {self.trt_major} (table {self.table_version}), {self.precision}: {verdict}"

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class QdqNode:
    """One QuantizeLinear/DequantizeLinear node as TensorRT sees it."""
    name: str
    op: str
    input: str                              # the tensor it (de)quantizes
    output: str
    dtype: str | None                       # quantized type: "int8", "uint8", ... (None: unknown)
    zero_point: tuple[int, ...] | None      # sorted unique values; None if not a constant
    scale_shape: tuple[int, ...] | None     # None if the scale is not a constant
    granularity: str                        # per_tensor | per_channel | per_block
    axis: int | None                        # as written (may be negative); None for per-tensor
    on_weight: bool                         # quantizes a constant (a weight), not an activation
    zero_point_shape: tuple[int, ...] | None = None   # ONNX: the scale's shape

    @property
    def zero_point_zero(self) -> bool:
        return self.zero_point is not None and all(v == 0 for v in self.zero_point)


@dataclass(frozen=True)
class SupportTable:
    major: int
    version: str
    verified: bool
    source: str
    opset: tuple[int, int]
    ops: dict


@functools.lru_cache(maxsize=None)
def load_table(trt_major: int) -> SupportTable:
    """TensorRT ``trt_major``'s operator table from trt_onnx_support.json."""
    if trt_major not in MAJORS:
        raise PreflightError(f"--trt-major: expected one of {', '.join(map(str, MAJORS))}, got {trt_major!r}")
    try:
        tables = json.loads(TABLE_PATH.read_text())["tables"]
        t = tables[str(trt_major)]
        # A major may be written as another's rows plus the changes its release notes list.
        ops = {**tables[t["ops_from"]]["ops"], **t.get("changes", {})} if "ops_from" in t else t["ops"]
        return SupportTable(trt_major, t["version"], bool(t["verified"]), t["source"], tuple(t["opset"]), ops)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreflightError(f"{TABLE_PATH}: not a readable operator table ({brief(e)})") from None


# ---------------------------------------------------------------- reading the graph

def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _nodes(graph):
    """Every node, those of If/Loop/Scan bodies included."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _nodes(g)


class _Graph:
    """Constants, element types, producers and consumers of a model's main graph, looked up once."""

    def __init__(self, model):
        g = model.graph
        self.consts = {t.name: t for t in g.initializer}
        for node in _nodes(g):
            if node.op_type == "Constant" and node.output:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.consts[node.output[0]] = value
        self.types = {name: t.data_type for name, t in self.consts.items()}
        for v in [*g.input, *g.output, *g.value_info]:
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                self.types.setdefault(v.name, v.type.tensor_type.elem_type)
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in _nodes(g):
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))

    @staticmethod
    def type_name(elem_type: int | None) -> str | None:
        return None if elem_type is None else onnx.TensorProto.DataType.Name(elem_type).lower()

    def array(self, name: str):
        return numpy_helper.to_array(self.consts[name]) if name in self.consts else None


def _load(path_or_model, name: str | None):
    """(model with local functions inlined and types inferred, label, notes)."""
    notes = []
    if isinstance(path_or_model, (str, os.PathLike)):
        path = Path(path_or_model)
        label = name or path.name
        if not path.is_file():
            raise PreflightError(f"{path}: ONNX model not found")
        try:
            model = onnx.load(str(path))
        except Exception as e:  # protobuf, external data and OS errors all mean "not a model we can read"
            raise PreflightError(f"{path}: not a readable ONNX model ({brief(e)})") from None
        try:  # first: a node without its inputs or an attribute of the wrong type would crash the analysis
            onnx.checker.check_model(str(path))
        except Exception as e:  # ValidationError, and protobuf's own errors on a malformed file
            raise PreflightError(f"{path}: not a valid ONNX model (onnx.checker: {brief(e)})") from None
    else:
        model, label = path_or_model, name or (path_or_model.graph.name or "ONNX model")
    if model.functions:
        from onnx import inliner
        model = inliner.inline_local_functions(model)  # TensorRT's parser imports local functions too
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # a graph onnx cannot type: check what the file states
        notes.append(f"shape inference failed ({brief(e)}): types checked where the file states them")
    return model, label, notes


# ---------------------------------------------------------------- Q/DQ

def qdq_nodes(model, graph: _Graph | None = None) -> list[QdqNode]:
    """The QuantizeLinear/DequantizeLinear nodes of the main graph, in order."""
    g = graph or _Graph(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        scale = g.consts.get(node.input[1]) if len(node.input) > 1 else None
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zp_name is not None:
            zp = g.array(zp_name)
            dtype = g.types.get(zp_name)
            values = None if zp is None else tuple(int(v) for v in np.unique(zp))
        else:  # ONNX: no zero point means 0, of type output_dtype (Q, default uint8) or x's (DQ)
            values = (0,)
            dtype = (_attr(node, "output_dtype") or onnx.TensorProto.UINT8) if node.op_type == "QuantizeLinear" \
                else g.types.get(node.input[0])
        if node.op_type == "QuantizeLinear" and dtype is not None:
            g.types.setdefault(node.output[0], dtype)   # lets the DQ that follows find its type
        shape = tuple(scale.dims) if scale is not None else None
        if shape is None or int(np.prod(shape)) == 1:
            granularity, axis = "per_tensor", None
        else:
            granularity, axis = ("per_channel" if len(shape) == 1 else "per_block"), int(_attr(node, "axis", 1))
        source = g.producer.get(node.input[0])
        on_weight = node.input[0] in g.consts or (
            node.op_type == "DequantizeLinear" and source is not None and source.op_type == "QuantizeLinear"
            and source.input[0] in g.consts)
        out.append(QdqNode(node.name, node.op_type, node.input[0], node.output[0], g.type_name(dtype), values,
                           shape, granularity, axis, on_weight,
                           tuple(zp.shape) if zp_name is not None and zp is not None else None))
    return out


def qdq_issues(model, graph: _Graph | None = None) -> list[Issue]:
    """What in the Q/DQ nodes TensorRT does not accept (see the module docstring)."""
    g = graph or _Graph(model)
    issues = []
    for q in qdq_nodes(model, g):
        def issue(rule, detail, q=q):
            issues.append(Issue(q.name, q.op, rule, detail))
        if q.dtype == "uint8":
            issue("qdq-type", "uint8; TensorRT needs signed int8 (zero point 0)")
        elif q.dtype == "int32":
            issue("qdq-type", "int32 (a quantized bias?); TensorRT's DequantizeLinear takes INT8/FP8/INT4/FP4: "
                              "keep the bias in float")
        elif q.dtype not in QDQ_TYPES:
            issue("qdq-type", f"{q.dtype or 'unknown type'}; TensorRT quantizes to {', '.join(QDQ_TYPES)}")
        if q.zero_point is None:
            issue("zero-point", "zero point is not a constant; TensorRT needs a constant 0")
        elif not q.zero_point_zero:
            issue("zero-point", f"zero point {list(q.zero_point[:4])}; TensorRT needs 0 (symmetric)")
        elif q.zero_point_shape not in (None, q.scale_shape) and q.scale_shape is not None:
            issue("zero-point", f"zero point of shape {list(q.zero_point_shape)} for a scale of shape "
                                f"{list(q.scale_shape)}; ONNX needs the same shape")
        if q.scale_shape is None:
            issue("scale", "scale is not a constant")
        elif not q.on_weight and q.granularity != "per_tensor":
            issue("activation-scale", f"{q.granularity} activation scale of shape {list(q.scale_shape)}; "
                                      "TensorRT needs one scale per activation tensor")
        elif q.on_weight and q.granularity == "per_block" and q.dtype == "int8":
            issue("weight-scale", "per-block INT8 weights; TensorRT quantizes blocks only for INT4/FP4 weights")
        elif q.on_weight and q.granularity == "per_channel" and q.op == "DequantizeLinear":
            issues.extend(_weight_axis_issues(q, g))
    return issues


def _weight_axis_issues(q: QdqNode, g: _Graph) -> list[Issue]:
    """A per-channel weight DQ: its scales must count the weight's output channels, on that axis."""
    weight = q.input if q.input in g.consts else g.producer[q.input].input[0]  # DQ(w) or DQ(Q(w))
    if weight not in g.consts:
        return []
    shape = tuple(g.consts[weight].dims)
    axis = q.axis % len(shape) if -len(shape) <= q.axis < len(shape) else None
    if axis is None or shape[axis] != q.scale_shape[0]:
        return [Issue(q.name, q.op, "weight-scale", f"{q.scale_shape[0]} scales on axis {q.axis} of a weight of "
                                                    f"shape {list(shape)}")]
    out = []
    for consumer, slot in g.consumers.get(q.output, []):
        want = WEIGHT_AXIS[consumer.op_type](consumer, len(shape)) if consumer.op_type in WEIGHT_AXIS else axis
        if slot == 1 and axis != want:
            out.append(Issue(q.name, q.op, "weight-axis", f"per-channel scale on axis {q.axis} of "
                             f"{consumer.op_type} '{consumer.name}' weight; its output channels are axis {want}"))
    return out


# ---------------------------------------------------------------- the check

def graph_precision(model, graph: _Graph | None = None) -> str:
    """The float types layers compute in ("fp32", "fp16+fp32", ...), led by "int8 Q/DQ + " when quantized."""
    g = graph or _Graph(model)
    names = {"float": "fp32", "double": "fp64", "float16": "fp16", "bfloat16": "bf16"}
    floats, quantized = set(), False
    for node in model.graph.node:
        quantized |= node.op_type in QDQ_OPS
        if node.op_type in (*QDQ_OPS, "Cast", "Constant"):
            continue
        for out in node.output:
            t = g.type_name(g.types.get(out))
            if t in names:
                floats.add(names[t])
    text = "+".join(sorted(floats)) or "no float tensors typed"
    return f"int8 Q/DQ + {text}" if quantized else text


def _node_issues(node, index: int, table: SupportTable, g: _Graph) -> list[Issue]:
    name = node.name or f"#{index}"
    issue = lambda rule, detail: Issue(name, node.op_type, rule, detail)  # noqa: E731
    if node.domain not in ("", "ai.onnx"):
        return [issue("custom-op", f"domain {node.domain!r}: TensorRT needs a plugin for it")]
    entry = table.ops.get(node.op_type)
    if entry is None:
        return [issue("unknown-op", f"not in TensorRT {table.version}'s ONNX operator table")]
    if not entry["supported"]:
        return [issue("unsupported-op", f"TensorRT {table.version} does not support {node.op_type}")]
    out = []
    data = node.input[0] if node.input else ""
    onnx_type = g.type_name(g.types.get(data)) if data else None
    if node.op_type not in QDQ_OPS and onnx_type is not None and "types" in entry:  # Q/DQ: qdq_issues
        trt = TRT_TYPES.get(onnx_type.upper())
        if trt not in entry["types"]:
            out.append(issue("type", f"input '{data}' is {onnx_type}; TensorRT {node.op_type} takes "
                                     f"{', '.join(entry['types'])}"))
    for attr, allowed in entry.get("attrs", {}).items():
        value = _attr(node, attr)
        if value is not None and value not in allowed:
            out.append(issue("attribute", f"{attr}={value!r}; TensorRT supports {allowed}"))
    for attr in entry.get("all_ones", ()):
        value = _attr(node, attr)
        if value and any(v != 1 for v in value):
            out.append(issue("attribute", f"{attr}={list(value)}; TensorRT needs all ones"))
    for attr in entry.get("forbidden_attrs", ()):
        if _attr(node, attr) is not None:
            out.append(issue("attribute", f"attribute {attr} is not supported by TensorRT"))
    ranks = entry.get("kernel_ranks")
    kernel = _attr(node, "kernel_shape")
    if ranks and kernel is not None and len(kernel) not in ranks:
        supported = " or ".join(f"{r}D" for r in ranks)
        out.append(issue("attribute", f"{len(kernel)}D kernel; TensorRT supports {supported}"))
    if "max_outputs" in entry and len([o for o in node.output if o]) > entry["max_outputs"]:
        out.append(issue("outputs", f"{entry.get('note', 'extra outputs are not supported')}"))
    for slot in entry.get("const_inputs", ()):
        if slot < len(node.input) and node.input[slot] and node.input[slot] not in g.consts:
            out.append(issue("constant-input", f"input {slot} '{node.input[slot]}' is computed at run time; "
                                               f"TensorRT: {entry.get('note', 'must be a constant')}"))
    return out


def check_onnx(path_or_model, trt_major: int, *, name: str | None = None) -> Preflight:
    """Check an ONNX file (or ModelProto) against TensorRT ``trt_major``'s documented ONNX support."""
    table = load_table(trt_major)
    model, label, notes = _load(path_or_model, name)
    try:
        return _check(model, label, notes, table, trt_major)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        # onnx.checker passed, yet a value is not what its operator's definition says (a string zero point)
        raise PreflightError(f"{label}: malformed model, the pre-flight cannot read it ({brief(e)})") from None


def _check(model, label: str, notes: list, table: SupportTable, trt_major: int) -> Preflight:
    g = _Graph(model)
    issues = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    low, high = table.opset
    if opset is None or not low <= opset <= high:
        issues.append(Issue("<model>", "", "opset",
                            f"opset {opset}; TensorRT {table.version} supports {low} to {high}"))
    newer = set()
    for i, node in enumerate(_nodes(model.graph)):
        issues.extend(_node_issues(node, i, table, g))
        since = table.ops.get(node.op_type, {}).get("since")
        if since and since.split(".")[0] == str(trt_major) and since != f"{trt_major}.0":  # newer than x.0
            newer.add(f"{node.op_type} needs TensorRT >= {since}")
    issues.extend(qdq_issues(model, g))
    precision = graph_precision(model, g)
    notes += sorted(newer)
    if not table.verified:
        notes.append(f"TensorRT {trt_major}'s operators.md was not read directly; the table used is {table.version}")
    if trt_major >= 11 and precision == "fp32":
        notes.append("TensorRT 11 builds this graph in FP32 (no FP16 tensors or Q/DQ; it has no --fp16 flag)")
    return Preflight(label, trt_major, table.version, precision, tuple(issues), tuple(notes))
