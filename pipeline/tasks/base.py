"""What a task owns: the one object the stages, the trainer and the pruner ask instead of testing for
`top1` or `tokens` (docs/architecture.md, "How to add a task").

A task sees model outputs as ``{name: array}`` (torch outputs in training), the labels, and what the
unpruned model produced; it never sees a config or a stage. Its `metric` is the figure every
accuracy gate compares, in the task's own units; `higher_is_better` says which way a drop points.
"""
from __future__ import annotations

import numpy as np

from pipeline import gate as gates
from pipeline.records import Check


class Task:
    kind = ""                  # the name a config gives (`[task] kind`)
    metric = ""                # the key of metrics() that gates compare and the report ranks by
    higher_is_better = True
    label, unit, drop_unit = "", "", ""   # how messages say it: "top-1", " %", " pt"
    keeps: tuple[str, ...] = ()   # outputs of the unpruned model kept for later fidelity checks

    def shown(self, metrics: dict) -> dict:
        """What the report shows of an artifact's metrics (Artifact fields): the top-1 of a classifier,
        nothing yet for other tasks (the report reads top-1 only)."""
        return {}

    def show(self, value: float) -> str:
        return f"{self.label or self.metric} {value:.2f}{self.unit}"

    def claims(self, output_names: tuple[str, ...]) -> bool:
        """Whether `kind = "auto"` means this task for a model with these outputs."""
        return False

    def metrics(self, outputs: dict[str, np.ndarray], labels: np.ndarray,
                teacher: dict[str, np.ndarray] | None = None) -> dict:
        """The task's figures on a test set; with ``teacher`` (the unpruned model's kept outputs), fidelity too."""
        raise NotImplementedError

    def agreement(self, outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
        """Percent of samples whose answer matches the reference model's (quantized vs fp32)."""
        raise NotImplementedError

    def fidelity_vs_fp32(self, outputs: dict[str, np.ndarray], fp32: dict[str, np.ndarray]) -> dict:
        """Figures (merged into a stage's metrics) of how close a quantized model stays to its fp32 form
        beyond the answer (an encoder's tokens); empty where the answer is all."""
        return {}

    def fidelity_checks(self, metrics: dict, min_cosine: float) -> list[Check]:
        """The checks of what fidelity_vs_fp32 added, at least ``min_cosine``."""
        return []

    def drop_check(self, value: float, reference: float, max_drop: float, label: str = "") -> Check:
        """The task metric's drop against a reference, at most ``max_drop`` (in the metric's units)."""
        name = self.metric + (f" ({label})" if label else "")
        if self.higher_is_better:
            return gates.drop_check(name, value, reference, max_drop)
        return gates.drop_check(name, -value, -reference, max_drop)   # an error that grows is a drop

    def baseline_extras(self, outputs: dict[str, np.ndarray]) -> dict:
        """Figures of the unpruned model that its gate reads besides metrics() (a classifier's chance level)."""
        return {}

    def baseline_check(self, metrics: dict, floor: float | None) -> Check | None:
        """What the baseline must reach to be worth compressing (``floor`` None: the task's default;
        returning None: nothing to check)."""
        return None

    def early_stop_target(self, outputs: dict[str, np.ndarray], labels: np.ndarray) -> float | None:
        """What the trainer's early stopping must reach on a held-out slice, given the teacher's outputs
        there: the trainer evaluates held-out top-1 (pipeline/train.py), so only a classifier has one."""
        return None
