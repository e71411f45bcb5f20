"""`python -m edgerun infer` and the edgerun command line, on tiny bundles built with onnx.helper.

The tiny model is Flatten -> MatMul, so every probability and accuracy is checked against the
same arithmetic done in numpy. One test runs a copy of edgerun/ alone in a temp folder to prove
that infer needs neither torch nor the pipeline.
"""
import csv
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_bundle import make_bundle, rewrite, tiny_onnx

from edgerun import __version__, cli
from edgerun.cli import main
from edgerun.errors import EdgeError
from edgerun.io import sha256_file

ROOT = Path(__file__).resolve().parent.parent
W = np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32)  # tiny_onnx's weights


def reference(images: np.ndarray) -> np.ndarray:
    """The tiny model's probabilities in numpy: normalise (mean 0.5, std 0.25), flatten, matmul, softmax."""
    x = ((images.astype(np.float32) / 255 - 0.5) / 0.25).reshape(len(images), -1)
    z = (x @ W).astype(np.float64)
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def idx(path: Path, arr: np.ndarray) -> Path:
    code = {np.uint8: 0x08, np.int8: 0x09, np.float32: 0x0D}[arr.dtype.type]
    raw = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "deploy")


@pytest.fixture
def data(tmp_path):
    """40 random 4x4 images; labels = the model's own answer, except 6 set wrong on purpose."""
    images = np.random.default_rng(1).integers(0, 256, (40, 4, 4), dtype=np.uint8)
    labels = reference(images[:, None]).argmax(1).astype(np.uint8)
    labels[:6] = (labels[:6] + 1) % 3
    folder = tmp_path / "data"
    folder.mkdir()
    images_file = idx(folder / "t-images-idx3-ubyte.gz", images)
    return images_file, idx(folder / "t-labels-idx1-ubyte.gz", labels), images, labels


def run(capsys, *argv):
    """(exit code, stdout lines, stderr) of `python -m edgerun ...` in this process."""
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out.splitlines(), cap.err


def user_error(capsys, *argv) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 1 and len(out) == 1 and out[0].startswith("FAILED | error: "), (rc, out, err)
    assert "Traceback" not in err
    return out[0][len("FAILED | error: "):]


# ---------------------------------------------------------------- predictions

def test_text_with_labels_beside_the_images(capsys, bundle, data):
    images_file, labels_file, images, labels = data
    rc, out, _ = run(capsys, "infer", "--bundle", bundle, "--input", images_file, "--limit", "4")
    assert rc == 0
    assert out[-1] == f"PASSED | 40 predictions, accuracy 85.00 % (34/40) against {labels_file}"
    probs = reference(images[:, None])
    first = out[0].split("\t")
    assert first[:3] == ["0", "abc"[probs[0].argmax()], f"{probs[0].max():.4f}"]
    assert first[-1] == f"WRONG: labelled {'abc'[labels[0]]}"  # the first six labels are wrong on purpose
    assert out[4] == "… 36 more (--limit, or --format json/csv for all)"
    assert out[5].startswith("40 inputs with model.onnx (sha256 verified) on onnxruntime (CPUExecutionProvider): ")
    assert out[6].startswith("confusion: most confused (true→predicted) ")


def test_json_document(capsys, bundle, data):
    images_file, labels_file, images, labels = data
    rc, out, err = run(capsys, "infer", "--bundle", bundle, "--input", images_file, "--format", "json", "--top-k", "2")
    doc = json.loads("\n".join(out))  # stdout is the document alone; the summary went to stderr
    assert rc == 0 and err.strip().splitlines()[-1].startswith("PASSED | 40 predictions, accuracy 85.00 %")
    probs = reference(images[:, None])
    assert doc["input_path"] == str(images_file) and doc["model_file"] == "model.onnx"
    assert doc["model_sha256"] == sha256_file(bundle / "model.onnx")
    assert doc["backend"] == "onnxruntime (CPUExecutionProvider)" and doc["count"] == 40
    assert doc["accuracy"] == {"top1_pct": 85.0, "correct": 34, "count": 40, "labels_from": str(labels_file)}
    matrix = np.array(doc["confusion"]["matrix"])
    assert matrix.sum() == 40 and np.trace(matrix) == 34
    assert matrix.sum(1).tolist() == np.bincount(labels, minlength=3).tolist()
    for i, p in enumerate(doc["predictions"]):
        assert p["input"] == str(i) and p["class_index"] == probs[i].argmax() and p["label"] == "abc"[p["class_index"]]
        assert abs(p["probability"] - probs[i].max()) < 1e-5
        assert [t["class_index"] for t in p["top_k"]] == list(np.argsort(-probs[i])[:2])
        assert p["true_class_index"] == labels[i] and p["true_label"] == "abc"[labels[i]]
    assert doc["timing"]["batches"] == 1 and doc["timing"]["total_ms"] > 0 and "wall time" in doc["timing"]["what"]


def test_csv_rows_and_output_file(capsys, tmp_path, bundle, data):
    images_file, _, images, labels = data
    out_file = tmp_path / "out" / "preds.csv"
    rc, out, _ = run(capsys, "infer", "--bundle", bundle, "--input", images_file, "--format", "csv",
                     "--output", out_file, "--batch-size", "7", "--top-k", "3")
    assert rc == 0 and out[-2] == f"predictions written to {out_file}" and out[-1].startswith("PASSED | 40 predictions")
    assert "in 6 batches of ≤7, " in out[0] and "(inference calls only, first one included)" in out[0]
    rows = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert len(rows) == 40 and [p.name for p in out_file.parent.iterdir()] == ["preds.csv"]  # no temp file left
    probs = reference(images[:, None])
    for i, row in enumerate(rows):
        order = np.argsort(-probs[i])
        assert [int(row["class_index"]), int(row["top2_class_index"]), int(row["top3_class_index"])] == list(order)
        total = sum(float(row[k]) for k in ("probability", "top2_probability", "top3_probability"))
        assert abs(total - 1) < 1e-4
        assert int(row["true_class_index"]) == labels[i]
    assert oct(out_file.stat().st_mode & 0o777) == "0o644"


def test_no_labels_says_accuracy_not_checked(capsys, tmp_path, bundle, data):
    images_file, labels_file, _, _ = data
    alone = tmp_path / "alone-idx3-ubyte"
    idx(alone, np.zeros((5, 4, 4), np.uint8))
    rc, out, _ = run(capsys, "infer", "--bundle", bundle, "--input", alone)
    assert rc == 0 and out[-1] == "PASSED | 5 predictions (no labels: accuracy not checked)"
    rc, out, _ = run(capsys, "infer", "--bundle", bundle, "--input", alone, "--labels", labels_file)
    assert rc == 1 and out == [f"FAILED | error: {labels_file}: 40 labels for 5 images"]


def test_image_file_flat_folder_and_class_folders(capsys, tmp_path, bundle):
    rng = np.random.default_rng(2)
    pictures = {}
    for cls in ("a", "c"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(3):
            pictures[f"{cls}/{i}.png"] = rng.integers(0, 256, (4, 4), dtype=np.uint8)
            Image.fromarray(pictures[f"{cls}/{i}.png"]).save(tmp_path / "tree" / cls / f"{i}.png")
    expected = {name: reference(arr[None, None])[0] for name, arr in pictures.items()}
    rc, out, _ = run(capsys, "infer", "--bundle", bundle, "--input", tmp_path / "tree" / "a" / "1.png")
    assert rc == 0 and out[0].split("\t")[:2] == ["1.png", "abc"[expected["a/1.png"].argmax()]]
    assert out[-1] == "PASSED | 1 predictions (no labels: accuracy not checked)"
    rc, out, _ = run(capsys, "infer", "--bundle", bundle, "--input", tmp_path / "tree" / "c")
    assert rc == 0 and [line.split("\t")[0] for line in out[:3]] == ["0.png", "1.png", "2.png"]
    rc, out, _ = run(capsys, "infer", "--bundle", bundle, "--input", tmp_path / "tree", "--format", "json")
    doc = json.loads("\n".join(out))
    correct = sum(expected[n].argmax() == "abc".index(n[0]) for n in pictures)
    assert doc["accuracy"]["correct"] == correct and doc["accuracy"]["labels_from"] == "class folders"
    assert [p["input"] for p in doc["predictions"]] == sorted(pictures)
    assert [p["true_label"] for p in doc["predictions"]] == [n[0] for n in sorted(pictures)]
    (tmp_path / "tree" / "c").rename(tmp_path / "tree" / "zebra")  # not one of the bundle's labels
    rc, out, _ = run(capsys, "infer", "--bundle", bundle, "--input", tmp_path / "tree")
    assert rc == 0 and out[-1] == ("PASSED | 6 predictions (no labels: class folders ['a', 'zebra'] are not the "
                                   "bundle's labels: accuracy not checked)")


def test_tar_bundle(capsys, tmp_path, bundle, data, monkeypatch):
    import tarfile
    import tempfile
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="deploy")
    rc, out, _ = run(capsys, "infer", "--bundle", archive, "--input", data[0])
    assert rc == 0 and out[-1].startswith("PASSED | 40 predictions, accuracy 85.00 %")
    assert list(scratch.iterdir()) == []  # the unpacked copy is removed


# ---------------------------------------------------------------- untrusted bundles and bad input

def test_a_corrupted_model_of_the_same_size_is_refused_before_loading(capsys, bundle, data):
    raw = bytearray((bundle / "model.onnx").read_bytes())
    raw[-10] ^= 0x40  # one weight changed: onnxruntime would load it and predict something
    (bundle / "model.onnx").write_bytes(bytes(raw))
    msg = user_error(capsys, "infer", "--bundle", bundle, "--input", data[0])
    assert msg.startswith(f"{bundle}/model.onnx: sha256 ") and "does not match manifest.json" in msg


def test_a_manifest_entry_outside_the_bundle_never_runs(capsys, tmp_path, bundle, data):
    outside = tiny_onnx(tmp_path / "x.onnx")
    rewrite(bundle, lambda d: d["files"].update({"../x.onnx": {"kind": "onnx", "sha256": sha256_file(outside)}}))
    msg = user_error(capsys, "infer", "--bundle", bundle, "--input", data[0], "--model", "../x.onnx")
    assert msg == (f"{bundle}/manifest.json: files key = '../x.onnx' points outside the bundle "
                   f"(absolute or '..'): refused")


def test_bad_arguments_and_inputs(capsys, tmp_path, bundle, data):
    images_file = data[0]

    def err(*extra, input_=images_file):
        return user_error(capsys, "infer", "--bundle", bundle, "--input", input_, *extra)
    assert err("--batch-size", "0") == "--batch-size must be > 0, got 0"
    assert err("--top-k", "4") == "--top-k must be between 1 and 3 (the bundle's classes), got 4"
    assert err("--format", "json", "--limit", "3") == \
        "--limit applies to --format text only, as a count ≥ 0 (got --limit 3 with --format json)"
    assert err("--model", "model.engine") == f"{bundle}: no model 'model.engine' in the bundle (has model.onnx)"
    assert err("--model", "calib.npz") == f"{bundle}: calib.npz is a calibration file, not a model (onnx or engine)"
    assert err(input_=tmp_path / "nope") == f"{tmp_path}/nope: input not found"
    wrong = idx(tmp_path / "w-idx3-ubyte", np.zeros((2, 5, 5), np.uint8))
    assert err(input_=wrong) == f"{wrong}: images are uint8 (1, 5, 5), the bundle expects uint8 (1, 4, 4)"
    floats = idx(tmp_path / "f-idx3-ubyte", np.zeros((2, 4, 4), np.float32))
    assert err(input_=floats) == f"{floats}: images are float32 (1, 4, 4), the bundle expects uint8 (1, 4, 4)"
    empty = idx(tmp_path / "e-idx3-ubyte", np.zeros((0, 4, 4), np.uint8))
    assert err(input_=empty) == f"{empty}: no images (the file holds 0)"
    high = idx(tmp_path / "h-labels-idx1-ubyte", np.array([0, 3, 0, 0, 0], np.uint8))
    five = idx(tmp_path / "five-idx3-ubyte", np.zeros((5, 4, 4), np.uint8))
    assert err("--labels", high, input_=five) == f"{high}: label 3 at index 1 is outside [0, 3) (3 classes)"
    truncated = tmp_path / "t-idx3-ubyte.gz"
    truncated.write_bytes(images_file.read_bytes()[:30])
    assert err(input_=truncated).startswith(f"{truncated}: not a readable gzip IDX file (")
    (bundle / "manifest.json").write_text("{not json")
    assert err().startswith(f"{bundle}/manifest.json: unreadable manifest (")
    assert user_error(capsys, "infer", "--bundle", tmp_path / "nobundle", "--input", images_file) == \
        f"{tmp_path}/nobundle: bundle not found"


def test_mixed_folder_and_labels_for_class_folders_are_refused(capsys, tmp_path, bundle, data):
    (tmp_path / "mixed" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "mixed" / "a" / "0.png")
    msg = user_error(capsys, "infer", "--bundle", bundle, "--input", tmp_path / "mixed", "--labels", data[1])
    assert msg == f"--labels {data[1]}: the input's class folders already give the labels"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "mixed" / "loose.png")
    assert user_error(capsys, "infer", "--bundle", bundle, "--input", tmp_path / "mixed").startswith(
        f"{tmp_path}/mixed: holds both image files and subfolders")


def nan_or_two_output_model(path: Path, case: str) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.full((16, 3), np.nan if case == "nan" else 1, np.float32), "w")
    nodes = [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["scores"])]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])]
    if case == "two":
        nodes.append(helper.make_node("Identity", ["scores"], ["copy"]))
        outputs.append(helper.make_tensor_value_info("copy", TensorProto.FLOAT, ["batch", 3]))
    if case == "wide":
        w = numpy_helper.from_array(np.ones((16, 5), np.float32), "w")
        outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 5])]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])]
    graph = helper.make_graph(nodes, "bad", inputs, outputs, [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("nan", "model.onnx: the model produced non-finite outputs for 40 of 40 inputs (first: 0)"),
    ("two", "model.onnx: the model has outputs ['scores', 'copy'] and none is named 'logits'"),
    ("wide", "model.onnx: the model's output is [40, 5], expected [40, 3] (one score per label in the manifest)"),
])
def test_model_outputs_that_cannot_be_trusted(capsys, bundle, data, case, message):
    nan_or_two_output_model(bundle / "model.onnx", case)
    rewrite(bundle, lambda d: d["files"]["model.onnx"].update(sha256=sha256_file(bundle / "model.onnx")))
    assert user_error(capsys, "infer", "--bundle", bundle, "--input", data[0]) == message


def test_engine_is_picked_only_when_tensorrt_is_here(bundle, monkeypatch):
    from edgerun import infer
    from edgerun.bundle import load_manifest
    (bundle / "model.engine").write_bytes(b"engine")
    entry = {"kind": "engine", "sha256": sha256_file(bundle / "model.engine")}
    rewrite(bundle, lambda d: d["files"].update({"model.engine": entry}))
    m = load_manifest(bundle)
    monkeypatch.setattr(infer, "_tensorrt_here", lambda: False)
    assert infer.pick_model(bundle, m, None) == "model.onnx"
    monkeypatch.setattr(infer, "_tensorrt_here", lambda: True)
    assert infer.pick_model(bundle, m, None) == "model.engine"


def test_the_runtime_feeds_the_model_the_training_input_to_the_bit(bundle):
    """One normaliser (edgerun.pixels): the runtime's input for every uint8 value, on 1 and 3
    channels, is the pipeline's training input bit for bit, and the old float32 arithmetic
    (x / 255 - mean) / std; multiplying by float32(1/255) instead flips the last bit of many."""
    from edgerun import infer, pixels
    from edgerun.bundle import load_manifest
    from pipeline.data import normalize

    x = np.arange(256, dtype=np.uint8).reshape(16, 1, 4, 4)
    old = (x.astype(np.float32) / 255.0 - np.float32(0.5)) / np.float32(0.25)
    got = infer.normalise(x, load_manifest(bundle))
    assert got.dtype == np.float32 and got.tobytes() == old.tobytes() == normalize(x, (0.5,), (0.25,)).tobytes()
    assert ((x.astype(np.float32) * np.float32(1 / 255) - 0.5) / 0.25 != old).any()   # why it divides
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = np.random.default_rng(0).integers(0, 256, (8, 3, 5, 5), dtype=np.uint8)
    rgb[0, :, :, :] = np.arange(75).reshape(3, 5, 5) * 3 + 30
    ref = (rgb.astype(np.float32) / 255.0 - np.float32(mean).reshape(1, 3, 1, 1)) / np.float32(std).reshape(1, 3, 1, 1)
    assert pixels.normalise(rgb, mean, std, json.loads(json.dumps(1 / 255))).tobytes() == ref.tobytes()


# ---------------------------------------------------------------- the command line

def test_usage_errors_exit_1_and_version(capsys):
    rc, out, err = run(capsys, "infer", "--bundle", "x")
    assert rc == 1 and out == ["FAILED | error: python -m edgerun infer: the following arguments are required: --input"]
    assert err.startswith("usage: python -m edgerun infer")
    rc, out, _ = run(capsys, "frobnicate")
    assert rc == 1 and out[0].startswith("FAILED | error: python -m edgerun: argument VERB: invalid choice: "
                                         "'frobnicate'")
    rc, out, _ = run(capsys, "infer", "--bundle", "x", "--input", "y", "--batch-size", "many")
    assert rc == 1 and "invalid int value: 'many'" in out[0]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"edgerun {__version__}"


def test_debug_shows_the_exception(tmp_path):
    from edgerun.bundle import BundleError
    with pytest.raises(BundleError, match="bundle not found"):
        main(["--debug", "infer", "--bundle", str(tmp_path / "nope"), "--input", "x"])


def test_a_missing_verb_module_leaves_a_one_line_answer(capsys, monkeypatch):
    monkeypatch.setitem(cli.VERBS, "check", ("edgerun.not_here", "add_check_parser", "run_check"))
    monkeypatch.setitem(cli.VERBS, "record", ("edgerun.readers", "add_record_parser", "run_record"))  # no such function
    rc, out, _ = run(capsys, "check", "--whatever", "x")
    assert rc == 1 and out == ["FAILED | error: `check` is not available in this edgerun "
                               "(edgerun.not_here: No module named 'edgerun.not_here')"]
    rc, out, _ = run(capsys, "record")
    assert rc == 1 and "`record` is not available in this edgerun (edgerun.readers: module 'edgerun.readers' " \
                       "has no attribute 'add_record_parser')" in out[0]
    import argparse  # mounted as edgepipe does: an option added to the stub must not break the parser
    ap = argparse.ArgumentParser(prog="edgepipe")
    sub = ap.add_subparsers(dest="command", required=True)
    assert set(cli.add_verbs(sub)) == {"check", "record"}
    sub.choices["check"].add_argument("--debug", action="store_true")
    with pytest.raises(EdgeError, match="^`check` is not available in this edgerun"):
        cli.dispatch(ap.parse_args(["check", "--debug", "bundle", "--strict"]))


def test_add_verbs_mounts_on_another_parser(bundle, data, capsys):
    """What pipeline/cli.py (edgepipe) does: its own parser, edgerun's verbs, dispatch()."""
    import argparse
    ap = argparse.ArgumentParser(prog="edgepipe")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("run")
    cli.add_verbs(sub)
    assert cli.dispatch(ap.parse_args(["run"])) is None
    assert cli.dispatch(ap.parse_args(["infer", "--bundle", str(bundle), "--input", str(data[0])])) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("PASSED | 40 predictions, accuracy 85.00 %")


def test_edgerun_alone_runs_infer_without_torch_or_the_pipeline(tmp_path, data):
    """A copy of edgerun/ alone in a temp folder, as on a device: `python -m edgerun infer` works,
    and -X importtime shows that neither torch nor pipeline/export/calib was imported."""
    site = tmp_path / "device"
    shutil.copytree(ROOT / "edgerun", site / "edgerun", ignore=shutil.ignore_patterns("__pycache__"))
    make_bundle(site / "deploy")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = subprocess.run([sys.executable, "-c", "import edgerun; print(edgerun.__file__)"], cwd=site, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(site / "edgerun" / "__init__.py")  # the copy, not the project
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "edgerun", "infer", "--bundle", "deploy",
                           "--input", str(data[0])], cwd=site, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].startswith("PASSED | 40 predictions, accuracy 85.00 %")
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "edgerun" in imported and "onnxruntime" in imported  # the log is real
    forbidden = {"torch", "pipeline", "export", "calib"}
    assert imported.isdisjoint(forbidden), imported & forbidden


def test_the_bundles_own_sample_is_hashed_too(capsys, bundle, data):
    """`infer --input sample/images-idx3-ubyte.gz` inside a bundle: the sample is checked like a model."""
    images_file, labels_file, _, _ = data
    (bundle / "sample").mkdir()
    for src, name in ((images_file, "images-idx3-ubyte.gz"), (labels_file, "labels-idx1-ubyte.gz")):
        (bundle / "sample" / name).write_bytes(src.read_bytes())

    def edit(d):
        for name in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
            d["files"][f"sample/{name}"] = {"kind": "sample", "sha256": sha256_file(bundle / "sample" / name)}
        d["sample"] = {"images": "sample/images-idx3-ubyte.gz", "labels": "sample/labels-idx1-ubyte.gz", "count": 40}
    rewrite(bundle, edit)
    sample = bundle / "sample" / "images-idx3-ubyte.gz"
    rc, out, _ = run(capsys, "infer", "--bundle", bundle, "--input", sample)
    assert rc == 0 and out[-1] == (f"PASSED | 40 predictions, accuracy 85.00 % (34/40) against "
                                   f"{bundle}/sample/labels-idx1-ubyte.gz")
    labels = bytearray(gzip.decompress((bundle / "sample" / "labels-idx1-ubyte.gz").read_bytes()))
    labels[-1] = (labels[-1] + 1) % 3  # a relabelled sample would change the accuracy it reports
    (bundle / "sample" / "labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    assert "sample/labels-idx1-ubyte.gz: sha256 " in user_error(capsys, "infer", "--bundle", bundle, "--input", sample)
