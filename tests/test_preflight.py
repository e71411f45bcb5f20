"""edgerun.preflight: the static TensorRT check catches real violations and passes the TensorRT form.

Models are built with onnx.helper (a tiny conv net) and quantized with calib.quantize_onnx, so the
Q/DQ forms checked are NNCF's real output for each target.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib import CalibError, quantize_onnx, validate_qdq
from edgerun.check import bundle_onnx_files, main
from edgerun.preflight import MAJORS, PreflightError, check_onnx, load_table, qdq_issues

ROOT = Path(__file__).resolve().parents[1]
OPSET = 18
# Op types the project's own models produce (export_onnx of every built-in model, FP16 and INT8 forms).
PROJECT_OPS = ("Add Clip Concat Conv Div Erf Expand Gather Gemm LayerNormalization MatMul Mul ReduceMean Relu "
               "Reshape Shape Slice Softmax Squeeze Transpose Cast QuantizeLinear DequantizeLinear Flatten").split()
COMMON_OPS = ("BatchNormalization MaxPool AveragePool GlobalAveragePool Sigmoid HardSwish HardSigmoid Gelu Sub Pow "
              "Sqrt Tanh Where Unsqueeze Split Pad Resize ConvTranspose Identity Constant Einsum").split()


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inits, inputs, outputs, opset=OPSET, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits, value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _tensor(name, elem=TensorProto.FLOAT, shape=("batch", 1, 8, 8)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def conv_net(path=None, dtype=np.float32):
    """input [batch, 1, 8, 8] -> Conv(4) -> Relu -> Conv(8) -> Relu -> Flatten -> Gemm(10)."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [_init("w1", rng.standard_normal((4, 1, 3, 3)).astype(dtype)), _init("b1", np.zeros(4, dtype)),
             _init("w2", rng.standard_normal((8, 4, 3, 3)).astype(dtype) * 0.3), _init("b2", np.zeros(8, dtype)),
             _init("wf", rng.standard_normal((10, 512)).astype(dtype) * 0.05), _init("bf", np.ones(10, dtype))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1)]
    model = _model(nodes, inits, [_tensor("input", elem)], [_tensor("logits", elem, ("batch", 10))])
    if path is not None:
        onnx.save(model, str(path))
    return model


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The conv net, and its NNCF INT8 forms for each target."""
    tmp = tmp_path_factory.mktemp("preflight")
    src = tmp / "fp32.onnx"
    conv_net(src)
    x = np.random.default_rng(1).standard_normal((32, 1, 8, 8)).astype(np.float32)
    ort_info = quantize_onnx(src, tmp / "ort.onnx", x, target="onnxruntime")
    trt_info = quantize_onnx(src, tmp / "trt.onnx", x, target="tensorrt")
    return {"fp32": src, "onnxruntime": Path(ort_info["path"]), "tensorrt": Path(trt_info["path"])}


def rules(result):
    return {i.rule for i in result.issues}


# ---------------------------------------------------------------- the table

def test_table_has_its_source_and_every_op_the_project_produces():
    raw = json.loads((ROOT / "edgerun" / "trt_onnx_support.json").read_text())
    for major in MAJORS:
        t = raw["tables"][str(major)]
        assert t["source"].startswith("https://github.com/onnx/onnx-tensorrt/") and t["version"]
        table = load_table(major)
        missing = [op for op in PROJECT_OPS + COMMON_OPS if not table.ops.get(op, {}).get("supported")]
        assert missing == [], f"TensorRT {major} table lacks {missing}"
        assert all("FP16" in table.ops[op]["types"] for op in PROJECT_OPS if op != "DequantizeLinear")
    assert load_table(10).verified and not load_table(11).verified  # said, not hidden
    with pytest.raises(PreflightError, match="--trt-major: expected one of 10, 11, got 9"):
        load_table(9)


# ---------------------------------------------------------------- Q/DQ from NNCF

def test_fp32_conv_net_passes_and_reports_its_precision(quantized):
    for major in MAJORS:
        r = check_onnx(quantized["fp32"], major)
        assert r and r.ok and r.issues == () and r.precision == "fp32" and r.trt_major == major
    assert any("builds this graph in FP32" in n for n in check_onnx(quantized["fp32"], 11).notes)
    assert not any("builds this graph in FP32" in n for n in check_onnx(quantized["fp32"], 10).notes)


def test_onnxruntime_form_of_nncf_fails_tensorrt_and_tensorrt_form_passes(quantized):
    for major in MAJORS:
        bad = check_onnx(quantized["onnxruntime"], major)
        assert not bad and bad.precision == "int8 Q/DQ + fp32"
        uint8 = [i for i in bad.issues if i.rule == "qdq-type" and "uint8" in i.detail]
        assert {i.node for i in uint8} >= {"QuantizeLinear_r1_1", "DequantizeLinear_r1_1"}  # post-ReLU activations
        assert any("int32" in i.detail for i in bad.issues)  # the QGemm bias: onnxruntime only
        good = check_onnx(quantized["tensorrt"], major)
        assert good, [i.line() for i in good.issues]
        assert good.precision == "int8 Q/DQ + fp32"


def test_calib_validate_qdq_uses_the_preflight_rules(quantized):
    assert len(qdq_issues(onnx.load(str(quantized["onnxruntime"])))) >= 4
    with pytest.raises(CalibError, match="ort.onnx: .* Q/DQ nodes are not valid for TensorRT: .*uint8"):
        validate_qdq(quantized["onnxruntime"], "tensorrt")
    validate_qdq(quantized["tensorrt"], "tensorrt")
    # A rule only the pre-flight had before: per-channel activation scales.
    with pytest.raises(CalibError, match="per_channel activation scale of shape \\[4\\]"):
        validate_qdq(_activation_qdq(scale=np.full(4, 0.1, np.float32), zero_point=np.zeros(4, np.int8)), "tensorrt")


# ---------------------------------------------------------------- hand-made violations

def _activation_qdq(scale, zero_point, dtype=np.int8):
    """input -> Q -> DQ -> Relu, with the given activation scale and zero point (axis 1 when per channel)."""
    kw = {"axis": 1} if np.ndim(scale) else {}
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "zp"], ["q"], name="q", **kw),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq", **kw),
             helper.make_node("Relu", ["dq"], ["y"], name="relu")]
    inits = [_init("s", np.asarray(scale, np.float32)), _init("zp", np.asarray(zero_point, dtype))]
    return _model(nodes, inits, [_tensor("input", shape=("batch", 4, 8, 8))], [_tensor("y", shape=("batch", 4, 8, 8))])


def _weight_dq(axis, consumer="Conv"):
    """A per-channel int8 weight DQ on ``axis`` feeding ``consumer``'s weight input."""
    shapes = {"Conv": (8, 4, 3, 3), "Gemm": (10, 16), "MatMul": (16, 10)}
    w = np.ones(shapes[consumer], np.int8)
    n = w.shape[axis]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w", axis=axis),
             helper.make_node(consumer, ["input", "w"], ["y"], name="op",
                              **({"transB": 1} if consumer == "Gemm" else {}))]
    inits = [_init("w_q", w), _init("w_s", np.full(n, 0.1, np.float32)), _init("w_zp", np.zeros(n, np.int8))]
    shape_in = ("batch", 4, 8, 8) if consumer == "Conv" else ("batch", 16)
    return _model(nodes, inits, [_tensor("input", shape=shape_in)], [_tensor("y", shape=("batch",))])


def test_qdq_violations_are_named_with_node_and_rule():
    uint8 = check_onnx(_activation_qdq(np.float32(0.1), np.uint8(0), dtype=np.uint8), 10)
    assert [(i.node, i.rule) for i in uint8.issues] == [("q", "qdq-type"), ("dq", "qdq-type")]
    asym = check_onnx(_activation_qdq(np.float32(0.1), np.int8(3)), 11)
    assert [(i.node, i.op_type, i.rule) for i in asym.issues] == [("q", "QuantizeLinear", "zero-point"),
                                                                  ("dq", "DequantizeLinear", "zero-point")]
    assert "zero point [3]; TensorRT needs 0" in asym.issues[0].detail
    per_channel = check_onnx(_activation_qdq(np.full(4, 0.1, np.float32), np.zeros(4, np.int8)), 10)
    assert rules(per_channel) == {"activation-scale"} and len(per_channel.issues) == 2
    assert check_onnx(_activation_qdq(np.float32(0.1), np.int8(0)), 10)  # the TensorRT form


@pytest.mark.parametrize("consumer, axis, ok", [
    ("Conv", 0, True), ("Conv", 1, False), ("Gemm", 0, True), ("Gemm", -2, True), ("Gemm", 1, False),
    ("MatMul", -1, True), ("MatMul", 1, True), ("MatMul", 0, False)])
def test_weight_scales_must_run_along_the_output_channels(consumer, axis, ok):
    r = check_onnx(_weight_dq(axis, consumer), 10)
    weight_issues = [i for i in r.issues if i.rule == "weight-axis"]
    assert (not weight_issues) == ok, [i.line() for i in r.issues]
    if not ok:
        assert weight_issues[0].node == "dq_w"
        assert "'op' weight; its output channels are axis" in weight_issues[0].detail


def test_unsupported_unknown_and_custom_ops_are_issues_not_passes():
    x, y = _tensor("x", shape=(4,)), _tensor("y", shape=(4,))
    unsupported = _model([helper.make_node("Unique", ["x"], ["y"], name="uniq")], [], [x], [y])
    assert [(i.node, i.rule) for i in check_onnx(unsupported, 10).issues] == [("uniq", "unsupported-op")]
    unknown = _model([helper.make_node("NotAnOnnxOp", ["x"], ["y"], name="mystery")], [], [x], [y])
    assert [(i.node, i.rule) for i in check_onnx(unknown, 11).issues] == [("mystery", "unknown-op")]
    custom = _model([helper.make_node("FusedThing", ["x"], ["y"], name="plug", domain="com.example")], [], [x], [y])
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    assert [(i.node, i.rule) for i in check_onnx(custom, 10).issues] == [("plug", "custom-op")]


def test_ops_added_in_tensorrt_11_pass_there_and_not_on_10():
    x, y = _tensor("x", shape=(1, 8)), _tensor("y", shape=(1, 8))
    swish = _model([helper.make_node("Swish", ["x"], ["y"], name="act")], [], [x], [y], opset=24)
    assert [(i.node, i.rule) for i in check_onnx(swish, 10).issues] == [("act", "unknown-op")]
    assert check_onnx(swish, 11)
    sig = _tensor("sig", shape=(1, 16, 1))
    dft = _model([helper.make_node("DFT", ["sig"], ["spec"], name="dft")], [], [sig], [_tensor("spec", shape=(1,))])
    assert [(i.node, i.rule) for i in check_onnx(dft, 10).issues] == [("dft", "unsupported-op")]
    r = check_onnx(dft, 11)
    assert r and "DFT needs TensorRT >= 11.2" in r.notes


def test_types_attributes_inputs_and_opset_follow_the_table():
    # FP16 into an op the table lists for FP32 only (STFT), and a BOOL into Add.
    sig = _tensor("sig", TensorProto.FLOAT16, ("batch", 64, 1))
    stft = _model([helper.make_node("STFT", ["sig", "step"], ["spec"], name="stft")],
                  [_init("step", np.array(8, np.int64))], [sig], [_tensor("spec", TensorProto.FLOAT16, ("batch",))])
    r = check_onnx(stft, 11)
    assert [(i.rule, i.node) for i in r.issues] == [("type", "stft")] and "float16" in r.issues[0].detail
    assert r.precision == "fp16"
    b = _tensor("b", TensorProto.BOOL, (4,))
    assert rules(check_onnx(_model([helper.make_node("Add", ["b", "b"], ["y"])], [], [b],
                                   [_tensor("y", TensorProto.BOOL, (4,))]), 10)) == {"type"}
    # Resize in cubic mode, MaxPool with its Indices output, ReduceMean with run-time axes.
    x4 = _tensor("x", shape=(1, 1, 8, 8))
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], name="resize", mode="cubic"),
             helper.make_node("MaxPool", ["r"], ["p", "idx"], name="pool", kernel_shape=[2, 2]),
             helper.make_node("Shape", ["p"], ["shape"], name="shape"),
             helper.make_node("Slice", ["shape", "one", "two"], ["axes"], name="slice"),
             helper.make_node("ReduceMean", ["p", "axes"], ["y"], name="mean")]
    inits = [_init("scales", np.array([1, 1, 2, 2], np.float32)), _init("one", np.array([1], np.int64)),
             _init("two", np.array([2], np.int64))]
    r = check_onnx(_model(nodes, inits, [x4], [_tensor("y", shape=(1,)), _tensor("idx", TensorProto.INT64, (1,))]), 10)
    assert {(i.node, i.rule) for i in r.issues} == {("resize", "attribute"), ("pool", "outputs"),
                                                    ("mean", "constant-input")}
    old = _model([helper.make_node("Relu", ["x"], ["y"])], [], [x4], [_tensor("y", shape=(1, 1, 8, 8))], opset=8)
    assert [(i.node, i.rule) for i in check_onnx(old, 10).issues] == [("<model>", "opset")]


def test_fp16_graph_passes_and_says_so(tmp_path):
    r = check_onnx(conv_net(dtype=np.float16), 11)
    assert r and r.precision == "fp16" and not any("FP32" in n for n in r.notes)


# ---------------------------------------------------------------- the `check` verb

def test_check_verb_exit_codes_and_lines(quantized, capsys):
    assert main([str(quantized["tensorrt"]), "--trt-major", "10", "11"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("PASSED | 1 ONNX file(s) x TensorRT 10/11")
    assert main([str(quantized["onnxruntime"]), "--trt-major", "10"]) == 2   # a failed check, like a gate
    out = capsys.readouterr().out.strip().splitlines()
    issue_lines = [line for line in out if "ort.onnx TensorRT 10:" in line]
    n = len(check_onnx(quantized["onnxruntime"], 10).issues)
    # uint8 Q/DQ, the int32 bias, and the Flatten that now moves uint8 (the QGemm form): one line each
    assert len(issue_lines) == n == 6 and sum("qdq-type" in line for line in issue_lines) == 5
    assert any("flatten (Flatten) type: input 'q_output_r2_1' is uint8" in line for line in issue_lines)
    assert out[-1] == f"FAILED | {n} issue(s) in 1 of 1 checks (1 ONNX file(s) x TensorRT 10)"
    assert main([str(quantized["onnxruntime"]), "--format", "json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] is False and [r["trt_major"] for r in doc["results"]] == [10, 11]
    assert doc["results"][0]["issues"][0].keys() == {"node", "op_type", "rule", "detail"}


def test_check_verb_on_a_bundle_checks_what_the_build_files_name(quantized, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model_int8.onnx").write_bytes(quantized["tensorrt"].read_bytes())
    (bundle / "model_ort.onnx").write_bytes(quantized["onnxruntime"].read_bytes())  # shipped, not built
    assert [p.name for p in bundle_onnx_files(bundle)] == ["model_int8.onnx", "model_ort.onnx"]  # no build files
    (bundle / "engine.env").write_text("ONNX=model_int8.onnx\nENGINE=model.engine\n")
    (bundle / "trtexec_args_trt10.txt").write_text("--onnx=model_int8.onnx\n--saveEngine=model.engine\n")
    assert [p.name for p in bundle_onnx_files(bundle)] == ["model_int8.onnx"]
    assert main([str(bundle)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASSED | 1 ONNX file(s)")
    (bundle / "engine.env").write_text("ONNX=../outside.onnx\n")
    assert main([str(bundle)]) == 1
    assert capsys.readouterr().out.strip() == (f"FAILED | error: {bundle}: build file names '../outside.onnx', "
                                               "which is outside the bundle")
    (bundle / "engine.env").write_text("ONNX='model_int8.onnx\n")  # unbalanced quote
    assert main([str(bundle)]) == 1
    assert capsys.readouterr().out.startswith(f"FAILED | error: {bundle}: cannot read its build files (ValueError")


@pytest.mark.parametrize("make, match", [
    (lambda p: p, "missing.onnx: ONNX model not found"),
    (lambda p: (p.write_bytes(b"\x08\x07 not protobuf" * 9), p)[1], "missing.onnx: not a readable ONNX model"),
    (lambda p: (p.mkdir(), p)[1], "no .onnx file in this folder"),
])
def test_check_verb_bad_inputs_are_one_line(tmp_path, capsys, make, match):
    path = make(tmp_path / "missing.onnx")
    assert main([str(path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("FAILED | error: ") and re.search(match, out[0])


def test_preflight_imports_no_torch_pipeline_export_or_calib():
    code = ("import sys, edgerun.preflight; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pipeline', 'export', 'calib'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
