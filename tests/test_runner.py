"""The runner's contract, with tiny fake stages: contracts, content-verified cache, store, gates, lock."""
import dataclasses
import json
import multiprocessing as mp

import pytest

from pipeline import gate as gates
from pipeline.config import Config, FinetuneCfg, PruneCfg
from pipeline.errors import ContractError, GateFailed, PipelineError
from pipeline.records import Artifact
from pipeline.runner import Output, Runner, Stage, run_lock

CALLS = []


def make_stage(name, reads=(), keys=(), crash=False, top1=99.0, read_extra=None, gate_section="prune"):
    def fn(ctx):
        CALLS.append(name)
        for k in keys:
            section, _, key = k.partition(".")
            getattr(getattr(ctx.cfg, section), key)
        if read_extra:
            read_extra(ctx)
        text = name + "".join((ctx.path(r) / "out.txt").read_text() for r in reads)
        (ctx.out / "out.txt").write_text(text)
        if crash:
            raise RuntimeError("boom")
        return Output(metrics={"top1": top1}, artifacts=(Artifact("onnx-fp32", "onnx", "out.txt"),))

    def gate(m, inputs, cfg):
        s = getattr(cfg, gate_section)
        return gates.gate(s.gate, gates.drop_check("top1", m["top1"], 99.0, s.max_drop))
    return Stage(name, 1, fn, tuple(keys), tuple(reads), gate=gate,
                 gate_config=(f"{gate_section}.gate", f"{gate_section}.max_drop"))


def stages(**kw):
    return [make_stage("a", keys=("baseline.epochs",), **kw.get("a", {})),
            make_stage("b", ("a",), keys=("prune.ratio",), **kw.get("b", {})),
            make_stage("c", ("b",), keys=("finetune.lr",), **kw.get("c", {}))]


def runner(tmp_path, cfg=None, st=None, run="run", log=None):
    return Runner(cfg or Config(), st or stages(), tmp_path / run, None, data_identity=lambda: "d",
                  store=tmp_path / ".store", log=log or (lambda m: None))


@pytest.fixture(autouse=True)
def clear():
    CALLS.clear()


def statuses(recs):
    return [r.status for r in recs]


def test_unchanged_rerun_is_cached(tmp_path):
    assert statuses(runner(tmp_path).run()) == ["ran"] * 3 and CALLS == ["a", "b", "c"]
    CALLS.clear()
    assert statuses(runner(tmp_path).run()) == ["cached"] * 3 and CALLS == []
    assert (tmp_path / "run/03_c/out.txt").read_text() == "cba"


def test_config_change_reruns_the_stage_that_reads_it_and_later(tmp_path):
    runner(tmp_path).run()
    CALLS.clear()
    cfg = dataclasses.replace(Config(), prune=PruneCfg(ratio=0.3))
    assert statuses(runner(tmp_path, cfg).run()) == ["cached", "ran", "ran"] and CALLS == ["b", "c"]


def test_a_key_no_stage_declares_reruns_nothing(tmp_path):
    runner(tmp_path).run()
    CALLS.clear()
    cfg = dataclasses.replace(Config(), finetune=FinetuneCfg(epochs=7.0))
    assert statuses(runner(tmp_path, cfg).run()) == ["cached"] * 3


def test_reading_an_undeclared_key_fails_loudly(tmp_path):
    st = stages(b={"read_extra": lambda ctx: ctx.cfg.prune.macs})
    with pytest.raises(ContractError, match="prune.macs without declaring"):
        runner(tmp_path, st=st).run()
    st = stages(b={"read_extra": lambda ctx: ctx.cfg.finetune})
    with pytest.raises(ContractError, match=r"section \[finetune\]"):
        runner(tmp_path, st=st).run()


def test_reading_an_undeclared_stage_or_the_data_fails_loudly(tmp_path):
    with pytest.raises(ContractError, match="stage 'a' without declaring"):
        runner(tmp_path, st=stages(c={"read_extra": lambda ctx: ctx.path("a")})).run()
    with pytest.raises(ContractError, match="dataset"):
        runner(tmp_path / "2", st=stages(a={"read_extra": lambda ctx: ctx.data})).run()


def test_same_size_corruption_reruns_that_stage_with_a_notice(tmp_path):
    runner(tmp_path).run()
    CALLS.clear()
    f = tmp_path / "run/02_b/out.txt"
    f.write_text(f.read_text()[::-1])  # same size, other bytes
    log = []
    recs = runner(tmp_path, log=log.append).run()   # the store's verified copy replaces it
    assert statuses(recs) == ["cached"] * 3 and CALLS == []
    assert any("02_b/out.txt changed on disk" in m and "sha256" in m for m in log)
    assert f.read_text() == "ba"
    f.write_text("ab")
    r = runner(tmp_path)
    r.store = None   # no verified copy anywhere: the stage that owns the file reruns, never a later gate
    assert statuses(r.run()) == ["cached", "ran", "cached"] and CALLS == ["b"]
    assert f.read_text() == "ba"


def test_a_broken_stage_record_means_not_done(tmp_path):
    runner(tmp_path).run()
    CALLS.clear()
    (tmp_path / "run/02_b/stage.json").write_text(json.dumps({"name": 3, "files": []}))
    log = []
    recs = runner(tmp_path, log=log.append).run()
    # never a traceback: the verified store copy replaces it (no store: b reruns)
    assert statuses(recs) == ["cached"] * 3 and CALLS == []
    assert any("is not a stage record" in m for m in log)
    assert json.loads((tmp_path / "run/02_b/stage.json").read_text())["name"] == "b"
    (tmp_path / "run/02_b/stage.json").write_text("[1, 2")
    r = runner(tmp_path)
    r.store = None
    assert statuses(r.run()) == ["cached", "ran", "cached"] and CALLS == ["b"]


def test_a_new_run_folder_reuses_the_shared_store(tmp_path):
    runner(tmp_path).run()
    CALLS.clear()
    log = []
    recs = runner(tmp_path, run="other", log=log.append).run()
    assert statuses(recs) == ["cached"] * 3 and CALLS == []
    assert (tmp_path / "other/03_c/out.txt").read_text() == "cba"
    assert any("reusing" in m for m in log)


def test_toggling_an_override_back_reuses_the_store(tmp_path):
    runner(tmp_path).run()
    runner(tmp_path, dataclasses.replace(Config(), prune=PruneCfg(ratio=0.3))).run()
    CALLS.clear()
    assert statuses(runner(tmp_path).run()) == ["cached"] * 3 and CALLS == []


def test_a_damaged_store_entry_is_never_served(tmp_path):
    runner(tmp_path).run()
    for f in (tmp_path / ".store").glob("b-*/out.txt"):
        f.write_text("XX")
    CALLS.clear()
    recs = runner(tmp_path, run="other").run()
    assert statuses(recs) == ["cached", "ran", "cached"]


def test_relaxing_a_failed_gate_reevaluates_without_rerunning(tmp_path):
    st = stages(b={"top1": 90.0})
    with pytest.raises(GateFailed) as e:
        runner(tmp_path, Config(prune=PruneCfg(gate="fail", max_drop=1.0)), st).run()
    assert e.value.record.name == "b" and (tmp_path / "run/02_b.failed").is_dir()
    CALLS.clear()
    recs = runner(tmp_path, Config(prune=PruneCfg(gate="fail", max_drop=20.0)), st).run()
    assert CALLS == ["c"] and statuses(recs) == ["cached", "cached", "ran"]
    assert recs[1].gate.passed and not (tmp_path / "run/02_b.failed").exists()


def test_tightening_a_gate_fails_on_the_cached_result(tmp_path):
    st = stages(b={"top1": 95.0})
    runner(tmp_path, Config(prune=PruneCfg(gate="fail", max_drop=10.0)), st).run()
    CALLS.clear()
    with pytest.raises(GateFailed, match="dropped 4.000"):
        runner(tmp_path, Config(prune=PruneCfg(gate="fail", max_drop=1.0)), st).run()
    assert CALLS == []


def test_warn_gate_records_without_stopping(tmp_path):
    recs = runner(tmp_path, Config(prune=PruneCfg(gate="warn", max_drop=1.0)), stages(b={"top1": 90.0})).run()
    assert statuses(recs) == ["ran"] * 3
    assert not recs[1].gate and "warn only" in recs[1].gate.summary()


def test_crash_leaves_only_a_tmp_folder_and_resumes(tmp_path):
    with pytest.raises(RuntimeError):
        runner(tmp_path, st=stages(b={"crash": True})).run()
    assert (tmp_path / "run/02_b.tmp").is_dir() and not (tmp_path / "run/02_b").exists()
    CALLS.clear()
    recs = runner(tmp_path).run()
    assert statuses(recs) == ["cached", "ran", "ran"]


def test_declared_artifact_must_exist(tmp_path):
    def fn(ctx):
        return Output(artifacts=(Artifact("onnx-fp32", "onnx", "missing.onnx"),))
    with pytest.raises(ContractError, match="missing.onnx"):
        runner(tmp_path, st=[Stage("a", 1, fn)]).run()


def test_selection(tmp_path):
    r = runner(tmp_path)
    with pytest.raises(PipelineError, match="no such stage"):
        r.run(start="zzz")
    with pytest.raises(PipelineError, match="comes after"):
        r.run(start="c", until="a")
    with pytest.raises(PipelineError, match="outside --from/--until"):
        runner(tmp_path).run(start="b")
    runner(tmp_path).run()
    CALLS.clear()
    # b reruns and writes the same bytes: c reads only what b wrote, so it stays cached
    assert statuses(runner(tmp_path).run(force=["b"])) == ["cached", "ran", "cached"] and CALLS == ["b"]


def _hold(path, ready, release):
    with run_lock(path):
        ready.set()
        release.wait(60)   # held until the test has tried: no sleep racing a slow machine


def test_lock_refuses_a_second_run(tmp_path):
    ready, release = mp.Event(), mp.Event()
    p = mp.Process(target=_hold, args=(tmp_path / "run", ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(PipelineError, match="another run"):
            with run_lock(tmp_path / "run"):
                pass
    finally:
        release.set()
        p.join()


@pytest.mark.parametrize("task, reused", [("classify", True), (None, False), ("no_such_task", False)])
def test_a_measuring_stage_is_reused_only_when_its_record_names_a_known_task(tmp_path, task, reused):
    def fn(ctx):
        CALLS.append("m")
        (ctx.out / "out.txt").write_text("m")
        return Output(metrics={"top1": 99.0, **({"task": task} if task else {})})

    def gate(m, inputs, cfg):
        return gates.gate("fail", gates.drop_check("top1", m["top1"], 99.0, 1.0))
    st = [dataclasses.replace(Stage("m", 1, fn, gate=gate), measures=True)]
    logs = []
    runner(tmp_path, st=st).run()
    recs = runner(tmp_path, st=st, log=logs.append).run()
    assert statuses(recs) == (["cached"] if reused else ["ran"]) and CALLS == ["m"] * (1 if reused else 2)
    assert any("lacks what its gate reads" in line for line in logs) is not reused
