"""edgerun.bundle: a deploy bundle is untrusted input.

Manifest fields are type- and range-checked, file names must stay inside the bundle (also in
archives and through symlinks), and a file's sha256 is checked before anything loads it.
"""
import copy
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgerun.bundle import BundleError, FileEntry, Manifest, Sample, inside, load_manifest, open_bundle, verify_file
from edgerun.errors import EdgeError
from edgerun.io import sha256_file


def tiny_onnx(path: Path, classes=3, size=4) -> Path:
    """Flatten -> MatMul: input 'input' [batch, 1, size, size] -> 'logits' [batch, classes]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    weights = np.random.default_rng(0).standard_normal((size * size, classes)).astype(np.float32)
    w = numpy_helper.from_array(weights, "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def make_bundle(root: Path, **changes) -> Path:
    """A valid bundle with one ONNX model and a calibration file; ``changes`` replace manifest fields."""
    root.mkdir(parents=True, exist_ok=True)
    tiny_onnx(root / "model.onnx")
    (root / "calib.npz").write_bytes(b"not really an npz")
    manifest = {
        "model": {"name": "tiny"},
        "input": {"name": "input", "shape": ["batch", 1, 4, 4], "dtype": "float32", "layout": "NCHW",
                  "normalisation": {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}},
        "labels": ["a", "b", "c"],
        "target": "cpu",
        "files": {"model.onnx": {"kind": "onnx", "precision": "fp32", "label": "ONNX fp32", "stage": "export_onnx",
                                 "sha256": sha256_file(root / "model.onnx")},
                  "calib.npz": {"kind": "calibration", "stage": "quantize", "sha256": sha256_file(root / "calib.npz")}},
        "chosen": {"file": "model.onnx", "why": "the only one"},
        "libraries": {"onnxruntime": "1.31"},
    }
    manifest.update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def rewrite(bundle: Path, edit) -> Path:
    doc = json.loads((bundle / "manifest.json").read_text())
    edit(doc)
    (bundle / "manifest.json").write_text(json.dumps(doc))
    return bundle


def refused(bundle: Path) -> str:
    with pytest.raises(BundleError) as e:
        load_manifest(bundle)
    msg = str(e.value)
    assert isinstance(e.value, EdgeError) and "\n" not in msg
    return msg


def test_a_valid_manifest_loads_as_typed_records(tmp_path):
    b = make_bundle(tmp_path / "b")
    m = load_manifest(b)
    assert isinstance(m, Manifest) and m.labels == ("a", "b", "c") and m.chosen == "model.onnx"
    assert (m.input.name, m.input.batch, m.input.channels, m.input.height, m.input.width) == ("input", "batch", 1, 4, 4)
    assert m.input.normalisation.mean == (0.5,) and m.input.normalisation.std == (0.25,)
    assert m.files["model.onnx"] == FileEntry("model.onnx", "onnx", sha256_file(b / "model.onnx"), "fp32",
                                              "ONNX fp32", "export_onnx", None)
    assert m.models() == ["model.onnx"] and m.sample is None and m.preflight is None
    with pytest.raises(TypeError):
        m.files["x"] = m.files["model.onnx"]  # read-only


SHA = "0" * 64


def norm(**kw):
    return lambda d: d["input"]["normalisation"].update(**kw)


def onnx_entry(**kw):
    return lambda d: d["files"]["model.onnx"].update(**kw)


MUTATIONS = {
    "not an object": (lambda d: d.clear() or d.update({"x": 1}), "no field 'input'"),
    "shape 2-d": (lambda d: d["input"].update(shape=[1, 28]), "input.shape must be [batch, C, H, W]"),
    "shape negative": (lambda d: d["input"].update(shape=["batch", 1, -4, 4]), "input.shape must be"),
    "shape bool": (lambda d: d["input"].update(shape=["batch", True, 4, 4]), "input.shape must be"),
    "shape float": (lambda d: d["input"].update(shape=["batch", 1, 4.0, 4]), "input.shape must be"),
    "dtype": (lambda d: d["input"].update(dtype="uint8"), "input.dtype must be 'float32' or 'float16', got 'uint8'"),
    "layout": (lambda d: d["input"].update(layout="NHWC"), "input.layout must be 'NCHW'"),
    "name": (lambda d: d["input"].update(name=3), "input.name must be a JSON string, got 3"),
    "mean length": (lambda d: d["input"]["normalisation"].update(mean=[0.1, 0.2, 0.3]),
                    "input.normalisation.mean must be 1 numbers (one per channel)"),
    "std zero": (norm(std=[0]), "input.normalisation.std must be a finite number > 0, got 0"),
    "std nan": (norm(std=[float("nan")]), "input.normalisation.std must be a finite number > 0, got nan"),
    "std string": (norm(std=["1"]), "input.normalisation.std must be a finite number"),
    "scale": (norm(scale=-1), "input.normalisation.scale must be a finite number > 0"),
    "no normalisation": (lambda d: d["input"].pop("normalisation"), "no field 'input.normalisation'"),
    "labels ints": (lambda d: d.update(labels=[0, 1, 2]), "labels must be a non-empty list of non-empty strings"),
    "labels empty": (lambda d: d.update(labels=[]), "labels must be a non-empty list"),
    "labels repeat": (lambda d: d.update(labels=["a", "a"]), "labels must be distinct names"),
    "files list": (lambda d: d.update(files=["model.onnx"]), "files must be a JSON object"),
    "files empty": (lambda d: d.update(files={}), "files must be a non-empty object"),
    "no sha": (lambda d: d["files"]["model.onnx"].pop("sha256"), "no field \"files['model.onnx'].sha256\""),
    "bad sha": (onnx_entry(sha256="abc"), "files['model.onnx'].sha256 must be 64 lowercase hex digits"),
    "no kind": (lambda d: d["files"]["model.onnx"].pop("kind"), "files['model.onnx'].kind must be a non-empty string"),
    "score string": (onnx_entry(score="98"), "files['model.onnx'].score must be a finite number"),
    "metric kind": (lambda d: d.update(metric={"kind": 3, "name": "top1"}), "metric.kind must be a non-empty string"),
    "metric direction": (lambda d: d.update(metric={"kind": "classify", "name": "top1", "higher_is_better": "yes"}),
                         "metric.higher_is_better must be true or false"),
    "chosen missing": (lambda d: d["chosen"].update(file="model_int8.onnx"),
                       "chosen.file must be a model listed in files (calib.npz, model.onnx), got 'model_int8.onnx'"),
    "chosen not a model": (lambda d: d["chosen"].update(file="calib.npz"),
                           "chosen.file must be a model listed in files"),
    "chosen list": (lambda d: d.update(chosen=["model.onnx"]), "chosen must be a JSON object"),
    "target": (lambda d: d.update(target=7), "target must be a string, got 7"),
    "preflight list": (lambda d: d.update(preflight=[1]), "preflight must be a JSON object, got [1]"),
    "sample not listed": (lambda d: d.update(sample={"images": "sample/i.gz", "labels": "sample/l.gz"}),
                          "sample.images must be a file listed in files with kind \"sample\", got 'sample/i.gz'"),
    "sample wrong kind": (lambda d: d.update(sample={"images": "model.onnx", "labels": "model.onnx"}),
                          "sample.images must be a file listed in files with kind \"sample\""),
}


@pytest.mark.parametrize("case", MUTATIONS)
def test_malformed_manifests_are_refused_naming_the_field(tmp_path, case):
    edit, message = MUTATIONS[case]
    b = rewrite(make_bundle(tmp_path / "b"), edit)
    msg = refused(b)
    assert msg.startswith(f"{b}/manifest.json: unreadable manifest (") and message in msg, msg


def test_unreadable_or_missing_manifest(tmp_path):
    b = make_bundle(tmp_path / "b")
    (b / "manifest.json").write_text("{not json")
    assert refused(b).startswith(f"{b}/manifest.json: unreadable manifest (Expecting property name")
    (b / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)  # deeper than the JSON parser recurses
    assert refused(b).startswith(f"{b}/manifest.json: unreadable manifest (")
    (b / "manifest.json").unlink()
    assert refused(b) == f"{b}: not a deploy bundle (no manifest.json)"


def test_sample_and_preflight_are_accepted(tmp_path):
    b = make_bundle(tmp_path / "b")
    (b / "sample").mkdir()
    for name in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
        (b / "sample" / name).write_bytes(name.encode())

    def edit(d):
        for name in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
            d["files"][f"sample/{name}"] = {"kind": "sample", "sha256": sha256_file(b / "sample" / name)}
        d["sample"] = {"images": "sample/images-idx3-ubyte.gz", "labels": "sample/labels-idx1-ubyte.gz", "count": 50}
        d["preflight"] = {"status": "passed", "checks": [{"name": "ops", "passed": True}]}
    m = load_manifest(rewrite(b, edit))
    assert m.sample == Sample("sample/images-idx3-ubyte.gz", "sample/labels-idx1-ubyte.gz", 50)
    assert m.preflight["status"] == "passed"
    assert verify_file(b, m, "sample/labels-idx1-ubyte.gz") == b / "sample/labels-idx1-ubyte.gz"
    rewrite(b, lambda d: d["sample"].update(count=0))
    assert "sample.count must be a positive integer, got 0" in refused(b)


@pytest.mark.parametrize("name, why", [
    ("../../x.onnx", "points outside the bundle (absolute or '..')"),
    ("sub/../../x.onnx", "points outside the bundle (absolute or '..')"),
    ("/etc/hostname", "points outside the bundle (absolute or '..')"),
    ("a\\..\\x.onnx", "must be a relative file name"),
    ("", "must be a relative file name"),
])
def test_file_names_outside_the_bundle_are_refused(tmp_path, name, why):
    b = make_bundle(tmp_path / "deploy")
    (tmp_path / "x.onnx").write_bytes((b / "model.onnx").read_bytes())  # a model outside, ready to be run
    rewrite(b, lambda d: d["files"].update({name: {"kind": "onnx", "sha256": SHA}}))
    msg = refused(b)
    assert msg.startswith(f"{b}/manifest.json: files key") and why in msg, msg


def test_symlinks_pointing_out_are_refused(tmp_path):
    b = make_bundle(tmp_path / "deploy")
    outside = tiny_onnx(tmp_path / "outside.onnx")
    os.symlink(outside, b / "evil.onnx")
    os.symlink("model.onnx", b / "alias.onnx")  # inside: fine
    rewrite(b, lambda d: d["files"].update({"alias.onnx": {"kind": "onnx", "sha256": sha256_file(b / "model.onnx")}}))
    m = load_manifest(b)
    assert verify_file(b, m, "alias.onnx") == b / "alias.onnx"
    rewrite(b, lambda d: d["files"].update({"evil.onnx": {"kind": "onnx", "sha256": sha256_file(outside)}}))
    assert refused(b) == (f"{b}/manifest.json: files key = 'evil.onnx' resolves outside the bundle "
                          f"(a symlink to {outside}): refused")
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        inside(b, "evil.onnx", "files['evil.onnx']")


def test_manifest_symlinked_out_is_refused(tmp_path):
    b = make_bundle(tmp_path / "deploy")
    real = tmp_path / "elsewhere.json"
    (b / "manifest.json").rename(real)
    os.symlink(real, b / "manifest.json")
    assert "manifest.json = 'manifest.json' resolves outside the bundle" in refused(b)


def test_verify_file_checks_the_hash_before_use(tmp_path):
    b = make_bundle(tmp_path / "b")
    m = load_manifest(b)
    assert verify_file(b, m, "model.onnx") == b / "model.onnx"
    data = bytearray((b / "model.onnx").read_bytes())
    data[-5] ^= 0xFF  # same size, one weight byte different: still a loadable model
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError) as e:
        verify_file(b, m, "model.onnx")
    assert str(e.value).startswith(f"{b}/model.onnx: sha256 ") and "does not match manifest.json" in str(e.value)
    with pytest.raises(BundleError, match=r"no file 'model.engine' in the bundle \(has calib.npz, model.onnx\)"):
        verify_file(b, m, "model.engine")
    (b / "calib.npz").unlink()
    with pytest.raises(BundleError, match="calib.npz: listed in manifest.json but missing from the bundle"):
        verify_file(b, m, "calib.npz")


# ---------------------------------------------------------------- archives

def tar_bundle(path: Path, bundle: Path, extra=()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(bundle, arcname="deploy")
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name, data=b"x", kind=tarfile.REGTYPE, target=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (data if kind == tarfile.REGTYPE else None)


def test_tar_bundle_opens(tmp_path):
    archive = tar_bundle(tmp_path / "b.tar.gz", make_bundle(tmp_path / "src"))
    (tmp_path / "scratch").mkdir()
    b = open_bundle(archive, tmp_path / "scratch")
    assert b == tmp_path / "scratch" / "deploy"
    assert verify_file(b, load_manifest(b), "model.onnx").is_file()
    assert open_bundle(tmp_path / "src", tmp_path / "unused") == tmp_path / "src"  # a folder is used in place


def test_tar_manifest_entry_outside_the_bundle_is_refused(tmp_path):
    """The archive holds deploy/ and x.onnx beside it: a manifest entry '../x.onnx' must not run it."""
    src = make_bundle(tmp_path / "src")
    model = (src / "model.onnx").read_bytes()
    entry = {"kind": "onnx", "sha256": sha256_file(src / "model.onnx")}
    rewrite(src, lambda d: d["files"].update({"../x.onnx": entry}))
    archive = tar_bundle(tmp_path / "b.tar.gz", src, [member("x.onnx", model)])
    (tmp_path / "scratch").mkdir()
    b = open_bundle(archive, tmp_path / "scratch")
    assert (tmp_path / "scratch" / "x.onnx").is_file()
    assert "files key = '../x.onnx' points outside the bundle" in refused(b)


def test_tar_symlink_out_of_the_bundle_but_inside_the_archive_is_refused(tmp_path):
    src = make_bundle(tmp_path / "src")
    model = (src / "model.onnx").read_bytes()
    entry = {"kind": "onnx", "sha256": sha256_file(src / "model.onnx")}
    rewrite(src, lambda d: d["files"].update({"link.onnx": entry}))
    link = member("deploy/link.onnx", kind=tarfile.SYMTYPE, target="../other/x.onnx")
    archive = tar_bundle(tmp_path / "b.tar.gz", src, [member("other/x.onnx", model), link])
    (tmp_path / "scratch").mkdir()
    b = open_bundle(archive, tmp_path / "scratch")  # the data filter allows it: the link stays in the archive's folder
    assert "files key = 'link.onnx' resolves outside the bundle" in refused(b)


@pytest.mark.parametrize("case", ["dotdot", "dotdot deep", "symlink out", "hardlink out", "absolute symlink"])
def test_tar_members_escaping_are_refused(tmp_path, case):
    extra = {"dotdot": [member("../evil")],
             "dotdot deep": [member("deploy/../../evil")],
             "symlink out": [member("deploy/link", kind=tarfile.SYMTYPE, target="../../.."),
                             member("deploy/link/evil")],
             "hardlink out": [member("deploy/hard", kind=tarfile.LNKTYPE, target="../../etc/hostname")],
             "absolute symlink": [member("deploy/abs", kind=tarfile.SYMTYPE, target="/etc")]}[case]
    archive = tar_bundle(tmp_path / "evil.tar.gz", make_bundle(tmp_path / "src"), extra)
    scratch = tmp_path / "scratch" / "inner"
    scratch.mkdir(parents=True)
    with pytest.raises(BundleError) as e:
        open_bundle(archive, scratch)
    assert str(e.value).startswith(f"{archive}: refused or unreadable bundle archive (")
    assert [p for p in tmp_path.rglob("evil") if scratch not in p.parents] == []


def test_tar_absolute_member_stays_inside(tmp_path):
    target = tmp_path / "abs-evil"
    archive = tar_bundle(tmp_path / "abs.tar.gz", make_bundle(tmp_path / "src"), [member(str(target))])
    (tmp_path / "scratch").mkdir()
    try:
        open_bundle(archive, tmp_path / "scratch")
    except BundleError:
        pass
    assert not target.exists()


def test_archives_without_exactly_one_bundle(tmp_path):
    src = make_bundle(tmp_path / "src")
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(BundleError, match=r"empty.tar: the archive must hold exactly one bundle \(manifest.json\), "
                                          r"found 0$"):
        open_bundle(empty, tmp_path / "s1")
    two = tmp_path / "two.tar"
    with tarfile.open(two, "w") as tar:
        tar.add(src, arcname="a")
        tar.add(src, arcname="b")
    with pytest.raises(BundleError, match="found 2$"):
        open_bundle(two, tmp_path / "s2")
    with pytest.raises(BundleError, match=f"^{tmp_path}/nope: bundle not found$"):
        open_bundle(tmp_path / "nope", tmp_path / "s3")


@pytest.mark.parametrize("case", ["truncated", "corrupt stream", "junk"])
def test_unreadable_archives(tmp_path, case):
    good = bytearray(tar_bundle(tmp_path / "b.tar.gz", make_bundle(tmp_path / "src")).read_bytes())
    data = {"truncated": good[:len(good) // 2], "corrupt stream": good[:200] + bytes(200) + good[400:],
            "junk": b"junk" * 100}[case]
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(data))
    (tmp_path / "scratch").mkdir()
    with pytest.raises(BundleError) as e:
        open_bundle(bad, tmp_path / "scratch")
    assert str(e.value).startswith(f"{bad}: refused or unreadable bundle archive (") and "\n" not in str(e.value)



# ---------------------------------------------------------------- fuzzing the manifest

def _paths(doc, prefix=()):
    """Every (path) to a value inside a JSON document."""
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


FUZZ_ROOT = Path(__import__("tempfile").mkdtemp(prefix="bundle-fuzz-"))
__import__("atexit").register(__import__("shutil").rmtree, FUZZ_ROOT, ignore_errors=True)
FUZZ_BUNDLE = make_bundle(FUZZ_ROOT / "b")
VALID = json.loads((FUZZ_BUNDLE / "manifest.json").read_text())
PATHS = [p for p in _paths(VALID) if p]
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)


@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), JSON_VALUES | st.just("__delete__")), min_size=1, max_size=3))
def test_mutated_manifests_give_a_manifest_or_one_line(edits):
    doc = copy.deepcopy(VALID)
    for path, value in edits:
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if value == "__delete__":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this path
    (FUZZ_BUNDLE / "manifest.json").write_text(json.dumps(doc))
    try:
        m = load_manifest(FUZZ_BUNDLE)
    except BundleError as e:
        assert str(e).startswith(f"{FUZZ_BUNDLE}") and "\n" not in str(e)
        return
    assert m.input.channels == len(m.input.normalisation.std) and all(s > 0 for s in m.input.normalisation.std)
    assert m.chosen is None or m.files[m.chosen].kind in ("onnx", "engine")
    assert all(isinstance(x, str) for x in m.labels) and m.labels
