"""Stage 2, prune: the baseline narrowed to a ratio, a MAC budget or a measured latency goal
(pipeline.prune), or to widths replayed from an earlier pick (``prune.widths``/``prune.from_record``).

Under a latency goal the stage also writes the back-off ladder: the pick, then wider picks, each
verified with the timing protocol and saved in ``rung<k>/``, which the fine-tune stage tries in turn
when a pick cannot be distilled back within its accuracy gate (pipeline.finetune_stage).
"""
from __future__ import annotations

import json

from edgerun.io import write_json
from pipeline import modelio
from pipeline.data import resolve_root
from pipeline.errors import PipelineError
from pipeline.finetune_stage import FINETUNE_TRAIN_KEYS, finetune_model
from pipeline.runner import Context, Output
from pipeline.stage_io import (
    SHIPPED_EXPORT_KEYS,
    load_baseline,
    model_keys,
    pruned_counts,
    replaying,
    shipped_exporter,
    task_of,
    teacher_outputs,
)

_LATENCY_KEYS = ("prune.latency_batch", "prune.latency_threads", "prune.goal", "prune.search_budget_s",
                 "prune.backoff")
PRUNE_TARGET_KEYS = {"ratio": ("prune.ratio", "prune.global_pruning"), "macs": ("prune.macs", "prune.global_pruning"),
                     "latency_ms": ("prune.latency_ms", *_LATENCY_KEYS), "speedup": ("prune.speedup", *_LATENCY_KEYS)}
TAYLOR_IMAGES = 512   # images whose gradients rank channels for Taylor importance


def prune_keys(cfg):
    p = cfg.prune
    keys = [*model_keys(cfg), "prune.target", "prune.importance", "prune.max_layer_ratio", "prune.iterative_steps",
            "prune.ignored_layers", "prune.widths", "prune.from_record"]
    if not replaying(cfg):   # replayed widths decide everything the target would have
        keys += ["prune.round_to", "prune.head_ratio", *PRUNE_TARGET_KEYS[p.target]]
        if p.round_to == 0 or p.target in ("latency_ms", "speedup"):   # auto rounding / which runtime to time on
            keys.append("run.target")
        if p.target in ("latency_ms", "speedup"):   # verification times the shipped exporter's graphs
            keys += SHIPPED_EXPORT_KEYS
    if p.iterative_steps > 1:
        keys.append("finetune.between_steps_epochs")
        if cfg.finetune.between_steps_epochs > 0:
            keys += FINETUNE_TRAIN_KEYS
    return keys


def replay_widths(cfg) -> dict[str, int] | None:
    """The widths to replay: ``prune.widths``, or those a record or widths.json names (``prune.from_record``)."""
    p = cfg.prune
    if p.widths:
        return {str(k): int(v) for k, v in p.widths.items()}
    if not p.from_record:
        return None
    path = resolve_root(p.from_record)
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"prune.from_record: cannot read {path} as JSON ({type(e).__name__}: {e})") from None
    found = d.get("widths") if isinstance(d, dict) else None
    if found is None and isinstance(d, dict) and isinstance(d.get("metrics"), dict):
        found = d["metrics"].get("widths")
    if not isinstance(found, dict) or not found or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in found.values()):
        raise PipelineError(f"prune.from_record: {path} holds no widths (expected a widths.json or a prune/finetune "
                            "stage.json with metrics.widths: {group: kept width >= 1})")
    return {str(k): int(v) for k, v in found.items()}


def prune(ctx: Context) -> Output:
    from pipeline.prune import LATENCY_TARGETS, latency_backend, prune_model, resolve_round_to, save_pruned
    from pipeline.prune_latency import SearchOptions
    cfg, data, p = ctx.cfg, ctx.data, ctx.cfg.prune
    model = load_baseline(ctx)
    widths = replay_widths(cfg)
    target_args, round_to = {}, 1
    if widths is None:
        target_args = {k.split(".")[1]: getattr(p, k.split(".")[1]) for k in PRUNE_TARGET_KEYS[p.target]
                       if k.split(".")[1] not in ("goal", "search_budget_s", "backoff")}
        target_args["head_ratio"] = p.head_ratio
        round_to = resolve_round_to(p.round_to, cfg.run.target if p.round_to == 0 else "")
        if p.target in LATENCY_TARGETS:
            shipped = shipped_exporter(cfg)   # verified speeds are those of the graph the export stage writes
            target_args.update(latency_runtime=latency_backend(cfg.run.target), log=ctx.log,
                               search=SearchOptions(goal=p.goal, budget_s=p.search_budget_s, backoff=p.backoff,
                                                    export=shipped))
    between = None
    if p.iterative_steps > 1 and cfg.finetune.between_steps_epochs > 0:
        teacher = load_baseline(ctx)

        def between(step, m):
            ctx.log(f"  fine-tune between steps ({step + 1}/{p.iterative_steps - 1})")
            finetune_model(ctx, m, teacher, epochs=cfg.finetune.between_steps_epochs, early_stop=False)
    taylor = None
    if p.importance == "taylor":
        import torch
        n = min(len(data.train.labels), TAYLOR_IMAGES)
        xs, ys = torch.from_numpy(data.x_train[:n]), torch.from_numpy(data.train.labels[:n])
        taylor = [(xs[i:i + 64], ys[i:i + 64]) for i in range(0, n, 64)]
    model, info = prune_model(model, modelio.example_input(cfg.data), target=p.target, importance=p.importance,
                              round_to=round_to, max_layer_ratio=p.max_layer_ratio,
                              iterative_steps=p.iterative_steps, ignored_layers=p.ignored_layers,
                              between_steps=between, taylor_batches=taylor,
                              taylor_loss=task_of(ctx).importance_loss, seed=cfg.run.seed, widths=widths,
                              **target_args)
    save_pruned(model, info["history"], ctx.out)
    ladder = _save_ladder(ctx, info)
    task = task_of(ctx)
    metrics = {"task": task.kind,
               **task.metrics(modelio.torch_outputs(model, data.x_test), data.test.labels, teacher_outputs(ctx))}
    counts = pruned_counts(ctx, model)
    base = ctx.record("baseline").metrics
    metrics.update(**counts, params_reduction=round(base["params"] / counts["params"], 3), round_to_used=round_to,
                   **{k: info.get(k) for k in ("ratio_used", "channels", "heads", "unwrapped", "latency_search",
                                               "widths_source") if k in info})
    notices = ()
    if ladder:
        search = info["latency_search"]
        metrics.update(widths=search["widths"], ladder=ladder)
        notices = search["notes"]
    elif widths is not None:
        metrics["widths"] = widths
    if "widths" in metrics:   # what `--set prune.from_record=...` replays
        write_json(ctx.out / "widths.json", {"widths": metrics["widths"], "source": info.get("widths_source")})
    if "latency_tables" in info:   # the measured tables are part of the stage's output
        write_json(ctx.out / "latency_table.json", {"search": info["latency_search"], "tables": info["latency_tables"]})
    return Output(metrics=metrics, notices=tuple(notices))


def _save_ladder(ctx: Context, info: dict) -> list[dict]:
    """The pick (this folder) and each back-off rung (``rung<k>/``), with their verified speedups."""
    from pipeline.prune import save_pruned
    search = info.get("latency_search")
    if not search:
        return []
    ladder = []
    for k, rung in enumerate(search["ladder"]):
        folder = ""
        if k:
            folder = f"rung{k}"
            widths, model, history = info["rungs"][k - 1]
            save_pruned(model, history, ctx.out / folder)
        ladder.append({"folder": folder, "widths": rung["widths"], "speedup": rung["speedup"],
                       "p10_p90": rung["p10_p90"], "meets_goal": rung["meets_goal"]})
    return ladder
