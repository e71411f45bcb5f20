"""Classification: top-1 against the labels, agreement of predicted classes, chance as the baseline's floor;
in training, cross-entropy with Hinton distillation on the logits (pipeline/tasks/logits.py, Task's defaults)
and early stopping on held-out top-1."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline import gate as gates
from pipeline.tasks.base import Figures, Task
from pipeline.tasks.logits import evaluate_top1
from pipeline.tasks.logits import last_output as logits


@dataclass(frozen=True)
class ClassifyMetrics(Figures):
    top1: float                        # percent of the test set answered right
    chance_top1: float | None = None   # 100 / classes: the baseline's floor is read against it


class Classify(Task):
    kind = "classify"
    metric = "top1"
    figures = ClassifyMetrics
    label, unit, drop_unit = "top-1", " %", " pt"
    bounds, min_span = (0.0, 100.0), 2.0   # a percent; the plots' axis at least 2 pt tall

    def claims(self, output_names):
        return True   # the fallback: any model whose last output is [batch, classes]

    def predictions(self, outputs):
        return logits(outputs).argmax(1)

    def metrics(self, outputs, labels, teacher=None):
        return ClassifyMetrics(round(float((self.predictions(outputs) == labels).mean() * 100), 4)).to_json()

    def agreement(self, outputs, reference):
        return round(float((self.predictions(outputs) == self.predictions(reference)).mean() * 100), 4)

    def baseline_extras(self, outputs):
        return {"chance_top1": round(100.0 / logits(outputs).shape[1], 4)}

    def baseline_check(self, metrics, floor):
        m = ClassifyMetrics.from_json(metrics)
        chance = m.chance_top1
        floor = chance + 10.0 if floor is None else floor
        check = gates.limit_check("top1_vs_chance", m.top1, round(floor, 4), at_least=True)
        hint = (f"chance is {chance:.1f} % for {round(100 / chance)} classes: every later gate would compare "
                "against a baseline that learned nothing; train longer or fix the model, or baseline.gate=warn")
        return dataclasses.replace(check, hint=hint)

    def early_stop_target(self, outputs, labels):
        return ClassifyMetrics.from_json(self.metrics(outputs, labels)).top1

    # Training: the loss, the teacher's cached logits and the running top-1 are Task's defaults (a classifier's);
    # early stopping on held-out top-1 is the classifier's alone, as early_stop_target is.
    def held_out(self, model, x, y, *, device="cpu"):
        return evaluate_top1(model, x, y, device=device)
