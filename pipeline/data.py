"""Datasets as uint8 arrays plus normalisation: the pipeline's only view of images.

Every check on the data happens here, where it enters, and before any training: both splits are
read (and checked) together, labels in [0, num_classes) in both, no empty split, a subset no
larger than its split, images of the configured size and channels (MNIST can be replicated to 3
channels and resized, for compute-bound workloads on real data), and a dataset that fits in memory.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from edgerun.io import sha256_file
from edgerun.pixels import normalise
from edgerun.readers import load_image_folder, load_mnist
from pipeline.errors import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MNIST_CLASSES = 10
# uint8 pixels plus the normalised float32 copy training reads: 5 bytes per pixel.
BYTES_PER_PIXEL = 1 + 4


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    classes: list[str]
    source_size: tuple[int, int] | None = None  # (H, W) of the images on disk, before any resize


def resolve_root(root: str) -> Path:
    """A relative path is taken from the working folder if it is there, else from the project folder
    (so `make deploy` works from anywhere, and an installed `edgepipe` reads the user's folders)."""
    p = Path(root)
    if p.is_absolute() or p.exists():
        return p.resolve() if not p.is_absolute() else p
    return PROJECT_ROOT / p


# Folders that hold the system, not a dataset: hashing one for the data's identity reads the whole
# machine (or never ends: /proc, /dev), and no reader finds images there. Refused before any work.
SYSTEM_FOLDERS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/run", "/sbin",
                  "/sys", "/usr", "/var")
PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


def check_root(root: str) -> Path:
    """data.root resolved, refused when it is a system folder or lies in /proc, /sys or /dev."""
    path = resolve_root(root)
    real = os.path.realpath(path)
    if real in SYSTEM_FOLDERS or any(real.startswith(p + "/") for p in PSEUDO_FILESYSTEMS):
        raise PipelineError(f"data.root: {path} is a system folder{f' ({real})' if real != str(path) else ''}, "
                            f"not a dataset; give the folder that holds the images")
    return path


def data_files(root: Path):
    """(name, path) of every file under ``root`` that a reader may read, in a fixed order.

    Followed as the readers follow them: links to files and folders are followed (the reader opens
    the target), each folder once (a link back up would loop); names starting with '.' are left
    out, as the readers skip them. A superset of what one reader reads, so no reader's choice can
    leave a file it reads out of the data's identity."""
    seen = set()

    def walk(folder: Path, rel: str):
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(e.name for e in os.scandir(folder) if not e.name.startswith("."))
        except OSError as e:
            raise PipelineError(f"data.root: {folder}: cannot list the folder ({e.strerror or e})") from None
        for name in entries:
            path = folder / name
            try:
                mode = path.stat().st_mode
            except OSError:
                continue   # a dangling link: no reader can read it either
            if stat.S_ISDIR(mode):
                yield from walk(path, f"{rel}{name}/")
            elif stat.S_ISREG(mode):
                yield f"{rel}{name}", path
    yield from walk(root, "")


def memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_fits(n: int, channels: int, size, where: str) -> None:
    """Refuse, before allocating, a split that would take more than half of this machine's memory."""
    h, w = size
    need, total = n * channels * h * w * BYTES_PER_PIXEL, memory_bytes()
    if total and need > total // 2:
        raise PipelineError(f"{where}: {n} images of {channels}x{h}x{w} need {need / 2**30:.1f} GiB "
                            f"(uint8 + float32), more than half of this machine's {total / 2**30:.1f} GiB; "
                            f"lower data.size or set data.train_subset / data.test_subset")


def _adapt_mnist(images: np.ndarray, size, channels: int) -> np.ndarray:
    """MNIST is 1x28x28 on disk: resize (bilinear) and replicate to 3 channels when the config asks."""
    if tuple(images.shape[2:]) != tuple(size):
        from PIL import Image
        h, w = size
        images = np.stack([np.asarray(Image.fromarray(im[0]).resize((w, h), Image.BILINEAR))[None] for im in images])
    if channels == 3:
        images = np.repeat(images, 3, axis=1)
    elif channels != 1:
        raise PipelineError(f"data.channels = {channels}: MNIST can be read with 1 or 3 channels")
    return np.ascontiguousarray(images)


def _subset(images: np.ndarray, labels: np.ndarray, subset: int, seed: int, key: str, where: str):
    if subset > len(labels):
        raise PipelineError(f"{key} = {subset}: {where} has only {len(labels)} images "
                            f"(0 = the whole split)")
    if subset and subset < len(labels):
        idx = np.sort(np.random.default_rng(seed).permutation(len(labels))[:subset])
        images, labels = images[idx], labels[idx]
    return images, labels


def load_split(kind: str, root: str, split: str, *, size=(28, 28), channels=1, subset=0, seed=0,
               classes: list[str] | None = None, num_classes: int | None = None) -> Split:
    """``split`` is 'train' or 'test'. ``subset`` > 0 keeps a seeded random subset (at most the split)."""
    path = check_root(root)
    where = f"data ({kind} {split} split at {path})"
    key = f"data.{split}_subset"
    if kind == "mnist":
        if num_classes is not None and num_classes < MNIST_CLASSES:
            raise PipelineError(f"{where}: MNIST has {MNIST_CLASSES} classes, model.num_classes is {num_classes}")
        images, labels = load_mnist(path, split, num_classes=num_classes or MNIST_CLASSES)
        source = tuple(images.shape[2:])
        images, labels = _subset(images, labels, subset, seed, key, where)  # before resizing: less work
        _check_fits(len(labels), channels, size, where)
        images = _adapt_mnist(images, size, channels)
        names = [str(i) for i in range(MNIST_CLASSES)]
    elif kind == "imagefolder":
        sub = path / split
        if split == "test" and not sub.is_dir() and (path / "val").is_dir():
            sub = path / "val"
        images, labels, names = load_image_folder(sub, tuple(size), channels, classes, num_classes=num_classes)
        source = None  # every image is resized as it is read; their own sizes may differ
        images, labels = _subset(images, labels, subset, seed, key, where)
        _check_fits(len(labels), channels, size, where)
    else:
        raise PipelineError(f"data.kind: unknown kind {kind!r}; expected 'mnist' or 'imagefolder'")
    if len(labels) == 0:
        raise PipelineError(f"{where}: no images")
    if num_classes is not None:
        if len(names) > num_classes:
            raise PipelineError(f"{where}: {len(names)} classes found, model.num_classes is {num_classes}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise PipelineError(f"{where}: labels must be in [0, {num_classes}) (model.num_classes), "
                                f"found {lo if lo < 0 else hi}")
    # What reaches the model is exactly what the config says, whatever the reader returned.
    if images.dtype != np.uint8 or images.shape[1:] != (channels, *size):
        raise PipelineError(f"{where}: images are {images.dtype} {list(images.shape[1:])}, "
                            f"expected uint8 {[channels, *size]} (data.channels, data.size)")
    return Split(images, labels, names, source)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NCHW → float32, scaled to [0, 1] then standardised per channel: edgerun.pixels.normalise,
    the bundle's runtime's own arithmetic (kept under this name for the pipeline's many callers)."""
    return normalise(images, mean, std)


class Data:
    """The run's images, loaded once per process and only when a stage reads them.

    Reading either split reads both: a bad test split must stop the run before the baseline trains,
    not after."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._identity: str | None = None

    def _split(self, split: str, subset: int, classes=None) -> Split:
        d = self.cfg.data
        return load_split(d.kind, d.root, split, size=d.size, channels=d.channels, subset=subset,
                          seed=self.cfg.run.seed, classes=classes, num_classes=self.cfg.model.num_classes)

    @cached_property
    def _splits(self) -> tuple[Split, Split]:
        d, q = self.cfg.data, self.cfg.quantize
        train = self._split("train", d.train_subset)
        test = self._split("test", d.test_subset, classes=train.classes if d.kind == "imagefolder" else None)
        if train.source_size != test.source_size:
            raise PipelineError(f"data ({d.kind} at {resolve_root(d.root)}): the train images are "
                                f"{'x'.join(map(str, train.source_size))} on disk, the test images "
                                f"{'x'.join(map(str, test.source_size))}: both splits must be one size")
        if q.enabled and q.calib_size > len(train.labels):
            raise PipelineError(f"quantize.calib_size = {q.calib_size}: more than the {len(train.labels)} "
                                f"training images the calibration set is drawn from (data.train_subset)")
        return train, test

    @property
    def train(self) -> Split:
        return self._splits[0]

    @property
    def test(self) -> Split:
        return self._splits[1]

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
        whatever its size and mtime), links followed to what they point at (data_files)."""
        if self._identity is None:
            root = check_root(self.cfg.data.root)
            if not root.is_dir():
                raise PipelineError(f"data.root: {root} is not a folder")
            h = hashlib.sha256()
            for name, path in data_files(root):
                try:
                    digest = sha256_file(path)
                except OSError as e:
                    raise PipelineError(f"data.root: {path}: cannot read ({e.strerror or e})") from None
                h.update(f"{name}\0{digest}\n".encode())
            self._identity = h.hexdigest()
        return self._identity
