"""prune_model on every built-in architecture: targets, importances, ONNX parity, persistence."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.errors import PipelineError
from pipeline.models.cnn import SimpleCNN
from pipeline.models.zoo import MobileNetV2Small, ResNetSmall, ViTSmall
from pipeline.prune import count_macs, load_pruned, measure_latency_ms, prune_model, save_pruned

# Small inputs and shallow variants keep the file fast on 2 shared cores without changing what is
# exercised: SimpleCNN's flatten into its head (torch-pruning's index mapping grows with H×W), residual
# adds with a projection shortcut, depthwise convs with expansion and a residual, ViT heads.
FACTORIES = {
    "simple_cnn": (lambda: SimpleCNN(image_size=8), 8),
    "resnet_small": (lambda: ResNetSmall(image_size=16, widths=(8, 16)), 16),
    "mobilenetv2_small": (lambda: MobileNetV2Small(image_size=16, stem_width=8,
                                                   settings=((1, 8, 1, 1), (4, 16, 2, 2)), last_width=32), 16),
    "vit_small": (lambda: ViTSmall(image_size=16, patch_size=4, embed_dim=32, num_heads=4), 16),
}
NAMES = list(FACTORIES)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """2 shared cores: one intra-op thread is several times faster than two here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(name, seed=0):
    torch.manual_seed(seed)
    factory, size = FACTORIES[name]
    model = factory().eval()
    # Non-trivial BatchNorm statistics and affine terms, so the persistence test means something.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.2, 1.5)
    return model, torch.randn(1, 1, size, size)


def onnx_max_abs(model, example, tmp_path, batch=3):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "pruned.onnx"
    model.eval()
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    x = torch.randn(batch, *example.shape[1:])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.abs(got - want).max())


@pytest.mark.parametrize("name", NAMES)
def test_ratio_target_shrinks_runs_and_exports(name, tmp_path):
    model, ex = make(name)
    macs0, params0 = count_macs(model, ex)
    model, info = prune_model(model, ex, target="ratio", ratio=0.5)
    assert info["macs_before"] == macs0 and info["params_before"] == params0
    assert info["macs_after"] < 0.6 * macs0 and info["params_after"] < params0
    assert info["ratio_used"] == 0.5
    assert info["channels"]["classifier"] == 10
    with torch.no_grad():
        assert model(torch.randn(4, *ex.shape[1:])).shape == (4, 10)
    json.dumps(info["history"])  # JSON-friendly
    assert onnx_max_abs(model, ex, tmp_path) <= 1e-4


@pytest.mark.parametrize("name", [n if n == "simple_cnn" else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_macs_target_fraction_is_met(name, tmp_path):
    model, ex = make(name)
    model, info = prune_model(model, ex, target="macs", macs=0.3)
    assert info["macs_after"] <= 0.3 * info["macs_before"]
    assert info["macs_after"] > 0.1 * info["macs_before"]  # bisection: not wildly over-pruned
    assert 0 < info["ratio_used"] < 1
    with torch.no_grad():
        assert model(torch.randn(2, *ex.shape[1:])).shape == (2, 10)
    assert onnx_max_abs(model, ex, tmp_path) <= 1e-4


def test_macs_target_absolute_budget_and_global():
    model, ex = make("simple_cnn")
    macs0, _ = count_macs(model, ex)
    budget = macs0 // 5
    model, info = prune_model(model, ex, target="macs", macs=float(budget), global_pruning=True, importance="lamp")
    assert info["macs_after"] <= budget
    assert info["macs_budget"] == budget


def test_unreachable_macs_target_errors():
    model, ex = make("simple_cnn")
    with pytest.raises(PipelineError, match="cannot reach"):
        prune_model(model, ex, target="macs", macs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_is_exact(name, tmp_path):
    model, ex = make(name)
    model, info = prune_model(model, ex, target="ratio", ratio=0.4, global_pruning=True)
    save_pruned(model, info["history"], tmp_path / "p")
    assert (tmp_path / "p" / "pruning_history.json").is_file()
    assert (tmp_path / "p" / "model.safetensors").is_file() or (tmp_path / "p" / "state_dict.pt").is_file()
    fresh, _ = make(name, seed=123)  # different weights: everything must come from the folder
    loaded = load_pruned(fresh, ex, tmp_path / "p").eval()
    x = torch.randn(3, *ex.shape[1:])
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    if name == "vit_small":
        assert loaded.blocks[0].attn.head_dim == model.blocks[0].attn.head_dim


def test_mismatched_history_errors_cleanly(tmp_path):
    model, ex = make("resnet_small")
    model, info = prune_model(model, ex, target="ratio", ratio=0.5)
    save_pruned(model, info["history"], tmp_path / "r")
    other, ex2 = make("simple_cnn")
    with pytest.raises(PipelineError) as e:
        load_pruned(other, ex2, tmp_path / "r")
    assert "\n" not in str(e.value)
    # same architecture, narrower widths: the indices do not fit
    cnn, exc = make("simple_cnn")
    cnn, info = prune_model(cnn, exc, target="ratio", ratio=0.25)
    save_pruned(cnn, info["history"], tmp_path / "c")
    narrow = SimpleCNN(image_size=8, channels=(4, 8))
    with pytest.raises(PipelineError) as e:
        load_pruned(narrow, exc, tmp_path / "c")
    assert "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="not found"):
        load_pruned(SimpleCNN(image_size=8), exc, tmp_path / "nothing")


def test_weights_without_pickle(tmp_path):
    model, ex = make("simple_cnn")
    model, info = prune_model(model, ex, ratio=0.5)
    folder = save_pruned(model, info["history"], tmp_path / "w")
    meta = json.loads((folder / "pruning_history.json").read_text())
    assert meta["format"] == 1 and meta["history"]
    if (folder / "state_dict.pt").is_file():  # the fallback must load with weights_only
        torch.load(folder / "state_dict.pt", weights_only=True)


@pytest.mark.parametrize("importance", ["l1", "l2", "lamp", "random", "taylor"])
def test_importances(importance):
    model, ex = make("simple_cnn")
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    model, info = prune_model(model, ex, ratio=0.5, importance=importance, taylor_batches=batches)
    assert info["channels"]["features.0"] == 8 and info["channels"]["features.2"] == 16
    assert all(p.grad is None for p in model.parameters())  # Taylor's gradients are not left behind


def test_bn_scale_needs_batchnorm():
    model, ex = make("simple_cnn")
    with pytest.raises(PipelineError, match="BatchNorm"):
        prune_model(model, ex, ratio=0.5, importance="bn_scale")
    model, ex = make("resnet_small")
    model, info = prune_model(model, ex, ratio=0.5, importance="bn_scale")
    assert info["macs_after"] < info["macs_before"]


def test_bad_arguments_are_one_line_errors():
    model, ex = make("simple_cnn")
    for kwargs in [dict(importance="norm"), dict(target="flops"), dict(importance="taylor"),
                   dict(ignored_layers=["nope"]), dict(ratio=1.5), dict(iterative_steps=0)]:
        with pytest.raises(PipelineError) as e:
            prune_model(model, ex, **kwargs)
        assert "\n" not in str(e.value)


def test_iterative_steps_call_between_steps_and_progress():
    model, ex = make("simple_cnn")
    seen, ticks = [], []
    model, info = prune_model(model, ex, ratio=0.5, iterative_steps=3,
                              between_steps=lambda i, m: seen.append((i, m.features[0].out_channels)),
                              progress=lambda s, n: ticks.append((s, n)))
    assert [i for i, _ in seen] == [0, 1]
    assert seen[0][1] > seen[1][1] > info["channels"]["features.0"]
    assert ticks == [(1, 3), (2, 3), (3, 3)]
    assert info["channels"]["features.0"] == 8


def test_iterative_macs_target_with_training_between_steps():
    model, ex = make("simple_cnn")

    def perturb(step, m):  # stands in for a fine-tune: changes the weights, hence global ranking
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(torch.rand_like(p) * 2)

    model, info = prune_model(model, ex, target="macs", macs=0.2, global_pruning=True, iterative_steps=2,
                              between_steps=perturb)
    assert info["macs_after"] <= 0.2 * info["macs_before"]


def test_ignored_layers_and_round_to():
    model, ex = make("simple_cnn")
    model, info = prune_model(model, ex, ratio=0.6, ignored_layers=["features.0"])
    assert info["channels"]["features.0"] == 16 and info["channels"]["features.2"] < 32
    model, ex = make("resnet_small")
    model, info = prune_model(model, ex, ratio=0.3, round_to=4)
    convs = {k: v for k, v in info["channels"].items() if k != "classifier"}
    assert all(v % 4 == 0 for v in convs.values())


def test_max_layer_ratio_limits_global_pruning():
    model, ex = make("resnet_small")
    model, info = prune_model(model, ex, ratio=0.6, global_pruning=True, max_layer_ratio=0.7)
    init = {n: m.out_channels for n, m in make("resnet_small")[0].named_modules() if isinstance(m, nn.Conv2d)}
    assert init
    assert all(info["channels"][n] >= int(c * 0.3) for n, c in init.items())


def test_vit_heads_are_kept_consistent():
    model, ex = make("vit_small")
    model, info = prune_model(model, ex, ratio=0.5)
    for blk in model.blocks:
        assert blk.attn.qkv.out_features == 3 * blk.attn.num_heads * blk.attn.head_dim
        assert blk.attn.head_dim == 4
    assert model.head_dim == 4


def test_measure_latency_positive():
    model, ex = make("simple_cnn")
    assert measure_latency_ms(model, ex, batch=2, warmup=1, runs=3) > 0


@pytest.mark.slow
def test_latency_target():
    # Full-size SimpleCNN at batch 32, so that compute (not call overhead) dominates the latency.
    torch.manual_seed(0)
    model, ex = SimpleCNN().eval(), torch.randn(1, 1, 28, 28)
    base = measure_latency_ms(model, ex, batch=32)
    model, info = prune_model(model, ex, target="latency_ms", latency_ms=base * 0.7, latency_batch=32)
    assert info["latency_budget_ms"] == base * 0.7
    assert info["macs_after"] < 0.9 * info["macs_before"]
    assert info["latency_ms_after"] > 0


def test_layer_ratios_fix_named_layers():
    model, ex = make("simple_cnn")
    model, info = prune_model(model, ex, ratio=0.0, layer_ratios={"features.0": 0.6875, "features.2": 0.75})
    assert info["channels"]["features.0"] == 5 and info["channels"]["features.2"] == 8
    model, ex = make("simple_cnn")
    model, info = prune_model(model, ex, target="macs", macs=0.3, layer_ratios={"features.0": 0.25})
    assert info["channels"]["features.0"] == 12 and info["macs_after"] <= 0.3 * info["macs_before"]
    for bad in ({"nope": 0.5}, {"features.0": 1.0}):
        with pytest.raises(PipelineError):
            prune_model(make("simple_cnn")[0], ex, layer_ratios=bad)


class TwoOutputs(nn.Module):
    """(tokens, logits) like a vision tower: the projector's width is part of the contract."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 16, 4, 4)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.projector = nn.Linear(16, 24)
        self.classifier = nn.Linear(24, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = self.projector(t + self.mlp(t))
        return t, self.classifier(t.mean(1))


def test_layers_producing_model_outputs_keep_their_width(tmp_path):
    torch.manual_seed(0)
    model, ex = TwoOutputs().eval(), torch.randn(1, 1, 8, 8)
    model, info = prune_model(model, ex, ratio=0.5)
    tokens, logits = model(torch.randn(2, 1, 8, 8))
    assert tokens.shape == (2, 4, 24) and logits.shape == (2, 10)
    assert info["channels"]["embed"] == 8 and info["channels"]["mlp.0"] == 16
    save_pruned(model, info["history"], tmp_path)
    torch.manual_seed(1)
    loaded = load_pruned(TwoOutputs(), ex, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ex)[0], model.eval()(ex)[0])
