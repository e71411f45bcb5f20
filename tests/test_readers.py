"""edgerun.readers: IDX files, images and image folders are untrusted input.

Every bad file gives one ReaderError line naming it; property-based tests feed arbitrary and
mutated bytes and accept only an array or a ReaderError.
"""
import atexit
import gzip
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import fuzz_settings, one_line
from hypothesis import assume, example, given
from hypothesis import strategies as st
from PIL import Image

from edgerun.errors import EdgeError
from edgerun.readers import (
    _IDX_DTYPES,
    IMAGE_SUFFIXES,
    ReaderError,
    check_labels,
    load_flat_folder,
    load_image_folder,
    load_mnist,
    read_idx,
    read_image,
)

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT / "data/mnist"
FUZZ = fuzz_settings()
WORK = Path(tempfile.mkdtemp(prefix="readers-"))  # hypothesis does not mix with function-scoped tmp_path
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


CODES = {np.dtype(d).newbyteorder("="): c for c, d in _IDX_DTYPES.items()}


def idx_bytes(arr: np.ndarray, code=None) -> bytes:
    arr = np.ascontiguousarray(arr)
    code = CODES[arr.dtype] if code is None else code
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def error(fn, *args, **kw) -> str:
    with pytest.raises(ReaderError) as e:
        fn(*args, **kw)
    assert isinstance(e.value, EdgeError)
    return one_line(e.value)


def mnist_dir(root: Path, images: np.ndarray, labels: np.ndarray, split="test", gz=True) -> Path:
    prefix = "t10k" if split == "test" else "train"
    suffix = ".gz" if gz else ""
    pack = (lambda b: gzip.compress(b, mtime=0)) if gz else (lambda b: b)
    write(root / f"{prefix}-images-idx3-ubyte{suffix}", pack(idx_bytes(images)))
    write(root / f"{prefix}-labels-idx1-ubyte{suffix}", pack(idx_bytes(labels)))
    return root


def png(path: Path, arr: np.ndarray, mode=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


# ---------------------------------------------------------------- IDX

def test_read_idx_round_trips_every_dtype(tmp_path):
    for code, dtype in _IDX_DTYPES.items():
        arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(np.dtype(dtype).newbyteorder("="))
        if dtype == ">u1":
            arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
        for name, data in ((f"a{code}-ubyte", idx_bytes(arr, code)),
                           (f"a{code}-ubyte.gz", gzip.compress(idx_bytes(arr, code)))):
            out = read_idx(write(tmp_path / name, data))
            assert out.dtype == arr.dtype and np.array_equal(out, arr), name


def test_read_idx_real_mnist_labels():
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8 and set(np.unique(labels)) == set(range(10))


def test_idx_header_whose_size_overflows(tmp_path):
    header = bytes([0, 0, 8, 3]) + (2**31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big")
    path = write(tmp_path / "bomb-idx3-ubyte", header)
    assert "header says 18446744073709551616 bytes" in error(read_idx, path)


def test_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    """A 10 x 28 x 28 header followed by 64 MiB of zeros: refused after reading one byte too many."""
    import tracemalloc
    header = idx_bytes(np.zeros((10, 28, 28), np.uint8))
    bomb = write(tmp_path / "bomb-idx3-ubyte.gz", gzip.compress(header + bytes(64 << 20), compresslevel=9))
    assert bomb.stat().st_size < 100_000
    tracemalloc.start()
    try:
        msg = error(read_idx, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg == f"{bomb}: IDX payload is longer than the 7840 bytes the header says (shape (10, 28, 28)): corrupt"
    assert peak < 4 << 20, f"read_idx allocated {peak} bytes for a 7840-byte payload"


def test_idx_over_the_size_limit(tmp_path):
    path = write(tmp_path / "big-idx3-ubyte", idx_bytes(np.zeros((4, 28, 28), np.uint8)))
    assert error(read_idx, path, max_bytes=1000).endswith("more than the 1000-byte limit: corrupt or not an image set")
    assert read_idx(path, max_bytes=4 * 784).shape == (4, 28, 28)


def test_idx_truncated_and_padded(tmp_path):
    raw = idx_bytes(np.zeros((3, 2, 2), np.uint8))
    short = write(tmp_path / "s-ubyte", raw[:-1])
    assert error(read_idx, short) == \
        f"{short}: IDX payload is 11 bytes, header says 12 (shape (3, 2, 2)): truncated or corrupt"
    long = write(tmp_path / "l-ubyte", raw + b"\x00")
    assert "IDX payload is 13 bytes, header says 12" in error(read_idx, long)
    gz_short = write(tmp_path / "s-ubyte.gz", gzip.compress(raw[:-1]))
    assert "IDX payload is 11 bytes, header says 12" in error(read_idx, gz_short)
    cut = write(tmp_path / "cut-ubyte.gz", gzip.compress(raw)[:-5])
    assert error(read_idx, cut).startswith(f"{cut}: not a readable gzip IDX file (")
    assert error(read_idx, tmp_path / "nope.gz") == f"{tmp_path}/nope.gz: IDX file not found"
    assert error(read_idx, write(tmp_path / "m-ubyte", b"GARBAGE!")).endswith("not an IDX file (bad magic number)")
    assert error(read_idx, write(tmp_path / "h-ubyte", bytes([0, 0, 8, 3, 0, 0]))).endswith("truncated IDX header")


def expected_idx(raw: bytes):
    """What read_idx must return for these bytes: (shape, dtype), or None for an error."""
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        return None
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        return None
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) - header != math.prod(shape) * dtype.itemsize:  # Python ints: no overflow
        return None
    return shape, dtype


def check_idx(raw: bytes | None, stored: bytes, suffix: str):
    """read_idx on ``stored`` gives exactly the array ``raw`` holds, or a one-line ReaderError."""
    path = WORK / f"fuzz{suffix}"
    path.write_bytes(stored)
    want = expected_idx(raw) if raw is not None else "unknown"
    try:
        arr = read_idx(path)
    except ReaderError as e:
        assert str(path) in one_line(e)
        assert want in (None, "unknown"), f"read_idx refused a well-formed IDX: {e}"
        return
    if want == "unknown":  # mutated gzip that still decompressed: judge the bytes it holds
        want = expected_idx(gzip.decompress(stored))
    assert want is not None, f"read_idx accepted a malformed IDX as {arr.shape}"
    shape, dtype = want
    assert arr.shape == shape and arr.dtype == dtype.newbyteorder("=")
    data = raw if raw is not None else gzip.decompress(stored)
    assert np.array_equal(arr, np.frombuffer(data, dtype=dtype, offset=4 + 4 * len(shape)).reshape(shape),
                          equal_nan=arr.dtype.kind == "f")


def real_idx() -> bytes:
    """A real IDX file: the first 300 MNIST test labels, header rewritten to match."""
    raw = gzip.decompress((MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    return raw[:4] + (300).to_bytes(4, "big") + raw[8:8 + 300]


def small_image_idx() -> bytes:
    raw = gzip.decompress((MNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    return raw[:4] + (2).to_bytes(4, "big") + raw[8:16] + raw[16:16 + 2 * 784]


REAL = [real_idx(), small_image_idx()]


@st.composite
def mutated_idx(draw):
    raw = bytearray(draw(st.sampled_from(REAL)))
    kind = draw(st.sampled_from(["truncate", "flip_header", "set_byte", "append", "dims"]))
    if kind == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif kind == "flip_header":
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, 15))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "set_byte":
        raw[draw(st.integers(0, 15))] = draw(st.integers(0, 255))
    elif kind == "append":
        raw += draw(st.binary(min_size=1, max_size=16))
    else:  # rewrite the type code, the number of dims and the dims themselves
        ndim = draw(st.integers(0, 4))
        raw = (bytes([0, 0, draw(st.sampled_from([*_IDX_DTYPES, 0x0A, 0xFF])), ndim])
               + b"".join(draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big") if draw(st.booleans())
                          else draw(st.integers(0, 400)).to_bytes(4, "big") for _ in range(ndim))
               + bytes(raw[16:]))
    return bytes(raw)


@FUZZ
@given(st.binary(max_size=64))
@example(b"")
@example(b"\x00\x00\x08\x00")
@example(b"\x00\x00\x08\x01\x00\x00\x00\x00")  # zero items: an empty array is correct
@example(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x3f\x80\x00\x00")  # one big-endian float32 1.0
def test_read_idx_random_bytes(raw):
    check_idx(raw, raw, ".idx")


@FUZZ
@given(mutated_idx())
def test_read_idx_mutated_real_files(raw):
    check_idx(raw, raw, "-ubyte")


@FUZZ
@given(mutated_idx())
def test_read_idx_mutated_real_files_gzipped(raw):
    check_idx(raw, gzip.compress(raw, mtime=0), "-ubyte.gz")


@FUZZ
@given(st.binary(max_size=64))
def test_read_idx_random_bytes_named_gz(raw):
    assume(not raw.startswith(b"\x1f\x8b"))  # bytes that are not gzip at all, under a .gz name
    check_idx(None, raw, ".gz")


@FUZZ
@given(st.data())
def test_read_idx_corrupted_gzip_stream(data):
    raw = bytearray(gzip.compress(REAL[0], mtime=0))
    # Past gzip's 10-byte header, before its 8-byte trailer: the deflate stream itself.
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(10, len(raw) - 9))] = data.draw(st.integers(0, 255))
    check_idx(None, bytes(raw), "-ubyte.gz")


# ---------------------------------------------------------------- MNIST

def test_load_mnist_real_test_split():
    images, labels = load_mnist(MNIST, "test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.min() == 0 and labels.max() == 9


def test_load_mnist_label_range(tmp_path):
    images = np.zeros((3, 4, 4), np.uint8)
    root = mnist_dir(tmp_path / "a", images, np.array([0, 12, 1], np.uint8))
    assert error(load_mnist, root, "test") == \
        f"{root}/t10k-labels-idx1-ubyte.gz: label 12 at index 1 is outside [0, 10) (10 classes)"
    assert load_mnist(root, "test", num_classes=13)[1].tolist() == [0, 12, 1]
    neg = mnist_dir(tmp_path / "b", images, np.array([0, -1, 1], np.int8), gz=False)
    assert error(load_mnist, neg, "test") == f"{neg}/t10k-labels-idx1-ubyte: negative label -1 at index 1"
    flt = mnist_dir(tmp_path / "c", images, np.array([0, 1, 1], np.float32))
    assert error(load_mnist, flt, "test").endswith("labels must be integers [N], got float32 (3,)")


def test_load_mnist_empty_or_mismatched(tmp_path):
    empty = mnist_dir(tmp_path / "e", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8), split="train")
    assert error(load_mnist, empty, "train") == \
        f"{empty}/train-images-idx3-ubyte.gz: the MNIST train split is empty (0 images)"
    odd = mnist_dir(tmp_path / "o", np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8))
    assert error(load_mnist, odd, "test") == f"{odd}: MNIST test images (3, 28, 28) and labels (2,) do not match"
    wide = mnist_dir(tmp_path / "w", np.zeros((2, 4, 4), np.int16), np.zeros(2, np.uint8))
    assert error(load_mnist, wide, "test").endswith("MNIST images must be uint8, got int16")
    assert error(load_mnist, tmp_path, "val") == "MNIST split must be 'train' or 'test', got 'val'"
    assert error(load_mnist, tmp_path / "nope", "test") == f"{tmp_path}/nope: MNIST folder not found"
    assert error(load_mnist, tmp_path, "test") == f"{tmp_path}: missing t10k-images-idx3-ubyte.gz (MNIST test split)"


def test_check_labels():
    assert check_labels(np.array([2, 0], np.uint8), 2, 3, "x").dtype == np.int64
    assert error(check_labels, np.array([0, 1]), 3, 3, "x") == "x: 2 labels for 3 images"
    assert error(check_labels, np.zeros((2, 2), np.uint8), 2, 3, "x").startswith("x: labels must be integers [N]")


# ---------------------------------------------------------------- images

def test_read_image_gray_and_rgb(tmp_path):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0] = 200
    path = png(tmp_path / "a.png", rgb)
    out = read_image(path, (5, 7), 3)
    assert out.shape == (3, 5, 7) and out[0].min() == 200 and out[1].max() == 0
    gray = read_image(path, (10, 14), 1)
    assert gray.shape == (1, 10, 14) and gray.dtype == np.uint8
    assert error(read_image, path, (5, 7), 2) == "image channels must be 1 or 3, got 2"


def test_one_bit_image_converts_exactly(tmp_path):
    path = tmp_path / "b.png"
    Image.fromarray(np.array([[True, False], [False, True]])).save(path)
    assert Image.open(path).mode == "1"
    assert read_image(path, (2, 2), 1)[0].tolist() == [[255, 0], [0, 255]]


@pytest.mark.parametrize("mode, dtype", [("I;16", np.uint16), ("I", np.int32), ("F", np.float32)])
def test_wide_images_are_refused_not_clipped(tmp_path, mode, dtype):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 1000, 60000]], dtype=dtype)).save(path)
    assert Image.open(path).mode == mode
    assert error(read_image, path, (1, 3), 1) == (f"{path}: image mode {mode} has more than 8 bits per channel; "
                                                  f"convert it to 8-bit (it would be clipped to 0..255)")


def test_sixteen_bit_png_is_refused(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.uint16)).save(path)
    assert "more than 8 bits per channel" in error(read_image, path, (1, 3), 1)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = png(tmp_path / "big.png", np.zeros((40, 40), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: over the limit, under twice it
    assert error(read_image, path, (4, 4), 1).startswith(f"{path}: image refused as a decompression bomb (")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)   # over twice the limit: PIL's own error
    assert error(read_image, path, (4, 4), 1).startswith(f"{path}: image refused as a decompression bomb (")


def test_broken_images(tmp_path):
    good = png(tmp_path / "g.png", np.full((28, 28), 7, np.uint8)).read_bytes()
    for name, data in (("random.png", bytes(range(256)) * 2), ("cut.png", good[:len(good) // 2]), ("empty.png", b"")):
        path = write(tmp_path / name, data)
        assert error(read_image, path, (28, 28), 1).startswith(f"{path}: unreadable image ("), name


def image_bytes() -> list[bytes]:
    out = []
    rng = np.random.default_rng(0)
    for fmt in ("PNG", "BMP", "GIF", "TIFF", "JPEG", "WEBP", "PPM"):
        import io
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(buf, fmt)
        out.append(buf.getvalue())
    return out


IMAGES = image_bytes()


def check_image(data: bytes, suffix: str):
    path = WORK / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        arr = read_image(path, (4, 3), 3)
    except ReaderError as e:
        assert one_line(e).startswith(f"{path}: ")
        return
    assert arr.shape == (3, 4, 3) and arr.dtype == np.uint8


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(IMAGE_SUFFIXES))
def test_read_image_random_bytes(data, suffix):
    check_image(data, suffix)


@FUZZ
@given(st.data())
def test_read_image_mutated_real_images(data):
    which = data.draw(st.integers(0, len(IMAGES) - 1))
    raw = bytearray(IMAGES[which])
    kind = data.draw(st.sampled_from(["truncate", "flip", "set", "append"]))
    if kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    elif kind == "append":
        raw += data.draw(st.binary(min_size=1, max_size=32))
    else:
        for _ in range(data.draw(st.integers(1, 6))):
            at = data.draw(st.integers(0, min(len(raw) - 1, 64)))  # headers are where decoders trip
            if kind == "flip":
                raw[at] ^= 1 << data.draw(st.integers(0, 7))
            else:
                raw[at] = data.draw(st.integers(0, 255))
    check_image(bytes(raw), [".png", ".bmp", ".gif", ".tif", ".jpg", ".webp", ".ppm"][which])


# ---------------------------------------------------------------- folders

def tree(root: Path, counts: dict) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            png(root / cls / f"{i}.png", rng.integers(0, 255, (6, 6), dtype=np.uint8))
    return root


def test_image_folder_labels_follow_the_classes(tmp_path):
    root = tree(tmp_path / "t", {"cat": 2, "dog": 1})
    images, labels, classes = load_image_folder(root, (6, 6), 1)
    assert images.shape == (3, 1, 6, 6) and labels.tolist() == [0, 0, 1] and classes == ["cat", "dog"]
    _, labels, classes = load_image_folder(root, (6, 6), 1, classes=["dog", "bird", "cat"])
    assert labels.tolist() == [0, 2, 2] and classes == ["dog", "bird", "cat"]  # read in class order; bird: absent


def test_image_folder_refusals(tmp_path):
    root = tree(tmp_path / "t", {"cat": 2, "dog": 1})
    (root / "fish").mkdir()
    (root / "fish" / "notes.txt").write_text("no images here")
    assert error(load_image_folder, root, (6, 6), 1) == \
        f"{root}/fish: empty class folder (no files with suffixes {', '.join(IMAGE_SUFFIXES)})"
    (root / "fish" / "notes.txt").unlink()
    (root / "fish").rmdir()
    assert error(load_image_folder, root, (6, 6), 1, num_classes=1) == \
        f"{root}: 2 class folders, more than the 1 classes the model has"
    assert error(load_image_folder, root, (6, 6), 1, classes=["cat"]) == \
        f"{root}: class folders ['dog'] are not among the training classes ['cat']"
    assert error(load_image_folder, root, (6, 6), 1, classes=["cat", "cat", "dog"]).endswith(
        "class names repeat: ['cat', 'cat', 'dog']")
    (tmp_path / "none").mkdir()
    assert error(load_image_folder, tmp_path / "none", (6, 6), 1) == \
        f"{tmp_path}/none: no class subfolders (expected one folder per class)"
    assert error(load_image_folder, tmp_path / "nope", (6, 6), 1) == f"{tmp_path}/nope: image folder not found"
    assert error(load_image_folder, root, (6, 6), 4) == "image channels must be 1 or 3, got 4"


def test_flat_folder(tmp_path):
    root = tree(tmp_path / "t", {"cat": 3})
    images, names = load_flat_folder(root / "cat", (6, 6), 3)
    assert images.shape == (3, 3, 6, 6) and names == ["0.png", "1.png", "2.png"]
    assert error(load_flat_folder, root, (6, 6), 1).startswith(f"{root}: no images found (suffixes .png")
