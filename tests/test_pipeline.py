"""The pipeline through its Python API, in-process: contracts, the content-verified cache, the store."""
import dataclasses
import json
import shutil
import typing

import pytest
from conftest import SMALL

import pipeline
from pipeline.config import CHOICES, Config, load_config
from pipeline.contract import fingerprint_values
from pipeline.stages import STAGES

CONFIG = "configs/cpu.toml"
# One ratio prune (one pruning schedule; the MAC target's bisection prunes 6 trial copies, ~10 s here: test_prune
# proves it) and one INT8 form keep these in-process runs fast; test_e2e runs the default recipe.
FAST = [*SMALL, "prune.target=ratio", "prune.ratio=0.5", "quantize.keep_fp32=none"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = pipeline.run(CONFIG, FAST, run_name="t", runs=runs, log=lambda m: None)
    assert result.passed, result.message
    return runs, result


def again(runs, *extra, name="t", log=None, until=None):
    return pipeline.run(CONFIG, [*FAST, *extra], run_name=name, runs=runs, log=log or (lambda m: None), until=until)


def statuses(result):
    return {r.name: r.status for r in result.records}


def test_first_run_passes_every_stage(first):
    _, result = first
    assert [r.name for r in result.records] == [s.name for s in STAGES]
    assert statuses(result)["engine"] == "skipped"
    assert result.bundle is not None and (result.bundle / "manifest.json").is_file()
    # One atomic writer, mode 0644: a copied bundle or run folder stays readable for another user.
    for f in ("04_export_onnx/model.onnx", "04_export_onnx/model_fp16.onnx", "05_quantize/model_int8.onnx",
              "05_quantize/calib.npz", "01_baseline/reference.npz", "deploy/manifest.json"):
        assert oct((result.run_dir / f).stat().st_mode)[-3:] == "644", f


def test_each_stage_read_exactly_what_it_declared(first):
    """With the view refusing undeclared keys, declared == read means the fingerprint is exact."""
    _, result = first
    cfg = result.config
    ran = {r.name for r in result.records if r.status == "ran"}   # a skipped stage reads less (engine here)
    assert len(ran) >= 6
    for stage in STAGES:
        if stage.name in ran:
            assert result.reads[stage.name] == set(stage.keys(cfg)), stage.name


def _other_value(key: str, value, tp):
    """Another valid value of the same type for ``key``."""
    if key in CHOICES:
        return next(c for c in CHOICES[key] if c != value)
    origin = typing.get_origin(tp)
    if tp is bool:
        return not value
    if tp is int:
        return value + 1
    if tp is float:
        return value / 2 if value else 0.5
    if tp is str:
        files = ("model.factory", "model.weights", "data.root", "prune.from_record")   # need a real file
        return (value or "x") + "_other" if key not in files else None
    if origin is tuple:
        return tuple(value) + tuple(value[-1:]) if value and typing.get_args(tp)[-1] is Ellipsis else None
    return None


def test_changing_any_key_invalidates_exactly_the_stages_that_read_it():
    cfg = load_config(CONFIG)
    base = {s.name: fingerprint_values(cfg, s.keys(cfg), lambda: "data") for s in STAGES}
    tried = 0
    for section in dataclasses.fields(Config):
        sec = getattr(cfg, section.name)
        for f in dataclasses.fields(sec):
            key = f"{section.name}.{f.name}"
            new = _other_value(key, getattr(sec, f.name), typing.get_type_hints(type(sec))[f.name])
            if new is None:
                continue
            changed = dataclasses.replace(cfg, **{section.name: dataclasses.replace(sec, **{f.name: new})})
            tried += 1
            for s in STAGES:
                readers = key in s.keys(cfg) or key in s.keys(changed)
                moved = fingerprint_values(changed, s.keys(changed), lambda: "data") != base[s.name]
                assert moved == readers, f"{key}: stage {s.name} {'changed' if moved else 'kept'} its fingerprint"
    assert tried > 60


def test_unchanged_rerun_is_all_cached(first):
    runs, _ = first
    result = again(runs)
    assert set(statuses(result).values()) <= {"cached", "skipped"}


def test_finetune_batch_size_reruns_finetune_not_prune(first):
    runs, _ = first
    result = again(runs, "finetune.batch_size=32", name="bs", until="finetune")   # the later stages are not the point
    s = statuses(result)
    assert s["baseline"] == s["prune"] == "cached" and s["finetune"] == "ran"


def test_same_size_corruption_reruns_the_stage_that_owns_the_file(first):
    runs, _ = first
    f = runs / "t/03_finetune/model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100:] = bytes(100)   # same size, other weights
    f.write_bytes(bytes(data))
    log = []
    result = again(runs, log=log.append)
    assert result.passed, result.message
    s = statuses(result)
    assert s["finetune"] == "cached" and s["export_onnx"] == "cached"   # verified copy from the shared store
    assert any("03_finetune/model.safetensors changed on disk" in m for m in log)
    assert json.loads((runs / "t/03_finetune/stage.json").read_text())["files"]["model.safetensors"]["sha256"]


def test_corrupted_bundle_file_reruns_package(first):
    runs, _ = first
    f = runs / "t/deploy/model.onnx"
    f.write_bytes(f.read_bytes()[:-10] + bytes(10))
    for entry in (runs / ".store").glob("package-*"):
        shutil.rmtree(entry)   # no verified copy elsewhere: the stage itself must rerun
    log = []
    result = again(runs, log=log.append)
    assert statuses(result)["package"] == "ran"
    assert any("deploy/model.onnx changed on disk" in m for m in log)


def test_weights_are_fingerprinted_by_content(first, tmp_path):
    import torch
    runs, result = first
    ckpt = tmp_path / "w.pt"
    shutil.copy(runs / "t/01_baseline/model.pt", ckpt)
    r1 = again(runs, f"model.weights={json.dumps(str(ckpt))}", name="w", until="baseline")
    assert statuses(r1)["baseline"] == "ran"
    state = torch.load(ckpt, weights_only=True)
    state[next(iter(state))].mul_(0.5)
    torch.save(state, ckpt)   # overwritten in place: same path
    r2 = again(runs, f"model.weights={json.dumps(str(ckpt))}", name="w", until="baseline")
    assert statuses(r2)["baseline"] == "ran"


def test_new_run_folder_reuses_the_store(first):
    runs, _ = first
    result = again(runs, name="fresh")
    assert statuses(result)["baseline"] == "cached"
    assert (runs / "fresh/01_baseline/model.pt").is_file()


def test_ignored_key_warns(first):
    runs, _ = first
    result = again(runs, "prune.macs=0.3")
    assert any("prune.macs" in w and "ignored" in w for w in result.warnings)
    assert any("prune.speedup" in w for w in result.warnings)   # cpu.toml's, not read under target = macs
    assert statuses(result)["prune"] == "cached"


def test_relaxing_a_gate_reevaluates_the_cached_result(first):
    runs, _ = first
    failed = again(runs, "finetune.max_drop=0", "finetune.gate=fail")
    assert not failed.passed and failed.failed_stage == "finetune"
    relaxed = again(runs, "finetune.max_drop=50")
    assert relaxed.passed and statuses(relaxed)["finetune"] == "cached"


def test_bundle_sample_labels_beyond_255_are_not_wrapped(tmp_path):
    """The sample's IDX writer keeps labels of more than 256 classes exact (int32), never cast to uint8."""
    import numpy as np

    from edgerun.readers import read_idx
    from pipeline.package import _idx_bytes
    for labels, dtype in ((np.array([0, 7, 9]), np.uint8), (np.array([0, 300, 999]), np.int32)):
        (tmp_path / "l.gz").write_bytes(_idx_bytes(labels))
        back = read_idx(tmp_path / "l.gz")
        assert back.dtype == dtype and back.tolist() == labels.tolist()
