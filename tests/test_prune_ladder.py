"""The decoder prune stage's back-off ladder (prune.target = speedup, prune.backoff > 0): the pick is the widest
measured candidate at the goal, and its rungs are wider measured candidates, each slower than the one before,
each saved as a model folder pruned from the unpruned model (the contract pipeline/llm/finetune.py reads)."""
import json

import pytest
from test_llm_byo import RUN, _folder

import pipeline
from pipeline.errors import PipelineError
from pipeline.llm.prune import _choose

SIZE = ("intermediate_size", "num_attention_heads")


def test_choose_picks_the_widest_measured_at_the_goal_not_the_first_found():
    # index: size order (0 the widest); speed not monotonic in it
    measured = {0: 1.0, 2: 1.6, 3: 1.4, 5: 1.9, 7: 2.3}
    assert _choose(measured, 1.5, 2) == (2, [0])           # 1.6x at index 2 beats the bisection's 5
    pick, rungs = _choose({0: 1.0, 1: 1.3, 2: 1.2, 3: 1.35, 4: 1.8}, 1.5, 3)
    assert pick == 4 and rungs == [3, 1, 0]                # 2 is slower than the wider 1: never a rung
    assert _choose({0: 1.0, 1: 1.3, 2: 1.2}, 2.0, 2) == (1, [0])   # none at the goal: the fastest measured
    assert _choose({0: 1.0, 1: 1.3, 4: 1.8}, 1.5, 0) == (4, [])


def _weights(w):
    """The search's size order: MLP and query/output projection rows per layer."""
    return w["intermediate_size"] * 3 + w["num_attention_heads"] * w["head_dim"] * 2


def _widths_of(folder):
    cfg = json.loads((folder / "config.json").read_text())
    return {k: cfg[k] for k in SIZE}


@pytest.mark.slow
def test_speedup_prune_saves_a_ladder_fastest_first_and_none_without_backoff(tmp_path, one_thread):
    folder, data = _folder(tmp_path, "llama")
    over = [*RUN, f"model.pretrained={folder}", f"data.root={data}", "prune.target=speedup",
            "prune.speedup=50", "prune.latency_threads=1", "prune.backoff=2"]
    result = pipeline.run("configs/llm-cpu.toml", over, runs=tmp_path / "runs", run_name="ladder", until="prune",
                          log=lambda m: None)
    rec = {r.name: r for r in result.records}["prune"]
    ladder, (out,) = rec.metrics["ladder"], list(result.run_dir.glob("*_prune"))
    assert 1 <= len(ladder) <= 3 and ladder[0]["folder"] == "model"
    assert ladder[0]["widths"] == rec.metrics["widths"] and ladder[0]["speedup"] == rec.metrics["search"]["speedup"]
    measured = rec.metrics["search"]["measured"]
    assert ladder[0]["speedup"] == max(measured.values())  # 50x is out of reach: the fastest measured is kept
    for k, rung in enumerate(ladder):
        assert rung["folder"] == ("model" if k == 0 else f"rung{k}/model") and rung["meets_goal"] is False
        assert _widths_of(out / rung["folder"]) == {s: rung["widths"][s] for s in SIZE}
        assert str(rung["widths"]) in measured and measured[str(rung["widths"])] == rung["speedup"]
    for faster, slower in zip(ladder, ladder[1:], strict=False):
        assert faster["speedup"] > slower["speedup"]
        assert _weights(faster["widths"]) < _weights(slower["widths"])   # each rung wider (more weights read)
    again = pipeline.run("configs/llm-cpu.toml", [*over, "prune.backoff=0"], runs=tmp_path / "runs",
                         run_name="ladder", until="prune", log=lambda m: None)
    assert "ladder" not in {r.name: r for r in again.records}["prune"].metrics


def test_keep_layers_drops_the_least_important_whole_layers(tmp_path, one_thread):
    folder, data = _folder(tmp_path, "llama")
    over = [*RUN, f"model.pretrained={folder}", f"data.root={data}", "prune.ratio=0", "decoder.keep_layers=1"]
    result = pipeline.run("configs/llm-cpu.toml", over, runs=tmp_path / "runs", run_name="layers", until="prune",
                          log=lambda m: None)
    rec = {r.name: r for r in result.records}
    base, pruned = rec["baseline"].metrics, rec["prune"].metrics
    assert base["config"]["num_hidden_layers"] == 2 and pruned["widths"]["num_hidden_layers"] == 1
    assert pruned["params"] < base["params"]
    (out,) = list(result.run_dir.glob("*_prune"))
    assert json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"] == 1
    with pytest.raises(PipelineError) as e:
        pipeline.run("configs/llm-cpu.toml", [*over, "decoder.keep_layers=5"], runs=tmp_path / "runs",
                     run_name="layers", until="prune", log=lambda m: None)
    assert "keep_layers = 5" in str(e.value)
