"""calib.quantize and calib.qdq on a tiny CNN trained on real MNIST inside the test.

What is checked: NNCF's default output runs in onnxruntime and keeps accuracy; the tensorrt
target has only signed int8, zero-point-0 Q/DQ and keeps the same accuracy; accuracy control
reverts layers when calibration is bad and reports which; bad inputs fail before anything is written.
"""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from calib import (CalibError, inspect_qdq, quantize_onnx, quantize_onnx_with_accuracy_control,
                   rewrite_uint8_to_int8, validate_qdq)
from calib.sources import load_mnist

MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist"


def _normalize(x):
    return ((x.astype(np.float32) / 255 - 0.1307) / 0.3081).astype(np.float32)


def _top1(path, x, y):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((s.run(None, {"input": x})[0].argmax(1) == y).mean())


@pytest.fixture(scope="module")
def mnist_model(tmp_path_factory):
    """A two-conv CNN trained 300 steps on 6,000 MNIST training images, exported with a dynamic batch."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: OpenMP threads only add spin-waiting on a busy 2-core box
    x, y = load_mnist(MNIST, "train")
    xt, yt = load_mnist(MNIST, "test")
    train_x, train_y = torch.from_numpy(_normalize(x[:6000])), torch.from_numpy(y[:6000])
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 10))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for step in range(300):
        i = torch.randint(0, len(train_x), (64,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(train_x[i]), train_y[i]).backward()
        opt.step()
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("model") / "fp32.onnx"
    torch.onnx.export(model.eval(), torch.zeros(1, 1, 28, 28), str(path), dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    calib = _normalize(x[10000:10256])  # training split, away from the images it was trained on
    val_x, val_y = _normalize(x[20000:21000]), y[20000:21000]
    test_x, test_y = _normalize(xt[:2000]), yt[:2000]
    fp32 = _top1(path, test_x, test_y)
    assert fp32 > 0.9, f"the test model did not train ({fp32:.3f})"
    return {"path": path, "calib": calib, "val": (val_x, val_y), "test": (test_x, test_y), "fp32": fp32}


def test_onnxruntime_target_keeps_nncf_defaults_and_accuracy(mnist_model, tmp_path):
    info = quantize_onnx(mnist_model["path"], tmp_path / "int8.onnx", mnist_model["calib"])
    assert info["path"] == str(tmp_path / "int8.onnx") and info["target"] == "onnxruntime"
    assert info["n_calib"] == 256 and info["int8_rewrites"] == 0 and info["seconds"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]  # no temp file left beside it
    q = info["qdq"]
    assert q["quantize"] == 3 and q["dequantize"] == 6  # input + 2 activations; 3 weights as DQ only
    assert q["uint8"] == 4  # NNCF's post-ReLU activations: fine for onnxruntime, not for TensorRT
    assert q["per_channel"] == 3 and q["nonzero_zero_point"] == 0
    assert validate_qdq(info["path"], "onnxruntime") == q
    with pytest.raises(CalibError, match="4 of 9 Q/DQ nodes are not valid for TensorRT.*Relu") as e:
        validate_qdq(info["path"], "tensorrt")
    assert "int8.onnx" in str(e.value) and "\n" not in str(e.value)
    acc = _top1(info["path"], *mnist_model["test"])
    assert abs(acc - mnist_model["fp32"]) <= 0.01


def test_tensorrt_target_is_signed_symmetric_and_keeps_accuracy(mnist_model, tmp_path):
    info = quantize_onnx(mnist_model["path"], tmp_path / "trt.onnx", mnist_model["calib"],
                         target="tensorrt", subset_size=128)
    assert info["n_calib"] == 128 and info["int8_rewrites"] == 4
    entries = inspect_qdq(info["path"])
    assert entries and all(e["dtype"] == "int8" and e["zero_point_zero"] for e in entries)
    weights = [e for e in entries if e["granularity"] == "per_channel"]
    assert [e["scale_shape"] for e in weights] == [[8], [8], [10]] and weights[0]["axis"] == 0
    assert info["qdq"] == validate_qdq(info["path"], "tensorrt")
    # The value_info entries were retyped too, or onnxruntime would refuse to load it here.
    acc = _top1(info["path"], *mnist_model["test"])
    assert abs(acc - mnist_model["fp32"]) <= 0.01


def test_tensorrt_output_that_fails_validation_is_not_written(mnist_model, tmp_path, monkeypatch):
    import calib.qdq

    monkeypatch.setattr(calib.qdq, "rewrite_uint8_to_int8", lambda model: [])  # as if the post-fix were lost
    with pytest.raises(CalibError, match=r"trt.onnx \(not written\): 4 of 9 Q/DQ nodes are not valid for TensorRT"):
        quantize_onnx(mnist_model["path"], tmp_path / "trt.onnx", mnist_model["calib"][:32], target="tensorrt")
    assert list(tmp_path.iterdir()) == []


def test_accuracy_control_reverts_layers_when_calibration_is_bad(mnist_model, tmp_path):
    # Calibrating on images scaled down 20x clips every activation: plain INT8 loses a lot.
    bad = mnist_model["calib"] * 0.05
    val_x, val_y = mnist_model["val"]
    plain = quantize_onnx(mnist_model["path"], tmp_path / "plain.onnx", bad, target="tensorrt")
    fp32_val, plain_val = _top1(mnist_model["path"], val_x, val_y), _top1(plain["path"], val_x, val_y)
    assert fp32_val - plain_val > 0.05

    info = quantize_onnx_with_accuracy_control(mnist_model["path"], tmp_path / "ac.onnx", bad, val_x, val_y,
                                               target="tensorrt", max_drop=0.003)
    assert info["n_val"] == 1000 and info["n_calib"] == 256
    assert info["reverted"] and set(info["reverted"]) <= {n.name for n in onnx.load(info["path"]).graph.node}
    assert info["qdq"]["nodes"] < plain["qdq"]["nodes"]
    validate_qdq(info["path"], "tensorrt")
    assert fp32_val - _top1(info["path"], val_x, val_y) <= 0.003 + 1e-9


class _TinyViT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(1, 32, 7, 7)
        self.encoder = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.encoder(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_transformer_model_type_gives_tensorrt_valid_qdq(tmp_path):
    # Random weights: only the Q/DQ form and closeness to FP32 matter here.
    torch.manual_seed(0)
    src = tmp_path / "vit.onnx"
    torch.onnx.export(_TinyViT().eval(), torch.zeros(1, 1, 28, 28), str(src), dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    x = np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32)
    ort_info = quantize_onnx(src, tmp_path / "ort.onnx", x, model_type="transformer")
    assert ort_info["qdq"]["nonzero_zero_point"] > 0  # NNCF's transformer default: asymmetric activations
    info = quantize_onnx(src, tmp_path / "trt.onnx", x, target="tensorrt", model_type="transformer")
    assert info["qdq"]["nonzero_zero_point"] == 0 and info["qdq"]["uint8"] == 0 and info["qdq"]["quantize"] > 0
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    out = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    cosine = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    assert cosine.min() > 0.95


def test_rewrite_keeps_values_of_a_uint8_pair_and_leaves_asymmetric_ones(tmp_path):
    scale = 0.02
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq"),
             helper.make_node("QuantizeLinear", ["x", "s2", "zp2"], ["q2"], name="q_asym"),
             helper.make_node("DequantizeLinear", ["q2", "s2", "zp2"], ["y2"], name="dq_asym")]
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "zp"),
             numpy_helper.from_array(np.array(scale, np.float32), "s2"),
             numpy_helper.from_array(np.array(10, np.uint8), "zp2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None])], inits,
                              value_info=[helper.make_tensor_value_info("q", TensorProto.UINT8, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = np.linspace(0, 255 * scale, 1000, dtype=np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    assert rewrite_uint8_to_int8(model) == ["q", "dq"]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    new_scale = scale * 255 / 127
    assert np.abs(after[0] - x).max() <= new_scale / 2 + 1e-6  # the full range survives, one bit coarser
    assert np.abs(after[0] - before[0]).max() <= new_scale
    np.testing.assert_array_equal(after[1], before[1])  # the asymmetric pair is untouched
    with pytest.raises(CalibError, match=r"2 of 4 .*q_asym \(uint8, zero point \[10\]\)"):
        validate_qdq(model, "tensorrt")


def _no_input_model(path):
    node = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones(2, np.float32)))
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return path


@pytest.mark.parametrize("case, match", [
    ("corrupt", "corrupt.onnx: not a"),
    ("missing", "missing.onnx: ONNX model not found"),
    ("no_inputs", "no_inputs.onnx: ONNX model has no inputs"),
    ("shape", r"samples of shape \[3, 28, 28\] do not fit input 'input' \(batch, 1, 28, 28\) of .*fp32.onnx"),
    ("empty", "empty calibration/validation set for .*fp32.onnx"),
    ("uint8", "expected normalized float32 inputs.*got uint8"),
    ("target", "target must be one of onnxruntime, tensorrt"),
    ("model_type", "model_type must be None or 'transformer'"),
    ("input_name", "has no input 'pixels'"),
    ("untyped", "untyped.onnx: input 'input' has no known tensor element type"),
])
def test_bad_inputs_raise_one_line_and_write_nothing(mnist_model, tmp_path, case, match):
    src, calib, kwargs = mnist_model["path"], mnist_model["calib"][:8], {}
    if case == "corrupt":
        src = tmp_path / "corrupt.onnx"
        src.write_bytes(b"\x08\x07garbage that is not protobuf" * 10)
    elif case == "missing":
        src = tmp_path / "missing.onnx"
    elif case == "no_inputs":
        src = _no_input_model(tmp_path / "no_inputs.onnx")
    elif case == "shape":
        calib = np.zeros((8, 3, 28, 28), np.float32)
    elif case == "empty":
        calib = calib[:0]
    elif case == "uint8":
        calib = np.zeros((8, 1, 28, 28), np.uint8)
    elif case == "target":
        kwargs = {"target": "tflite"}
    elif case == "model_type":
        kwargs = {"model_type": "cnn"}
    elif case == "input_name":
        kwargs = {"input_name": "pixels"}
    elif case == "untyped":
        graph = helper.make_graph([helper.make_node("Identity", ["input"], ["y"])], "g",
                                  [helper.make_tensor_value_info("input", 0, ["batch", 4])],
                                  [helper.make_tensor_value_info("y", 0, ["batch", 4])])
        src = tmp_path / "untyped.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), src)
    out = tmp_path / "out"
    with pytest.raises(CalibError, match=match) as e:
        quantize_onnx(src, out / "int8.onnx", calib, **kwargs)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_accuracy_control_checks_labels(mnist_model, tmp_path):
    val_x, val_y = mnist_model["val"]
    with pytest.raises(CalibError, match="val_labels: expected 1000 integer labels"):
        quantize_onnx_with_accuracy_control(mnist_model["path"], tmp_path / "x.onnx", mnist_model["calib"],
                                            val_x, val_y[:10])
    with pytest.raises(CalibError, match="max_drop must be a fraction"):
        quantize_onnx_with_accuracy_control(mnist_model["path"], tmp_path / "x.onnx", mnist_model["calib"],
                                            val_x, val_y, max_drop=3)
    assert list(tmp_path.iterdir()) == []
