"""Datasets as uint8 arrays plus normalisation: the pipeline's only view of images."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calib.errors import CalibError
from calib.sources import load_image_folder, load_mnist
from pipeline.errors import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    classes: list[str]


def resolve_root(root: str) -> Path:
    """Relative data roots are relative to the project, so `make deploy` works from anywhere."""
    p = Path(root)
    return p if p.is_absolute() else PROJECT_ROOT / p


def load_split(kind: str, root: str, split: str, *, size=(28, 28), channels=1, subset=0, seed=0,
               classes: list[str] | None = None) -> Split:
    """``split`` is 'train' or 'test'. ``subset`` > 0 keeps a seeded, class-balanced-ish random subset."""
    path = resolve_root(root)
    try:
        if kind == "mnist":
            images, labels = load_mnist(path, split)
            names = [str(i) for i in range(10)]
        elif kind == "imagefolder":
            sub = path / split
            if split == "test" and not sub.is_dir() and (path / "val").is_dir():
                sub = path / "val"
            images, labels, names = load_image_folder(sub, tuple(size), channels, classes)
        else:
            raise PipelineError(f"data.kind: unknown kind {kind!r}; expected 'mnist' or 'imagefolder'")
    except CalibError as e:
        raise PipelineError(str(e)) from None
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
