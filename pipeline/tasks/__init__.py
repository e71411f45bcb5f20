"""The task seam: one object per task kind owns what differs between model families (metrics, gates,
what the unpruned model must keep for comparison, the training loss). Stages and the trainer ask the task.

`register` adds a task from outside the library (a test's toy task, a user's own).
"""
from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.tasks.base import Task
from pipeline.tasks.classify import Classify
from pipeline.tasks.encode import Encode
from pipeline.tasks.generate import Generate
from pipeline.tasks.vlm import VLMAnswer

# "auto" asks these in order: the most specific first, classification (which claims any model) last.
_ORDER: list[Task] = [Generate(), VLMAnswer(), Encode(), Classify()]


def register(task: Task) -> Task:
    """Add (or replace) a task; it is asked before the built-in ones under `kind = "auto"`."""
    if not isinstance(task, Task) or not task.kind or not task.metric:
        raise PipelineError(f"task: {task!r} is not a Task with a kind and a metric")
    _ORDER[:] = [task, *(t for t in _ORDER if t.kind != task.kind)]
    return task


def unregister(kind: str) -> None:
    """Remove a task added with `register` (the built-in ones stay)."""
    if kind in ("classify", "encode", "generate", "vlm"):
        raise PipelineError(f"task: {kind!r} is built in and cannot be removed")
    _ORDER[:] = [t for t in _ORDER if t.kind != kind]


def kinds() -> tuple[str, ...]:
    return tuple(t.kind for t in _ORDER)


def resolve(kind: str, output_names) -> Task:
    """The task a config names, or for "auto" the first that claims a model with these outputs."""
    if kind == "auto":
        names = tuple(output_names)
        return next(t for t in _ORDER if t.claims(names))
    return named(kind)


def of_metrics(metrics: dict) -> Task | None:
    """The task a stage measured with (its metrics' "task"); None for a stage that measured nothing or with
    a task not registered in this process (what reads figures shows none; a gate asks `named` and refuses)."""
    kind = metrics.get("task")
    return next((t for t in _ORDER if t.kind == kind), None)


def score_of(metrics: dict):
    """A stage's figure (pipeline.records.Score) in its task's metric, or None."""
    task = of_metrics(metrics)
    return None if task is None else task.score(metrics)


def of_run(records) -> Task:
    """The task a run's records were measured with (the first that names one); the classifier, the default
    task, where none does (a run that stopped before measuring anything)."""
    return next((t for t in (of_metrics(r.metrics) for r in records) if t is not None), named("classify"))


def named(kind: str) -> Task:
    """The task of this kind (a stage's metrics record it as "task", so its gate reads the same task)."""
    for t in _ORDER:
        if t.kind == kind:
            return t
    raise PipelineError(f"task.kind: unknown {kind!r}; expected auto or one of {', '.join(kinds())}")


__all__ = ["Task", "Classify", "Encode", "Generate", "VLMAnswer", "register", "unregister", "resolve", "named", "kinds",
           "of_metrics", "score_of", "of_run"]
