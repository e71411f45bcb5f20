"""What a task owns: the one object the stages, the trainer and calib's scores ask instead of testing for
`top1` or `tokens` (docs/architecture.md, "How to add a task").

A task sees model outputs as ``{name: array}`` (torch outputs in training), the labels, and what the
unpruned model produced; it never sees a config or a stage. Its `metric` is the figure every
accuracy gate compares, in the task's own units; `higher_is_better` says which way a drop points.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from pipeline import gate as gates
from pipeline.records import Check, Metric, Score
from pipeline.tasks.logits import importance_loss, infer_answers, kd_loss, last_output, logits_of


@dataclass(frozen=True)
class Figures:
    """A task's figures of one model, typed (a subclass per task: ClassifyMetrics, EncodeMetrics). Stage
    metrics keep them as plain keys; ``from_json`` reads them back at that edge (keys it does not know,
    a stage's own, stay there), ``to_json`` drops what was not measured."""

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, metrics: dict):
        return cls(**{f.name: metrics[f.name] for f in fields(cls) if f.name in metrics})


class Task:
    kind = ""                  # the name a config gives (`[task] kind`)
    metric = ""                # the key of metrics() that gates compare and the report ranks by
    higher_is_better = True
    label, unit, drop_unit = "", "", ""   # how messages say it: "top-1", " %", " pt"
    decimals = 2                  # how the report, the console and the manifest write a value
    bounds: tuple[float, float] | None = None   # the metric's range, if it has one (a percent: 0..100)
    min_span = 0.0                # the plots' axis for the metric is at least this tall
    keeps: tuple[str, ...] = ()   # outputs of the unpruned model kept for later fidelity checks
    token_distillation = False    # whether finetune.token_weight means anything for this task
    NO_TOKEN_TERM = "has no tokens to distil (an encoder's tokens output)"   # why token_weight is refused
    figures: type[Figures] | None = None   # the typed form of metrics() (None: a task's plain dict)
    # how the target gets its TensorRT engine, for the report's "Not executed here" line (the bundle's file)
    engine_recipe = "deploy/build_engine.sh builds it on the target"

    def describe(self) -> Metric:
        """How the report, the plots and the bundle's manifest name, write and rank this task's figure
        (report.json's and manifest.json's ``metric``, read there without the task registry)."""
        return Metric(self.kind, self.metric, self.label or self.metric, self.unit, self.drop_unit,
                      self.higher_is_better, self.decimals, self.bounds, self.min_span)

    def value(self, metrics: dict, key: str = "") -> float:
        """The task's figure a gate compares, from a stage's metrics: the typed field where the task has
        typed figures, else the plain key (``key``: another form of it, ``fp32_<metric>``)."""
        key = key or self.metric
        if self.figures is not None and key == self.metric:
            return getattr(self.figures.from_json(metrics), key)
        return metrics[key]

    def score(self, metrics: dict) -> Score | None:
        """The task's figure in a stage's metrics (None: the stage measured none)."""
        value = metrics.get(self.metric)
        return None if value is None else Score(self.metric, value)

    def shown(self, metrics: dict) -> dict:
        """What an artifact records of metrics measured on it alone (Artifact fields: its score)."""
        return {"score": self.score(metrics)}

    def show(self, value: float) -> str:
        return f"{self.label or self.metric} {value:.{self.decimals}f}{self.unit}"

    def brief(self, value: float) -> str:
        """The console's form (the runner's stage lines, the CLI's last line): ``top1 98.60 %``."""
        return f"{self.metric} {value:.{self.decimals}f}{self.unit}"

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
        there, in the units of `held_out` (higher is better); None: this task cannot stop early, so the
        fine-tune refuses `early_stop` rather than train blind."""
        return None

    # ---- the bundle's self-test (pipeline/package.py) ---------------------------------------------------------
    # edgerun's `infer` answers classes on a model's last output (the runtime half of classification,
    # edgerun/classify.py); a task whose bundle answers otherwise overrides both.

    def bundle_answers(self, infer_doc: dict) -> tuple[np.ndarray, dict]:
        """What the bundle's runtime answered per sample (`edgerun infer --format json`), and its figures
        on the bundle's sample for the package record."""
        return infer_answers(infer_doc)

    def answers(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """What the pipeline's model answers per sample, compared with `bundle_answers`."""
        return last_output(outputs).argmax(1)

    # ---- training (pipeline/train.py) ----------------------------------------------------------------------
    # The loop is the same for every task; what it minimises, keeps of the teacher and watches is the task's.
    # These defaults are a classifier's (cross-entropy and distillation on the last output): every model the
    # library builds ends with logits, so a task that owns only its metrics still trains. A task whose model
    # answers otherwise (a decoder's [B, T, V] next-token logits) overrides all four; with early stopping, also
    # `held_out` and `early_stop_target`. Outputs are torch's: a tensor or a tuple, as the model returns them.

    def train_loss(self, student_out, labels, teacher_out, *, temperature: float, kd_weight: float,
                   token_weight: float):
        """The scalar one step minimises. ``teacher_out`` is the teacher's output for the batch when
        `teacher_per_batch`, else the rows `teacher_cache` kept of it; None trains on the labels alone."""
        teacher_logits = None if teacher_out is None else logits_of(teacher_out)
        return kd_loss(logits_of(student_out), teacher_logits, labels, temperature, kd_weight)

    def importance_loss(self, output, labels):
        """The scalar Taylor importance differentiates when pruning (pipeline/prune_tp.py): how much each
        channel's removal would cost this task, on a batch of training data."""
        return importance_loss(output, labels)

    def teacher_per_batch(self, *, kd_weight: float, token_weight: float) -> bool:
        """Whether the loss needs what is too big to keep for the whole run (tokens, a decoder's vocabulary
        per position), so the teacher runs beside the student every step instead of once up front."""
        return False

    def teacher_cache(self, teacher_out):
        """What of the teacher's output for a batch is kept for the run (one row per sample, float32 on the
        CPU): the same every epoch, as the data is not augmented."""
        return logits_of(teacher_out).float().cpu()

    def train_hits(self, student_out, labels) -> tuple[int, int]:
        """(right, counted) in a batch, summed over the run into the progress line's accuracy and the
        trainer's ``train_top1`` (a decoder counts positions, not samples)."""
        return int((logits_of(student_out).detach().argmax(1) == labels).sum()), len(labels)

    def held_out(self, model, x: np.ndarray, y: np.ndarray, *, device="cpu") -> float:
        """The student's figure on the held-out slice that early stopping compares (``>=``) with
        `early_stop_target`; leaves the model in the mode it found it in."""
        raise NotImplementedError(f"task {self.kind!r} has no held-out figure to stop early on")
