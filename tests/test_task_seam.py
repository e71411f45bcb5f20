"""The task seam: a task defined here, in the test folder alone, runs through every stage.

`LogitMAE` is a regression-style task: no labels, no top-1; a model passes while its logits stay within
a mean absolute error of the unpruned model's (lower is better). If a stage, gate or the report still
read `top1` or tested for an output by name, this run would fail or show the wrong figure.
"""
import json

import numpy as np
import pytest
from conftest import SMALL, one_line

import pipeline
from pipeline import tasks
from pipeline.errors import PipelineError
from pipeline.tasks import Task

# one ratio prune (no MAC bisection) and one INT8 form: what is tested here is the task, not the search
FAST = [*SMALL, "prune.target=ratio", "prune.ratio=0.5", "quantize.keep_fp32=none"]


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


TOY = [*FAST, "task.kind=logit_mae", "finetune.max_drop=50", "export.max_drop=0.01", "quantize.max_drop=5",
       "prune.max_drop=100"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, toy):
    runs = tmp_path_factory.mktemp("runs")
    return runs, pipeline.run("configs/cpu.toml", TOY, run_name="toy", runs=runs, log=lambda m: None)


def refused(runs, *extra):
    """A run of the toy config with ``extra`` (its baseline and prune come from the store) refused at fine-tune."""
    with pytest.raises(PipelineError) as e:
        pipeline.run("configs/cpu.toml", [*TOY, *extra], run_name="refused", runs=runs, log=lambda m: None,
                     until="finetune")
    return one_line(e.value)


def test_a_task_from_the_test_folder_runs_through_every_stage(toy_run):
    tmp_path, result = toy_run
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


def test_the_report_and_the_manifest_speak_the_tasks_metric(toy_run):
    runs, result = toy_run
    report = json.loads((result.run_dir / "report.json").read_text())
    assert (report["metric"]["name"], report["metric"]["label"], report["metric"]["higher_is_better"]) == (
        "logit_mae", "logit MAE", False)
    by = {r.name: r for r in result.records}
    acc = report["summary"]["accuracy"]
    assert acc["reference_logit_mae"] == 0.0 and acc["shipped_logit_mae"] == report["summary"]["shipped"]["logit_mae"]
    assert acc["drop"] == pytest.approx(acc["shipped_logit_mae"], abs=1e-4)   # lower is better: error grown
    assert all(row["logit_mae"] is not None for row in report["latency"])
    md = result.report.read_text()
    assert "| logit MAE |" in md and f"against {by['baseline'].metrics['logit_mae']:.2f} for baseline" in md
    assert "top-1" not in md and "top1" not in md
    manifest = json.loads((runs / "toy/deploy/manifest.json").read_text())
    assert manifest["metric"]["kind"] == "logit_mae" and manifest["metric"]["name"] == "logit_mae"
    assert manifest["files"]["model.onnx"]["score"] == by["export_onnx"].metrics["logit_mae"]
    # the FP16 side file records its own figure, measured on it alone
    fp16 = by["export_onnx"].artifact("onnx-fp16")
    assert fp16.score.metric == "logit_mae" and manifest["files"]["model_fp16.onnx"]["score"] == fp16.score.value


def test_early_stopping_is_refused_for_a_task_the_trainer_cannot_evaluate(toy_run):
    assert refused(toy_run[0], "finetune.early_stop=true").startswith(
        "finetune.early_stop: the trainer stops early on held-out top-1 only; task 'logit_mae' gates on logit_mae")


class LogitMSE(LogitMAE):
    """Brings its own training loss: the student's logits regress onto the teacher's, the labels unused."""
    kind = metric = "logit_mse"

    def train_loss(self, student_out, labels, teacher_out, *, temperature, kd_weight, token_weight):
        import torch.nn.functional as F
        return F.mse_loss(student_out, teacher_out)   # teacher_out: the logits teacher_cache kept


def test_a_task_brings_its_own_training_loss():
    import torch

    from pipeline.train import train
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(16, 5), torch.nn.Linear(16, 5)
    x = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
    y = np.zeros(256, dtype=np.int64)   # every label class 0: cross-entropy would pull away from the teacher

    def mse():
        with torch.no_grad():
            return float(((student(torch.from_numpy(x)) - teacher(torch.from_numpy(x))) ** 2).mean())
    before = mse()
    info = train(student, teacher, x, y, epochs=4, lr=3e-2, batch_size=32, kd_weight=0.01, schedule="constant",
                 progress=None, device="cpu", task=LogitMSE())
    after = mse()
    assert info["losses"][-1] < info["losses"][0] / 4   # what it reports is its own loss, falling
    assert info["losses"][0] == pytest.approx(before, rel=0.5)   # the figure is the MSE, not a cross-entropy
    assert after < before / 10   # the student moved onto the teacher


def test_token_weight_is_refused_for_a_task_without_tokens(toy_run):
    assert refused(toy_run[0], "finetune.token_weight=0.5") == (
        "finetune.token_weight = 0.5: task 'logit_mae' has no tokens to distil (an encoder's tokens output); "
        "set it to 0")


def test_taylor_importance_differentiates_the_tasks_loss():
    import torch

    from pipeline.models.cnn import SimpleCNN
    from pipeline.prune import prune_model
    seen = []

    class Regress(LogitMAE):
        kind = metric = "regress"

        def importance_loss(self, output, labels):
            seen.append(labels.dtype)
            return (output.float() - labels[:, None]).pow(2).mean()   # float targets: no cross-entropy could take them

    torch.manual_seed(0)
    model = SimpleCNN(image_size=8).eval()
    batches = [(torch.randn(8, 1, 8, 8), torch.randn(8)) for _ in range(3)]
    model, info = prune_model(model, torch.randn(1, 1, 8, 8), ratio=0.5, importance="taylor", taylor_batches=batches,
                              taylor_loss=Regress().importance_loss)
    assert seen == [torch.float32] * 3 and info["channels"]["features.0"] == 8
