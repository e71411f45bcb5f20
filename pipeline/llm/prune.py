"""The decoder's prune stage: MLP channels and whole query heads chosen by first-order Taylor importance on the
task's own loss, to widths the target's kernels accept (edgerun/llm_limits.json), picked by measured decode time.

``prune.target = "ratio"``: ``prune.ratio`` of the MLP channels and ``prune.head_ratio`` of the query heads go
(rounded down to legal widths). ``"speedup"``: the widest legal widths whose decode step (one token after
``decoder.decode_past`` cached, batch 1, onnxruntime CPU, FP32) is at least ``prune.speedup`` times faster than
the unpruned model's, measured interleaved on exported files; none fast enough: the fastest measured, with a
notice. The speed that ships also depends on INT4 (the quantize stage) and is measured by the profile stage.
"""
from __future__ import annotations

import copy
import tempfile
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
            "decoder.eval_prompts"]
    if cfg.prune.target == "speedup":
        return [*keys, "prune.speedup", "decoder.decode_past", "prune.latency_threads"]
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
    if cfg.prune.target == "ratio" and cfg.prune.ratio == 0 and cfg.prune.head_ratio == 0:
        return _unpruned(ctx, model, tok)   # any family, a layout the pruner cannot rewrite (Phi-3's) included
    target, group = limits_target(cfg), cfg.decoder.int4_group
    ids, labels = lm.token_rows(tok, data.train[:CALIB_BATCHES * CALIB_BATCH])
    importance = taylor_importance(model, _lm_loss, _batches(ids, labels))
    candidates = legal_widths(model, target, int4_group=group)
    if not candidates:
        raise PipelineError(f"prune: no widths of this model are legal for {target} with INT4 group {group} "
                            f"({decoder_widths(model)})")
    notices, search = [], None
    if cfg.prune.target == "speedup":
        widths, search = _search(ctx, model, importance, candidates, target)
        if search["speedup"] < cfg.prune.speedup:
            notices.append(f"no legal widths reach {cfg.prune.speedup}x decode speed in FP32; the fastest "
                           f"measured ({search['speedup']:.2f}x) is kept")
    elif cfg.prune.target == "ratio":
        widths = _by_ratio(decoder_widths(model), candidates, cfg.prune.ratio, cfg.prune.head_ratio)
    else:
        raise PipelineError(f"prune.target = {cfg.prune.target!r}: a decoder prunes by ratio or speedup")
    prune_decoder(model, widths, importance, target=target, int4_group=group)
    lm.save_model(model, tok, ctx.out / lm.MODEL_DIR)
    write_json(ctx.out / "widths.json", widths.config_dict())
    metrics = {"task": "generate", **measure_torch(ctx, model, tok), "widths": widths.config_dict(),
               "limits": target, "params": sum(p.numel() for p in model.parameters()),
               "weight_bytes": lm.weight_bytes(model), "importance": importance.kind,
               **({"search": search} if search else {})}
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
    """Bisection over the candidates ordered by size (decode time grows with the weights read per token)."""
    from edgerun.decode_timing import open_decoder_runs
    from edgerun.timing import compare
    from export.decoder import export_decoder
    from pipeline.prune_decoder import prune_decoder
    cfg = ctx.cfg
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
        lo, hi = 0, len(ordered) - 1          # find the first (widest) index that reaches the goal
        if speedup(hi) < cfg.prune.speedup:
            pick = hi
        else:
            while lo < hi:
                mid = (lo + hi) // 2
                if speedup(mid) >= cfg.prune.speedup:
                    hi = mid
                else:
                    lo = mid + 1
            pick = hi
    return ordered[pick], {"speedup": measured[pick], "measured": {
        str(ordered[i].config_dict()): s for i, s in sorted(measured.items())}, "workload": "decode",
        "decode_past": cfg.decoder.decode_past, "threads": cfg.prune.latency_threads}


