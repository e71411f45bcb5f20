"""Bad input and untrusted files: every case gives one line naming what and where, exit 1, no
traceback (unless --debug), and leaves nothing that looks finished. docs/robustness.md lists each
case with the line the user sees.

Most CLI cases call pipeline.cli.main in this process (an exception escaping main() is exactly
what would be a traceback, and no interpreter start-up is paid); a few run the real CLI in a
subprocess to prove the exit code and the absence of a traceback end to end.
"""
import dataclasses
import gzip
import io
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from calib.calibset import load_calibration_set
from calib.errors import CalibError
from export.errors import ExportError
from export.onnx_export import check_onnx
from export.tensorrt import EngineOptions, check_engine_compat, record_engine, sidecar_path
from pipeline.cli import main
from pipeline.runner import RECORD, intact

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT / "data/mnist"
TINY = ["data.train_subset=300", "data.test_subset=100"]


# ---------------------------------------------------------------- helpers

def cli(capsys, *argv, lines=False):
    """(exit code, the last stdout line, stderr) of `python -m pipeline ...`, in this process."""
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    out = cap.out.strip().splitlines()
    return rc, (out if lines else out[-1] if out else ""), cap.err


def user_error(capsys, *argv) -> str:
    """Runs the CLI, checks the user-error contract and returns the message after 'FAILED | error: '."""
    rc, out, err = cli(capsys, *argv, lines=True)
    assert rc == 1, (rc, out, err[-2000:])
    assert len(out) == 1 and out[0].startswith("FAILED | error: "), out  # stdout is that one line
    assert "Traceback" not in err
    return out[0][len("FAILED | error: "):]


def run_args(runs, *sets, until="baseline", run="r"):
    args = ["run", "--config", ROOT / "configs/cpu.toml", "--runs", runs, "--run", run]
    if until:
        args += ["--until", until]
    for s in [*TINY, *sets]:
        args += ["--set", s]
    return args


def assert_nothing_finished(run_dir: Path, failing: str | None = None):
    """Only finished stages have a folder without .tmp/.failed, and each is complete; no temporary
    or partial file sits at a final place."""
    if not run_dir.exists():
        return
    assert not (run_dir / "report.json").exists()  # a report is written only for a pass or a failed gate
    for p in run_dir.iterdir():
        if p.is_dir() and not p.name.endswith((".tmp", ".failed")):
            assert not p.name.endswith(".old"), p
            if failing:
                assert not p.name.endswith(f"_{failing}") and not (failing == "package" and p.name == "deploy"), p
            record = json.loads((p / RECORD).read_text())
            assert record["status"] in ("ran", "skipped") and intact(p, record), p
    for f in run_dir.rglob("*"):
        parents = f.relative_to(run_dir).parts[:-1]
        if f.is_file() and not any(part.endswith((".tmp", ".failed")) for part in parents):
            assert not f.name.endswith((".partial", ".tmp")), f"half-written file at a final place: {f}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A state_dict that fits the default model (seeded init: the tests need it to load, not to be good)."""
    import torch

    from pipeline.config import Config
    from pipeline.stages import build
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    torch.save(build(Config()).state_dict(), path)
    return path


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("sets, message", [
    (["prune.ration=0.3"], "configs/cpu.toml: config: unknown key 'prune.ration' (did you mean 'ratio'?)"),
    (["prune.ratio=abc"], "configs/cpu.toml: config: prune.ratio must be a number, got str 'abc'"),
    (["baseline.epochs=two"], "configs/cpu.toml: config: baseline.epochs must be an integer, got str 'two'"),
    (["run.target=jetson-nano"], "configs/cpu.toml: config: run.target = 'jetson-nano' is not one of 'cpu', "
                                 "'desktop-gpu', 'jetson-orin' (did you mean 'jetson-orin'?)"),
    (["prune"], "--set 'prune': expected section.key=value"),
    (["prune.ratio=1.5"], "configs/cpu.toml: config: prune.ratio must be in [0, 1), got 1.5"),
])
def test_config_errors(tmp_path, capsys, sets, message):
    msg = user_error(capsys, *run_args(tmp_path, *sets))
    assert msg.endswith(message)
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_config_file_errors(tmp_path, capsys):
    typo = tmp_path / "typo.toml"
    typo.write_text("[prun]\nratio = 0.3\n")
    assert user_error(capsys, "run", "--config", typo) == f"{typo}: config: unknown key 'prun' (did you mean 'prune'?)"
    bad = tmp_path / "bad.toml"
    bad.write_text("[prune]\nratio = \n")
    assert user_error(capsys, "run", "--config", bad) == f"{bad}: not valid TOML (Invalid value (at line 2, column 9))"
    missing = tmp_path / "nope.toml"
    assert user_error(capsys, "run", "--config", missing) == f"{missing}: config file not found"


def test_cli_selection_errors(tmp_path, capsys):
    assert user_error(capsys, *run_args(tmp_path, until=None), "--from", "prun") == (
        "--from 'prun': no such stage (stages: baseline, prune, finetune, export_onnx, quantize, engine, profile, package)")
    assert user_error(capsys, *run_args(tmp_path, run="../x")) == "--run '../x': must be a plain folder name"


@pytest.mark.parametrize("where", ["file", "override"])
def test_config_deeply_nested_value(tmp_path, capsys, where):
    deep = "[" * 3000 + "]" * 3000
    if where == "file":
        path = tmp_path / "deep.toml"
        path.write_text(f"[model]\nkwargs = {{ x = {deep} }}\n")
        msg = user_error(capsys, "run", "--config", path)
    else:
        msg = user_error(capsys, *run_args(tmp_path, f"model.kwargs={deep}"))
    assert "nested" in msg or "TOML" in msg


def test_debug_shows_the_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pipeline", "--debug", *map(str, run_args(tmp_path, "prune.ration=0.3"))],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" in p.stderr and "unknown key 'prune.ration'" in p.stderr


# ---------------------------------------------------------------- data

def mnist_root(tmp_path, name, replace: dict) -> Path:
    """A copy of data/mnist (symlinks) with some files replaced: {vendored name: (new name, bytes)}."""
    root = tmp_path / name
    root.mkdir()
    for f in MNIST.glob("*.gz"):
        if f.name in replace:
            new_name, data = replace[f.name]
            (root / new_name).write_bytes(data)
        else:
            os.symlink(f, root / f.name)
    return root


def test_missing_data_folder(tmp_path, capsys):
    assert user_error(capsys, *run_args(tmp_path, "data.root=/nonexistent/mnist")) == \
        "data.root: /nonexistent/mnist is not a folder"
    assert_nothing_finished(tmp_path / "r", "baseline")
    assert not (tmp_path / "r/01_baseline.tmp").exists()  # refused before any stage started
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert user_error(capsys, *run_args(tmp_path, f"data.root={afile}")) == f"data.root: {afile} is not a folder"


def test_data_folder_without_mnist_files(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert user_error(capsys, *run_args(tmp_path, f"data.root={empty}")) == \
        f"{empty}: missing train-images-idx3-ubyte.gz (MNIST train split)"
    assert_nothing_finished(tmp_path / "r", "baseline")


LABELS = (MNIST / "train-labels-idx1-ubyte.gz").read_bytes()
RAW_LABELS = gzip.decompress(LABELS)


@pytest.mark.parametrize("case, new_name, data, message", [
    ("truncated .gz", "train-labels-idx1-ubyte.gz", LABELS[:len(LABELS) // 2],
     "train-labels-idx1-ubyte.gz: not a readable gzip IDX file (Compressed file ended before the end-of-stream "
     "marker was reached)"),
    ("truncated raw", "train-labels-idx1-ubyte", RAW_LABELS[:-100],
     "train-labels-idx1-ubyte: IDX payload is 59900 bytes, header says 60000 (shape (60000,)): truncated or corrupt"),
    ("bad magic", "train-labels-idx1-ubyte", b"GARBAGE" + RAW_LABELS[7:],
     "train-labels-idx1-ubyte: not an IDX file (bad magic number)"),
    ("not gzip", "train-labels-idx1-ubyte.gz", RAW_LABELS,
     "train-labels-idx1-ubyte.gz: not a readable gzip IDX file (Not a gzipped file (b'\\x00\\x00'))"),
    ("count mismatch", "train-labels-idx1-ubyte", RAW_LABELS[:4] + (59999).to_bytes(4, "big") + RAW_LABELS[8:-1],
     "MNIST train images (60000, 28, 28) and labels (59999,) do not match"),
])
def test_corrupt_idx_files(tmp_path, capsys, case, new_name, data, message):
    root = mnist_root(tmp_path, "mnist", {"train-labels-idx1-ubyte.gz": (new_name, data)})
    msg = user_error(capsys, *run_args(tmp_path, f"data.root={root}"))
    assert msg.startswith(str(root)) and msg.endswith(message), msg
    assert_nothing_finished(tmp_path / "r", "baseline")


def test_corrupt_gzip_stream(tmp_path, capsys):
    data = bytearray(LABELS)
    data[40:60] = bytes(20)  # inside the deflate stream: gzip's header and CRC are intact
    root = mnist_root(tmp_path, "mnist", {"train-labels-idx1-ubyte.gz": ("train-labels-idx1-ubyte.gz", bytes(data))})
    msg = user_error(capsys, *run_args(tmp_path, f"data.root={root}"))
    assert msg.startswith(f"{root}/train-labels-idx1-ubyte.gz: not a readable gzip IDX file")


def test_idx_header_whose_size_overflows(tmp_path):
    from calib.sources import read_idx
    path = tmp_path / "bomb-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + (2**31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big"))
    with pytest.raises(CalibError, match="header says"):
        read_idx(path)


def image_folder(root: Path, broken: dict | None = None) -> Path:
    """train/ and test/ with two classes of three 28x28 PNGs; broken = {relative path: bytes}."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    for rel, data in (broken or {}).items():
        (root / rel).write_bytes(data)
    return root


def png_bytes(tmp_path) -> bytes:
    from PIL import Image
    p = tmp_path / "x.png"
    Image.fromarray(np.full((28, 28), 7, np.uint8)).save(p)
    return p.read_bytes()


@pytest.mark.parametrize("case", ["random bytes", "truncated", "empty"])
def test_corrupt_image_files(tmp_path, capsys, case):
    good = png_bytes(tmp_path)
    data = {"random bytes": os.urandom(200), "truncated": good[:len(good) // 2], "empty": b""}[case]
    root = image_folder(tmp_path / "imgs", {"train/dog/1.png": data})
    msg = user_error(capsys, *run_args(tmp_path, "data.kind=imagefolder", f"data.root={root}"))
    assert msg.startswith(f"{root}/train/dog/1.png: unreadable image ("), msg
    assert_nothing_finished(tmp_path / "r", "baseline")


def test_image_folder_without_classes(tmp_path, capsys):
    root = tmp_path / "imgs"
    (root / "train").mkdir(parents=True)
    assert user_error(capsys, *run_args(tmp_path, "data.kind=imagefolder", f"data.root={root}")) == \
        f"{root}/train: no class subfolders (expected one folder per class)"


# ---------------------------------------------------------------- checkpoints (--set model.weights=...)

class Payload:
    """Unpickling this runs open(marker, 'w'): it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint_error(tmp_path, capsys, path) -> str:
    msg = user_error(capsys, *run_args(tmp_path, f"model.weights={path}"))
    assert msg.startswith(f"{path}: "), msg
    assert_nothing_finished(tmp_path / "r", "baseline")
    return msg[len(f"{path}: "):]


def test_checkpoint_missing(tmp_path, capsys):
    assert checkpoint_error(tmp_path, capsys, tmp_path / "nope.pt") == "checkpoint not found"


def test_checkpoint_corrupt(tmp_path, capsys, weights):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00garbage" * 20)
    assert checkpoint_error(tmp_path, capsys, garbage).startswith("not a weights-only state_dict (")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights.read_bytes()[:50_000])
    # torch's own detail varies with where the zip is cut ("[Errno 22] Invalid argument" at 50 kB).
    assert checkpoint_error(tmp_path, capsys, truncated).startswith("not a weights-only state_dict (")


def test_checkpoint_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert checkpoint_error(tmp_path, capsys, empty).startswith("not a weights-only state_dict (")


def test_checkpoint_pickled_full_model(tmp_path, capsys):
    import torch

    from pipeline.config import Config
    from pipeline.stages import build
    path = tmp_path / "full_model.pt"
    torch.save(build(Config()), path)
    msg = checkpoint_error(tmp_path, capsys, path)
    assert msg.startswith("not a weights-only state_dict (Weights only load failed.")
    assert msg.endswith("--set model.unsafe_pickle=true loads it (pickle runs code from the file)")


@pytest.mark.parametrize("case", ["other shapes", "other keys", "not tensors", "a list"])
def test_checkpoint_not_matching_the_model(tmp_path, capsys, case):
    import torch

    from pipeline.config import Config, ModelCfg
    from pipeline.stages import build
    own = build(Config()).state_dict()
    obj = {"other shapes": lambda: build(dataclasses.replace(Config(), model=ModelCfg(num_classes=5))).state_dict(),
           "other keys": lambda: {"encoder.weight": torch.zeros(3)},
           "not tensors": lambda: {k: 1 for k in own},
           "a list": lambda: [torch.zeros(2)]}[case]()
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    msg = checkpoint_error(tmp_path, capsys, path)
    if case == "a list":
        assert msg == "expected a state_dict, got list"
    else:
        assert msg.startswith("does not match the model (")


@pytest.mark.parametrize("payload", [Payload, SystemPayload])
@pytest.mark.parametrize("fmt", ["torch zip", "plain pickle"])
def test_checkpoint_with_code_does_not_run_it(tmp_path, capsys, payload, fmt):
    import torch
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    obj = {"features.0.weight": payload(marker)}
    if fmt == "torch zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    msg = checkpoint_error(tmp_path, capsys, path)
    assert msg.startswith("not a weights-only state_dict (")
    assert not marker.exists(), "loading the checkpoint ran code from it"


# ---------------------------------------------------------------- failed writes

def test_runs_folder_under_a_regular_file(tmp_path, capsys):
    """As root chmod does not stop writes; a --runs path through a regular file does."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert user_error(capsys, *run_args(afile / "runs")) == f"{afile}/runs/r: Not a directory"
    assert afile.read_text() == "not a folder"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="procfs")
def test_runs_folder_in_proc(capsys):
    """/proc refuses new folders even to root."""
    assert user_error(capsys, *run_args("/proc/self/runs")) == "/proc/self/runs: No such file or directory"


def _limit_file_size():
    # The shell's `ulimit -f`: writes past 300 kB fail with EFBIG, as on a full disk (SIGXFSZ ignored,
    # else it kills the process instead of failing the write).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_failed_write_mid_stage(tmp_path, weights):
    runs = tmp_path / "runs"
    p = subprocess.run([sys.executable, "-m", "pipeline", *map(str, run_args(runs, f"model.weights={weights}"))],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert_nothing_finished(runs / "r", "baseline")
    assert (runs / "r/01_baseline.tmp").is_dir()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1].startswith(f"FAILED | error: {runs}/r/01_baseline.tmp/model.pt: ")


def test_real_cli_user_error_has_no_traceback(tmp_path, weights):
    """The subprocess view of one stage-time error: exit 1, one line, no traceback."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    p = subprocess.run([sys.executable, "-m", "pipeline", *map(str, run_args(tmp_path, f"model.weights={bad}"))],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    out = p.stdout.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"FAILED | error: {bad}: not a weights-only state_dict (")


# ---------------------------------------------------------------- ONNX files

def small_onnx(path: Path) -> Path:
    """A tiny classifier with the bundle's contract: input 'input' [batch, 1, 28, 28] -> 'logits' [batch, 10]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((784, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def external_data_onnx(path: Path, location: str) -> Path:
    """A model whose weight claims to live in an external file at `location` (outside its folder)."""
    from onnx import TensorProto, helper
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [1, 2, 3, 4])
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    graph = helper.make_graph([helper.make_node("Add", ["input", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    return path


def bad_onnx_files(tmp_path) -> dict:
    good = small_onnx(tmp_path / "good.onnx").read_bytes()
    files = {"empty": b"", "garbage": b"\xff\x00garbage" * 30, "truncated": good[:len(good) // 2], "text": b"hello"}
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.onnx"
        out[name].write_bytes(data)
    return out


def test_check_onnx_refuses_corrupt_files(tmp_path):
    expected = {"empty": "fails onnx.checker (ValidationError: The model does not have an ir_version set properly.)",
                "garbage": "not a valid ONNX file (DecodeError: Error parsing message",
                "truncated": "not a valid ONNX file (DecodeError: Error parsing message",
                "text": "not a valid ONNX file (DecodeError: Error parsing message"}
    for name, path in bad_onnx_files(tmp_path).items():
        with pytest.raises(ExportError) as e:
            check_onnx(path)
        assert str(e.value).startswith(f"{name}.onnx: {expected[name]}") and "\n" not in str(e.value)
    with pytest.raises(ExportError, match=r"^nope.onnx: no such file \("):
        check_onnx(tmp_path / "nope.onnx")


@pytest.mark.parametrize("location", ["../../../../etc/hostname", "/etc/hostname"])
def test_check_onnx_refuses_external_data_outside_its_folder(tmp_path, location):
    (tmp_path / "sub").mkdir()
    path = external_data_onnx(tmp_path / "sub/ext.onnx", location)
    with pytest.raises(ExportError, match=r"^ext.onnx: not a valid ONNX file \(ValidationError: .*"
                                          r"(points outside the directory|should be a relative path)"):
        check_onnx(path)


def test_quantize_onnx_refuses_corrupt_files(tmp_path):
    from calib.quantize import quantize_onnx
    calib = np.zeros((4, 1, 28, 28), np.float32)
    for name, path in bad_onnx_files(tmp_path).items():
        with pytest.raises(CalibError) as e:
            quantize_onnx(path, tmp_path / "q.onnx", calib)
        assert str(e.value).startswith(f"{path}: not a") and "\n" not in str(e.value)
        assert not (tmp_path / "q.onnx").exists()


def test_quantize_onnx_refuses_external_data_outside_its_folder(tmp_path):
    from calib.quantize import quantize_onnx
    (tmp_path / "sub").mkdir()
    path = external_data_onnx(tmp_path / "sub/ext.onnx", "/etc/hostname")
    with pytest.raises(CalibError) as e:
        quantize_onnx(path, tmp_path / "q.onnx", np.zeros((2, 4), np.float32))
    assert str(e.value) == f"{path}: not a readable ONNX model (ValidationError)"


def test_quantize_onnx_refuses_an_input_of_unknown_type(tmp_path):
    from onnx import helper
    from calib.quantize import quantize_onnx
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["y"])], "g",
                              [helper.make_tensor_value_info("input", 0, ["batch", 4])],
                              [helper.make_tensor_value_info("y", 0, ["batch", 4])])
    path = tmp_path / "untyped.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    with pytest.raises(CalibError) as e:
        quantize_onnx(path, tmp_path / "q.onnx", np.zeros((2, 4), np.float32))
    assert str(e.value) == f"{path}: input 'input' has no known tensor element type (0)"


# ---------------------------------------------------------------- calibration sets

def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def calib_error(path, **kw) -> str:
    with pytest.raises(CalibError) as e:
        load_calibration_set(path, **kw)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    return msg[len(f"{path}: "):]


def test_calibration_set_wrong_shape_or_empty(tmp_path):
    labels4 = np.zeros(4, np.int64)
    assert calib_error(npz(tmp_path / "rgb.npz", images=np.zeros((4, 3, 32, 32), np.uint8), labels=labels4),
                       expect_shape=(1, 28, 28)) == "images are [3, 32, 32] (C, H, W), expected [1, 28, 28]"
    assert calib_error(npz(tmp_path / "3d.npz", images=np.zeros((4, 28, 28), np.uint8), labels=labels4)) == \
        "images must be uint8 [N, C, H, W], got uint8 [4, 28, 28]"
    assert calib_error(npz(tmp_path / "f32.npz", images=np.zeros((4, 1, 28, 28), np.float32), labels=labels4)) == \
        "images must be uint8 [N, C, H, W], got float32 [4, 1, 28, 28]"
    assert calib_error(npz(tmp_path / "empty.npz", images=np.zeros((0, 1, 28, 28), np.uint8),
                           labels=np.zeros(0, np.int64))) == "calibration set is empty"
    assert calib_error(npz(tmp_path / "nolabels.npz", images=np.zeros((4, 1, 28, 28), np.uint8))) == \
        "calibration set lacks labels (expected keys images, labels)"
    assert calib_error(npz(tmp_path / "labels.npz", images=np.zeros((4, 1, 28, 28), np.uint8),
                           labels=np.zeros(3, np.int64))) == "labels must be int64 [4], got int64 [3]"
    assert calib_error(npz(tmp_path / "few.npz", images=np.zeros((4, 1, 28, 28), np.uint8), labels=labels4),
                       n=10) == "calibration set has 4 samples, 10 needed"
    assert calib_error(tmp_path / "nope.npz") == "calibration set not found"


def test_calibration_set_corrupt_files(tmp_path):
    good = npz(tmp_path / "good.npz", images=np.zeros((4, 1, 28, 28), np.uint8), labels=np.zeros(4, np.int64))
    data = good.read_bytes()
    cases = {"truncated": (data[:len(data) // 2], "BadZipFile"), "garbage": (os.urandom(300), "ValueError"),
             "emptyfile": (b"", "EOFError")}
    for name, (content, kind) in cases.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(content)
        assert calib_error(path) == f"not a readable .npz calibration set ({kind})"


def test_calibration_set_with_pickled_objects_does_not_run_them(tmp_path):
    marker = tmp_path / "PWNED"
    objs = np.empty(1, dtype=object)
    objs[0] = Payload(marker)
    assert calib_error(npz(tmp_path / "obj.npz", images=objs, labels=np.zeros(1, np.int64))) == \
        "not a readable .npz calibration set (ValueError)"
    plain = tmp_path / "plain.npz"
    plain.write_bytes(pickle.dumps(Payload(marker)))
    assert calib_error(plain) == "not a readable .npz calibration set (ValueError)"
    assert not marker.exists()


def test_calibration_set_that_is_a_npy_file(tmp_path):
    path = tmp_path / "calib.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((2, 1, 28, 28), np.uint8))
    assert calib_error(path) == "not a .npz calibration set (a single .npy array; expected keys images, labels)"


def test_calibration_set_whose_header_claims_a_huge_array(tmp_path):
    path = tmp_path / "bomb.npz"
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1000000000000000, 1, 28, 28), }".ljust(117) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
        z.writestr("labels.npy", b"")
    assert calib_error(path) == "not a readable .npz calibration set (MemoryError)"


# ---------------------------------------------------------------- TensorRT engines

@pytest.fixture
def engine(tmp_path):
    """An 'engine' and the sidecar written for it as if built with TensorRT 10.3.0 on a Jetson Orin (sm_87)."""
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    path = tmp_path / "model.engine"
    path.write_bytes(os.urandom(4096))
    record_engine(tmp_path / "model.onnx", path, EngineOptions(input_shape=(1, 28, 28)), trt_version="10.3.0",
                  gpu_name="Orin", compute_capability="8.7")
    return path


HERE = dict(trt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7")


def engine_error(path, **here) -> str:
    with pytest.raises(ExportError) as e:
        check_engine_compat(path, **{**HERE, **here})
    assert "\n" not in str(e.value)
    return str(e.value)


def test_engine_matching_this_device_passes(engine):
    assert check_engine_compat(engine, **HERE)["gpu_name"] == "Orin"


def test_engine_from_another_tensorrt_or_gpu(engine):
    assert engine_error(engine, trt_version="10.8.0") == (
        "model.engine: built for TensorRT 10.3.0 on sm_87 (Orin), this is TensorRT 10.8.0 on sm_87 (Orin): "
        "rebuild it on this device")
    assert engine_error(engine, trt_version="11.0.0").startswith("model.engine: built for TensorRT 10.3.0 on sm_87")
    assert engine_error(engine, gpu_name="NVIDIA GeForce RTX 3090", compute_capability="8.6") == (
        "model.engine: built for TensorRT 10.3.0 on sm_87 (Orin), this is TensorRT 10.3.0.30 on sm_86 "
        "(NVIDIA GeForce RTX 3090): rebuild it on this device")


def test_engine_truncated_or_replaced(engine):
    data = engine.read_bytes()
    engine.write_bytes(data[:1000])
    assert engine_error(engine).startswith("model.engine: 1000 bytes that do not match model.engine.json (4096 bytes, "
                                           "sha256 ")
    engine.write_bytes(bytes(len(data)))
    assert engine_error(engine).endswith("truncated or replaced, rebuild it")


def test_engine_without_or_with_a_broken_sidecar(engine):
    side = sidecar_path(engine)
    good = json.loads(side.read_text())
    side.write_bytes(b"\xff{")
    assert engine_error(engine).startswith("model.engine.json: not readable engine metadata (UnicodeDecodeError")
    side.write_text("[1, 2]")
    assert engine_error(engine) == ("model.engine.json: not readable engine metadata (ValueError: expected a JSON "
                                    "object, got list): rebuild the engine on this device")
    side.write_text(json.dumps({k: v for k, v in good.items() if k != "engine_sha256"}))
    assert engine_error(engine) == ("model.engine.json: not readable engine metadata (ValueError: no engine_sha256): "
                                    "rebuild the engine on this device")
    side.unlink()
    assert engine_error(engine) == ("model.engine: its metadata model.engine.json is missing, so where it was built "
                                    "is unknown: rebuild it on this device")
    side.write_text(json.dumps(good))
    engine.unlink()
    assert engine_error(engine).startswith("model.engine: no such file (")


@pytest.mark.parametrize("field, value", [
    ("options", [1]), ("options", "x"), ("engine_size_bytes", "4096"), ("engine_sha256", ["a"]),
    ("tensorrt_version", "abc"), ("tensorrt_version", None), ("compute_capability", "x"), ("gpu_name", {"a": 1}),
])
def test_engine_sidecar_with_wrong_types(engine, field, value):
    side = sidecar_path(engine)
    side.write_text(json.dumps({**json.loads(side.read_text()), field: value}))
    assert engine_error(engine).startswith("model.engine.json: not readable engine metadata (")


def test_engine_sidecar_cannot_claim_compatibility_with_a_non_boolean(engine):
    side = sidecar_path(engine)
    meta = json.loads(side.read_text())
    meta["options"]["version_compatible"] = "no"
    side.write_text(json.dumps(meta))
    assert engine_error(engine, trt_version="10.8.0").startswith("model.engine: built for TensorRT 10.3.0")


def test_record_refuses_a_version_no_runtime_can_read(engine):
    with pytest.raises(ExportError, match=r"^TensorRT version 'latest' not understood"):
        record_engine(engine.with_name("model.onnx"), engine, EngineOptions(input_shape=(1, 28, 28)),
                      trt_version="latest", gpu_name="Orin", compute_capability="8.7")
    assert check_engine_compat(engine, **HERE)  # the old sidecar is left as it was


def test_device_cli_failed_write_is_one_line(engine, capsys, monkeypatch):
    """`python -m export.tensorrt record` (what build_engine.sh runs) when the sidecar cannot be written."""
    import export.tensorrt
    from export.tensorrt import main as trt_main
    monkeypatch.setattr(export.tensorrt, "_cuda_device", lambda index=0: ("Orin", "8.7"))  # no GPU here
    side = sidecar_path(engine)
    side.unlink()
    side.mkdir()  # a folder where the sidecar file should go: the rename onto it fails
    rc = trt_main(["record", "--onnx", str(engine.with_name("model.onnx")), "--engine", str(engine),
                   "--trt-version", "10.3.0", "--input-shape", "1x28x28"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == [f"FAILED | {side}: Is a directory"], err
    assert [p.name for p in engine.parent.iterdir() if p.name.endswith(".partial")] == []


# ---------------------------------------------------------------- infer

@pytest.fixture
def bundle(tmp_path):
    b = tmp_path / "deploy"
    b.mkdir()
    small_onnx(b / "model.onnx")
    (b / "manifest.json").write_text(json.dumps({
        "input": {"name": "input", "shape": ["batch", 1, 28, 28], "dtype": "float32", "layout": "NCHW",
                  "normalisation": {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]}},
        "labels": [str(i) for i in range(10)],
        "files": {"model.onnx": {"kind": "onnx", "precision": "fp32"}},
        "chosen": {"file": "model.onnx"}}))
    return b


def idx_file(path: Path, arr: np.ndarray, code=0x08) -> Path:
    arr = np.ascontiguousarray(arr)
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.astype(arr.dtype.newbyteorder(">")).tobytes())
    return path


def test_infer_works_on_the_fake_bundle(tmp_path, capsys, bundle):
    rc, line, _ = cli(capsys, "infer", "--bundle", bundle, "--input", MNIST / "t10k-images-idx3-ubyte.gz")
    assert rc == 0 and line.startswith("PASSED | 10000 predictions")


def test_infer_bundle_missing_or_broken(tmp_path, capsys, bundle):
    img = MNIST / "t10k-images-idx3-ubyte.gz"
    assert user_error(capsys, "infer", "--bundle", tmp_path / "nope", "--input", img) == f"{tmp_path}/nope: bundle not found"
    assert user_error(capsys, "infer", "--bundle", tmp_path, "--input", img) == \
        f"{tmp_path}: not a deploy bundle (no manifest.json)"
    (bundle / "model.onnx").write_bytes(b"garbage")
    assert user_error(capsys, "infer", "--bundle", bundle, "--input", img).startswith(
        "model.onnx: onnxruntime cannot load it (")
    assert user_error(capsys, "infer", "--bundle", bundle, "--input", img, "--model", "model.engine") == \
        f"{bundle}: no model 'model.engine' in the bundle (has model.onnx)"
    (bundle / "manifest.json").write_text("{not json")
    assert user_error(capsys, "infer", "--bundle", bundle, "--input", img).startswith(
        f"{bundle}/manifest.json: unreadable manifest (")


def test_infer_manifest_with_a_malformed_input_shape(capsys, bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["input"]["shape"] = [1, 28]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "unreadable manifest" in user_error(capsys, "infer", "--bundle", bundle, "--input",
                                               MNIST / "t10k-images-idx3-ubyte.gz")


def test_infer_wrong_or_broken_input(tmp_path, capsys, bundle):
    def err(path):
        return user_error(capsys, "infer", "--bundle", bundle, "--input", path)
    small = idx_file(tmp_path / "small-idx3-ubyte", np.zeros((5, 14, 14), np.uint8))
    assert err(small) == f"{small}: images are uint8 (1, 14, 14), the bundle expects uint8 (1, 28, 28)"
    floats = idx_file(tmp_path / "float-idx3-ubyte", np.zeros((5, 28, 28), np.float32), code=0x0D)
    assert err(floats) == f"{floats}: images are float32 (1, 28, 28), the bundle expects uint8 (1, 28, 28)"
    labels = MNIST / "t10k-labels-idx1-ubyte.gz"
    assert err(labels) == f"{labels}: images are uint8 (), the bundle expects uint8 (1, 28, 28)"
    assert err(tmp_path / "nope.gz") == f"{tmp_path}/nope.gz: IDX file not found"
    truncated = tmp_path / "t-idx3-ubyte.gz"
    truncated.write_bytes((MNIST / "t10k-images-idx3-ubyte.gz").read_bytes()[:5000])
    assert err(truncated).startswith(f"{truncated}: not a readable gzip IDX file (")
    assert user_error(capsys, "infer", "--bundle", bundle, "--input", small, "--batch-size", "0") == \
        "--batch-size must be > 0, got 0"


def test_infer_on_an_image_folder_with_a_broken_image(tmp_path, capsys, bundle):
    root = image_folder(tmp_path / "imgs", {"test/cat/2.png": b"\x89PNG broken"})
    rc, line, _ = cli(capsys, "infer", "--bundle", bundle, "--input", root / "train")
    assert rc == 0 and line.startswith("PASSED | 6 predictions; per class: ")
    assert user_error(capsys, "infer", "--bundle", bundle, "--input", root / "test").startswith(
        f"{root}/test/cat/2.png: unreadable image (")


def test_infer_on_a_flat_image_folder(tmp_path, capsys, bundle):
    root = image_folder(tmp_path / "imgs") / "train" / "cat"
    rc, line, _ = cli(capsys, "infer", "--bundle", bundle, "--input", root)
    assert rc == 0 and line.startswith("PASSED | 3 predictions")


# ---------------------------------------------------------------- bundle archives (untrusted)

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


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """infer unpacks into a temporary folder: put it where the test can see what escapes it."""
    import tempfile
    where = tmp_path / "scratch" / "inner"
    where.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def test_infer_on_a_tar_bundle(tmp_path, capsys, bundle, scratch):
    archive = tar_bundle(tmp_path / "b.tar.gz", bundle)
    rc, line, _ = cli(capsys, "infer", "--bundle", archive, "--input", MNIST / "t10k-images-idx3-ubyte.gz")
    assert rc == 0 and line.startswith("PASSED | 10000 predictions")
    assert list(scratch.iterdir()) == []  # unpacked copy removed


@pytest.mark.parametrize("case", ["dotdot", "dotdot deep", "symlink out", "hardlink out", "absolute symlink"])
def test_tar_bundle_with_members_escaping_is_refused(tmp_path, capsys, bundle, scratch, case):
    extra = {"dotdot": [member("../evil")],
             "dotdot deep": [member("deploy/../../evil")],
             "symlink out": [member("deploy/link", kind=tarfile.SYMTYPE, target="../../.."), member("deploy/link/evil")],
             "hardlink out": [member("deploy/hard", kind=tarfile.LNKTYPE, target="../../etc/hostname")],
             "absolute symlink": [member("deploy/abs", kind=tarfile.SYMTYPE, target="/etc")]}[case]
    archive = tar_bundle(tmp_path / "evil.tar.gz", bundle, extra)
    msg = user_error(capsys, "infer", "--bundle", archive, "--input", MNIST / "t10k-images-idx3-ubyte.gz")
    assert msg.startswith(f"{archive}: refused or unreadable bundle archive (")
    escaped = [p for p in tmp_path.rglob("*") if p.name == "evil" and scratch not in p.parents]
    assert escaped == [], escaped
    assert list(scratch.iterdir()) == []


def test_tar_bundle_absolute_member_stays_inside(tmp_path, capsys, bundle, scratch):
    target = tmp_path / "abs-evil"
    archive = tar_bundle(tmp_path / "abs.tar.gz", bundle, [member(str(target))])
    cli(capsys, "infer", "--bundle", archive, "--input", MNIST / "t10k-images-idx3-ubyte.gz")
    assert not target.exists()


def test_archives_without_exactly_one_bundle(tmp_path, capsys, bundle, scratch):
    img = MNIST / "t10k-images-idx3-ubyte.gz"
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    assert user_error(capsys, "infer", "--bundle", empty, "--input", img) == \
        f"{empty}: the archive must hold exactly one bundle (manifest.json), found 0"
    two = tmp_path / "two.tar"
    with tarfile.open(two, "w") as tar:
        tar.add(bundle, arcname="a")
        tar.add(bundle, arcname="b")
    assert user_error(capsys, "infer", "--bundle", two, "--input", img) == \
        f"{two}: the archive must hold exactly one bundle (manifest.json), found 2"


@pytest.mark.parametrize("case", ["truncated", "corrupt stream", "junk"])
def test_unreadable_archives(tmp_path, capsys, bundle, scratch, case):
    good = bytearray(tar_bundle(tmp_path / "b.tar.gz", bundle).read_bytes())
    data = {"truncated": good[:len(good) // 2], "corrupt stream": good[:200] + bytes(200) + good[400:],
            "junk": b"junk" * 100}[case]
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(data))
    assert user_error(capsys, "infer", "--bundle", bad, "--input", MNIST / "t10k-images-idx3-ubyte.gz").startswith(
        f"{bad}: refused or unreadable bundle archive (")
    assert list(scratch.iterdir()) == []
