"""Bring your own model: a user's module (``model.factory = "mod:fn"``) on a user's ImageFolder
dataset runs through the whole pipeline, and ``model.weights`` starts from a weights-only state_dict."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("checker", "hstripes", "vstripes")
STAGES = ("baseline", "prune", "finetune", "export_onnx", "quantize", "engine", "profile", "package")

MODULE = textwrap.dedent('''
    """A user's model, outside the project: a small CNN with its head named ``classifier``."""
    import torch.nn as nn


    def make(num_classes=3, in_channels=3, width=12):
        return Tiny(num_classes, in_channels, width)


    class Tiny(nn.Module):
        def __init__(self, num_classes, in_channels, width):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1))
            self.classifier = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            return self.classifier(self.features(x).flatten(1))
''')


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
    """The user's module folder and an ImageFolder tree (train/ and test/, one folder per class)."""
    from PIL import Image
    base = tmp_path_factory.mktemp("byo")
    (base / "code").mkdir()
    (base / "code" / "byo_tiny.py").write_text(MODULE)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 12)):
        for c in CLASSES:
            folder = base / "images" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_pattern(c, rng)).save(folder / f"{i:03d}.png")
    return base


def _toml(base: Path, extra: str = "") -> Path:
    path = base / f"byo{abs(hash(extra)) % 10**6}.toml"
    path.write_text(textwrap.dedent(f'''
        [data]
        kind = "imagefolder"
        root = "{base / 'images'}"
        channels = 3
        size = [16, 16]
        mean = [0.3, 0.3, 0.3]
        std = [0.35, 0.35, 0.35]
        reference_batch = 16

        [model]
        factory = "byo_tiny:make"
        num_classes = 3
        kwargs = {{ width = 12 }}
        {extra}

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
    '''))
    return path


def _run(base: Path, config: Path, runs: Path, *sets: str, until: str | None = None):
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(config), "--runs", str(runs), "--run", "byo"]
    if until:
        cmd += ["--until", until]
    for s in ("finetune.epochs=0.2", "profile.iters=3", "profile.warmup=1", "quantize.calib_size=16", *sets):
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(base / "code"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def _report(runs: Path) -> dict:
    return json.loads((runs / "byo" / "report.json").read_text())


def test_byo_model_and_imagefolder_run_the_whole_pipeline(byo, tmp_path):
    p = _run(byo, _toml(byo), tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1].startswith("PASSED")
    report = _report(tmp_path)
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert list(status) == list(STAGES)
    assert status == {**{n: "ran" for n in STAGES}, "engine": "skipped"}
    st = {s["name"]: s for s in report["stages"]}
    base = st["baseline"]["metrics"]
    assert base["epochs"] == 8 and "weights" not in base
    assert base["top1"] >= 90.0, base  # three very different patterns
    assert st["prune"]["metrics"]["macs"] < base["macs"]
    bundle = tmp_path / "byo" / "deploy"
    assert (bundle / "model.onnx").is_file() and (bundle / "model_int8.onnx").is_file()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["labels"] == list(CLASSES)
    assert manifest["input"]["shape"] == ["batch", 3, 16, 16]
    assert manifest["model"]["model"] == "byo_tiny:make"


def _user_model(byo: Path, *, train: bool):
    """The user's model built in-process (trained a little when ``train``), as a user would have it."""
    sys.path.insert(0, str(byo / "code"))
    try:
        import byo_tiny
    finally:
        sys.path.remove(str(byo / "code"))
    model = byo_tiny.make(num_classes=3, width=12)
    if train:
        import torch
        from pipeline.data import load_split, normalize
        from pipeline.train import train_classifier
        split = load_split("imagefolder", str(byo / "images"), "train", size=(16, 16), channels=3)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny steps: more threads only fight other processes for the cores
        try:
            train_classifier(model, normalize(split.images, (0.3,) * 3, (0.35,) * 3), split.labels, epochs=8,
                             lr=3e-3, batch_size=16, seed=0)
        finally:
            torch.set_num_threads(threads)
    return model.eval()


def test_weights_skip_baseline_training(byo, tmp_path):
    import torch
    weights = tmp_path / "user_weights.pt"
    torch.save(_user_model(byo, train=True).state_dict(), weights)
    p = _run(byo, _toml(byo, f'weights = "{weights}"'), tmp_path / "runs", until="prune")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    st = {s["name"]: s for s in _report(tmp_path / "runs")["stages"]}
    base = st["baseline"]["metrics"]
    assert base["weights"] == str(weights)
    assert "epochs" not in base and "losses" not in base
    assert base["top1"] >= 90.0
    assert [s["name"] for s in _report(tmp_path / "runs")["stages"]] == ["baseline", "prune"]
    assert st["prune"]["status"] == "ran" and st["prune"]["metrics"]["macs"] < base["macs"]


def test_pickled_model_is_refused_not_unpickled(byo, tmp_path):
    import torch
    weights = tmp_path / "whole_model.pt"
    torch.save(_user_model(byo, train=False), weights)  # a pickle: loading it would run code
    p = _run(byo, _toml(byo, f'weights = "{weights}"'), tmp_path / "runs", until="baseline")
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED | error:") and "weights-only" in last
