"""Image sources as plain uint8 arrays: MNIST IDX files and ImageFolder-style trees.

Everything returns ``(images, labels)`` with images ``uint8 [N, C, H, W]`` and labels ``int64 [N]``,
so calibration sets, training and inference all read the same bytes.
"""
from __future__ import annotations

import gzip
import math
import zlib
import os
from pathlib import Path

import numpy as np

from calib.errors import CalibError

# IDX type codes (the third byte of the magic number) -> numpy dtype, big-endian as stored.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed), checking the header against the payload."""
    path = Path(path)
    if not path.is_file():
        raise CalibError(f"{path}: IDX file not found")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CalibError(f"{path}: not a readable gzip IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise CalibError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CalibError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a huge header must not wrap around
    if len(raw) - header != expected:
        raise CalibError(f"{path}: IDX payload is {len(raw) - header} bytes, header says {expected} (shape {shape}): truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from its four IDX files (``.gz`` or not) under ``root``; split is 'train' or 'test'."""
    if split not in ("train", "test"):
        raise CalibError(f"MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise CalibError(f"{root}: MNIST folder not found")
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CalibError(f"{root}: missing {candidates[0].name} (MNIST {split} split)")
        arrays.append(read_idx(found))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CalibError(f"{root}: MNIST {split} images {images.shape} and labels {labels.shape} do not match")
    if images.dtype != np.uint8:
        raise CalibError(f"{root}: MNIST {split} images must be uint8, got {images.dtype}")
    return np.ascontiguousarray(images[:, None]), labels.astype(np.int64)


def read_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image file as uint8 [C, H, W], converted to 1 (L) or 3 (RGB) channels and resized to (H, W)."""
    from PIL import Image, UnidentifiedImageError

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise CalibError(f"image channels must be 1 or 3, got {channels}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode).resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise CalibError(f"{path}: unreadable image ({e})") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_image_folder(root: str | os.PathLike, size: tuple[int, int], channels: int,
                      classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder tree (one subfolder per class), resized to ``size`` (H, W).

    ``classes`` fixes the label order (pass the training split's classes when reading test/);
    otherwise it is the sorted subfolder names.
    """
    root = Path(root)
    if not root.is_dir():
        raise CalibError(f"{root}: image folder not found")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    if not classes:
        raise CalibError(f"{root}: no class subfolders (expected one folder per class)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise CalibError(f"{root}: class folders {unknown} are not among the training classes {classes}")
    if channels not in (1, 3):  # before reading any file
        raise CalibError(f"image channels must be 1 or 3, got {channels}")
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            images.append(read_image(f, size, channels))
            labels.append(label)
    if not images:
        raise CalibError(f"{root}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return np.stack(images), np.asarray(labels, dtype=np.int64), list(classes)
