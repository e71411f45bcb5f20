"""Bring your own model, through the Python API in-process: a user's module (``model.factory = "mod:fn"``)
on a user's ImageFolder dataset; the factory arguments it receives; ``model.weights`` (strict and not);
the chance gate that stops a run on a baseline that learned nothing; the BatchNorm train/eval notice."""
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from pipeline.cli import main
from pipeline.errors import PipelineError

CLASSES = ("checker", "hstripes", "vstripes")
STAGES = ("baseline", "prune", "finetune", "export_onnx", "quantize", "engine", "profile", "package")
MODULE_NAME = "byo_tiny"

MODULE = textwrap.dedent('''
    """A user's models, outside the project: small CNNs with the head named ``classifier``."""
    import torch.nn as nn

    RECEIVED = []   # what make_sized was called with (the test reads it)


    def make(num_classes=3, in_channels=3, width=12):
        return Tiny(num_classes, in_channels, width)


    def make_named(n_out, width=12):
        """The classes count under another name (model.kwargs.classes_arg) and no in_channels."""
        return Tiny(n_out, 3, width)


    def make_sized(num_classes, in_channels, image_size, width=4):
        """Needs the input size: its head is a Linear over the flattened feature map."""
        RECEIVED.append({"in_channels": in_channels, "image_size": image_size})
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(width * image_size * image_size, num_classes))


    def make_blind(num_classes=3):
        """Ignores its input (features times zero): it can only learn the class prior, i.e. chance."""
        return Blind(num_classes)


    def make_stale_bn(num_classes=3, in_channels=3, width=12):
        """BatchNorm momentum 0: the running statistics never leave their init (mean 0, var 1)."""
        model = Tiny(num_classes, in_channels, width, gain=8.0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.0
        return model


    class Tiny(nn.Module):
        def __init__(self, num_classes, in_channels, width, gain=1.0):
            super().__init__()
            self.gain = gain
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1))
            self.classifier = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            return self.classifier(self.features(x * self.gain).flatten(1))


    class Blind(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.AdaptiveAvgPool2d(1))
            self.classifier = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.classifier(self.features(x).flatten(1) * 0.0)
''')

# The run settings every test here shares: small, few timing rounds, one process.
FAST = ["finetune.epochs=0.2", "quantize.calib_size=16", "profile.iters=3", "profile.warmup=1",
        "profile.rounds=3", "profile.processes=1", "profile.block_ms=5"]


def _pattern(kind: str, rng) -> np.ndarray:
    """A 16x16 RGB image of one of three simple patterns, with a random colour, phase and noise."""
    yy, xx = np.mgrid[0:16, 0:16]
    period = int(rng.integers(2, 4))
    phase = int(rng.integers(0, period))
    if kind == "hstripes":
        mask = ((yy + phase) // period) % 2
    elif kind == "vstripes":
        mask = ((xx + phase) // period) % 2
    else:
        mask = (((yy + phase) // period) + ((xx + phase) // period)) % 2
    colour = rng.integers(120, 256, size=3)
    img = mask[..., None] * colour[None, None, :] + rng.normal(0, 12, size=(16, 16, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    """The user's module (importable for this module's tests) and an ImageFolder tree (train/, test/)."""
    from PIL import Image
    base = tmp_path_factory.mktemp("byo")
    (base / "code").mkdir()
    (base / "code" / f"{MODULE_NAME}.py").write_text(MODULE)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 12)):
        for c in CLASSES:
            folder = base / "images" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_pattern(c, rng)).save(folder / f"{i:03d}.png")
    sys.path.insert(0, str(base / "code"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny steps: more threads only fight the other jobs for the 2 cores
    yield base
    torch.set_num_threads(threads)
    sys.path.remove(str(base / "code"))
    sys.modules.pop(MODULE_NAME, None)


CONFIG = textwrap.dedent('''
    [data]
    kind = "imagefolder"
    root = "ROOT"
    channels = 3
    size = [16, 16]
    mean = [0.3, 0.3, 0.3]
    std = [0.35, 0.35, 0.35]
    reference_batch = 16

    [model]
    num_classes = 3
    MODEL

    [baseline]
    epochs = 8
    lr = 3e-3
    batch_size = 16

    [prune]
    target = "ratio"
    ratio = 0.3

    [finetune]
    batch_size = 16
    val_size = 12
    gate = "warn"

    [quantize]
    gate = "warn"

    [profile]
    batches = [1, 4]
''')
DEFAULT_MODEL = 'factory = "byo_tiny:make"\nkwargs = { width = 12 }'


def _toml(base: Path, tmp_path: Path, model: str = DEFAULT_MODEL) -> Path:
    """The user's config: their data, their model (``model``: the lines of the [model] table)."""
    path = tmp_path / "byo.toml"
    path.write_text(CONFIG.replace("ROOT", str(base / "images")).replace("MODEL", model))
    return path


def _run(config: Path, runs: Path, *sets: str, until: str | None = None, log=None):
    return pipeline.run(config, [*FAST, *sets], run_name="byo", runs=runs, until=until,
                        log=log if log is not None else (lambda m: None))


def _user_module():
    import byo_tiny
    return byo_tiny


# ------------------------------------------------------------------ the whole pipeline

@pytest.mark.e2e   # the whole pipeline (~20 s): `make test-e2e`, which CI runs after `make test`
def test_byo_model_and_imagefolder_run_the_whole_pipeline(byo, tmp_path):
    result = _run(_toml(byo, tmp_path), tmp_path / "runs")
    assert result.passed, result.message
    assert result.warnings == ()
    status = {r.name: r.status for r in result.records}
    assert list(status) == list(STAGES)
    assert status == {**{n: "ran" for n in STAGES}, "engine": "skipped"}
    base = result.record("baseline")
    assert base.metrics["epochs"] == 8 and "weights" not in base.metrics
    assert base.metrics["top1"] >= 90.0, base.metrics  # three very different patterns
    assert base.metrics["chance_top1"] == pytest.approx(100 / 3, abs=1e-3)
    assert base.gate.passed and base.gate.checks[0].metric == "top1_vs_chance"
    assert result.record("prune").metrics["macs"] < base.metrics["macs"]
    bundle = result.bundle
    assert (bundle / "model.onnx").is_file() and (bundle / "model_int8.onnx").is_file()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["labels"] == list(CLASSES)
    assert manifest["input"]["shape"] == ["batch", 3, 16, 16]
    assert manifest["model"]["model"] == "byo_tiny:make"


# ------------------------------------------------------------------ factory arguments

def test_classes_under_another_name_via_classes_arg(byo, tmp_path):
    model = 'factory = "byo_tiny:make_named"\nkwargs = { classes_arg = "n_out", width = 8 }'
    result = _run(_toml(byo, tmp_path, model), tmp_path / "runs", until="baseline")
    assert result.passed, result.message
    assert result.record("baseline").metrics["top1"] >= 90.0


def test_factory_without_the_classes_name_is_one_line_naming_classes_arg(byo, tmp_path):
    with pytest.raises(PipelineError) as e:
        _run(_toml(byo, tmp_path, 'factory = "byo_tiny:make_named"'), tmp_path / "runs", until="baseline")
    msg = str(e.value)
    assert "\n" not in msg and "'num_classes'" in msg and "model.kwargs.classes_arg" in msg and "n_out" in msg


def test_factory_that_asks_for_channels_and_size_receives_them(byo, tmp_path):
    received = _user_module().RECEIVED
    received.clear()
    result = _run(_toml(byo, tmp_path, 'factory = "byo_tiny:make_sized"'), tmp_path / "runs", until="baseline")
    assert result.passed, result.message
    assert received and all(r == {"in_channels": 3, "image_size": 16} for r in received)   # square: one int
    assert result.record("baseline").metrics["params"] == 3 * 4 * 9 + 4 + (4 * 16 * 16) * 3 + 3


# ------------------------------------------------------------------ the chance gate

def test_baseline_at_chance_fails_the_run(byo, tmp_path, capsys):
    config = _toml(byo, tmp_path, 'factory = "byo_tiny:make_blind"')
    result = _run(config, tmp_path / "runs")
    assert not result.passed and result.failed_stage == "baseline"
    assert [r.name for r in result.records] == ["baseline"]   # nothing after a baseline that learned nothing
    rec = result.record("baseline")
    assert rec.status == "failed" and rec.metrics["top1"] == pytest.approx(100 / 3, abs=1e-3)   # the class prior only
    assert "chance" in result.message and "43.33" in result.message   # chance 33.33 % + 10 pt
    # The CLI: exit 2, the last line says why.
    rc = main(["run", "--config", str(config), "--runs", str(tmp_path / "runs"), "--run", "byo-cli",
               "--until", "baseline", *[a for s in FAST for a in ("--set", s)]])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("FAILED | gate:") and "chance" in last


def test_warn_lets_a_chance_baseline_through_and_says_so(byo, tmp_path):
    lines = []
    result = _run(_toml(byo, tmp_path, 'factory = "byo_tiny:make_blind"'), tmp_path / "runs", "baseline.gate=warn",
                  until="baseline", log=lines.append)
    assert result.passed
    rec = result.record("baseline")
    assert rec.status == "ran" and rec.gate.mode == "warn" and not rec.gate.passed
    assert "warn only" in rec.gate.summary() and "chance" in rec.gate.summary()
    assert any("baseline" in line and "warn only" in line for line in lines), lines


def test_min_top1_sets_the_floor_and_is_judged_on_the_cached_result(byo, tmp_path):
    config, runs = _toml(byo, tmp_path, 'factory = "byo_tiny:make_blind"'), tmp_path / "runs"
    assert _run(config, runs, "baseline.gate=warn", until="baseline").record("baseline").status == "ran"
    result = _run(config, runs, "baseline.min_top1=30", until="baseline")   # 33.3 % clears 30 %
    assert result.passed and result.record("baseline").status == "cached"
    assert result.record("baseline").gate.passed


# ------------------------------------------------------------------ BatchNorm notice

def test_train_eval_batchnorm_gap_is_a_notice(byo, tmp_path):
    lines = []
    result = _run(_toml(byo, tmp_path, 'factory = "byo_tiny:make_stale_bn"'), tmp_path / "runs", "baseline.gate=warn",
                  until="baseline", log=lines.append)
    rec = result.record("baseline")
    gap = rec.metrics["train_eval_gap"]
    assert gap > 10.0, rec.metrics
    notice = next(n for n in rec.notices if "BatchNorm" in n)
    assert f"{gap:+.1f} pt" in notice
    assert any(line.strip() == f"note: {notice}" for line in lines)


def test_settled_batchnorm_gives_no_notice(byo, tmp_path):
    rec = _run(_toml(byo, tmp_path), tmp_path / "runs", until="baseline").record("baseline")
    assert abs(rec.metrics["train_eval_gap"]) <= 10.0 and rec.notices == ()


# ------------------------------------------------------------------ weights

def _trained_user_model(byo: Path, **kwargs):
    """The user's model trained a little in-process, as a user would have it."""
    from pipeline.data import load_split, normalize
    from pipeline.train import train
    model = _user_module().make(**{"num_classes": 3, "width": 12, **kwargs})
    split = load_split("imagefolder", str(byo / "images"), "train", size=(16, 16), channels=3)
    train(model, None, normalize(split.images, (0.3,) * 3, (0.35,) * 3), split.labels, epochs=8, lr=3e-3,
          batch_size=16, seed=0, schedule="constant", progress=None, device="cpu")
    return model.eval()


def test_weights_skip_baseline_training(byo, tmp_path):
    weights = tmp_path / "user_weights.pt"
    torch.save(_trained_user_model(byo).state_dict(), weights)
    result = _run(_toml(byo, tmp_path, f'factory = "byo_tiny:make"\nkwargs = {{ width = 12 }}\nweights = "{weights}"'),
                  tmp_path / "runs", until="prune")
    assert result.passed, result.message
    assert [r.name for r in result.records] == ["baseline", "prune"]
    base = result.record("baseline").metrics
    assert base["weights"] == str(weights)
    assert base["weights_load"] == {"missing": [], "unexpected": [], "reshaped": []}
    assert "epochs" not in base and "losses" not in base
    assert base["top1"] >= 90.0
    assert result.record("prune").status == "ran" and result.record("prune").metrics["macs"] < base["macs"]
    # the file's baseline.* training keys are not read when weights are given
    assert sorted(w.split()[1] for w in result.warnings) == ["baseline.batch_size", "baseline.epochs", "baseline.lr"]


def _other_head_checkpoint(byo: Path, path: Path) -> None:
    """A checkpoint for 5 classes, one BatchNorm statistic dropped and one key of another model."""
    state = _user_module().make(num_classes=5, width=12).state_dict()
    del state["features.1.running_mean"]
    state["extra.scale"] = torch.ones(1)
    torch.save(state, path)


def test_non_strict_weights_load_what_fits_and_say_what_did_not(byo, tmp_path):
    weights = tmp_path / "other_head.pt"
    _other_head_checkpoint(byo, weights)
    lines = []
    model = f'factory = "byo_tiny:make"\nkwargs = {{ width = 12 }}\nweights = "{weights}"\nweights_strict = false'
    result = _run(_toml(byo, tmp_path, model), tmp_path / "runs", "baseline.gate=off", until="baseline",
                  log=lines.append)
    assert result.passed
    rec = result.record("baseline")
    assert rec.metrics["weights_load"] == {"missing": ["features.1.running_mean"], "unexpected": ["extra.scale"],
                                           "reshaped": ["classifier.bias", "classifier.weight"]}
    assert "model.weights loaded non-strictly: 1 missing, 1 unexpected, 2 reshaped" in rec.notices
    assert any("loaded non-strictly" in line for line in lines)
    saved = torch.load(result.run_dir / "01_baseline" / "model.pt", weights_only=True)
    source = torch.load(weights, weights_only=True)
    assert torch.equal(saved["features.0.weight"], source["features.0.weight"])   # what fits was loaded
    assert saved["classifier.weight"].shape == (3, 24)                              # the head stays the model's


def test_strict_weights_refuse_another_head_in_one_line(byo, tmp_path):
    weights = tmp_path / "other_head.pt"
    _other_head_checkpoint(byo, weights)
    model = f'factory = "byo_tiny:make"\nkwargs = {{ width = 12 }}\nweights = "{weights}"'
    with pytest.raises(PipelineError) as e:
        _run(_toml(byo, tmp_path, model), tmp_path / "runs", until="baseline")
    msg = str(e.value)
    assert "\n" not in msg and str(weights) in msg and "does not match the model" in msg
    assert "model.weights_strict = false" in msg


def test_pickled_model_is_refused_not_unpickled(byo, tmp_path):
    weights = tmp_path / "whole_model.pt"
    torch.save(_user_module().make(num_classes=3, width=12), weights)  # a pickle: loading it would run code
    model = f'factory = "byo_tiny:make"\nkwargs = {{ width = 12 }}\nweights = "{weights}"'
    with pytest.raises(PipelineError) as e:
        _run(_toml(byo, tmp_path, model), tmp_path / "runs", until="baseline")
    assert "weights-only" in str(e.value) and "model.unsafe_pickle" in str(e.value) and "\n" not in str(e.value)
