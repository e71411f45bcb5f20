"""The plain-torch model zoo: shapes, heads, attributes, registry names, ONNX export."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.models import build_model
from pipeline.models.zoo import MobileNetV2Small, ResNetSmall, ViTSmall

ZOO = [ResNetSmall, MobileNetV2Small, ViTSmall]


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_forward_shape_and_classifier(cls):
    torch.manual_seed(0)
    m = cls(num_classes=7).eval()
    assert isinstance(m.classifier, nn.Linear) and m.classifier.out_features == 7
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 7)


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_rgb_input(cls):
    m = cls(num_classes=5, in_channels=3, image_size=28).eval()
    assert m(torch.randn(2, 3, 28, 28)).shape == (2, 5)


def test_other_image_sizes():
    assert ResNetSmall(image_size=32)(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    assert MobileNetV2Small(image_size=32)(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    assert ViTSmall(image_size=32, patch_size=8)(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTSmall(image_size=30)


def test_structure_features():
    r = ResNetSmall()
    assert any(isinstance(m, nn.BatchNorm2d) for m in r.modules())
    mb = MobileNetV2Small()
    depthwise = [m for m in mb.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert any(b.use_residual for b in mb.blocks)
    v = ViTSmall(embed_dim=48, num_heads=3)
    assert v.num_heads == 3 and v.head_dim == 16
    assert all(b.attn.num_heads == 3 and b.attn.head_dim == 16 for b in v.blocks)
    assert isinstance(v.blocks[0].attn.qkv, nn.Linear) and v.blocks[0].attn.qkv.out_features == 144


@pytest.mark.parametrize("name", ["resnet_small", "mobilenetv2_small", "vit_small"])
def test_registry_builds(name):
    m = build_model(name, num_classes=10, in_channels=1, image_size=28).eval()
    assert m(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_onnx_export_dynamic_batch(cls, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = cls().eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, (torch.randn(1, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    x = torch.randn(5, 1, 28, 28)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = m(x).numpy()
    assert np.abs(got - want).max() <= 1e-4
