"""calib.calibset: stratified, seeded, reproducible calibration sets, and loud failures on bad files."""
import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

import calib.calibset
from calib import CalibError, build_calibration_set, load_calibration_set
from edgerun.errors import EdgeError
from edgerun.readers import load_mnist

MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist"


def _images(labels):
    """uint8 [N, 1, 4, 4] whose first pixels encode the sample index, so picks can be traced back."""
    n = len(labels)
    x = np.zeros((n, 1, 4, 4), np.uint8)
    x[:, 0, 0, 0] = np.arange(n) % 256
    x[:, 0, 0, 1] = np.arange(n) // 256
    return x, np.asarray(labels, np.int64)


def _index(images):
    return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def test_balanced_classes_get_equal_shares_and_remainder_goes_to_lowest_labels(tmp_path):
    x, y = _images(np.repeat(np.arange(10), 50))
    info = build_calibration_set(x, y, 25, 0, tmp_path / "c.npz")
    assert info["per_class"] == {0: 3, 1: 3, 2: 3, 3: 3, 4: 3, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2}
    assert info["n"] == 25 and info["seed"] == 0 and info["split"] == "train"
    assert info["sha256"] == hashlib.sha256((tmp_path / "c.npz").read_bytes()).hexdigest()
    imgs, labels = load_calibration_set(tmp_path / "c.npz", expect_shape=(1, 4, 4))
    assert imgs.dtype == np.uint8 and labels.dtype == np.int64 and len(imgs) == 25
    assert {c: int((labels == c).sum()) for c in range(10)} == info["per_class"]
    idx = _index(imgs)
    assert len(set(idx.tolist())) == 25  # no image drawn twice
    np.testing.assert_array_equal(y[idx], labels)  # each saved label is the label of the saved image
    assert labels[:10].tolist() != sorted(labels[:10].tolist())  # shuffled, not grouped by class


def test_a_short_class_gives_its_share_to_the_others(tmp_path):
    x, y = _images([0] * 2 + [1] * 40 + [2] * 40)
    info = build_calibration_set(x, y, 30, 1, tmp_path / "c.npz")
    assert info["per_class"] == {0: 2, 1: 14, 2: 14}
    x, y = _images([0] * 3 + [1] * 5)
    info = build_calibration_set(x, y, 8, 1, tmp_path / "all.npz")  # n == available: everything
    assert info["per_class"] == {0: 3, 1: 5}
    assert sorted(_index(load_calibration_set(tmp_path / "all.npz")[0]).tolist()) == list(range(8))


def test_same_seed_gives_the_same_bytes_and_another_seed_another_sample(tmp_path):
    x, y = _images(np.repeat(np.arange(5), 40))
    a = build_calibration_set(x, y, 20, 7, tmp_path / "a.npz")
    b = build_calibration_set(x, y, 20, 7, tmp_path / "b.npz")
    c = build_calibration_set(x, y, 20, 8, tmp_path / "c.npz")
    assert a["sha256"] == b["sha256"] != c["sha256"]
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert (tmp_path / "a.npz").stat().st_mode & 0o777 == 0o644  # edgerun.io's mode: readable by all, not 0600


def test_a_failed_write_leaves_neither_the_file_nor_a_temp_file(tmp_path, monkeypatch):
    def half_then_disk_full(path, arrays):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(calib.calibset, "_write_npz", half_then_disk_full)
    x, y = _images(np.repeat(np.arange(4), 10))
    (tmp_path / "old.npz").write_bytes(b"previous")
    with pytest.raises(EdgeError, match=r"old.npz: could not write \(No space left on device\)") as e:
        build_calibration_set(x, y, 8, 0, tmp_path / "old.npz")
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["old.npz"] and (tmp_path / "old.npz").read_bytes() == b"previous"


def test_real_mnist_train_split(tmp_path):
    x, y = load_mnist(MNIST, "train")
    info = build_calibration_set(x, y, 100, 0, tmp_path / "mnist.npz", split="train")
    assert info["per_class"] == {c: 10 for c in range(10)}
    imgs, labels = load_calibration_set(tmp_path / "mnist.npz", expect_shape=(1, 28, 28), n=100)
    assert imgs.shape == (100, 1, 28, 28) and imgs.max() > 200  # real digits, not zeros


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "positive integer"),
    ({"n": -3}, "positive integer"),
    ({"n": 41}, "more than the 40 images"),
    ({"images": np.zeros((40, 4, 4), np.uint8)}, r"uint8 \[N, C, H, W\]"),
    ({"images": np.zeros((40, 1, 4, 4), np.float32)}, r"uint8 \[N, C, H, W\]"),
    ({"labels": np.zeros(39, np.int64)}, "labels must be integers"),
    ({"split": "test"}, "test split"),
])
def test_bad_arguments_raise_one_line_and_write_nothing(tmp_path, kwargs, match):
    x, y = _images(np.repeat(np.arange(4), 10))
    args = {"images": x, "labels": y, "n": 8, "seed": 0, "path": tmp_path / "c.npz"} | kwargs
    with pytest.raises(CalibError, match=match) as e:
        build_calibration_set(**args)
    assert "c.npz" in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_load_takes_the_first_n_and_refuses_more_than_stored(tmp_path):
    x, y = _images(np.repeat(np.arange(4), 10))
    build_calibration_set(x, y, 12, 0, tmp_path / "c.npz")
    full, _ = load_calibration_set(tmp_path / "c.npz")
    part, labels = load_calibration_set(tmp_path / "c.npz", n=5)
    np.testing.assert_array_equal(part, full[:5])
    assert len(labels) == 5
    with pytest.raises(CalibError, match="has 12 samples, 13 needed"):
        load_calibration_set(tmp_path / "c.npz", n=13)
    with pytest.raises(CalibError, match=r"expected \[3, 4, 4\]"):
        load_calibration_set(tmp_path / "c.npz", expect_shape=(3, 4, 4))


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _npy(path, array):
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to the name
        np.save(f, array)
    return path


def _huge_header(path):
    """A .npz whose images header claims 10^15 images: must fail cleanly, not try to allocate them."""
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1000000000000000, 1, 4, 4), }".ljust(117) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
        z.writestr("labels.npy", b"")
    return path


@pytest.mark.parametrize("make, match", [
    (lambda p: p, "not found"),
    (lambda p: (p.write_bytes(b"this is not a zip file"), p)[1], "not a readable .npz"),
    (lambda p: (p.write_bytes(b"PK\x03\x04 truncated"), p)[1], "not a readable .npz"),
    (lambda p: _npz(p, images=np.zeros((2, 1, 4, 4), np.uint8)), "lacks labels"),
    (lambda p: _npz(p, images=np.zeros((2, 1, 4, 4), np.float32), labels=np.zeros(2, np.int64)),
     "images must be uint8"),
    (lambda p: _npz(p, images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.int64)), "images must be uint8"),
    (lambda p: _npz(p, images=np.zeros((2, 1, 4, 4), np.uint8), labels=np.zeros(2, np.int32)), "labels must be int64"),
    (lambda p: _npz(p, images=np.zeros((2, 1, 4, 4), np.uint8), labels=np.zeros(3, np.int64)), "labels must be int64"),
    (lambda p: _npz(p, images=np.zeros((0, 1, 4, 4), np.uint8), labels=np.zeros(0, np.int64)), "empty"),
    (lambda p: _npy(p, np.zeros((2, 1, 4, 4), np.uint8)), "a single .npy array"),
    (lambda p: _huge_header(p), r"not a readable .npz calibration set \(MemoryError\)"),
])
def test_load_rejects_bad_files_naming_them(tmp_path, make, match):
    path = make(tmp_path / "bad.npz")
    with pytest.raises(CalibError, match=match) as e:
        load_calibration_set(path)
    assert "bad.npz" in str(e.value) and "\n" not in str(e.value)
