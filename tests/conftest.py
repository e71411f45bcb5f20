"""Shared fixtures: the project root and the small settings every pipeline test runs with."""
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# configs/cpu.toml starts from the vendored baseline checkpoint; tests that vary the data, the model or
# the training train their own small baseline instead (a few seconds on a subset).
TRAIN_BASELINE = "model.weights="
# A few seconds per stage on 2 cores: MNIST subsets, one short epoch, few timing rounds, one process.
SMALL = [TRAIN_BASELINE, "data.train_subset=2000", "data.test_subset=300", "baseline.epochs=1", "finetune.epochs=0.3",
         "finetune.max_drop=8", "quantize.calib_size=64", "quantize.max_drop=1.5",
         "quantize.min_agreement=95",   # 300 test images of a barely trained model: one image is 0.33 pt
         "profile.iters=5",
         "profile.warmup=2", "profile.batches=[1, 8]", "profile.rounds=3", "profile.processes=1",
         "profile.block_ms=5"]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def fuzz_settings():
    """Hypothesis settings of the fuzz tests: deterministic, no example database, no deadline."""
    from hypothesis import HealthCheck, settings
    return settings(max_examples=60, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text and "\r" not in text, f"message is not one line: {text!r}"
    return text


@pytest.fixture(scope="module")
def one_thread():
    """2 shared cores: one intra-op torch thread is several times faster than two here."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conv_onnx(path, channels: int) -> Path:
    """Conv(1 -> channels, 3x3) + ReLU + global average pool + Flatten on 1x8x8, dynamic batch:
    a real ONNX file whose cost grows with ``channels`` (for timing and bundle tests)."""
    import onnx
    from onnx import TensorProto, helper
    w = (np.random.default_rng(0).standard_normal((channels, 1, 3, 3)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", channels])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return Path(path)
