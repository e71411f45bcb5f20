"""export.onnx_export, export.fp16, export.parity and the ORT runner on tiny models (CPU only)."""
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper

from edgerun.ort import OrtError, OrtRunner, available_ort_providers, run_onnx
from export.errors import ExportError
from export.fp16 import to_fp16
from export.onnx_export import check_onnx, export_onnx
from export.parity import compare_outputs

BATCHES = (1, 7, 64)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TinyViT(nn.Module):
    """Patch embedding, class token, one pre-norm block (attention + GELU MLP), LayerNorm, head."""

    def __init__(self, dim=32, heads=4, patch=4, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def tokens(self, x):
        return self.patch(x).flatten(2).transpose(1, 2)

    def forward(self, x):
        x = self.tokens(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x)[:, 0])


class TwoOutputs(nn.Module):
    """forward returns (tokens, logits); tokens is also used inside the graph."""

    def __init__(self):
        super().__init__()
        self.vit = TinyViT()

    def forward(self, x):
        return self.vit.tokens(x), self.vit(x)


MODELS = {
    "cnn": (TinyCNN, ("logits",)),
    "vit": (TinyViT, ("logits",)),
    "two": (TwoOutputs, ("tokens", "logits")),
}


def torch_outputs(model, x, names):
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    out = out if isinstance(out, tuple) else (out,)
    return {name: o.numpy() for name, o in zip(names, out, strict=True)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model exported once (the dynamo exporter takes seconds per model)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("onnx")
    result = {}
    for key, (cls, names) in MODELS.items():
        model = cls().eval()
        if key == "cnn":  # non-trivial BatchNorm statistics, so that eval mode matters
            model.bn1.running_mean.uniform_(-0.5, 0.5)
            model.bn1.running_var.uniform_(0.5, 2.0)
        path = folder / f"{key}.onnx"
        info = export_onnx(model, torch.randn(2, 3, 16, 16), path, output_names=names)
        result[key] = (model, names, path, info)
    return result


def random_batches(seed=0):
    rng = np.random.default_rng(seed)
    return {b: rng.standard_normal((b, 3, 16, 16)).astype(np.float32) for b in BATCHES}


@pytest.mark.parametrize("key", list(MODELS))
def test_export_runs_every_batch_with_torch_parity(exported, key):
    model, names, path, info = exported[key]
    assert path.is_file() and info["path"] == str(path)
    assert info["opset"] == 18 and info["slimmed"] is False
    assert info["size_bytes"] == path.stat().st_size
    assert info["inputs"] == [{"name": "input", "shape": ["batch", 3, 16, 16], "dtype": "float32"}]
    assert [o["name"] for o in info["outputs"]] == list(names)
    assert all(o["shape"][0] == "batch" for o in info["outputs"])
    assert check_onnx(path)["outputs"] == info["outputs"]
    assert not list(path.parent.glob("*.partial"))

    with OrtRunner(path) as runner:
        assert runner.input_names == ["input"] and runner.output_names == list(names)
        for batch, x in random_batches().items():
            result = compare_outputs(torch_outputs(model, x, names), runner.infer({"input": x}))
            assert result["max_abs"] <= 1e-4, (batch, result)
            assert all(m["min_cosine"] >= 0.9999 for m in result["outputs"].values()), (batch, result)


@pytest.mark.parametrize("key", list(MODELS))
def test_fp16_keeps_fp32_io_and_close_outputs(exported, tmp_path, key):
    model, names, path, _ = exported[key]
    info = to_fp16(path, tmp_path / f"{key}_fp16.onnx")
    assert [i["dtype"] for i in info["inputs"] + info["outputs"]] == ["float32"] * (1 + len(names))
    fp16_model = onnx.load(info["path"])
    assert any(i.data_type == TensorProto.FLOAT16 for i in fp16_model.graph.initializer)

    x = random_batches(seed=1)[7]
    with OrtRunner(info["path"]) as runner:
        out = runner.infer({"input": x})
    assert all(v.dtype == np.float32 for v in out.values())
    result = compare_outputs(torch_outputs(model, x, names), out)
    # FP16 has ~3 decimal digits: errors of ~1e-3 on outputs of order 1.
    assert 0 < result["max_abs"] <= 1e-2, result
    assert result["min_mean_cosine"] >= 0.999, result
    assert all(m["min_cosine"] >= 0.999 for m in result["outputs"].values()), result


def test_slim_export_of_a_training_model(exported, tmp_path):
    """export_onnx exports eval behaviour (BatchNorm running stats) and restores training mode."""
    model, names, _, _ = exported["cnn"]
    model.train()
    try:
        info = export_onnx(model, torch.randn(3, 3, 16, 16), tmp_path / "slim.onnx", slim=True)
        assert model.training
    finally:
        model.eval()
    assert info["slimmed"] is True and info["inputs"][0]["shape"][0] == "batch"
    x = random_batches()[64]
    out = run_onnx(info["path"], x, batch_size=64)
    assert compare_outputs(torch_outputs(model, x, names), out)["max_abs"] <= 1e-4


class FixedBatch(nn.Module):  # hard-codes the batch size: cannot have a dynamic batch
    def forward(self, x):
        return x.reshape(2, -1).sum(1)


class Eigvals(nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x.reshape(-1, 2, 2)).real.flatten(1)


class Eig(nn.Module):
    """An op the ONNX exporter has no translation for, inside a named submodule."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Eigvals())

    def forward(self, x):
        return self.inner(x)


def test_export_errors_are_one_line_and_leave_only_the_log(tmp_path):
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    path = tmp_path / "fixed.onnx"
    with pytest.raises(ExportError) as err:
        export_onnx(FixedBatch(), torch.randn(1, 3), path)
    message = str(err.value)
    assert message.startswith("fixed.onnx: torch.export cannot keep the batch dynamic (") and "\n" not in message
    assert "specialized it to be a constant (2)" in message
    log = tmp_path / "fixed.onnx.export.log"
    assert message.endswith(f"full log: {log}")
    assert "Constraints violated" in log.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx.export.log"]

    with pytest.raises(ExportError, match=r"pair.onnx: the model returns 2 outputs but output_names has 1"):
        export_onnx(Pair(), torch.randn(2, 3), tmp_path / "pair.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx.export.log"]


def test_unsupported_op_names_the_op_and_the_module(tmp_path):
    path = tmp_path / "eig.onnx"
    with pytest.raises(ExportError) as err:
        export_onnx(Eig(), torch.randn(1, 4), path)
    message = str(err.value)
    assert "\n" not in message and message.startswith("eig.onnx: torch.onnx.export failed (")
    assert "No ONNX function found for aten.linalg_eig" in message, message
    assert "in module 'inner.1' (Eigvals)" in message, message
    assert (tmp_path / "eig.onnx.export.log").is_file() and not path.exists()
    # the log has the whole chain, not just the one line
    assert "DispatchError" in (tmp_path / "eig.onnx.export.log").read_text()


class SpecialisedAtBatch1(nn.Module):
    """Modules that torch.export specialises to batch 1 from a batch-1 example: Unfold, a
    TransformerEncoder and a ConvNeXt block (depthwise 7x7, channels-last LayerNorm, layer scale)."""

    def __init__(self):
        super().__init__()
        self.unfold = nn.Unfold(4, stride=4)  # [B, 3*16, 16 patches]
        self.embed = nn.Linear(48, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.dw = nn.Conv2d(3, 3, 7, padding=3, groups=3)
        self.norm = nn.LayerNorm(3)
        self.scale = nn.Parameter(torch.full((3, 1, 1), 0.5))
        self.head = nn.Linear(19, 5)

    def forward(self, x):
        tokens = self.encoder(self.embed(self.unfold(x).transpose(1, 2))).mean(1)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        conv = (x + self.scale * y).mean((2, 3))
        return self.head(torch.cat([tokens, conv], 1))


def test_batch1_example_still_exports_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = SpecialisedAtBatch1().eval()
    info = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "spec.onnx")
    assert info["inputs"][0]["shape"][0] == "batch" and info["outputs"][0]["shape"][0] == "batch"
    for batch in (1, 7):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            want = model(x).numpy()
        got = run_onnx(info["path"], x.numpy())["logits"]
        assert got.shape == (batch, 5) and np.abs(got - want).max() <= 1e-4


def test_opset_is_honoured_or_refused(tmp_path):
    for bad, match in [(13, "opset 13 is below 18"), (5, "opset 5 is below 18"), (999, "newer than"),
                       ("18", "must be an integer")]:
        with pytest.raises(ExportError, match=match) as err:
            export_onnx(TinyCNN(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", opset=bad)
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    info = export_onnx(TinyCNN().eval(), torch.randn(1, 3, 16, 16), tmp_path / "m20.onnx", opset=20,
                       check_batches=(1, 3))
    assert info["opset"] == 20 and onnx.load(info["path"]).opset_import[0].version == 20


def test_example_batch_must_be_at_least_two(tmp_path):
    with pytest.raises(ExportError, match="example_batch must be an integer >= 2"):
        export_onnx(TinyCNN(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", example_batch=1)
    with pytest.raises(ExportError, match="at least one row"):
        export_onnx(TinyCNN(), torch.randn(0, 3, 16, 16), tmp_path / "m.onnx")


def test_a_later_success_removes_the_stale_log(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError):
        export_onnx(FixedBatch(), torch.randn(1, 3), path)
    assert (tmp_path / "m.onnx.export.log").is_file()
    export_onnx(TinyCNN().eval(), torch.randn(1, 3, 16, 16), path, check_batches=(1, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


NOISE_SCRIPT = """
import torch, torch.nn as nn
from export.onnx_export import export_onnx
m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(1), nn.Linear(72, 3)).eval()
export_onnx(m, torch.zeros(1, 1, 8, 8), r"{path}", check_batches=(1, 2))
print("EXPORTED")
"""


def test_known_exporter_noise_is_filtered_at_its_source(tmp_path, root):
    """A fresh process (the exporter's registry prints its torchvision notices once per process)."""
    p = subprocess.run([sys.executable, "-c", NOISE_SCRIPT.format(path=tmp_path / "n.onnx")], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "EXPORTED" in p.stdout, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert "torchvision is not installed" not in out and "LeafSpec" not in out, out[-2000:]
    assert "[torch.onnx]" not in out  # the exporter's progress lines (verbose=False)


# ---------------------------------------------------------------- check_onnx errors

def one_line_error(path, match):
    with pytest.raises(ExportError, match=match) as err:
        check_onnx(path)
    message = str(err.value)
    assert message.startswith(f"{path.name}: ") and "\n" not in message
    return message


def test_check_onnx_missing_file(tmp_path):
    one_line_error(tmp_path / "model.onnx", "no such file")


def test_check_onnx_random_bytes(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    one_line_error(path, "not a valid ONNX file")


def test_check_onnx_truncated_file(exported, tmp_path):
    data = exported["cnn"][2].read_bytes()
    path = tmp_path / "model.onnx"
    path.write_bytes(data[: len(data) * 9 // 10])
    one_line_error(path, "not a valid ONNX file")


def test_check_onnx_checker_failure(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.graph.node[0].op_type = "NoSuchOp"
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    one_line_error(path, "fails onnx.checker")


def test_check_onnx_graph_without_inputs(tmp_path):
    const = helper.make_node("Constant", [], ["y"],
                             value=helper.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0]))
    graph = helper.make_graph([const], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    one_line_error(path, "has no inputs")


# ---------------------------------------------------------------- compare_outputs

def test_compare_identical():
    out = {"logits": np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)}
    result = compare_outputs(out, {"logits": out["logits"].copy()})
    assert result["max_abs"] == 0.0 and result["min_mean_cosine"] == pytest.approx(1.0)
    assert result["outputs"]["logits"] == {"max_abs": 0.0, "mean_abs": 0.0,
                                           "mean_cosine": pytest.approx(1.0),
                                           "min_cosine": pytest.approx(1.0)}


def test_compare_perturbed_numbers():
    reference = {"a": np.array([[1.0, 0.0], [0.0, 1.0]]), "b": np.array([[3.0, 4.0]])}
    candidate = {"a": np.array([[1.0, 0.0], [1.0, 1.0]]), "b": np.array([[3.0, 4.5]])}
    result = compare_outputs(reference, candidate)
    a, b = result["outputs"]["a"], result["outputs"]["b"]
    assert a["max_abs"] == 1.0 and a["mean_abs"] == 0.25
    assert a["min_cosine"] == pytest.approx(1 / np.sqrt(2))  # row 2: (0,1) vs (1,1)
    assert a["mean_cosine"] == pytest.approx((1 + 1 / np.sqrt(2)) / 2)
    assert b["max_abs"] == 0.5 and b["mean_abs"] == 0.25
    assert b["mean_cosine"] == pytest.approx((9 + 18) / (5 * np.hypot(3, 4.5)))
    assert result["max_abs"] == 1.0
    assert result["min_mean_cosine"] == pytest.approx(min(a["mean_cosine"], b["mean_cosine"]))


def test_compare_one_bad_sample_shows_in_min_cosine():
    ref = np.ones((8, 4))
    cand = ref.copy()
    cand[3] = -1.0
    m = compare_outputs({"x": ref}, {"x": cand})["outputs"]["x"]
    assert m["min_cosine"] == pytest.approx(-1.0) and m["mean_cosine"] == pytest.approx(0.75)


def test_compare_nan_is_the_worst_match():
    result = compare_outputs({"x": np.ones((2, 3))}, {"x": np.array([[1, 1, np.nan], [1, 1, 1.0]])})
    assert result["max_abs"] == np.inf and result["outputs"]["x"]["min_cosine"] == -1.0


def test_compare_mismatches_raise():
    with pytest.raises(ExportError, match="output names differ"):
        compare_outputs({"logits": np.zeros(2)}, {"tokens": np.zeros(2)})
    with pytest.raises(ExportError, match=r"output 'logits' has shape \(2, 3\)"):
        compare_outputs({"logits": np.zeros((2, 3))}, {"logits": np.zeros((2, 4))})


# ---------------------------------------------------------------- runners

def test_run_onnx_batches_match_one_run(exported):
    _, names, path, _ = exported["cnn"]
    x = np.random.default_rng(2).standard_normal((70, 3, 16, 16)).astype(np.float32)
    whole = run_onnx(path, x, batch_size=70)
    pieces = run_onnx(path, x, batch_size=16, threads=1)
    assert whole["logits"].shape == (70, 10)
    np.testing.assert_allclose(pieces["logits"], whole["logits"], rtol=1e-5, atol=1e-6)


def test_runner_errors(exported):
    path = exported["cnn"][2]
    assert "CPUExecutionProvider" in available_ort_providers()
    with pytest.raises(OrtError, match="cnn.onnx: onnxruntime here has no NoSuchExecutionProvider"):
        OrtRunner(path, providers=("NoSuchExecutionProvider", "CPUExecutionProvider"))
    with OrtRunner(path) as runner:
        with pytest.raises(OrtError, match=r"cnn.onnx: expected inputs \['input'\]"):
            runner.infer({"images": np.zeros((1, 3, 16, 16), np.float32)})
    with pytest.raises(OrtError, match="at least one input row"):
        run_onnx(path, np.zeros((0, 3, 16, 16), np.float32))
