"""Reproducible picks (issue 19): the widths a search chose are in the records and replay exactly,
from `prune.widths` or from a record (`prune.from_record`), without searching; bad widths are one line."""
import json

import pytest
from conftest import TRAIN_BASELINE

import pipeline
from pipeline.errors import PipelineError

CONFIG = "configs/cpu.toml"
TINY = [TRAIN_BASELINE, "data.train_subset=300", "data.test_subset=100", "baseline.epochs=1",
        "quantize.calib_size=64", "prune.max_layer_ratio=1.0"]
WIDTHS = {"features.0": 3, "features.2": 8}


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory):
    """One runs folder for the refusals: the baseline they share is trained once (the store)."""
    return tmp_path_factory.mktemp("runs")


def _prune(runs, name, *sets):
    return pipeline.run(CONFIG, [*TINY, *sets], run_name=name, runs=runs, log=lambda m: None, until="prune")


@pytest.mark.heavy
def test_widths_replay_exactly_from_the_config_and_from_a_record(tmp_path):
    first = _prune(tmp_path, "a", 'prune.widths={"features.0" = 3, "features.2" = 8}')
    assert first.passed, first.message
    m = first.record("prune").metrics
    assert m["widths"] == WIDTHS and m["widths_source"] == "replayed" and "latency_search" not in m
    assert m["channels"]["features.0"] == 3 and m["channels"]["features.2"] == 8
    written = first.run_dir / "02_prune" / "widths.json"
    assert json.loads(written.read_text())["widths"] == WIDTHS
    # the same pick from the stage record and from widths.json, in other runs: the same pruned model files
    for name, record in (("b", first.run_dir / "02_prune" / "stage.json"), ("c", written)):
        again = _prune(tmp_path, name, f"prune.from_record={record}")
        assert again.passed and again.record("prune").metrics["widths"] == WIDTHS
        assert _model_files(again.run_dir) == _model_files(first.run_dir)
    assert not (tmp_path / "a" / "02_prune" / "latency_table.json").exists()   # nothing was timed


def _model_files(run_dir):
    folder = run_dir / "02_prune"
    files = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and f.suffix in (".pt", ".safetensors")}
    assert files
    return files


@pytest.mark.parametrize("sets, message", [
    (['prune.widths={"features.9" = 3}'], "prune.widths: the model has no prunable group 'features.9' (groups: "
                                          "features.0, features.2)"),
    (['prune.widths={"features.0" = 40}'], "prune.widths: features.0 has 16 channels; a kept width must be in 1..16, "
                                           "got 40"),
    (['prune.widths={"features.0" = 0}'], "prune.widths.features.0 must be a whole number of channels (or heads) >= 1"),
    (['prune.widths={"features.0" = 2}', "prune.from_record=x.json"], "prune.widths and prune.from_record both name"),
])
def test_bad_widths_are_one_line(shared_runs, sets, message):
    result = None
    try:
        result = _prune(shared_runs, "bad", *sets)
    except PipelineError as e:
        assert message in str(e) and "\n" not in str(e)
        return
    assert not result.passed and message in result.message, result.message


def test_a_record_without_widths_is_refused(tmp_path):
    bad = tmp_path / "nothing.json"
    bad.write_text('{"metrics": {"top1": 99}}')
    with pytest.raises(PipelineError, match="holds no widths"):
        _prune(tmp_path, "r", f"prune.from_record={bad}")
