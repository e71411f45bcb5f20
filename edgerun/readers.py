"""Image readers: MNIST IDX files, single images and ImageFolder-style trees, as plain uint8 arrays.

Everything returns images ``uint8 [N, C, H, W]`` and labels ``int64 [N]``, so calibration sets,
training and inference all read the same bytes. Files are untrusted input: each check happens
here, where the bytes enter, and every refusal is one ``ReaderError`` line naming the file.
Needs numpy and PIL only (runtime code: a Jetson runs it).
"""
from __future__ import annotations

import gzip
import math
import os
import warnings
import zlib
from pathlib import Path

import numpy as np

from edgerun.errors import EdgeError, brief


class ReaderError(EdgeError):
    """An input file or folder that cannot be read as images or labels."""


# IDX type codes (the third byte of the magic number) -> numpy dtype, big-endian as stored.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp")
# MNIST's largest file (train images) is 47 MB; a header claiming more than this is corrupt or a bomb.
MAX_IDX_BYTES = 1 << 31
# PIL modes whose bands hold at most 8 bits. Wider modes (I;16, I, F) would be clipped to 0..255
# by convert("L"). Mode "1" (1 bit) converts exactly to 0/255, so it is accepted.
_EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_CHUNK = 1 << 20


# ---------------------------------------------------------------- IDX

def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """One IDX file (gzip-compressed when named ``.gz``), its payload checked against its header.

    A gzip stream is read only up to the size the header announces (plus one byte to tell a
    longer stream), so a small file that inflates to gigabytes is refused, not unpacked.
    """
    path = Path(path)
    if not path.is_file():
        raise ReaderError(f"{path}: IDX file not found")
    gz = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            return _parse_idx(path, f, gz, max_bytes)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        what = "not a readable gzip IDX file" if gz else "unreadable IDX file"
        raise ReaderError(f"{path}: {what} ({_detail(e)})") from None


def _detail(e: BaseException) -> str:
    """The first line of a library's message, without the exception's type name."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _parse_idx(path: Path, f, gz: bool, max_bytes: int) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4 or magic[0] or magic[1] or magic[2] not in _IDX_DTYPES or magic[3] == 0:
        raise ReaderError(f"{path}: not an IDX file (bad magic number)")
    ndim = magic[3]
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ReaderError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[magic[2]])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a huge header must not wrap around
    if expected > max_bytes:
        raise ReaderError(f"{path}: IDX header says {expected} bytes (shape {shape}), more than the "
                          f"{max_bytes}-byte limit: corrupt or not an image set")
    if gz:
        payload = bytearray()
        while len(payload) <= expected:  # one read past the end: at EOF gzip also checks its CRC
            chunk = f.read(min(_CHUNK, expected + 1 - len(payload)))
            if not chunk:
                break
            payload += chunk
        if len(payload) > expected:
            raise ReaderError(f"{path}: IDX payload is longer than the {expected} bytes the header says "
                              f"(shape {shape}): corrupt")
        size = len(payload)
    else:  # a plain file tells its size: compare before reading anything
        size = os.fstat(f.fileno()).st_size - 4 - 4 * ndim
        payload = f.read(expected) if size == expected else b""
    if size != expected or len(payload) != expected:
        raise ReaderError(f"{path}: IDX payload is {size} bytes, header says {expected} (shape {shape}): "
                          f"truncated or corrupt")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def check_labels(labels: np.ndarray, count: int, num_classes: int | None, where: str) -> np.ndarray:
    """Labels as int64 [count], each in [0, num_classes); ``where`` names the file in messages."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ReaderError(f"{where}: labels must be integers [N], got {labels.dtype} {tuple(labels.shape)}")
    if len(labels) != count:
        raise ReaderError(f"{where}: {len(labels)} labels for {count} images")
    if len(labels):
        low, high = int(labels.min()), int(labels.max())
        if low < 0:
            raise ReaderError(f"{where}: negative label {low} at index {int(labels.argmin())}")
        if num_classes is not None and high >= num_classes:
            raise ReaderError(f"{where}: label {high} at index {int(labels.argmax())} is outside "
                              f"[0, {num_classes}) ({num_classes} classes)")
    return labels.astype(np.int64)


def load_mnist(root: str | os.PathLike, split: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from its four IDX files (``.gz`` or not) under ``root``; split is 'train' or 'test'."""
    if split not in ("train", "test"):
        raise ReaderError(f"MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise ReaderError(f"{root}: MNIST folder not found")
    prefix = "train" if split == "train" else "t10k"
    arrays, files = [], []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ReaderError(f"{root}: missing {candidates[0].name} (MNIST {split} split)")
        arrays.append(read_idx(found))
        files.append(found)
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ReaderError(f"{root}: MNIST {split} images {images.shape} and labels {labels.shape} do not match")
    if images.dtype != np.uint8:
        raise ReaderError(f"{files[0]}: MNIST images must be uint8, got {images.dtype}")
    if len(images) == 0:
        raise ReaderError(f"{files[0]}: the MNIST {split} split is empty (0 images)")
    labels = check_labels(labels, len(images), num_classes, str(files[1]))
    return np.ascontiguousarray(images[:, None]), labels


# ---------------------------------------------------------------- images

def read_image(path: str | os.PathLike, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image file as uint8 [C, H, W], converted to 1 (L) or 3 (RGB) channels and resized to (H, W).

    Refused: images with more than 8 bits per band (they would be clipped), images over PIL's
    MAX_IMAGE_PIXELS (decompression bombs), and anything PIL cannot decode.
    """
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ReaderError(f"image channels must be 1 or 3, got {channels}")
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.mode not in _EIGHT_BIT_MODES:
                    raise ReaderError(f"{path}: image mode {im.mode} has more than 8 bits per channel; "
                                      f"convert it to 8-bit (it would be clipped to 0..255)")
                arr = np.asarray(im.convert(mode).resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)
    except ReaderError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ReaderError(f"{path}: image refused as a decompression bomb ({brief(e)})") from None
    except Exception as e:  # PIL's decoders raise many types (SyntaxError, struct.error, ...) on bad bytes
        raise ReaderError(f"{path}: unreadable image ({brief(e)})") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise ReaderError(f"{folder}: cannot list the folder ({e.strerror or e})") from None


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (by suffix), sorted by name."""
    return [p for p in _entries(folder) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


def class_folders(root: Path) -> list[str]:
    """The subfolder names of ``root`` (hidden ones left out), sorted."""
    return [p.name for p in _entries(root) if p.is_dir()]


def load_flat_folder(root: str | os.PathLike, size: tuple[int, int], channels: int) -> tuple[np.ndarray, list[str]]:
    """Every image file directly in ``root``, sorted by name: (images, file names)."""
    root = Path(root)
    if not root.is_dir():
        raise ReaderError(f"{root}: image folder not found")
    files = image_files(root)
    if not files:
        raise ReaderError(f"{root}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return np.stack([read_image(f, size, channels) for f in files]), [f.name for f in files]


def load_image_folder(root: str | os.PathLike, size: tuple[int, int], channels: int,
                      classes: list[str] | None = None,
                      num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder tree (one subfolder per class), resized to ``size`` (H, W).

    ``classes`` fixes the label order (pass the training split's classes when reading test/; a
    class may be missing there); otherwise it is the sorted subfolder names. A class folder that
    exists but holds no image is refused, as are more classes than ``num_classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReaderError(f"{root}: image folder not found")
    if channels not in (1, 3):  # before reading any file
        raise ReaderError(f"image channels must be 1 or 3, got {channels}")
    found = class_folders(root)
    classes = list(found if classes is None else classes)
    if not classes:
        raise ReaderError(f"{root}: no class subfolders (expected one folder per class)")
    if len(set(classes)) != len(classes):
        raise ReaderError(f"{root}: class names repeat: {classes}")
    if num_classes is not None and len(classes) > num_classes:
        raise ReaderError(f"{root}: {len(classes)} class folders, more than the {num_classes} classes "
                          f"the model has")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ReaderError(f"{root}: class folders {unknown} are not among the training classes {classes}")
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue  # a class missing from this split: nothing to read, nothing mislabelled
        files = image_files(folder)
        if not files:
            raise ReaderError(f"{folder}: empty class folder (no files with suffixes {', '.join(IMAGE_SUFFIXES)})")
        images.extend(read_image(f, size, channels) for f in files)
        labels.extend([label] * len(files))
    if not images:
        raise ReaderError(f"{root}: no images found (none of the class folders {classes} is here)")
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes
