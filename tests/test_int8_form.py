"""INT8 correct on every CPU (calib.int8form): which weight range each CPU gets, that the reduced range
keeps every int16 pair sum of a u8s8 kernel exact, and that the fused kernels match the unfused Q/DQ
arithmetic in the reduced form (forced here: this machine may have VNNI and never saturate)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import test_calib_quantize
from onnx import TensorProto, helper, numpy_helper
from test_calib_quantize import _optimized_ops

from calib import CalibError, quantize_onnx
from calib.int8form import (
    FULL,
    REDUCED,
    WEIGHT_BOUND,
    int8_weight_max,
    kernel_parity,
    outputs,
    reduce_weight_range,
    weight_form,
)

INT16_MAX = 32767
mnist_model = test_calib_quantize.mnist_model   # the CNN trained on MNIST, as a fixture here too


@pytest.mark.parametrize("arch, flags, weights", [
    ("x86_64", {"sse4_2", "avx", "avx2", "fma"}, REDUCED),                       # AVX2 only (the AMD EPYC)
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, REDUCED),                        # AVX-512 before VNNI
    ("x86_64", set(), REDUCED),                                                  # flags unreadable: the safe form
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, FULL),
    ("x86_64", {"avx2", "avx_vnni"}, FULL),                                      # Alder Lake and later
    ("x86_64", {"avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"}, FULL),
    ("aarch64", {"fp", "asimd", "asimddp"}, FULL),                               # a Jetson
])
def test_fake_cpu_flag_sets_map_to_the_weight_range_their_int8_kernels_need(arch, flags, weights):
    """Fake flag sets prove the mapping only: whether a real CPU saturates is onnxruntime's kernels' business,
    and the quantize stage measures its own kernels against the unfused arithmetic on every run."""
    reduce, form = weight_form("onnxruntime", None, flags=frozenset(flags), arch=arch)
    assert form["weights"] == weights and reduce == (weights == REDUCED)
    assert ("int16" in form["reason"]) == reduce
    # TensorRT runs on a GPU: full range whatever the CPU; an explicit choice wins over the CPU.
    assert weight_form("tensorrt", None, flags=frozenset(flags), arch=arch)[1]["weights"] == FULL
    assert weight_form("onnxruntime", True, flags=frozenset(flags), arch=arch)[0] is True
    assert weight_form("onnxruntime", False, flags=frozenset(flags), arch=arch)[0] is False


def test_reduce_range_that_is_not_a_bool_is_refused(mnist_model, tmp_path):
    with pytest.raises(CalibError, match=r"reduce_range must be True, False or None .*got 'yes'"):
        quantize_onnx(mnist_model["path"], tmp_path / "x.onnx", mnist_model["calib"][:8], reduce_range="yes")
    assert list(tmp_path.iterdir()) == []


def _gemm_u8_input_and_int8_weight(path, x):
    """The Gemm's uint8 activations on ``x`` (the unfused arithmetic) and its int8 weight [N, K]."""
    model = onnx.load(path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    act, weight = producer[gemm.input[0]].input[0], producer[gemm.input[1]].input[0]
    g.output.append(helper.make_tensor_value_info(act, TensorProto.UINT8, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        [act], {"input": x})[0]
    return a.reshape(len(a), -1).astype(np.int32), numpy_helper.to_array(inits[weight]).astype(np.int32)


def test_reduced_range_gemm_cannot_saturate_an_int16_pair_sum_where_full_range_does(mnist_model, tmp_path):
    """vpmaddubsw (AVX2 without VNNI) adds two u8*s8 products into a saturating int16. Emulated here on the
    classifier's real activations, pairing neighbours along K (the kernel's packing may pair others: the
    bound on |q| holds for any pairing)."""
    calib, x = mnist_model["calib"][:64], mnist_model["test"][0][:256]
    sums = {}
    for reduce in (False, True):
        info = quantize_onnx(mnist_model["path"], tmp_path / f"{reduce}.onnx", calib, reduce_range=reduce)
        assert info["int8_form"]["weights"] == (REDUCED if reduce else FULL)
        assert info["int8_form"]["max_abs_weight"] == int8_weight_max(onnx.load(info["path"]))
        a, w = _gemm_u8_input_and_int8_weight(info["path"], x)
        pairs = a[:, None, 0::2] * w[None, :, 0::2] + a[:, None, 1::2] * w[None, :, 1::2]
        sums[reduce] = (pairs.sum(-1), np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(-1))
        if reduce:   # every conv and Gemm weight, not only this one
            assert info["int8_form"]["max_abs_weight"] <= WEIGHT_BOUND and 2 * 255 * WEIGHT_BOUND <= INT16_MAX
    exact, saturated = sums[False]
    assert (exact != saturated).any()   # the full range does overflow on these images: the bound matters
    exact, saturated = sums[True]
    np.testing.assert_array_equal(exact, saturated)


def test_forced_reduced_range_fused_qgemm_and_qlinearconv_match_the_unfused_arithmetic(mnist_model, tmp_path):
    info = quantize_onnx(mnist_model["path"], tmp_path / "reduced.onnx", mnist_model["calib"][:64], reduce_range=True)
    assert info["int8_form"] == {"weights": REDUCED, "reason": "asked for (reduce_range)", "max_abs_weight": 64,
                                 "requantized": []}   # NNCF's overflow fix covered every conv and the Gemm
    ops = _optimized_ops(info["path"], tmp_path)
    assert "QGemm" in ops and ops.count("QLinearConv") == 2   # the fused kernels are the ones compared
    x, y = mnist_model["test"]
    fused, unfused = outputs(info["path"], x, fused=True), outputs(info["path"], x, fused=False)
    parity = kernel_parity(fused, unfused)
    # The same 0.02-on-logits-of-about-20 limit as the QGemm test in test_calib_quantize.py.
    assert parity["max_abs"] <= 1e-3 * np.abs(unfused["logits"]).max() and parity["agreement"] >= 99.5
    assert parity["n"] == len(x)
    # One bit less of weight resolution keeps the accuracy.
    assert abs(float((fused["logits"].argmax(1) == y).mean()) - mnist_model["fp32"]) <= 0.01


def _depthwise_model(q: np.ndarray, scale: np.ndarray, *, shared_scale: bool = False):
    """x -> Conv(DQ(q, scale, axis 0), group = channels): a depthwise conv, an op NNCF's overflow fix skips."""
    c = len(q)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w"], name="dq_w", axis=0),
             helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=c)]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared_scale:   # something else reads the scale: requantizing it would change that too
        nodes.append(helper.make_node("Identity", ["s"], ["s_copy"], name="other"))
        outs.append(helper.make_tensor_value_info("s_copy", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 5, 5])],
                              outs, [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"),
                                     numpy_helper.from_array(np.zeros(c, np.int8), "zp")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_a_full_range_depthwise_weight_is_requantized_within_64_per_channel():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (3, 1, 3, 3)).astype(np.int8)
    q[0, 0, 0, 0], q[2] = 127, np.clip(q[2], -40, 40)   # channel 2 already within the bound: left as it is
    scale = np.array([0.01, 0.02, 0.03], np.float32)
    model = _depthwise_model(q, scale)
    assert reduce_weight_range(model) == ["dq_w"] and int8_weight_max(model) == WEIGHT_BOUND
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q_new, s_new = inits["q"].astype(np.float64), inits["s"].astype(np.float64)
    np.testing.assert_array_equal(inits["q"][2], q[2])
    assert s_new[2] == np.float32(0.03) and s_new[0] == pytest.approx(0.01 * 127 / 64)
    # Each weight is within half a new step of the value it had (the second rounding).
    err = np.abs(q_new * s_new[:, None, None, None] - q * scale[:, None, None, None].astype(np.float64))
    assert (err <= s_new[:, None, None, None] / 2 + 1e-9).all()
    x = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    before = ort.InferenceSession(_depthwise_model(q, scale).SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, x)[0]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.abs(after - before).max() <= 9 * np.abs(x["x"]).max() * s_new.max() / 2 + 1e-6   # 9 taps, half a step

    shared = _depthwise_model(q, scale, shared_scale=True)
    assert reduce_weight_range(shared) == [] and int8_weight_max(shared) == 127   # left for the bound check
