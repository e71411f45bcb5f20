"""Stage 3, fine-tune: distil the unpruned teacher into the pruned student, and close the loop
between speed and accuracy.

The prune stage may hand over a ladder of picks (the fastest first, then wider ones; see
pipeline.prune_latency). Each is distilled in turn until one is within the gate's top-1 drop: the
fastest pick that passes ships. If none passes, the most accurate one is kept and the gate fails
with what was measured. Under ``prune.goal = "require"`` a pick that passes only by falling below
the speed goal also fails the gate, naming the best passing pick, its speed and its top-1.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from pipeline import gate as gates
from pipeline import modelio
from pipeline.errors import PipelineError
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.stage_io import (
    LADDER_KEYS,
    has_ladder,
    load_baseline,
    load_pruned_model,
    model_keys,
    pruned_counts,
    task_of,
    teacher_outputs,
)
from pipeline.tasks import named

FINETUNE_TRAIN_KEYS = ("finetune.lr", "finetune.batch_size", "finetune.optimizer", "finetune.schedule",
                       "finetune.kd_temperature", "finetune.kd_weight", "finetune.token_weight", "finetune.val_size",
                       "finetune.device", "finetune.nproc")


def finetune_keys(cfg):
    keys = [*model_keys(cfg), *FINETUNE_TRAIN_KEYS, "finetune.epochs", "finetune.early_stop"]
    if has_ladder(cfg):   # the gate's limit decides which pick is distilled next, so it is an input here
        keys += ["finetune.gate", "finetune.max_drop"]
    # what decides whether there is a ladder (has_ladder), so that the declaration is a function of it
    return [*keys, *LADDER_KEYS]


def finetune_model(ctx: Context, student, teacher, *, epochs: float, early_stop: bool) -> dict:
    """Distil ``teacher`` into ``student``; early stopping looks at a held-out slice of the TRAIN split."""
    from pipeline.train import train
    from pipeline.train_dist import train_ddp
    f, data = ctx.cfg.finetune, ctx.data
    n = min(f.val_size, len(data.train.labels) // 5)
    perm = np.random.default_rng(ctx.cfg.run.seed + 1).permutation(len(data.train.labels))
    val = (data.x_train[perm[:n]], data.train.labels[perm[:n]])
    x, y = data.x_train[perm[n:]], data.train.labels[perm[n:]]
    # Stop once the student matches the teacher on the same held-out slice: comparing with the
    # teacher's *test* top-1 would stop too early, as held-out train images are easier.
    task, target = task_of(ctx), None
    if f.token_weight > 0 and not task.token_distillation:   # refused, not ignored
        raise PipelineError(f"finetune.token_weight = {f.token_weight}: task {task.kind!r} {task.NO_TOKEN_TERM}; "
                            "set it to 0")
    if early_stop:
        target = task.early_stop_target(modelio.torch_outputs(teacher, val[0]), val[1])
        if target is None:   # refused, not ignored: the trainer can stop early only on what it evaluates
            raise PipelineError(f"finetune.early_stop: the trainer stops early on held-out top-1 only; task "
                                f"{task.kind!r} gates on {task.metric}: set finetune.early_stop = false")
    kwargs = dict(epochs=epochs, lr=f.lr, batch_size=f.batch_size, kd_temperature=f.kd_temperature,
                  kd_weight=f.kd_weight, schedule=f.schedule, optimizer=f.optimizer, seed=ctx.cfg.run.seed,
                  early_stop_top1=target, val=val, device=f.device, token_weight=f.token_weight,
                  progress="fine-tune", task=task)
    if f.nproc > 1:
        return train_ddp(student, teacher, x, y, nproc=f.nproc, **kwargs)
    return train(student, teacher, x, y, **kwargs)


@dataclasses.dataclass
class _Tried:
    rung: int
    folder: str
    student: object
    info: dict
    metrics: dict
    passed: bool
    drop: float      # the task metric's drop against the baseline, in the gate's direction


def finetune(ctx: Context) -> Output:
    from pipeline.prune import save_pruned
    cfg, data = ctx.cfg, ctx.data
    pm = ctx.record("prune").metrics
    ladder = pm.get("ladder") or [{"folder": "", "widths": pm.get("widths"), "speedup": None, "meets_goal": True}]
    max_drop = None   # None: the first pick ships (no ladder, or finetune.gate = "off")
    if has_ladder(cfg) and cfg.finetune.gate != "off":
        max_drop = cfg.finetune.max_drop
    task = task_of(ctx)
    score, kept = task.metric, teacher_outputs(ctx)
    reference = ctx.record("baseline").metrics[score]
    teacher, tried, chosen = load_baseline(ctx), [], None
    for k, rung in enumerate(ladder):
        student = load_pruned_model(ctx, "prune", rung["folder"])
        if len(ladder) > 1:
            ctx.log(f"  fine-tune pick {k + 1}/{len(ladder)}: widths {rung['widths']}, verified {rung['speedup']}x")
        info = finetune_model(ctx, student, teacher, epochs=cfg.finetune.epochs, early_stop=cfg.finetune.early_stop)
        metrics = {"task": task.kind, **task.metrics(modelio.torch_outputs(student, data.x_test), data.test.labels,
                                                     kept)}
        # the gate's own check (direction, tolerance); no limit where the first pick ships
        check = task.drop_check(metrics[score], reference, math.inf if max_drop is None else max_drop)
        t = _Tried(k, rung["folder"], student, info, metrics, check.passed, check.drop)
        tried.append(t)
        if t.passed:
            chosen = t
            break
        more = "backing off to a wider pick" if k + 1 < len(ladder) else "no wider pick left"
        ctx.log(f"  {task.show(metrics[score])} misses the gate (drop {t.drop:.2f} > {max_drop}{task.drop_unit}): "
                f"{more}")
        tried[k] = dataclasses.replace(t, student=None)   # only the chosen one is kept in memory
        if chosen is None or t.drop < chosen.drop:
            chosen = dataclasses.replace(t, student=student)
    folder = ctx.path("prune", chosen.folder)
    history = json.loads((folder / "pruning_history.json").read_text())["history"]
    save_pruned(chosen.student, history, ctx.out)
    metrics = dict(chosen.metrics)
    metrics.update(**pruned_counts(ctx, chosen.student),
                   **{k: chosen.info[k] for k in ("epochs_run", "steps", "stopped_early") if k in chosen.info})
    rung = ladder[chosen.rung]
    if rung.get("widths"):
        metrics.update(widths=rung["widths"], widths_source=pm.get("widths_source"))
    if len(ladder) > 1:
        search = pm.get("latency_search") or {}
        metrics.update(rung=chosen.rung, rung_speedup=rung["speedup"], rung_meets_goal=rung["meets_goal"],
                       goal_speedup=round(1 / search["goal_ratio"], 3) if search.get("goal_ratio") else None,
                       tried=[{"rung": t.rung, "widths": ladder[t.rung]["widths"], "speedup": ladder[t.rung]["speedup"],
                               score: t.metrics[score], "passed": t.passed} for t in tried])
    notices = ()
    if len(ladder) > 1 and chosen.rung and not rung["meets_goal"] and metrics.get("goal_speedup"):
        notices = (f"speedup {metrics['goal_speedup']:g}x not reached within the accuracy gate: the fastest pick "
                   f"that passed is {rung['speedup']}x at {task.show(metrics[score])} "
                   f"({chosen.rung} narrower pick(s) missed the gate)",)
    return Output(metrics=metrics, notices=notices,
                  artifacts=(Artifact("pruned-torch", "torch", "", label="pruned + fine-tuned (torch)"),))


def finetune_gate(m, inputs, cfg):
    """The task metric's drop vs the baseline; under prune.goal = require, also the speed goal of the pick that
    passed."""
    f, task = cfg.finetune, named(m["task"])
    checks = [task.drop_check(task.value(m), task.value(inputs["baseline"].metrics), f.max_drop)]
    if cfg.prune.goal == "require" and m.get("rung_meets_goal") is False and m.get("goal_speedup"):
        check = gates.limit_check("verified speedup of the fastest pick within the accuracy gate",
                                  m["rung_speedup"], m["goal_speedup"], at_least=True)
        hint = (f"that pick keeps {task.show(m[task.metric])}; narrower picks missed the accuracy gate. "
                "prune.goal = 'best' ships it, or relax prune.speedup")
        checks.append(dataclasses.replace(check, hint=hint))
    return gates.gate(f.gate, *checks)
