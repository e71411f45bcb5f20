"""The runner's contract, with tiny fake stages: caching, invalidation, atomic folders, selection, lock."""
import dataclasses
import json
import multiprocessing as mp
import time

import pytest

from pipeline import gate as gates
from pipeline.config import Config, PruneCfg
from pipeline.errors import GateFailed, PipelineError
from pipeline.runner import Result, Runner, Stage, run_lock

CALLS = []


def make_stage(name, reads=(), section=None, crash=False, fail_gate=False):
    def fn(ctx):
        CALLS.append(name)
        text = name + "".join((ctx.path(r) / "out.txt").read_text() for r in reads)
        (ctx.out / "out.txt").write_text(text)
        if crash:
            raise RuntimeError("boom")
        g = gates.gate("fail", gates.drop_check("top1", 90.0 if fail_gate else 99.0, 99.0, 0.5))
        return Result(metrics={"top1": 99.0}, gate=g)
    return Stage(name, 1, (section,) if section else (), tuple(reads), fn)


def stages(**kw):
    return [make_stage("a", section="baseline"), make_stage("b", ("a",), section="prune", **kw.get("b", {})),
            make_stage("c", ("b",), section="finetune")]


def runner(tmp_path, cfg=None, st=None):
    return Runner(cfg or Config(), st or stages(), tmp_path / "run", None, data_identity=lambda: "d", log=lambda m: None)


@pytest.fixture(autouse=True)
def clear():
    CALLS.clear()


def test_unchanged_rerun_is_cached(tmp_path):
    recs = runner(tmp_path).run()
    assert [r["status"] for r in recs] == ["ran"] * 3 and CALLS == ["a", "b", "c"]
    CALLS.clear()
    recs = runner(tmp_path).run()
    assert [r["status"] for r in recs] == ["cached"] * 3 and CALLS == []
    assert (tmp_path / "run/03_c/out.txt").read_text() == "cba"


def test_config_change_reruns_that_stage_and_later(tmp_path):
    runner(tmp_path).run()
    CALLS.clear()
    cfg = dataclasses.replace(Config(), prune=PruneCfg(ratio=0.3))
    recs = runner(tmp_path, cfg).run()
    assert [r["status"] for r in recs] == ["cached", "ran", "ran"] and CALLS == ["b", "c"]


def test_truncated_output_reruns(tmp_path):
    runner(tmp_path).run()
    CALLS.clear()
    (tmp_path / "run/02_b/out.txt").write_text("x")
    recs = runner(tmp_path).run()
    # b rewrote the same bytes, so c's inputs are unchanged.
    assert CALLS == ["b"] and [r["status"] for r in recs] == ["cached", "ran", "cached"]


def test_new_input_bytes_rerun_readers(tmp_path):
    runner(tmp_path).run()
    CALLS.clear()
    st = stages()
    orig = st[0].fn

    def other_bytes(ctx):
        res = orig(ctx)
        (ctx.out / "extra.txt").write_text("new")
        return res
    st[0] = dataclasses.replace(st[0], fn=other_bytes)
    runner(tmp_path, st=st).run(force=["a"])
    assert CALLS == ["a", "b", "c"]


def test_crash_leaves_nothing_that_looks_finished(tmp_path):
    with pytest.raises(RuntimeError):
        runner(tmp_path, st=stages(b={"crash": True})).run()
    assert (tmp_path / "run/01_a/stage.json").is_file()
    assert not (tmp_path / "run/02_b").exists() and (tmp_path / "run/02_b.tmp").is_dir()
    CALLS.clear()
    recs = runner(tmp_path).run()
    assert [r["status"] for r in recs] == ["cached", "ran", "ran"]
    assert not (tmp_path / "run/02_b.tmp").exists()


def test_gate_failure_keeps_failed_folder_only(tmp_path):
    r = runner(tmp_path, st=stages(b={"fail_gate": True}))
    with pytest.raises(GateFailed) as e:
        r.run()
    assert "stage b: top1 dropped 9.000 pt" in e.value.args[0] and "max_drop 0.5" in e.value.args[0]
    assert (tmp_path / "run/02_b.failed/stage.json").is_file() and not (tmp_path / "run/02_b").exists()
    assert json.loads((tmp_path / "run/02_b.failed/stage.json").read_text())["status"] == "failed"
    assert list(r.records) == ["a"] and CALLS == ["a", "b"]


def test_selection(tmp_path):
    with pytest.raises(PipelineError, match="stage a has no up-to-date result"):
        runner(tmp_path).run(start="b")
    recs = runner(tmp_path).run(until="b")
    assert [r["name"] for r in recs] == ["a", "b"]
    CALLS.clear()
    recs = runner(tmp_path).run(start="b", force=["b"])
    assert [r["status"] for r in recs] == ["cached", "ran", "ran"] and CALLS == ["b", "c"]
    CALLS.clear()
    runner(tmp_path).run(force=[])
    assert CALLS == ["a", "b", "c"]
    with pytest.raises(PipelineError, match="no such stage"):
        runner(tmp_path).run(until="zzz")
    with pytest.raises(PipelineError, match="comes after"):
        runner(tmp_path).run(start="c", until="a")


def _hold(path, ready):
    with run_lock(path):
        ready.set()
        time.sleep(5)


def test_second_run_on_same_folder_is_refused(tmp_path):
    ready = mp.get_context("fork").Event()
    p = mp.get_context("fork").Process(target=_hold, args=(tmp_path / "run", ready))
    p.start()
    try:
        assert ready.wait(10)
        with pytest.raises(PipelineError, match=rf"another run is using this run folder \(pid {p.pid}\)"):
            runner(tmp_path).run()
    finally:
        p.terminate()
        p.join()
    runner(tmp_path).run()  # the lock dies with its holder
