"""Calibration sets: a seeded, class-stratified sample of training images saved as one .npz.

The file holds ``images`` (uint8 [N, C, H, W]), ``labels`` (int64 [N]) and ``split``; it is
written with fixed zip timestamps, so the same inputs give the same bytes and the same sha256.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from calib.errors import CalibError
from edgerun.io import atomic_write, sha256_file


def _write_npz(path: str, arrays: dict) -> None:
    # np.savez stamps each member with the current time; a fixed date makes the bytes reproducible.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


def _quotas(counts: dict, n: int) -> dict:
    """Equal shares per class; a class that runs out gives its share to the others.

    What cannot be split equally goes one each to the lowest labels that still have images.
    """
    quota = {c: 0 for c in counts}
    left = n
    while left:
        open_ = [c for c in sorted(counts) if quota[c] < counts[c]]
        share = left // len(open_)
        if share == 0:
            for c in open_[:left]:
                quota[c] += 1
            break
        for c in open_:
            add = min(share, counts[c] - quota[c])
            quota[c] += add
            left -= add
    return quota


def build_calibration_set(images: np.ndarray, labels: np.ndarray, n: int, seed: int,
                          path: str | os.PathLike, *, split: str = "train") -> dict:
    """Draw ``n`` images, as equal per class as the data allows, and save them to ``path``.

    ``images`` uint8 [N, C, H, W] and ``labels`` [N] must come from a training (or validation)
    split: calibrating on the test split would leak it into the model, so ``split="test"`` is refused.
    Returns {"path", "n", "sha256", "per_class": {label: count}, "seed", "split"}.
    """
    path = Path(path)
    if split == "test":
        raise CalibError(f"{path}: calibration images must not come from the test split (got split='test')")
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise CalibError(f"{path}: calibration images must be uint8 [N, C, H, W], "
                         f"got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise CalibError(f"{path}: labels must be integers [N] with N = {len(images)} images, "
                         f"got {labels.dtype} {list(labels.shape)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise CalibError(f"{path}: calibration size n must be a positive integer, got {n!r}")
    if n > len(images):
        raise CalibError(f"{path}: calibration size n={n} is more than the {len(images)} images available")

    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = _quotas(dict(zip(classes.tolist(), counts.tolist(), strict=True)), int(n))
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in quota.items() if k]
    # Shuffled, so that a quantizer reading only the first items still sees every class.
    index = rng.permutation(np.concatenate(chosen))
    out_images, out_labels = np.ascontiguousarray(images[index]), labels[index].astype(np.int64)

    atomic_write(path, lambda tmp: _write_npz(tmp, {"images": out_images, "labels": out_labels,
                                                    "split": np.array(split)}))
    return {"path": str(path), "n": int(n), "sha256": sha256_file(path),
            "per_class": {int(c): int(k) for c, k in quota.items()}, "seed": seed, "split": split}


def load_calibration_set(path: str | os.PathLike, *, expect_shape: tuple[int, int, int] | None = None,
                         n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, C, H, W], labels int64 [N]) from a file written by ``build_calibration_set``.

    ``expect_shape`` (C, H, W) checks the per-image shape; ``n`` requires at least n samples and
    returns the first n (the file is shuffled, so they stay roughly balanced).
    """
    path = Path(path)
    if not path.is_file():
        raise CalibError(f"{path}: calibration set not found")
    try:
        # Our own handle: np.load leaks its file when a corrupt zip makes it fail.
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
                raise CalibError(f"{path}: not a .npz calibration set (a single .npy array; "
                                 "expected keys images, labels)")
            missing = [k for k in ("images", "labels") if k not in data.files]
            if missing:
                raise CalibError(f"{path}: calibration set lacks {', '.join(missing)} (expected keys images, labels)")
            images, labels = data["images"], data["labels"]
    except CalibError:
        raise
    # MemoryError: a corrupt .npy header can claim an array far larger than the file.
    except (OSError, ValueError, EOFError, MemoryError, zipfile.BadZipFile) as e:
        raise CalibError(f"{path}: not a readable .npz calibration set ({type(e).__name__})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise CalibError(f"{path}: images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
    if labels.dtype != np.int64 or labels.shape != (len(images),):
        raise CalibError(f"{path}: labels must be int64 [{len(images)}], got {labels.dtype} {list(labels.shape)}")
    if len(images) == 0:
        raise CalibError(f"{path}: calibration set is empty")
    if expect_shape is not None and tuple(images.shape[1:]) != tuple(expect_shape):
        raise CalibError(f"{path}: images are {list(images.shape[1:])} (C, H, W), expected {list(expect_shape)}")
    if n is not None:
        if len(images) < n:
            raise CalibError(f"{path}: calibration set has {len(images)} samples, {n} needed")
        images, labels = images[:n], labels[:n]
    return images, labels
