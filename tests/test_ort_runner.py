"""edgerun.ort: the onnxruntime runner on tiny ONNX models built with onnx.helper (CPU, no torch)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgerun.errors import EdgeError
from edgerun.ort import OrtError, OrtRunner, available_ort_providers, ort_tensorrt_provider_options, run_onnx

REPO = Path(__file__).resolve().parents[1]


def affine_onnx(path, weight, bias):
    """logits = relu(input @ weight + bias), dynamic batch: the reference is one numpy line."""
    n_in, n_out = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["m"]),
         helper.make_node("Add", ["m", "b"], ["a"]),
         helper.make_node("Relu", ["a"], ["logits"])],
        "affine",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])],
        [helper.make_tensor("w", TensorProto.FLOAT, list(weight.shape), weight.ravel()),
         helper.make_tensor("b", TensorProto.FLOAT, [n_out], bias)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return path


@pytest.fixture
def model(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    return affine_onnx(tmp_path / "affine.onnx", weight, bias), weight, bias


def reference(x, weight, bias):
    return np.maximum(x @ weight + bias, 0)


def test_runner_matches_numpy(model):
    path, weight, bias = model
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    with OrtRunner(path, threads=1) as runner:
        assert runner.input_names == ["input"] and runner.output_names == ["logits"]
        assert runner.providers == ["CPUExecutionProvider"]
        out = runner.infer({"input": x})
    assert set(out) == {"logits"} and out["logits"].shape == (5, 4)
    np.testing.assert_allclose(out["logits"], reference(x, weight, bias), rtol=1e-5, atol=1e-6)


def test_run_onnx_batches_match_one_run(model):
    path, weight, bias = model
    x = np.random.default_rng(2).standard_normal((70, 6)).astype(np.float32)
    whole = run_onnx(path, x, batch_size=70)
    pieces = run_onnx(path, x, batch_size=16, threads=1)  # 5 batches, the last one of 6 rows
    assert whole["logits"].shape == (70, 4)
    np.testing.assert_allclose(pieces["logits"], whole["logits"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(whole["logits"], reference(x, weight, bias), rtol=1e-5, atol=1e-6)


def test_runner_errors_are_one_line(model, tmp_path):
    path, _, _ = model
    assert "CPUExecutionProvider" in available_ort_providers()
    with pytest.raises(OrtError, match=r"^affine.onnx: onnxruntime here has no NoSuchExecutionProvider "
                                       r"\(available: .*CPUExecutionProvider"):
        OrtRunner(path, providers=("NoSuchExecutionProvider", "CPUExecutionProvider"))
    with pytest.raises(OrtError, match=r"^missing.onnx: no such file"):
        OrtRunner(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(OrtError, match=r"^garbage.onnx: onnxruntime cannot load it \(") as err:
        OrtRunner(garbage)
    assert "\n" not in str(err.value)

    runner = OrtRunner(path)
    with runner:
        with pytest.raises(OrtError, match=r"^affine.onnx: expected inputs \['input'\], got \['images'\]$"):
            runner.infer({"images": np.zeros((1, 6), np.float32)})
        with pytest.raises(OrtError, match=r"^affine.onnx: onnxruntime failed \(") as err:
            runner.infer({"input": np.zeros((1, 5), np.float32)})  # wrong width
        assert "\n" not in str(err.value)
    with pytest.raises(OrtError, match="this runner was closed"):
        runner.infer({"input": np.zeros((1, 6), np.float32)})

    with pytest.raises(OrtError, match=r"at least one input row and batch_size ≥ 1 \(got 0 rows"):
        run_onnx(path, np.zeros((0, 6), np.float32))
    with pytest.raises(OrtError, match=r"got 2 rows, batch_size 0"):
        run_onnx(path, np.zeros((2, 6), np.float32), batch_size=0)
    assert issubclass(OrtError, EdgeError)


def test_run_onnx_refuses_a_two_input_model(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])], "pair",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 2])])
    path = tmp_path / "pair.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    with pytest.raises(OrtError, match=r"pair.onnx: run_onnx needs a single-input model, this one has \['a', 'b'\]"):
        run_onnx(path, np.zeros((3, 2), np.float32))
    with OrtRunner(path) as runner:  # the runner itself takes any number of inputs
        out = runner.infer({"a": np.ones((1, 2), np.float32), "b": np.full((1, 2), 2, np.float32)})
    np.testing.assert_array_equal(out["sum"], [[3, 3]])


def test_ort_tensorrt_provider_options():
    kw = dict(cache_dir="/cache", min_batch=1, opt_batch=8, max_batch=32, input_name="input",
              input_shape=(3, 224, 224))
    (name, trt_opts), cuda, cpu = ort_tensorrt_provider_options(10, fp16=True, **kw)
    assert name == "TensorrtExecutionProvider" and cuda[0] == "CUDAExecutionProvider"
    assert cpu[0] == "CPUExecutionProvider"
    assert trt_opts["trt_fp16_enable"] is True and "trt_int8_enable" not in trt_opts
    assert trt_opts["trt_engine_cache_enable"] and trt_opts["trt_engine_cache_path"] == "/cache"
    assert trt_opts["trt_timing_cache_enable"] and trt_opts["trt_timing_cache_path"] == "/cache"
    assert trt_opts["trt_profile_min_shapes"] == "input:1x3x224x224"
    assert trt_opts["trt_profile_opt_shapes"] == "input:8x3x224x224"
    assert trt_opts["trt_profile_max_shapes"] == "input:32x3x224x224"

    (_, trt11_opts), _, _ = ort_tensorrt_provider_options(11, **kw)
    assert not {"trt_fp16_enable", "trt_int8_enable"} & set(trt11_opts)
    with pytest.raises(OrtError, match="precision comes from the ONNX"):
        ort_tensorrt_provider_options(11, int8=True, **kw)


def test_runtime_modules_import_no_build_code():
    """A Jetson bundle ships edgerun alone: its runners must not pull in torch or the build side."""
    code = ("import sys, edgerun.ort, edgerun.trt\n"
            "bad = {'torch', 'tensorrt', 'polygraphy', 'onnxruntime', 'pipeline', 'export', 'calib'}"
            " & {m.split('.')[0] for m in sys.modules}\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def layer_norm_bytes(width=64) -> bytes:
    """LayerNorm written out op by op: onnxruntime's graph optimisations fuse it into one
    LayerNormalization kernel, whose float32 sums round differently from the written-out ops."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["p"]), helper.make_node("ReduceMean", ["p"], ["v"], axes=[-1]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["n"]), helper.make_node("Mul", ["n", "g"], ["ng"]),
             helper.make_node("Add", ["ng", "b"], ["y"])]
    inits = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
             helper.make_tensor("g", TensorProto.FLOAT, [width], rng.standard_normal(width).astype(np.float32)),
             helper.make_tensor("b", TensorProto.FLOAT, [width], rng.standard_normal(width).astype(np.float32))]
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", width]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "layer_norm", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def test_session_options_reach_onnxruntime_and_take_effect():
    """graph_optimization=False runs the ops as written (calib.int8form's unfused arithmetic relies on it):
    bit for bit a raw ORT_DISABLE_ALL session, and not the fused kernel's rounding; True is onnxruntime's
    default. Threads reach the session too; a model given as bytes is named as such in errors."""
    import onnxruntime as ort
    model = layer_norm_bytes()
    x = (np.random.default_rng(4).standard_normal((64, 64)) * 3 + 1).astype(np.float32)

    def raw(level):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    unfused, fused = raw(ort.GraphOptimizationLevel.ORT_DISABLE_ALL), raw(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert (unfused != fused).any()       # the fusion is visible in the last bits: the check below can tell
    off, on = run_onnx(model, x, graph_optimization=False)["y"], run_onnx(model, x, batch_size=16)["y"]
    assert off.tobytes() == unfused.tobytes() and on.tobytes() == fused.tobytes()

    with OrtRunner(model, threads=2, inter_threads=1, graph_optimization=False) as runner:
        opts = runner.session.get_session_options()
        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
        with pytest.raises(OrtError, match=r"^the in-memory model: expected inputs \['x'\]"):
            runner.infer({"input": x})
    with pytest.raises(OrtError, match=r"^the in-memory model: onnxruntime cannot load it \(") as err:
        OrtRunner(b"not a model")
    assert err.value.__cause__ is not None   # onnxruntime's own error, for callers that quote it
