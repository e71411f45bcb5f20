"""Coverage: the architectures users bring, through prune -> ONNX (dynamic batch) -> INT8 -> onnxruntime.

Small plain-torch versions (pipeline.models.coverage) on MNIST images (28x28; the 3-channel variants
see the gray image repeated): prune to 40% of the MACs, check that every pruned layer is still
consistent (heads divide, groups divide, norms match), export with a dynamic batch and compare with
torch at batch 1 and 7, quantize with NNCF and run the INT8 model once. Untrained weights: this is
about the path working, not accuracy (benchmarks/bench_coverage.py trains them for that).
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

from calib.quantize import quantize_onnx
from edgerun.ort import run_onnx
from edgerun.readers import load_mnist
from export.onnx_export import export_onnx
from export.parity import compare_outputs
from pipeline.models.coverage import COVERAGE, ViTMHA
from pipeline.prune import prune_model

# (name, constructor kwargs, input channels): each architecture once, 1 and 3 channels both seen.
CASES = [("vit_mha", {}, 1), ("convnext_small", {}, 3), ("mobilenetv3_small", {}, 1),
         ("regnet_small", {}, 3), ("densenet_small", {}, 1), ("yolo_c2f_small", {"split_free": True}, 3)]


# Every architecture through prune, export and quantize: ~25 s, run by make test-e2e (CI), not make test.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.heavy]


@pytest.fixture(scope="module")
def mnist(root):
    images, _ = load_mnist(root / "data" / "mnist", "test")
    x = images[:64].astype(np.float32) / 255.0
    return (x - 0.1307) / 0.3081


def inputs(mnist, channels, n):
    return np.ascontiguousarray(np.repeat(mnist[:n], channels, axis=1))


def check_structure(model: nn.Module) -> None:
    """Every pruned layer agrees with its own attributes: what a mis-pruned graph would break."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
            assert m.weight.shape == (m.out_channels, m.in_channels // m.groups, *m.kernel_size), name
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.running_mean.shape == (m.num_features,), name
        elif isinstance(m, nn.LayerNorm):
            assert tuple(m.weight.shape) == tuple(m.normalized_shape), name
        elif isinstance(m, nn.MultiheadAttention):
            e = m.embed_dim
            assert e % m.num_heads == 0 and m.head_dim * m.num_heads == e, name
            assert m.in_proj_weight.shape == (3 * e, e) and m.out_proj.weight.shape == (e, e), name


@pytest.mark.parametrize("name, kwargs, channels", CASES, ids=[c[0] for c in CASES])
def test_prune_export_quantize(name, kwargs, channels, mnist, tmp_path):
    torch.manual_seed(0)
    model = COVERAGE[name](in_channels=channels, **kwargs).eval()
    example = torch.zeros(1, channels, 28, 28)

    model, info = prune_model(model, example, target="macs", macs=0.4)
    assert 0.15 * info["macs_before"] < info["macs_after"] <= 0.4 * info["macs_before"], info["macs_after"]
    assert info["params_after"] < info["params_before"]
    check_structure(model)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1
                 and m.groups == m.in_channels]
    assert all(m.out_channels == m.groups for m in depthwise)  # depthwise stays depthwise
    if name == "regnet_small":
        assert any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels for m in model.modules())

    onnx_info = export_onnx(model, example, tmp_path / f"{name}.onnx", check_batches=(1, 7))
    assert onnx_info["inputs"][0]["shape"][0] == "batch" and onnx_info["outputs"][0]["shape"][0] == "batch"
    for batch in (1, 7):
        x = inputs(mnist, channels, batch)
        with torch.no_grad():
            want = {"logits": model(torch.from_numpy(x)).numpy()}
        got = run_onnx(onnx_info["path"], x)
        parity = compare_outputs(want, got)
        assert parity["max_abs"] <= 1e-4, (batch, parity)

    q = quantize_onnx(onnx_info["path"], tmp_path / f"{name}_int8.onnx", inputs(mnist, channels, 32),
                      model_type="transformer" if name.startswith("vit") else None)
    assert q["qdq"], q
    x = inputs(mnist, channels, 7)
    int8 = run_onnx(q["path"], x)["logits"]
    assert int8.shape == (7, 10) and np.isfinite(int8).all()


def test_mha_without_whole_heads_still_exports(mnist, tmp_path):
    """Whole-head removal rewrites nn.MultiheadAttention's num_heads: the ONNX graph must follow it."""
    torch.manual_seed(0)
    model, info = prune_model(ViTMHA().eval(), torch.zeros(1, 1, 28, 28), ratio=0.25, head_ratio=0.5)
    assert {h["num_heads"] for h in info["heads"].values()} == {2}
    path = export_onnx(model, torch.zeros(1, 1, 28, 28), tmp_path / "heads.onnx", check_batches=(1, 7))["path"]
    x = inputs(mnist, 1, 7)
    with torch.no_grad():
        want = {"logits": model(torch.from_numpy(x)).numpy()}
    assert compare_outputs(want, run_onnx(path, x))["max_abs"] <= 1e-4
