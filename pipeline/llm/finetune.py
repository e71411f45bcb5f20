"""The decoder's fine-tune stage: the pruned model distilled from the unpruned one over [B, T, V] (KL on the answer
positions plus the labels' cross-entropy: pipeline/tasks/generate.py, pipeline/train.py's loop), then judged like
the baseline: exact-match, next-token agreement with the unpruned model, perplexity.

On one process, or on ``finetune.nproc`` under DDP or FSDP2 (``finetune.sharding``; pipeline/train_dist.py). The
run checkpoints every ``finetune.checkpoint_every`` steps into the runner's checkpoint folder of this stage's
fingerprint, so a killed attempt's rerun resumes inside the distillation (pipeline/train_ckpt.py).

The prune stage may hand over a ladder of picks (its metrics' ``ladder``: the fastest first, then wider ones, each a
model folder in its output). Like the image models' fine-tune (pipeline/finetune_stage.py), each is distilled in turn
until one is within the exact-match drop of the gate (``finetune.max_drop`` against the baseline); the first that
passes ships, else the most accurate one, and the gate fails on what was measured.
"""
from __future__ import annotations

import dataclasses
import math

from pipeline import gate as gates
from pipeline.errors import PipelineError
from pipeline.llm import lm
from pipeline.llm.stage_io import measure_torch
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.stage_io import LADDER_KEYS, has_ladder
from pipeline.tasks import named

TRAIN_KEYS = ("finetune.epochs", "finetune.lr", "finetune.batch_size", "finetune.optimizer", "finetune.schedule",
              "finetune.kd_temperature", "finetune.kd_weight", "finetune.device", "finetune.nproc",
              "finetune.sharding", "finetune.checkpoint_every")
AUTO_CHECKPOINT_EVERY = 100   # steps: a few minutes of a CPU decoder's distillation between saves


def finetune_keys(cfg):
    keys = [*TRAIN_KEYS, "decoder.max_new_tokens", "decoder.eval_prompts"]
    if has_ladder(cfg):   # the gate's limit decides which pick is distilled next, so it is an input here
        keys += ["finetune.gate", "finetune.max_drop"]
    return [*keys, *LADDER_KEYS]


def checkpoint_every(f) -> int:
    """finetune.checkpoint_every resolved: -1 (auto) is AUTO_CHECKPOINT_EVERY, off under FSDP (refused there)."""
    every, nproc, sharding = f.checkpoint_every, f.nproc, f.sharding   # all read: all are declared
    if every == -1:
        return 0 if nproc > 1 and sharding == "fsdp" else AUTO_CHECKPOINT_EVERY
    return every


def distil(ctx: Context, student, teacher, tok, name: str) -> dict:
    """Distil ``teacher`` into ``student`` in place (one process or several), checkpointed as ``name``."""
    from pipeline.train import train
    from pipeline.train_ckpt import Checkpoint
    from pipeline.train_dist import train_ddp
    cfg, f = ctx.cfg, ctx.cfg.finetune
    ids, labels = lm.token_rows(tok, ctx.data.train)
    every, where = checkpoint_every(f), ctx.checkpoint(name)
    checkpoint = Checkpoint(where[0], every, where[1]) if every > 0 and where is not None else None
    kwargs = dict(epochs=f.epochs, lr=f.lr, batch_size=f.batch_size, kd_temperature=f.kd_temperature,
                  kd_weight=f.kd_weight, schedule=f.schedule, optimizer=f.optimizer, seed=cfg.run.seed,
                  device=f.device, progress="finetune", task=named("generate"), checkpoint=checkpoint, log=ctx.log)
    how = f" on {f.nproc} processes ({f.sharding})" if f.nproc > 1 else ""
    ctx.log(f"  distilling the pruned decoder for {f.epochs} epochs on {len(ids)} prompts{how}")
    if f.nproc > 1:
        info = train_ddp(student, teacher, ids, labels, nproc=f.nproc, sharding=f.sharding, **kwargs)
    else:
        info = train(student, teacher, ids, labels, **kwargs)
    if info.get("resumed_at_step") is not None:
        ctx.log(f"  resumed from the checkpoint at step {info['resumed_at_step']} of {info['steps']}")
    return info


@dataclasses.dataclass
class Tried:
    """One pick of the ladder, distilled and measured."""
    rung: int
    student: object
    tok: object
    info: dict
    metrics: dict
    passed: bool
    drop: float      # exact-match points lost against the baseline


def _ladder(ctx: Context) -> list[dict]:
    """The prune stage's picks, fastest first (one, its model folder, where it recorded no ladder); checked."""
    pm = ctx.record("prune").metrics
    ladder = pm.get("ladder") or [{"folder": lm.MODEL_DIR, "widths": pm.get("widths"), "speedup": None,
                                   "meets_goal": True}]
    if not isinstance(ladder, list) or not all(isinstance(r, dict) and isinstance(r.get("folder"), str)
                                               for r in ladder):
        raise PipelineError("prune: its record's ladder is not a list of picks with a folder each; rerun prune")
    root = ctx.path("prune").resolve()
    for rung in ladder:
        folder = ctx.path("prune", rung["folder"]).resolve()
        if not folder.is_relative_to(root) or not (folder / "config.json").is_file():
            raise PipelineError(f"prune: ladder pick {rung['folder']!r} is not a model folder inside {root}; "
                                "rerun prune")
    return ladder


def finetune(ctx: Context) -> Output:
    cfg, task = ctx.cfg, named("generate")
    ladder = _ladder(ctx)
    max_drop = cfg.finetune.max_drop if has_ladder(cfg) and cfg.finetune.gate != "off" else None
    reference = ctx.record("baseline").metrics[task.metric]
    teacher, _ = lm.load_model(ctx.path("baseline", lm.MODEL_DIR))
    tried, chosen = [], None
    for k, rung in enumerate(ladder):
        student, tok = lm.load_model(ctx.path("prune", rung["folder"]))
        if len(ladder) > 1:
            ctx.log(f"  fine-tune pick {k + 1}/{len(ladder)}: widths {rung.get('widths')}, "
                    f"verified {rung.get('speedup')}x")
        info = distil(ctx, student, teacher, tok, f"rung{k}.pt")
        student.cpu().eval()
        metrics = measure_torch(ctx, student, tok)
        check = task.drop_check(metrics[task.metric], reference, math.inf if max_drop is None else max_drop)
        t = Tried(k, student, tok, info, metrics, check.passed, check.drop)
        tried.append(t)
        if t.passed:
            chosen = t
            break
        more = "backing off to a wider pick" if k + 1 < len(ladder) else "no wider pick left"
        ctx.log(f"  {task.show(metrics[task.metric])} misses the gate (drop {t.drop:.2f} > {max_drop}"
                f"{task.drop_unit}): {more}")
        if chosen is None or t.drop < chosen.drop:
            chosen = t
        tried[k] = dataclasses.replace(t, student=None, tok=None)   # only the best so far stays in memory
    lm.save_model(chosen.student, chosen.tok, ctx.out / lm.MODEL_DIR)
    return Output(metrics=_metrics(chosen, ladder, tried, task, cfg.finetune.epochs),
                  notices=_notices(chosen, ladder, task),
                  artifacts=(Artifact("pruned-torch", "torch", lm.MODEL_DIR, label="fine-tuned (torch)"),))


def _metrics(chosen: Tried, ladder: list[dict], tried: list[Tried], task, epochs: float) -> dict:
    model, info, rung = chosen.student, chosen.info, ladder[chosen.rung]
    metrics = {"task": "generate", **chosen.metrics, "epochs": epochs, "losses": info["losses"],
               "steps": info["steps"], "train_seconds": round(info["seconds"], 1),
               "widths": rung.get("widths") or lm.widths_of(model.config),
               "params": sum(p.numel() for p in model.parameters()), "weight_bytes": lm.weight_bytes(model)}
    for key in ("resumed_at_step", "world_size", "sharding"):
        if info.get(key) is not None:
            metrics[key] = info[key]
    if len(ladder) > 1:
        metrics.update(rung=chosen.rung, rung_speedup=rung.get("speedup"), rung_meets_goal=rung.get("meets_goal"),
                       tried=[{"rung": t.rung, "widths": ladder[t.rung].get("widths"),
                               "speedup": ladder[t.rung].get("speedup"), task.metric: t.metrics[task.metric],
                               "drop": round(t.drop, 4), "passed": t.passed} for t in tried])
    return metrics


def _notices(chosen: Tried, ladder: list[dict], task) -> tuple[str, ...]:
    rung = ladder[chosen.rung]
    if len(ladder) > 1 and chosen.rung and chosen.passed and rung.get("meets_goal") is False:
        return (f"the fastest pick within the accuracy gate is {rung.get('speedup')}x at "
                f"{task.show(chosen.metrics[task.metric])}, below the speed goal ({chosen.rung} narrower pick(s) "
                f"missed the gate)",)
    return ()


def quality_gate(section: str, parent: str):
    """The gate of a decoder stage: the exact-match drop against ``parent`` at most ``section.max_drop``, next-token
    agreement with the unpruned model at least decoder.min_agreement, perplexity within its ratio."""
    def check(m, inputs, cfg):
        s, d, task = getattr(cfg, section), cfg.decoder, named(m["task"])
        ref = inputs[parent].metrics
        return gates.gate(s.gate, task.drop_check(m[task.metric], ref[task.metric], s.max_drop),
                          *task.quality_checks(m, inputs["baseline"].metrics, min_agreement=d.min_agreement,
                                               max_perplexity_ratio=d.max_perplexity_ratio))
    return check


GATE_CONFIG = ("decoder.min_agreement", "decoder.max_perplexity_ratio")
