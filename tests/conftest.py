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


@pytest.fixture(scope="session", autouse=True)
def torchlib_registry_built_once():
    """torch.onnx's dynamo exporter rebuilds its table of ~1,100 ATen -> ONNX functions on every export (~0.5 s
    on 2 shared cores; the suite exports a few dozen times in this process). Within the test process the table
    is built once per opset and each export gets its own copy of it (fresh lists, so a registration on one
    export's registry cannot reach another's): what the exporter sees is what a fresh build gives. A torch
    whose registry is laid out otherwise is left alone. Fresh processes (the CLI tests) build it as usual."""
    try:
        from torch.onnx._internal.exporter import _registration
        cls = _registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
        probe = cls()
        laid_out = isinstance(original, classmethod) and isinstance(probe.functions, dict)
        laid_out = laid_out and hasattr(probe, "_opset_version") and set(vars(probe)) == {"functions", "_opset_version"}
    except (ImportError, AttributeError, KeyError):
        laid_out = False
    if not laid_out:
        yield
        return
    built = {}

    def from_torchlib(klass, opset_version=_registration._constants.TORCHLIB_OPSET):
        key = (klass, opset_version)
        if key not in built:
            built[key] = original.__func__(klass, opset_version)
        registry = klass()
        registry._opset_version = built[key]._opset_version
        registry.functions = {k: list(v) for k, v in built[key].functions.items()}
        return registry
    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


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
