"""The decoder's prune stage: MLP channels and whole query heads chosen by first-order Taylor importance on the
task's own loss, to widths the target's kernels accept (edgerun/llm_limits.json), picked by measured decode time.

``prune.target = "ratio"``: ``prune.ratio`` of the MLP channels and ``prune.head_ratio`` of the query heads go
(rounded down to legal widths). ``"speedup"``: the widest legal widths whose decode step (one token after
``decoder.decode_past`` cached, batch 1, onnxruntime CPU, FP32) is at least ``prune.speedup`` times faster than
the unpruned model's, measured interleaved on exported files; none fast enough: the fastest measured, with a
notice. The speed that ships also depends on INT4 (the quantize stage) and is measured by the profile stage.

Measured decode speed is not monotonic in the candidates' size order (a narrower MLP can time slower than a wider
one), so the bisection only chooses what to measure: the pick is the widest *measured* candidate at the goal.
``prune.backoff`` > 0 keeps that many wider rungs beside it (``rung{k}/model``), for the fine-tune stage to fall
back on when the pick misses its accuracy gate: the next-wider legal candidates, each measured in the same search
(the legal grid is coarse -- multiples of the INT4 group times whole heads per KV head -- so its next steps are the
smallest give-backs there are; a fixed 1.18x step would often land between two legal widths), keeping only those
faster than every wider one (a rung that a wider, at-least-as-fast candidate beats is of no use to fall back on).
The metrics' ``ladder`` lists the pick and its rungs, fastest first.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgerun.io import write_json
from pipeline.errors import PipelineError
from pipeline.llm import lm
from pipeline.llm.stage_io import measure_torch
from pipeline.records import Artifact
from pipeline.runner import Context, Output

CALIB_BATCHES, CALIB_BATCH = 8, 32     # Taylor importance: train rows seen (scores settle well before)
SEARCH_ROUNDS = 9                      # interleaved rounds per measured pick (a decode step is ms)


def prune_keys(cfg):
    keys = ["prune.target", "decoder.limits", "decoder.int4_group", "run.target", "decoder.max_new_tokens",
            "decoder.eval_prompts", "decoder.keep_layers"]
    if cfg.prune.target == "speedup":
        return [*keys, "prune.speedup", "decoder.decode_past", "prune.latency_threads", "prune.backoff"]
    return [*keys, "prune.ratio", "prune.head_ratio"]


def limits_target(cfg) -> str:
    """Whose kernel limits the widths keep to: decoder.limits, or the run's target."""
    if cfg.decoder.limits != "auto":
        return cfg.decoder.limits
    return {"cpu": "ort-cpu", "desktop-gpu": "trt-desktop", "jetson-orin": "jetson-orin"}[cfg.run.target]


def prune(ctx: Context) -> Output:
    from pipeline.prune_decoder import decoder_widths, legal_widths, prune_decoder, taylor_importance
    cfg, data = ctx.cfg, ctx.data
    model, tok = lm.load_model(ctx.path("baseline", lm.MODEL_DIR))
    if cfg.prune.target == "ratio" and cfg.prune.ratio == 0 and cfg.prune.head_ratio == 0 and not \
            cfg.decoder.keep_layers:
        return _unpruned(ctx, model, tok)   # any family, a layout the pruner cannot rewrite (Phi-3's) included
    target, group = limits_target(cfg), cfg.decoder.int4_group
    ids, labels = lm.token_rows(tok, data.train[:CALIB_BATCHES * CALIB_BATCH])
    importance = taylor_importance(model, _lm_loss, _batches(ids, labels))
    keep = cfg.decoder.keep_layers
    if keep > decoder_widths(model).layers:
        raise PipelineError(f"decoder.keep_layers = {keep}: the model has {decoder_widths(model).layers} layers")
    candidates = legal_widths(model, target, int4_group=group, layers=keep or None)
    if not candidates:
        raise PipelineError(f"prune: no widths of this model are legal for {target} with INT4 group {group} "
                            f"({decoder_widths(model)})")
    notices, search, rungs = [], None, []
    if cfg.prune.target == "speedup":
        widths, rungs, search = _search(ctx, model, importance, candidates, target)
        if search["speedup"] < cfg.prune.speedup:
            notices.append(f"no legal widths reach {cfg.prune.speedup}x decode speed in FP32; the fastest "
                           f"measured ({search['speedup']:.2f}x) is kept")
    elif cfg.prune.target == "ratio":
        widths = _by_ratio(decoder_widths(model), candidates, cfg.prune.ratio, cfg.prune.head_ratio)
    else:
        raise PipelineError(f"prune.target = {cfg.prune.target!r}: a decoder prunes by ratio or speedup")
    ladder = _save_rungs(ctx, model, tok, rungs, importance, target) if rungs else []
    prune_decoder(model, widths, importance, target=target, int4_group=group)
    lm.save_model(model, tok, ctx.out / lm.MODEL_DIR)
    if search and cfg.prune.backoff > 0:
        ladder = [LadderRung(lm.MODEL_DIR, lm.widths_of(model.config), search["speedup"],
                             search["speedup"] >= cfg.prune.speedup), *ladder]
    write_json(ctx.out / "widths.json", widths.config_dict())
    metrics = {"task": "generate", **measure_torch(ctx, model, tok), "widths": widths.config_dict(),
               "limits": target, "params": sum(p.numel() for p in model.parameters()),
               "weight_bytes": lm.weight_bytes(model), "importance": importance.kind,
               **({"search": search} if search else {}),
               **({"ladder": [r.to_json() for r in ladder]} if ladder else {})}
    return Output(metrics=metrics, notices=tuple(notices),
                  artifacts=(Artifact("pruned-torch", "torch", lm.MODEL_DIR, label="pruned (torch)"),))


def _unpruned(ctx: Context, model, tok) -> Output:
    lm.save_model(model, tok, ctx.out / lm.MODEL_DIR)
    widths = lm.widths_of(model.config)
    write_json(ctx.out / "widths.json", widths)
    metrics = {"task": "generate", **measure_torch(ctx, model, tok), "widths": widths, "limits": limits_target(ctx.cfg),
               "params": sum(p.numel() for p in model.parameters()), "weight_bytes": lm.weight_bytes(model),
               "importance": "none (prune.ratio = 0: widths kept)"}
    return Output(metrics=metrics, notices=("prune.ratio = 0 and prune.head_ratio = 0: the widths are kept",),
                  artifacts=(Artifact("pruned-torch", "torch", lm.MODEL_DIR, label="unpruned (torch)"),))


def _lm_loss(model, batch):
    from pipeline.lm_loss import lm_loss
    ids, labels = batch
    return lm_loss(model(ids).logits, labels)


def _batches(ids, labels):
    import torch
    for i in range(0, len(ids), CALIB_BATCH):
        yield torch.from_numpy(ids[i:i + CALIB_BATCH]), torch.from_numpy(labels[i:i + CALIB_BATCH])


def _by_ratio(now, candidates, ratio: float, head_ratio: float):
    """The widest legal widths at or below the asked fractions (MLP channels and query heads kept)."""
    inter, heads = now.intermediate * (1 - ratio), now.q_heads * (1 - head_ratio)
    fits = [w for w in candidates if w.intermediate <= inter + 1e-9 and w.q_heads <= heads + 1e-9]
    if not fits:
        raise PipelineError(f"prune.ratio = {ratio}, prune.head_ratio = {head_ratio}: no legal widths are that "
                            f"narrow (narrowest: {candidates[-1].config_dict()})")
    return max(fits, key=lambda w: (w.intermediate * w.q_heads, w.intermediate))


def _search(ctx: Context, model, importance, candidates, target):
    """(pick, rungs, search record): a bisection over the candidates ordered by size (decode time grows with the
    weights read per token) chooses what to measure; ``_choose`` picks among what was measured."""
    from edgerun.decode_timing import open_decoder_runs
    from edgerun.timing import compare
    from export.decoder import export_decoder
    from pipeline.prune_decoder import prune_decoder
    cfg = ctx.cfg
    goal, backoff = cfg.prune.speedup, cfg.prune.backoff
    ordered = sorted(candidates, key=lambda w: -(w.intermediate * 3 + w.q_heads * w.head_dim * 2))
    measured: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgepipe_decoder_search_") as tmp:
        base = Path(tmp) / "unpruned.onnx"
        export_decoder(model, base)

        def speedup(i: int) -> float:
            if i not in measured:
                pruned = prune_decoder(copy.deepcopy(model), ordered[i], importance, target=target,
                                       int4_group=cfg.decoder.int4_group)
                path = Path(tmp) / f"pick{i}.onnx"
                export_decoder(pruned, path)
                runs, close = open_decoder_runs({"unpruned": str(base), "pick": str(path)}, "decode",
                                                cfg.decoder.decode_past, cfg.prune.latency_threads)
                try:
                    c = compare(runs, reference="unpruned", rounds=SEARCH_ROUNDS)
                finally:
                    close()
                measured[i] = round(1.0 / c.ratio("pick").median, 3)
                path.unlink()
                ctx.log(f"  decode speed of {ordered[i].config_dict()}: {measured[i]:.2f}x")
            return measured[i]
        lo, hi = 0, len(ordered) - 1          # the bisection's guess at the first (widest) index at the goal
        if speedup(hi) >= goal:
            while lo < hi:
                mid = (lo + hi) // 2
                if speedup(mid) >= goal:
                    hi = mid
                else:
                    lo = mid + 1
        # the next-wider candidates of the pick are measured too (the rungs, and a check on the bisection's
        # assumption: one of them at the goal moves the pick there); bounded, as each pass measures new ones
        pick = _choose(measured, goal, backoff)[0]
        for _ in range(len(ordered)):      # each pass measures new candidates or stops
            for i in range(pick - 1, max(pick - 1 - backoff, -1), -1):
                speedup(i)
            moved = _choose(measured, goal, backoff)[0]
            if moved == pick:
                break
            pick = moved
        pick, rungs = _choose(measured, goal, backoff)
    record = {"speedup": measured[pick], "measured": {str(ordered[i].config_dict()): s
                                                      for i, s in sorted(measured.items())},
              "workload": "decode", "decode_past": cfg.decoder.decode_past, "threads": cfg.prune.latency_threads}
    return ordered[pick], [(ordered[i], measured[i], measured[i] >= goal) for i in rungs], record


def _choose(measured: dict[int, float], goal: float, backoff: int) -> tuple[int, list[int]]:
    """(pick, rungs) among measured candidates (index: size order, 0 the widest; value: measured speedup).

    The pick: the widest measured at the goal, else the fastest measured. The rungs: up to ``backoff`` measured
    candidates wider than the pick, nearest first, each slower than the one before it (a candidate that a wider
    one at least as fast beats is skipped), so the ladder is fastest first and progressively wider."""
    at_goal = [i for i in measured if measured[i] >= goal]
    pick = min(at_goal) if at_goal else max(measured, key=lambda i: (measured[i], -i))
    wider = sorted((i for i in measured if i < pick), reverse=True)
    undominated = [i for i in wider if all(measured[j] < measured[i] for j in measured if j < i)]
    return pick, [i for i in undominated if measured[i] < measured[pick]][:backoff]


@dataclass(frozen=True)
class LadderRung:
    """One entry of the prune metrics' ``ladder`` (the fine-tune stage's fall-back contract)."""
    folder: str          # the model folder, relative to the prune stage's output
    widths: dict         # lm.widths_of of the pruned model
    speedup: float       # measured FP32 decode speedup against the unpruned model
    meets_goal: bool

    def to_json(self) -> dict:
        return {"folder": self.folder, "widths": self.widths, "speedup": float(self.speedup),
                "meets_goal": bool(self.meets_goal)}


def _save_rungs(ctx: Context, model, tok, rungs, importance, target) -> list[LadderRung]:
    """Each rung pruned from the unpruned model with the same importance, saved as ``rung{k}/model``."""
    from pipeline.prune_decoder import prune_decoder
    out = []
    for k, (widths, speedup, meets) in enumerate(rungs, 1):
        pruned = prune_decoder(copy.deepcopy(model), widths, importance, target=target,
                               int4_group=ctx.cfg.decoder.int4_group)
        folder = f"rung{k}/{lm.MODEL_DIR}"
        lm.save_model(pruned, tok, ctx.out / folder)
        out.append(LadderRung(folder, lm.widths_of(pruned.config), speedup, meets))
        ctx.log(f"  rung {k}: {widths.config_dict()} ({speedup:.2f}x)")
    return out
