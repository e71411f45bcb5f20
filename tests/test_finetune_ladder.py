"""The fine-tune stage closes the loop between speed and accuracy (issue 19): it distils the pick, and
backs off to the wider picks of the prune stage's ladder until one is within its accuracy gate.

The ladder here comes from a stand-in for the latency search (its timings are made up, so this proves
the ladder's path through the prune and fine-tune stages, not any speed); the search that builds real
ladders is tested in test_prune_latency.py. The widths are extreme on purpose: one channel per conv
cannot be distilled back within 20 pt on 300 images, the full width can, whatever the CPU.
"""
import json

import pytest
from conftest import one_line  # noqa: F401 (shared helpers live there)

import pipeline
from pipeline import prune_latency as pl

CONFIG = "configs/cpu.toml"
TINY = ["data.train_subset=300", "data.test_subset=100", "baseline.epochs=1", "finetune.epochs=0.5",
        "quantize.calib_size=64", "prune.max_layer_ratio=1.0", "prune.importance=l1"]
NARROW, WIDE = {"features.0": 1, "features.2": 1}, {"features.0": 16, "features.2": 32}


def _rung(widths, speedup, goal=2.0):
    return pl.Rung(widths, speedup, (speedup, speedup), 1, 1.0, speedup >= goal)


def _can(monkeypatch, *ladder):
    """Replaces the timed search with ``ladder`` (the pick first)."""
    def search(groups, **kw):
        assert {g.name: g.channels for g in groups} == WIDE
        return pl.LatencySearch(
            backend="onnxruntime-cpu", batch=1, threads=1, block=16, goal="speedup 2x", goal_ratio=0.5,
            channels=dict(WIDE), widths=dict(ladder[0].widths), predicted_speedup=3.0, measured_speedup=3.0,
            measured_p10_p90=(3.0, 3.0), processes=1, process_spread=1.0, unpruned_ms=1.0, pruned_ms=0.33,
            rounds=1, measurements=2, table_size=0, seconds=0.0, goal_mode=kw["goal_mode"], ladder=ladder)
    monkeypatch.setattr(pl, "search", search)


@pytest.fixture
def canned_search(monkeypatch):
    """The narrow pick (meets a 2x goal), then the full width (1.0x, does not)."""
    _can(monkeypatch, _rung(NARROW, 3.0), _rung(WIDE, 1.0))


def _run(tmp_path, *extra):
    overrides = [*TINY, "prune.target=speedup", "prune.speedup=2", "prune.backoff=1", *extra]
    return pipeline.run(CONFIG, overrides, run_name="ladder", runs=tmp_path, log=lambda m: None, until="finetune")


def test_a_pick_that_misses_the_gate_backs_off_to_the_next_rung(tmp_path, canned_search):
    result = _run(tmp_path, "finetune.max_drop=20", "prune.goal=best")
    assert result.passed, result.message
    prune, ft = result.record("prune"), result.record("finetune")
    assert [r["folder"] for r in prune.metrics["ladder"]] == ["", "rung1"]
    assert (result.run_dir / "02_prune" / "rung1" / "pruning_history.json").is_file()
    tried = ft.metrics["tried"]
    assert [t["passed"] for t in tried] == [False, True] and tried[0]["widths"] == NARROW
    assert ft.metrics["widths"] == WIDE and ft.metrics["rung"] == 1
    assert any("speedup 2x not reached within the accuracy gate: the fastest pick that passed is 1.0x" in n
               for n in ft.notices), ft.notices
    assert ft.metrics["top1"] == tried[1]["top1"] and tried[1]["top1"] > tried[0]["top1"] + 20
    # what ships is the rung that passed: its structure is what the stage saved
    saved = json.loads((result.run_dir / "03_finetune" / "pruning_history.json").read_text())["history"]
    assert saved == json.loads((result.run_dir / "02_prune" / "rung1" / "pruning_history.json").read_text())["history"]


def test_the_first_pick_that_passes_ships_without_trying_more(tmp_path, canned_search):
    ft = _run(tmp_path, "finetune.max_drop=100", "prune.goal=best").record("finetune")
    assert len(ft.metrics["tried"]) == 1 and ft.metrics["widths"] == NARROW


def test_require_fails_the_gate_when_only_a_pick_below_the_goal_passes(tmp_path, canned_search):
    result = _run(tmp_path, "finetune.max_drop=20", "prune.goal=require")
    assert not result.passed
    assert "verified speedup of the fastest pick within the accuracy gate = 1, limit >= 2" in result.message
    assert "prune.goal = 'best' ships it" in result.message


def test_no_pick_within_the_gate_keeps_the_most_accurate_and_fails(tmp_path, monkeypatch):
    _can(monkeypatch, _rung(NARROW, 3.0), _rung({"features.0": 1, "features.2": 2}, 2.5))
    result = _run(tmp_path, "finetune.max_drop=1", "prune.goal=best")
    assert not result.passed and "stage finetune: top1 dropped" in result.message
    ft = result.record("finetune")
    assert [t["passed"] for t in ft.metrics["tried"]] == [False, False]
    assert ft.metrics["top1"] == max(t["top1"] for t in ft.metrics["tried"])
