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

from calib import (
    CalibError,
    inspect_qdq,
    quantize_onnx,
    quantize_onnx_with_accuracy_control,
    rewrite_uint8_to_int8,
    single_input_channel_convs,
    validate_qdq,
)
from edgerun.readers import load_mnist

MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist"


def _normalize(x):
    return ((x.astype(np.float32) / 255 - 0.1307) / 0.3081).astype(np.float32)


def _top1(path, x, y):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((s.run(None, {"input": x})[0].argmax(1) == y).mean())


def top1_score(labels):
    """calib's score for a classifier: top-1 (a fraction) of the logits on ``labels[rows]``."""
    return lambda outputs, rows=slice(None): float((outputs["logits"].argmax(1) == labels[rows]).mean())


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
    for _ in range(300):
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
    assert len(info["int32_bias"]) == 1 and info["keep_fp32"] == []  # the classifier Gemm
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]  # no temp file left beside it
    q = info["qdq"]
    # input + 2 activations; 3 weights as DQ only, plus the classifier's int32 bias DQ
    assert q["quantize"] == 3 and q["dequantize"] == 7
    assert q["uint8"] == 4  # NNCF's post-ReLU activations: fine for onnxruntime, not for TensorRT
    assert q["per_channel"] == 4 and q["nonzero_zero_point"] == 0
    assert validate_qdq(info["path"], "onnxruntime") == q
    # 4 uint8 nodes and the int32 bias: fine for onnxruntime, not for TensorRT
    with pytest.raises(CalibError, match=r"5 of 10 Q/DQ nodes are not valid for TensorRT: .*Relu.*int32") as e:
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
    with pytest.raises(CalibError, match=r"trt.onnx \(not written\): 4 of 9 Q/DQ nodes are not valid for TensorRT: "
                                         r".*uint8; TensorRT needs signed int8"):
        quantize_onnx(mnist_model["path"], tmp_path / "trt.onnx", mnist_model["calib"][:32], target="tensorrt")
    assert list(tmp_path.iterdir()) == []


def test_accuracy_control_reverts_layers_when_calibration_is_bad(mnist_model, tmp_path):
    # Calibrating on images scaled down 20x clips every activation: plain INT8 loses a lot.
    bad = mnist_model["calib"] * 0.05
    val_x, val_y = mnist_model["val"]
    plain = quantize_onnx(mnist_model["path"], tmp_path / "plain.onnx", bad, target="tensorrt")
    fp32_val, plain_val = _top1(mnist_model["path"], val_x, val_y), _top1(plain["path"], val_x, val_y)
    assert fp32_val - plain_val > 0.05

    info = quantize_onnx_with_accuracy_control(mnist_model["path"], tmp_path / "ac.onnx", bad, val_x,
                                               top1_score(val_y), target="tensorrt", max_drop=0.003)
    assert info["n_val"] == 1000 and info["n_calib"] == 256
    assert info["reverted"] and set(info["reverted"]) <= {n.name for n in onnx.load(info["path"]).graph.node}
    assert info["qdq"]["nodes"] < plain["qdq"]["nodes"]
    validate_qdq(info["path"], "tensorrt")
    assert fp32_val - _top1(info["path"], val_x, val_y) <= 0.003 + 1e-9


def _optimized_ops(path, tmp_path) -> list[str]:
    """Op types of the graph onnxruntime actually runs (ORT_ENABLE_ALL), as it saves it."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / f"{Path(path).stem}.optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def _logits(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_int32_gemm_bias_lets_onnxruntime_fuse_qgemm_with_the_same_outputs(mnist_model, tmp_path):
    """With the weight range chosen for this CPU (reduced where its u8s8 kernels saturate, as on an AVX2-only
    CPU, where full-range weights put the QGemm's logits 1.37 away), the fused QGemm gives the same logits."""
    from calib.int8form import weight_form

    calib, (x, _) = mnist_model["calib"][:64], mnist_model["test"]
    plain = quantize_onnx(mnist_model["path"], tmp_path / "float_bias.onnx", calib, int32_bias=False)
    fused = quantize_onnx(mnist_model["path"], tmp_path / "int32_bias.onnx", calib)
    assert plain["int32_bias"] == [] and len(fused["int32_bias"]) == 1
    assert {k: fused["int8_form"][k] for k in ("weights", "reason")} == weight_form("onnxruntime", None)[1]
    before, after = _optimized_ops(plain["path"], tmp_path), _optimized_ops(fused["path"], tmp_path)
    assert "QGemm" not in before and "Gemm" in before  # NNCF as-is: the classifier stays FP32
    assert "QGemm" in after and "Gemm" not in after
    ref, out = _logits(plain["path"], x[:256]), _logits(fused["path"], x[:256])
    # The int32 bias is the float bias rounded to a step of s_x * s_w: far below the logits' scale.
    assert np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.995


def test_int32_bias_is_refused_for_tensorrt_and_keep_fp32_names_are_checked(mnist_model, tmp_path):
    with pytest.raises(CalibError, match="int32_bias=True is for the onnxruntime target"):
        quantize_onnx(mnist_model["path"], tmp_path / "x.onnx", mnist_model["calib"][:8], target="tensorrt",
                      int32_bias=True)
    with pytest.raises(CalibError, match=r"keep_fp32: .*fp32.onnx has no node named 'conv_9'"):
        quantize_onnx(mnist_model["path"], tmp_path / "x.onnx", mnist_model["calib"][:8], keep_fp32=("conv_9",))
    assert list(tmp_path.iterdir()) == []


def test_keep_fp32_leaves_the_single_channel_first_conv_in_float(mnist_model, tmp_path):
    first = single_input_channel_convs(mnist_model["path"])
    convs = [n for n in onnx.load(mnist_model["path"]).graph.node if n.op_type == "Conv"]
    assert first == (convs[0].name,)  # Cin = 1: the stem, not the second conv
    info = quantize_onnx(mnist_model["path"], tmp_path / "mixed.onnx", mnist_model["calib"][:64], keep_fp32=first,
                         target="tensorrt")
    assert info["keep_fp32"] == list(first)
    graph = onnx.load(info["path"]).graph
    dq_out = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    by_name = {n.name: n for n in graph.node}
    assert not set(by_name[first[0]].input) & dq_out  # neither its input nor its weight is quantized
    assert set(by_name[convs[1].name].input) & dq_out
    validate_qdq(info["path"], "tensorrt")
    assert abs(_top1(info["path"], *mnist_model["test"]) - mnist_model["fp32"]) <= 0.01


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_a_quantized_model_that_loads_but_cannot_run_is_refused_and_not_written(tmp_path, monkeypatch):
    """NNCF's default quantizes the ReLU6 -> depthwise activations of a MobileNetV2 per channel; onnxruntime
    loads that file and fails on the first run. quantize_onnx asks for per-tensor activations; with NNCF's
    default put back, the one real inference must catch it."""
    import calib.quantize
    from pipeline.models.zoo import MobileNetV2Small

    torch.manual_seed(0)
    src = tmp_path / "mbv2.onnx"
    # The dynamo exporter, as export_onnx uses: the TorchScript export of the same model does not trigger it.
    torch.onnx.export(MobileNetV2Small(settings=((1, 16, 1, 1), (4, 24, 1, 2)), last_width=32).eval(),
                      (torch.zeros(2, 1, 28, 28),), str(src), dynamo=True, external_data=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    x = np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32)
    info = quantize_onnx(src, tmp_path / "ok.onnx", x)  # per-tensor activations: runs
    assert not [e for e in inspect_qdq(info["path"]) if not e["on_weight"] and e["granularity"] != "per_tensor"]

    nncf_options = calib.quantize._nncf_options

    def nncf_default(*args):
        options = nncf_options(*args)
        del options["advanced_parameters"]
        return options

    monkeypatch.setattr(calib.quantize, "_nncf_options", nncf_default)
    with pytest.raises(CalibError, match=r"bad.onnx \(not written\): onnxruntime loads the quantized model but its "
                                         r"first inference fails at QLinearConv node '[^']+' \(.*zero point must be "
                                         r"a scalar") as e:
        quantize_onnx(src, tmp_path / "bad.onnx", x)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "bad.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mbv2.onnx", "ok.onnx"]  # no temp file either


def test_choose_quantized_layers_picks_the_fastest_variant_within_the_drop(mnist_model, tmp_path):
    from calib import choose_quantized_layers

    val_x, val_y = mnist_model["val"]
    dst = tmp_path / "chosen.onnx"
    stem = single_input_channel_convs(mnist_model["path"])
    choice = choose_quantized_layers(mnist_model["path"], dst, mnist_model["calib"][:64], val_x[:500],
                                     top1_score(val_y[:500]), max_drop=0.003,
                                     candidates={"all_int8": (), "stem_fp32": stem}, rounds=5, block_ms=5)
    assert [v.name for v in choice.variants] == ["all_int8", "stem_fp32"]
    assert choice.variants[1].keep_fp32 == stem and "interleaved rounds" in choice.measured
    for v in choice.variants:
        assert v.ratio > 0 and v.ratio_p10 <= v.ratio <= v.ratio_p90 and v.p50_ms > 0
        assert v.drop == pytest.approx(choice.fp32_score - v.score) and 0 <= v.score <= 1
        assert v.within_drop == (v.drop <= 0.003 + 1e-9)
    fit = [v for v in choice.variants if v.within_drop and v.ratio < 1]
    if fit:  # INT8 paid on this machine: the fastest such variant is chosen and written
        best = min(fit, key=lambda v: v.ratio)
        assert choice.chosen == best.name and choice.path == str(dst) and dst.is_file()
    else:  # it did not: FP32 is the answer and nothing is written
        assert choice.chosen == "fp32" and choice.path is None and not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["chosen.onnx"] if fit else [])
    with pytest.raises(CalibError, match="keep_fp32: .* has no node named 'nope'"):
        choose_quantized_layers(mnist_model["path"], dst, mnist_model["calib"][:8], val_x[:8], top1_score(val_y[:8]),
                                max_drop=0.003, candidates={"bad": ("nope",)})


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
    with pytest.raises(CalibError, match=r"2 of 4 .*q_asym \(uint8;.*q_asym \(zero point \[10\]; TensorRT needs 0"):
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


def test_bad_scores_and_drops_raise_one_line_before_anything_is_quantized(mnist_model, tmp_path):
    """The score replaces the labels: what it returns for the FP32 model is checked first (one line each)."""
    from calib import choose_quantized_layers

    val_x, val_y = mnist_model["val"]
    src, calib, out = mnist_model["path"], mnist_model["calib"][:8], tmp_path / "x.onnx"
    for score, match in [(lambda outputs, rows=None: "high", "score: expected a float for the FP32 model's "
                                                             "outputs, got str 'high'"),
                         (lambda outputs, rows=None: float("nan"), "score: expected a finite float for the FP32 "
                                                                   "model's outputs, got nan"),
                         ("top1", "score: expected a callable on a model's outputs, got str")]:
        with pytest.raises(CalibError, match=match) as e:
            quantize_onnx_with_accuracy_control(src, out, calib, val_x, score, max_drop=0.003)
        assert "\n" not in str(e.value)
        with pytest.raises(CalibError, match=match):
            choose_quantized_layers(src, out, calib, val_x[:8], score, max_drop=0.003)
    for drop in (-1, float("nan"), True):
        with pytest.raises(CalibError, match="max_drop must be a number >= 0 in the score's units"):
            quantize_onnx_with_accuracy_control(src, out, calib, val_x, top1_score(val_y), max_drop=drop)
        with pytest.raises(CalibError, match="max_drop must be a number >= 0 in the score's units"):
            choose_quantized_layers(src, out, calib, val_x[:8], top1_score(val_y[:8]), max_drop=drop)
    assert list(tmp_path.iterdir()) == []


def test_nncf_validation_scores_the_rows_it_is_given_and_negates_a_lower_is_better_score(mnist_model):
    """NNCF validates subsets and ranks layers by per-sample values, always taking higher as better."""
    from calib.quantize import _validation_fn

    val_x, _ = mnist_model["val"]
    model = onnx.load(mnist_model["path"])
    seen = []

    def error(outputs, rows):   # lower is better: the mean of logit 0 over the rows, plus their positions
        seen.append(rows.tolist())
        return float(outputs["logits"][:, 0].mean() + rows.sum())

    validate = _validation_fn(256, "onnxruntime", False, error, higher_is_better=False)
    value, each = validate(model, [(val_x[5], 5), (val_x[2], 2)])
    logits = _logits(mnist_model["path"], val_x[[5, 2]])
    assert value == pytest.approx(-(logits[:, 0].mean() + 7), rel=1e-5)
    assert each == pytest.approx([-(logits[0, 0] + 5), -(logits[1, 0] + 2)], rel=1e-5)
    assert seen == [[5, 2], [5], [2]]
    up_value, up_each = _validation_fn(256, "onnxruntime", False, error, True)(model, [(val_x[5], 5)])
    assert up_value == pytest.approx(logits[0, 0] + 5, rel=1e-5) and up_each == [up_value]


def test_a_lower_is_better_score_picks_and_refuses_variants_by_its_own_drop(mnist_model, tmp_path):
    """Not top-1: the mean absolute error of the logits against the FP32 model's, lower is better, max_drop
    in its own units. Ignoring the direction would make every INT8 error a gain, within any drop."""
    from calib import choose_quantized_layers

    val_x = mnist_model["val"][0][:300]
    reference = _logits(mnist_model["path"], val_x)

    def mae(outputs):
        return float(np.abs(outputs["logits"] - reference).mean())

    stem = single_input_channel_convs(mnist_model["path"])
    candidates = {"all_int8": (), "stem_fp32": stem}
    kwargs = dict(candidates=candidates, rounds=3, block_ms=2, higher_is_better=False)
    loose = choose_quantized_layers(mnist_model["path"], tmp_path / "a.onnx", mnist_model["calib"][:64], val_x, mae,
                                    max_drop=1e9, **kwargs)
    assert loose.fp32_score == pytest.approx(0.0, abs=1e-6)
    errors = {v.name: v.score for v in loose.variants}
    assert all(e > 1e-4 for e in errors.values()) and errors["all_int8"] != errors["stem_fp32"]
    for v in loose.variants:
        assert v.within_drop and v.drop == pytest.approx(v.score - loose.fp32_score)   # the error grew: a drop

    strict = choose_quantized_layers(mnist_model["path"], tmp_path / "b.onnx", mnist_model["calib"][:64], val_x, mae,
                                     max_drop=0.0, **kwargs)
    assert not any(v.within_drop for v in strict.variants)
    assert strict.chosen == "fp32" and strict.path is None and not (tmp_path / "b.onnx").exists()

    between = sum(errors.values()) / 2   # the closer variant is within, the other is not
    mid = choose_quantized_layers(mnist_model["path"], tmp_path / "c.onnx", mnist_model["calib"][:64], val_x, mae,
                                  max_drop=between, **kwargs)
    closer = min(errors, key=errors.get)
    assert {v.name: v.within_drop for v in mid.variants} == {name: name == closer for name in errors}
    assert mid.chosen in ("fp32", closer)


def test_layer_choice_gives_the_score_every_output_of_an_encoder(tmp_path):
    """An encoder returns (tokens, logits): the score sees both, by name, over every batch of 256, and a
    classifier's task scores the logits, not the tokens."""
    import onnx
    from onnx import TensorProto, helper

    from calib.layers import _outputs, _session
    from pipeline.tasks import Classify
    nodes = [helper.make_node("Identity", ["input"], ["tokens"]), helper.make_node("Neg", ["input"], ["logits"])]
    graph = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 3])],
                              [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["b", 3]),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "enc.onnx"))
    x = np.random.default_rng(0).standard_normal((600, 3)).astype(np.float32)   # three batches of 256
    runner = _session(tmp_path / "enc.onnx", 2)   # the runner the choice opens: its thread settings kept
    outputs = _outputs(runner, x)
    assert sorted(outputs) == ["logits", "tokens"]
    np.testing.assert_array_equal(outputs["tokens"], x)
    np.testing.assert_array_equal(outputs["logits"], -x)
    assert Classify().metrics(outputs, (-x).argmax(1))["top1"] == 100.0
    assert Classify().metrics(outputs, x.argmax(1))["top1"] == 0.0   # the tokens' argmax: never the logits'
    opts = runner.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
