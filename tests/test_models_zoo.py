"""The plain-torch model zoo and the registry: shapes, heads, attributes, ONNX export, factories, probing."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.errors import PipelineError
from pipeline.models import build_model, probe_model
from pipeline.models.cnn import SimpleCNN
from pipeline.models.coverage import COVERAGE, C2f
from pipeline.models.tower import VisionTower
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


# ------------------------------------------------------------------------------------- factories
FACTORIES = '''
import torch.nn as nn

class Net(nn.Module):
    def __init__(self, classes, chans, size):
        super().__init__()
        self.fc = nn.Linear(chans * size * size, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))

def plain(num_classes):                       # takes neither channels nor size
    return Net(num_classes, 1, 28)

def timm_like(num_classes, in_chans=3, img_size=224):
    return Net(num_classes, in_chans, img_size)

def rect(num_classes, in_channels, input_size):
    assert input_size == (20, 28)
    return Net(num_classes, in_channels, 1)

def renamed(n_classes, in_channels=1, image_size=28):
    return Net(n_classes, in_channels, image_size)

def no_classes(in_channels, image_size):
    return Net(10, in_channels, image_size)

def catch_all(**kw):
    assert set(kw) == {"num_classes", "depth"}, kw
    return Net(kw["num_classes"], 1, 28)

def raises_key(num_classes):
    return {}["nope"]

def returns_none(num_classes):
    return None

def exits(num_classes):
    raise SystemExit(3)
'''


@pytest.fixture()
def factories(tmp_path, monkeypatch):
    (tmp_path / "userfactories.py").write_text(FACTORIES)
    (tmp_path / "brokenimport.py").write_text("import torch\nraise RuntimeError('no GPU here')\n")
    (tmp_path / "badsyntax.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userfactories"


def test_factories_get_what_their_signature_asks_for(factories):
    m = build_model(f"{factories}:plain", num_classes=4, in_channels=3, image_size=(28, 28))
    assert m.fc.out_features == 4 and m.fc.in_features == 784
    m = build_model(f"{factories}:timm_like", num_classes=5, in_channels=2, image_size=(8, 8))
    assert m.fc.in_features == 2 * 64 and m.fc.out_features == 5
    m = build_model(f"{factories}:rect", num_classes=3, in_channels=2, image_size=(20, 28))
    assert m.fc.in_features == 2
    m = build_model(f"{factories}:renamed", num_classes=7, in_channels=1, image_size=28,
                    kwargs={"classes_arg": "n_classes"})
    assert m.fc.out_features == 7
    m = build_model(f"{factories}:no_classes", num_classes=7, in_channels=1, image_size=28,
                    kwargs={"classes_arg": ""})
    assert m.fc.out_features == 10
    build_model(f"{factories}:catch_all", num_classes=2, in_channels=1, image_size=28, kwargs={"depth": 3})
    # the user's own kwargs win over what the data says; the older call style still works
    m = build_model(f"{factories}:timm_like", num_classes=5, in_channels=2, image_size=8, kwargs={"in_chans": 1})
    assert m.fc.in_features == 64
    assert build_model("simple_cnn", num_classes=3, in_channels=1, channels=(4, 8)).classifier.out_features == 3


@pytest.mark.parametrize("spec, kwargs, match", [
    (":raises_key", {}, r"model.factory: userfactories:raises_key\(num_classes=10\) raised KeyError: 'nope'"),
    (":returns_none", {}, "userfactories:returns_none returned NoneType, not a torch.nn.Module"),
    (":exits", {}, "raised SystemExit: 3"),
    (":renamed", {}, "has no parameter 'num_classes' for the number of classes .*classes_arg"),
    (":plain", {"depth": 2}, "model.kwargs: userfactories:plain has no parameter 'depth'"),
    (":plain", {"classes_arg": 3}, "classes_arg: expected the name"),
    ("brokenimport:f", {}, "cannot import module 'brokenimport' for brokenimport:f .*RuntimeError: no GPU here"),
    ("badsyntax:f", {}, "cannot import module 'badsyntax' .*SyntaxError"),
    (":missing", {}, "has no callable 'missing'"),
])
def test_factory_failures_are_one_line_naming_the_factory(factories, spec, kwargs, match):
    spec = f"{factories}{spec}" if spec.startswith(":") else spec
    with pytest.raises(PipelineError, match=match) as e:
        build_model(spec, num_classes=10, in_channels=1, image_size=28, kwargs=kwargs)
    assert "\n" not in str(e.value)


def test_probe_model_refuses_wrong_widths_and_names_the_failing_part():
    assert probe_model(ResNetSmall(num_classes=4), 1, 28, 4).shape == (2, 4)
    tokens, logits = probe_model(VisionTower(dim=16, depth=1, heads=2, llm_hidden=8), 1, (28, 28), 10, batch=3)
    assert logits.shape == (3, 10)
    with pytest.raises(PipelineError, match=r"logits of shape \[2, 10\] .* expected \[2, 5\]"):
        probe_model(ResNetSmall(num_classes=10), 1, 28, 5)
    with pytest.raises(PipelineError) as e:
        probe_model(SimpleCNN(image_size=28), 1, 16, 10, name="simple_cnn")  # flatten width mismatch
    msg = str(e.value)
    assert msg.startswith("model: simple_cnn fails on zeros of shape [2, 1, 16, 16] in classifier (Linear): ")
    assert "\n" not in msg
    with pytest.raises(PipelineError, match=r"in features.0 \(Conv2d\)"):
        probe_model(SimpleCNN(), 3, 28, 10)
    m = ResNetSmall().train()
    probe_model(m, 1, 28, 10)
    assert m.training  # restored


# ------------------------------------------------------------------------------------- coverage zoo
@pytest.mark.parametrize("name", sorted(COVERAGE))
@pytest.mark.parametrize("channels", [1, 3])
def test_coverage_models_build_by_name_and_run(name, channels):
    m = build_model(name, num_classes=7, in_channels=channels, image_size=(28, 28)).eval()
    with torch.no_grad():
        assert m(torch.randn(2, channels, 28, 28)).shape == (2, 7)


def test_split_free_c2f_computes_the_same_function():
    torch.manual_seed(0)
    c2f = C2f(8, 8, n=2).eval()
    for mod in c2f.modules():
        if isinstance(mod, nn.BatchNorm2d):  # non-trivial statistics, so that copying them matters
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -1, 1)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(c2f(x), c2f.split_free().eval()(x))
