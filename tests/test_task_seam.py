"""The task seam: a task defined here, in the test folder alone, runs through every stage.

`LogitMAE` is a regression-style task: no labels, no top-1; a model passes while its logits stay within
a mean absolute error of the unpruned model's (lower is better). If a stage, gate or the report still
read `top1` or tested for an output by name, this run would fail or show the wrong figure.
"""
import numpy as np
import pytest
from conftest import SMALL, one_line

import pipeline
from pipeline import tasks
from pipeline.errors import PipelineError
from pipeline.tasks import Task

FAST = [*SMALL, "prune.target=macs", "prune.macs=0.1", "quantize.keep_fp32=none"]


class LogitMAE(Task):
    kind = "logit_mae"
    metric = "logit_mae"
    higher_is_better = False
    label, unit, drop_unit = "logit MAE", "", ""
    keeps = ("logits",)

    def metrics(self, outputs, labels, teacher=None):
        if teacher is None:   # the unpruned model is its own reference
            return {"logit_mae": 0.0}
        return {"logit_mae": round(float(np.abs(outputs["logits"] - teacher["logits"]).mean()), 6)}

    def agreement(self, outputs, reference):
        close = np.abs(outputs["logits"] - reference["logits"]).max(axis=1) <= 1.0
        return round(float(close.mean() * 100), 4)



@pytest.fixture(scope="module")
def toy():
    task = tasks.register(LogitMAE())
    yield task
    tasks.unregister(task.kind)


def test_a_task_from_the_test_folder_runs_through_every_stage(tmp_path, toy):
    result = pipeline.run("configs/cpu.toml", [*FAST, "task.kind=logit_mae", "finetune.max_drop=50",
                                               "export.max_drop=0.01", "quantize.max_drop=5", "prune.max_drop=100"],
                          run_name="toy", runs=tmp_path, log=lambda m: None)
    assert result.passed, result.message
    by = {r.name: r for r in result.records}
    assert {n: r.status for n, r in by.items() if r.status != "ran"} == {"engine": "skipped"}   # no TensorRT here
    assert (tmp_path / "toy/deploy/manifest.json").exists()
    assert by["baseline"].metrics["logit_mae"] == 0.0 and "top1" not in by["baseline"].metrics
    for name in ("prune", "finetune", "export_onnx", "quantize"):
        m, gate = by[name].metrics, by[name].gate
        assert m["task"] == "logit_mae" and m["logit_mae"] > 0.0, name
        assert gate.checks[0].metric == "logit_mae", name
    # export keeps the fine-tuned model's logits: its error against the teacher is the fine-tune's
    assert by["export_onnx"].metrics["logit_mae"] == pytest.approx(by["finetune"].metrics["logit_mae"], abs=1e-3)
    # lower is better: a drop is the error growing
    q = by["quantize"].gate.checks[0]
    assert q.drop == pytest.approx(by["quantize"].metrics["logit_mae"] - by["quantize"].metrics["fp32_logit_mae"])


def test_early_stopping_is_refused_for_a_task_the_trainer_cannot_evaluate(tmp_path, toy):
    with pytest.raises(PipelineError) as e:
        pipeline.run("configs/cpu.toml", [*FAST, "task.kind=logit_mae", "finetune.early_stop=true"],
                     run_name="toy", runs=tmp_path, log=lambda m: None, until="finetune")
    assert one_line(e.value).startswith("finetune.early_stop: the trainer stops early on held-out top-1 only; "
                                        "task 'logit_mae' gates on logit_mae")
