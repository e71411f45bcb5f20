"""Datasets as uint8 arrays plus normalisation: the pipeline's only view of images.

Every check on the data happens here, where it enters: labels in [0, num_classes) in both splits,
no empty split, images of the configured size and channels (MNIST can be replicated to 3 channels
and resized, for compute-bound workloads on real data).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from edgerun.readers import load_image_folder, load_mnist
from edgerun.io import sha256_file
from pipeline.errors import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    classes: list[str]


def resolve_root(root: str) -> Path:
    """A relative path is taken from the working folder if it is there, else from the project folder
    (so `make deploy` works from anywhere, and an installed `edgepipe` reads the user's folders)."""
    p = Path(root)
    if p.is_absolute() or p.exists():
        return p.resolve() if not p.is_absolute() else p
    return PROJECT_ROOT / p


def _adapt_mnist(images: np.ndarray, size, channels: int) -> np.ndarray:
    """MNIST is 1x28x28: resize (bilinear) and replicate to 3 channels when the config asks."""
    if tuple(size) != (28, 28):
        from PIL import Image
        h, w = size
        images = np.stack([np.asarray(Image.fromarray(im[0]).resize((w, h), Image.BILINEAR))[None] for im in images])
    if channels == 3:
        images = np.repeat(images, 3, axis=1)
    elif channels != 1:
        raise PipelineError(f"data.channels = {channels}: MNIST can be read with 1 or 3 channels")
    return np.ascontiguousarray(images)


def load_split(kind: str, root: str, split: str, *, size=(28, 28), channels=1, subset=0, seed=0,
               classes: list[str] | None = None, num_classes: int | None = None) -> Split:
    """``split`` is 'train' or 'test'. ``subset`` > 0 keeps a seeded random subset."""
    path = resolve_root(root)
    if kind == "mnist":
        images, labels = load_mnist(path, split)
        images = _adapt_mnist(images, size, channels)
        names = [str(i) for i in range(10)]
    elif kind == "imagefolder":
        sub = path / split
        if split == "test" and not sub.is_dir() and (path / "val").is_dir():
            sub = path / "val"
        images, labels, names = load_image_folder(sub, tuple(size), channels, classes)
    else:
        raise PipelineError(f"data.kind: unknown kind {kind!r}; expected 'mnist' or 'imagefolder'")
    where = f"data ({kind} {split} split at {path})"
    if len(labels) == 0:
        raise PipelineError(f"{where}: no images")
    if num_classes is not None:
        if len(names) > num_classes:
            raise PipelineError(f"{where}: {len(names)} classes found, model.num_classes is {num_classes}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise PipelineError(f"{where}: labels must be in [0, {num_classes}) (model.num_classes), "
                                f"found {lo if lo < 0 else hi}")
    if subset and subset < len(labels):
        idx = np.sort(np.random.default_rng(seed).permutation(len(labels))[:subset])
        images, labels = images[idx], labels[idx]
    return Split(images, labels, names)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NCHW → float32, scaled to [0, 1] then standardised per channel."""
    x = images.astype(np.float32) / 255.0
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - m) / s


class Data:
    """The run's images, loaded once per process and only when a stage reads them."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._identity: str | None = None

    def _split(self, split: str, subset: int, classes=None) -> Split:
        d = self.cfg.data
        return load_split(d.kind, d.root, split, size=d.size, channels=d.channels, subset=subset,
                          seed=self.cfg.run.seed, classes=classes, num_classes=self.cfg.model.num_classes)

    @cached_property
    def train(self) -> Split:
        return self._split("train", self.cfg.data.train_subset)

    @cached_property
    def test(self) -> Split:
        imagefolder = self.cfg.data.kind == "imagefolder"
        return self._split("test", self.cfg.data.test_subset, classes=self.train.classes if imagefolder else None)

    def norm(self, images: np.ndarray) -> np.ndarray:
        return normalize(images, self.cfg.data.mean, self.cfg.data.std)

    @cached_property
    def x_train(self) -> np.ndarray:
        return self.norm(self.train.images)

    @cached_property
    def x_test(self) -> np.ndarray:
        return self.norm(self.test.images)

    def identity(self) -> str:
        """The content of data.root: every file's name and sha256 (a replaced image is noticed,
        whatever its size and mtime)."""
        if self._identity is None:
            root = resolve_root(self.cfg.data.root)
            if not root.is_dir():
                raise PipelineError(f"data.root: {root} is not a folder")
            h = hashlib.sha256()
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    h.update(f"{p.relative_to(root)}\0{sha256_file(p)}\n".encode())
            self._identity = h.hexdigest()
        return self._identity
