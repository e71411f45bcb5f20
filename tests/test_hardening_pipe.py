"""Hardening round 2, the pipeline's side (issue 23): nothing reused unverified, nothing written
outside the run folder, every input one line (exit 1) with bounds. Each test is named by the input
it attacks; docs/robustness.md lists the lines. Runs the CLI in this process, as
tests/test_robustness.py does (its helpers and fixtures are reused).
"""
import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import test_robustness
from conftest import ROOT
from test_robustness import CPU, MNIST, cli, copy_runs, run_args, user_error

from edgerun.errors import EdgeError
from edgerun.io import atomic_write
from pipeline.api import ArgumentTypeError
from pipeline.config import Config
from pipeline.contract import fingerprint_values, user_code
from pipeline.data import Data
from pipeline.errors import PipelineError
from pipeline.modelio import check_weights_file
from pipeline.records import StageRecord
from pipeline.runner import RECORD, read_record, run_lock

# test_robustness's fixtures, under their names here: a runs folder with one passed baseline, a checkpoint.
passed_runs, weights = test_robustness.passed_runs, test_robustness.weights


def files_of(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def victim(tmp_path) -> Path:
    v = tmp_path / "victim.txt"
    v.write_text("a file the user can write, far from the run folder\n")
    return v


# ---------------------------------------------------------------- no write outside the run folder

def test_lock_file_that_is_a_symlink_to_a_user_file(passed_runs, tmp_path, capsys):
    runs, target = copy_runs(passed_runs, tmp_path), victim(tmp_path)
    lock = runs / "r/.lock"
    lock.unlink()
    lock.symlink_to(target)
    before = files_of(runs / "r")
    msg = user_error(capsys, *run_args(runs))
    assert msg.startswith(f"{lock}: is a symbolic link (to {target}); refusing to open it as the lock file"), msg
    assert target.read_text() == "a file the user can write, far from the run folder\n"
    assert files_of(runs / "r") == before   # refused before the lock: nothing written, not even a report


def test_lock_file_that_is_a_hard_link_to_a_user_file(passed_runs, tmp_path, capsys):
    runs, target = copy_runs(passed_runs, tmp_path), victim(tmp_path)
    lock = runs / "r/.lock"
    lock.unlink()
    os.link(target, lock)
    assert user_error(capsys, *run_args(runs)) == \
        f"{lock}: not a plain lock file (a hard link to another file); remove it and run again"
    assert target.read_text().startswith("a file the user can write")


def test_run_folder_that_is_a_symlink(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/r").symlink_to(elsewhere)
    assert "is a symbolic link" in user_error(capsys, *run_args(tmp_path / "runs"))
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("name", ["report.json", "config.json", "report.md"])
def test_run_output_that_is_a_symlink_is_refused_not_followed(passed_runs, tmp_path, capsys, name):
    runs, target = copy_runs(passed_runs, tmp_path), victim(tmp_path)
    out = runs / "r" / name
    out.unlink()
    out.symlink_to(target)
    msg = user_error(capsys, *run_args(runs))
    assert msg.startswith(f"{out}: is a symbolic link (to {target}); refusing to write through it"), msg
    assert target.read_text().startswith("a file the user can write") and out.is_symlink()


def test_atomic_write_to_a_symlinked_target(tmp_path):
    target = victim(tmp_path)
    link = tmp_path / "out.json"
    link.symlink_to(target)
    with pytest.raises(EdgeError, match="is a symbolic link"):
        atomic_write(link, b"{}")
    assert target.read_text().startswith("a file the user can write")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_second_run_refused_by_the_lock_writes_nothing(passed_runs, tmp_path, capsys):
    runs = copy_runs(passed_runs, tmp_path)
    before = files_of(runs / "r")
    with run_lock(runs / "r"):   # the run holding the folder (this process, another open file)
        before = files_of(runs / "r")
        msg = user_error(capsys, *run_args(runs, "baseline.epochs=2"))
        assert "another run is using this run folder" in msg
        assert files_of(runs / "r") == before   # not its config.json, not its report


def test_stage_folder_that_is_a_symlink_is_not_reused_nor_written_through(passed_runs, tmp_path, capsys):
    runs = copy_runs(passed_runs, tmp_path)
    outside = tmp_path / "outside"
    shutil.move(runs / "r/01_baseline", outside)
    (runs / "r/01_baseline").symlink_to(outside)
    before = files_of(outside)
    rc, out, err = cli(capsys, *run_args(runs))
    assert rc == 0 and out[-1].startswith("PASSED | 1 stages: 0 ran, 1 cached"), (out, err[-2000:])
    assert f"{runs}/r/01_baseline is a symbolic link, not a stage folder; not reused" in err
    assert not (runs / "r/01_baseline").is_symlink() and files_of(outside) == before


# ---------------------------------------------------------------- what is reused is verified whole

def edit_metric(folder: Path):
    record = folder / RECORD
    d = json.loads(record.read_text())
    d["metrics"]["top1"] = 99.99
    record.write_text(json.dumps(d))


def test_stage_record_with_a_hand_edited_metric_in_the_run_folder(passed_runs, tmp_path, capsys):
    runs = copy_runs(passed_runs, tmp_path)
    top1 = read_record(runs / "r/01_baseline").metrics["top1"]
    edit_metric(runs / "r/01_baseline")
    rc, out, err = cli(capsys, *run_args(runs))
    assert rc == 0 and out[-1].startswith("PASSED | 1 stages: 0 ran, 1 cached"), out
    assert f"{runs}/r/01_baseline/{RECORD} does not match its seal (edited after it was written?)" in err
    assert f"reusing the result in {runs}/.store/baseline-" in err
    assert read_record(runs / "r/01_baseline").metrics["top1"] == top1 != 99.99


def test_stage_record_with_a_hand_edited_metric_everywhere_reruns(passed_runs, tmp_path, capsys):
    runs = copy_runs(passed_runs, tmp_path)
    for folder in (runs / "r/01_baseline", *(runs / ".store").iterdir()):
        edit_metric(folder)
    rc, out, err = cli(capsys, *run_args(runs))
    assert rc == 0 and out[-1].startswith("PASSED | 1 stages: 1 ran"), out
    assert "does not match its seal" in err and read_record(runs / "r/01_baseline").metrics["top1"] != 99.99


def test_stage_record_from_before_seals_reruns(passed_runs, tmp_path, capsys):
    """A record without a seal (or another stage's seal pasted in) is not vouched for."""
    runs = copy_runs(passed_runs, tmp_path)
    for folder in (runs / "r/01_baseline", *(runs / ".store").iterdir()):
        d = json.loads((folder / RECORD).read_text())
        del d["seal"]
        (folder / RECORD).write_text(json.dumps(d))
    rc, out, err = cli(capsys, *run_args(runs))
    assert rc == 0 and out[-1].startswith("PASSED | 1 stages: 1 ran"), out


def test_stage_records_its_cpu_time_and_older_records_keep_their_seal(passed_runs, tmp_path, capsys):
    """cpu_seconds is measured per stage; a record from before it was measured (no key) is still vouched for."""
    d = json.loads((passed_runs / "r/01_baseline" / RECORD).read_text())
    assert d["cpu_seconds"] > 0 and d["cpu_seconds"] < 4 * d["seconds"] + 1, d   # 2 cores, rounding
    runs = copy_runs(passed_runs, tmp_path)
    for folder in (runs / "r/01_baseline", *(runs / ".store").iterdir()):
        old = json.loads((folder / RECORD).read_text())
        old.pop("cpu_seconds")
        old["seal"] = StageRecord.from_json(old).computed_seal()   # what the code before it wrote
        (folder / RECORD).write_text(json.dumps(old))
    rc, out, err = cli(capsys, *run_args(runs))
    assert rc == 0 and out[-1].startswith("PASSED | 1 stages: 0 ran, 1 cached"), (out, err)
    assert " s of CPU)" in out[-1]


def test_store_entry_with_a_planted_module(passed_runs, tmp_path, capsys):
    """A file added to a stored entry (a bundle would import onnxruntime.py first) refuses the entry."""
    runs = copy_runs(passed_runs, tmp_path)
    entry = next((runs / ".store").glob("baseline-*"))
    (entry / "onnxruntime.py").write_text("open('/tmp/pwned', 'w')\n")
    rc, out, err = cli(capsys, *run_args(runs, run="fresh"))
    assert rc == 0 and out[-1].startswith("PASSED | 1 stages: 1 ran"), out
    assert f"{entry}/onnxruntime.py is not listed in its stage record (added after the stage ran); not reused" in err
    assert not (runs / "fresh/01_baseline/onnxruntime.py").exists()
    assert not any((runs / ".store").glob("*/onnxruntime.py"))


@pytest.mark.parametrize("planted", ["onnxruntime.py", "sub/__pycache__/x.pyc", "link"])
def test_run_folder_stage_with_an_unlisted_entry(passed_runs, tmp_path, capsys, planted):
    runs = copy_runs(passed_runs, tmp_path)
    path = runs / "r/01_baseline" / planted
    path.parent.mkdir(parents=True, exist_ok=True)
    if planted == "link":
        path.symlink_to("/etc")
    else:
        path.write_text("planted")
    rc, out, err = cli(capsys, *run_args(runs))
    assert rc == 0 and out[-1].startswith("PASSED | 1 stages: 0 ran, 1 cached"), out   # the store's copy
    assert f"01_baseline/{planted} is not listed in its stage record" in err
    assert not path.exists() and not path.is_symlink()


def test_recorded_file_replaced_by_a_symlink_to_the_same_bytes(passed_runs, tmp_path, capsys):
    runs = copy_runs(passed_runs, tmp_path)
    model = runs / "r/01_baseline/model.pt"
    copy = tmp_path / "model.pt"
    shutil.copy(model, copy)
    model.unlink()
    model.symlink_to(copy)
    rc, out, err = cli(capsys, *run_args(runs))
    assert rc == 0 and "01_baseline/model.pt changed on disk since it was written" in err
    assert not model.is_symlink()


@pytest.mark.parametrize("name", ["../../victim.txt", "/etc/hostname", ""])
def test_stage_record_naming_a_file_outside_its_folder(passed_runs, tmp_path, name):
    runs = copy_runs(passed_runs, tmp_path)
    record = runs / "r/01_baseline" / RECORD
    d = json.loads(record.read_text())
    d["files"][name] = {"size": 1, "sha256": "0" * 64}
    record.write_text(json.dumps(d))
    assert read_record(runs / "r/01_baseline") is None


def test_stage_record_that_is_a_fifo(passed_runs, tmp_path):
    runs = copy_runs(passed_runs, tmp_path)
    (runs / "r/01_baseline" / RECORD).unlink()
    os.mkfifo(runs / "r/01_baseline" / RECORD)
    assert read_record(runs / "r/01_baseline") is None   # returns at once: a FIFO is never read


# ---------------------------------------------------------------- fingerprints by content

MODEL = '''
import torch.nn as nn
from hp_layers import WIDTH


def make(num_classes=10, in_channels=1):
    return nn.Sequential(nn.Conv2d(in_channels, WIDTH, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(WIDTH, num_classes))
'''


@pytest.fixture
def user_models(tmp_path):
    """hp_model.py imports its width from a sibling hp_layers.py; hp_pkg is a package whose factory
    uses a relative import and whose other module is reached only by a computed name."""
    where = tmp_path / "code"
    (where / "hp_pkg").mkdir(parents=True)
    (where / "hp_model.py").write_text(MODEL)
    (where / "hp_layers.py").write_text("WIDTH = 4\n")
    (where / "hp_pkg/__init__.py").write_text("")
    (where / "hp_pkg/net.py").write_text("from .blocks import WIDTH\nimport importlib\n"
                                         "PLUGIN = importlib.import_module('hp_pkg.' + 'plugin')\n"
                                         "def make(**kw):\n    return None\n")
    (where / "hp_pkg/blocks.py").write_text("WIDTH = 4\n")
    (where / "hp_pkg/plugin.py").write_text("SCALE = 1\n")
    sys.path.insert(0, str(where))
    yield where
    sys.path.remove(str(where))
    for name in ("hp_model", "hp_layers", "hp_pkg", "hp_pkg.net", "hp_pkg.blocks", "hp_pkg.plugin"):
        sys.modules.pop(name, None)


def factory_fingerprint(factory: str) -> str:
    cfg = Config()
    cfg = type(cfg)(**{**cfg.__dict__, "model": type(cfg.model)(factory=factory)})
    return fingerprint_values(cfg, ["model.factory"], lambda: "")["model.factory"]["sha256"]


@pytest.mark.parametrize("factory, edited", [("hp_model:make", "hp_layers.py"), ("hp_pkg.net:make", "hp_pkg/blocks.py"),
                                             ("hp_pkg.net:make", "hp_pkg/plugin.py"),
                                             ("hp_pkg.net:make", "hp_pkg/__init__.py")])
def test_model_factory_whose_imported_user_code_changes(user_models, factory, edited):
    before = factory_fingerprint(factory)
    (user_models / edited).write_text((user_models / edited).read_text() + "WIDTH = 8\n")
    assert factory_fingerprint(factory) != before


def test_pretrained_folder_is_fingerprinted_by_its_content(tmp_path):
    """Weights replaced in place (the same path) change the fingerprint; a missing folder is one line."""
    folder = tmp_path / "hf"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "model.safetensors").write_bytes(b"one")
    cfg = Config()

    def fp(path):
        c = type(cfg)(**{**cfg.__dict__, "model": type(cfg.model)(pretrained=str(path))})
        return fingerprint_values(c, ["model.pretrained"], lambda: "")["model.pretrained"]
    before = fp(folder)
    assert before["value"] == str(folder) and fp(folder) == before
    (folder / "sub" / "model.safetensors").write_bytes(b"two")
    assert fp(folder) != before
    (folder / "sub" / "model.safetensors").rename(folder / "model.safetensors")   # same bytes, other name
    assert fp(folder)["sha256"] != before["sha256"]
    with pytest.raises(PipelineError, match=r"^model.pretrained: .*/missing is not a folder"):
        fp(tmp_path / "missing")


def test_model_factory_code_is_the_users_only(user_models):
    import importlib.util
    found = user_code("hp_model", importlib.util.find_spec("hp_model"))
    assert set(found) == {"hp_model", "hp_layers"}   # not torch, not the standard library


def test_model_factory_helper_change_reruns_the_baseline(user_models, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = run_args(runs, 'model.factory="hp_model:make"', "baseline.gate=off")
    assert cli(capsys, *args)[0] == 0
    (user_models / "hp_layers.py").write_text("WIDTH = 6\n")
    rc, out, err = cli(capsys, *args)
    assert rc == 0 and out[-1].startswith("PASSED | 1 stages: 1 ran"), out


def data_identity(root: Path) -> str:
    cfg = Config()
    cfg = type(cfg)(**{**cfg.__dict__, "data": type(cfg.data)(root=str(root))})
    return Data(cfg).identity()


def test_data_file_replaced_behind_a_symlink(tmp_path):
    """The root's files are links (as mnist_root makes them): the content behind them is the identity."""
    real = tmp_path / "real"
    shutil.copytree(MNIST, real)
    root = tmp_path / "linked"
    root.mkdir()
    for f in real.iterdir():
        (root / f.name).symlink_to(f)
    before = data_identity(root)
    labels = real / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(labels.read_bytes())
    data[100] ^= 1
    labels.write_bytes(bytes(data))
    assert data_identity(root) != before


def test_data_class_folder_that_is_a_symlink_and_a_link_loop(tmp_path):
    outside = tmp_path / "outside/cat"
    outside.mkdir(parents=True)
    (outside / "1.png").write_bytes(b"one")
    root = tmp_path / "root"
    (root / "train").mkdir(parents=True)
    (root / "train/cat").symlink_to(outside)
    (root / "train/loop").symlink_to(root)   # a link back up: walked once, never forever
    before = data_identity(root)
    (outside / "1.png").write_bytes(b"two")
    assert data_identity(root) != before


# ---------------------------------------------------------------- every input one line, exit 1

@contextlib.contextmanager
def as_nobody():
    """Root reads a chmod 000 file anyway: drop to nobody for the block (no-op for another user)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def _others_can_enter(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


@pytest.fixture
def world():
    """A folder nobody may write in (pytest's tmp_path is root's, mode 0700). The run as nobody also reads
    the checkout (its config, data and lazily imported modules): a clone inside a folder only its owner
    may enter (mktemp -d) cannot be tested this way."""
    if os.geteuid() == 0 and not _others_can_enter(ROOT):
        pytest.skip(f"{ROOT} is not open to other users: the unreadable-input cases run as nobody")
    where = Path(tempfile.mkdtemp(prefix="hp-"))
    os.chmod(where, 0o777)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_config_file_that_cannot_be_read(world, capsys):
    config = world / "c.toml"
    shutil.copy(CPU, config)
    os.chmod(config, 0)
    with as_nobody():
        msg = user_error(capsys, *run_args(world / "runs", config=config))
    assert msg == f"{config}: cannot read the config file (Permission denied)"


def test_weights_file_that_cannot_be_read(world, weights, capsys):
    ckpt = world / "w.pt"
    shutil.copy(weights, ckpt)
    os.chmod(ckpt, 0)
    with as_nobody():
        msg = user_error(capsys, *run_args(world / "runs", f"model.weights={ckpt}"))
    assert msg == f"model.weights: {ckpt}: cannot read (Permission denied)"


def test_data_file_that_cannot_be_read(world, capsys):
    root = world / "mnist"
    shutil.copytree(MNIST, root)
    os.chmod(root / "t10k-labels-idx1-ubyte.gz", 0)
    with as_nobody():
        msg = user_error(capsys, *run_args(world / "runs", f"data.root={root}"))
    assert msg == f"data.root: {root}/t10k-labels-idx1-ubyte.gz: cannot read (Permission denied)"


def test_runs_folder_that_cannot_be_written(world, capsys):
    runs = world / "runs"
    runs.mkdir()
    os.chmod(runs, 0o555)
    with as_nobody():
        msg = user_error(capsys, *run_args(runs))
    assert msg == f"{runs}/r: cannot create the run folder (Permission denied)"


@pytest.mark.parametrize("root", ["/", "/etc", "/proc", "/proc/self", "/sys/kernel", "/dev", "/usr"])
def test_data_root_that_is_a_system_folder(tmp_path, capsys, root):
    msg = user_error(capsys, *run_args(tmp_path / "runs", f"data.root={root}"))
    assert msg.startswith(f"{CPU}: config: data.root: {root} is a system folder"), msg
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kwargs, argument", [
    ({"config": {"run": {}}}, "config"), ({"config": None}, "config"), ({"config": 5}, "config"),
    ({"overrides": "prune.ratio=0.3"}, "overrides"), ({"overrides": None}, "overrides"),
    ({"overrides": [1]}, "overrides"), ({"run_name": 5}, "run_name"), ({"run_name": {}}, "run_name"),
    ({"runs": None}, "runs"), ({"runs": 3}, "runs"), ({"force": "baseline"}, "force"), ({"until": 7}, "until"),
    ({"log": 3}, "log")])
def test_python_api_argument_of_the_wrong_type(tmp_path, kwargs, argument):
    import pipeline
    args = {"config": str(CPU), "overrides": [], "runs": tmp_path / "runs", **kwargs}
    config, overrides = args.pop("config"), args.pop("overrides")
    with pytest.raises(ArgumentTypeError) as e:
        pipeline.run(config, overrides, **args)
    assert isinstance(e.value, PipelineError) and isinstance(e.value, TypeError)
    assert str(e.value).startswith(f"run(): {argument} must be ") and "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_python_api_config_object_with_values_a_file_could_not_have(tmp_path):
    import dataclasses

    import pipeline
    cfg = dataclasses.replace(Config(), baseline=dataclasses.replace(Config().baseline, epochs=10**9))
    with pytest.raises(PipelineError, match=r"^Config: config: baseline.epochs = 1000000000: more than 1000 epochs"):
        pipeline.run(cfg, runs=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- resource bounds

def zip_of_zeros(path: Path, megabytes: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("archive/data/0", "w") as f:
        chunk = bytes(1 << 20)
        for _ in range(megabytes):
            f.write(chunk)
    return path


def test_weights_zip_of_zeros_is_refused_before_unpacking(tmp_path, capsys, monkeypatch):
    import torch
    bomb = zip_of_zeros(tmp_path / "bomb.pt", 256)
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load unpacked the bomb"))
    msg = user_error(capsys, *run_args(tmp_path / "runs", f"model.weights={bomb}"))
    assert msg.startswith(f"model.weights: {bomb}: zip member 'archive/data/0' unpacks ")
    # zlib's exact output size may differ between builds: the ratio is about 1000:1 either way
    assert f" bytes to {256 << 20} (10" in msg and msg.endswith(
        ":1; torch stores tensors uncompressed): refused before unpacking"), msg


def test_weights_zip_whose_directory_declares_gigabytes(tmp_path):
    path = tmp_path / "big.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(3):
            z.writestr(f"archive/data/{i}", b"x" * 10)
    data = bytearray(path.read_bytes())
    at = 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:   # each central directory header: its sizes
        struct.pack_into("<II", data, at + 20, 0xFFFFFFF0, 0xFFFFFFF0)
        at += 4
    path.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"declares 12.0 GiB unpacked, more than the 4 GiB .* before unpacking"):
        check_weights_file(path)


def safetensors_header(tensors: dict) -> bytes:
    text = json.dumps(tensors).encode()
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize("header, message", [
    (struct.pack("<Q", 1 << 62), "safetensors header of 4611686018427387904 bytes in a file of 24 bytes"),
    (safetensors_header({"w": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 1 << 32]}}),
     "a safetensors header whose tensors lie beyond the end of the file")])
def test_safetensors_header_claiming_absurd_sizes(tmp_path, capsys, header, message):
    path = tmp_path / "w.safetensors"
    path.write_bytes(header + bytes(16))
    assert message in user_error(capsys, *run_args(tmp_path / "runs", f"model.weights={path}"))


@pytest.mark.parametrize("setting, message", [
    ("baseline.epochs=100000", "baseline.epochs = 100000: more than 1000 epochs"),
    ("finetune.epochs=1e9", "finetune.epochs = 1000000000.0: more than 1000 epochs"),
    ("prune.iterative_steps=1000000", "prune.iterative_steps = 1000000: more than 1000 pruning steps")])
def test_training_length_that_would_not_end(tmp_path, capsys, setting, message):
    assert message in user_error(capsys, *run_args(tmp_path / "runs", setting))
    assert not (tmp_path / "runs").exists()



def test_real_checkpoints_pass_the_bounds(tmp_path, weights):
    """The contrast: what torch.save and safetensors write is not refused."""
    check_weights_file(weights)
    pytest.importorskip("safetensors")
    import torch
    from safetensors.torch import save_file
    save_file(torch.load(weights), tmp_path / "w.safetensors")
    check_weights_file(tmp_path / "w.safetensors")


def test_model_weights_as_safetensors_load_the_same_tensors(tmp_path, weights):
    """check_weights_file bounds a safetensors header for model.weights; the reader then reads it (it used to refuse
    it as 'not a weights-only state_dict') and gives the torch file's tensors."""
    import torch
    from safetensors.torch import save_file

    from pipeline.modelio import build, load_state
    save_file(torch.load(weights), tmp_path / "w.safetensors")
    models = [build(Config().model, Config().data) for _ in range(2)]
    for model, path in zip(models, (weights, tmp_path / "w.safetensors"), strict=True):
        assert load_state(model, path) == {"missing": [], "unexpected": [], "reshaped": []}
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(),
                                                 strict=True))
