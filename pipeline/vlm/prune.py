"""The VLM's prune stage: the vision tower to ``vlm.vision_macs`` of its MACs and the decoder's MLP channels and
query heads by ``prune.ratio`` / ``prune.head_ratio`` (to widths legal for the target's kernels and the INT4
group), both ranked by first-order Taylor importance on the VLM's own answer loss (pipeline/prune_vlm.py). The
decoder's hidden size is kept, so the projector's output and the KV-cache layout stay what the device expects."""
from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.vlm import io

CALIB_BATCHES, CALIB_BATCH = 8, 32     # Taylor importance: train records seen


def prune_keys(cfg):
    return ["prune.target", "prune.ratio", "prune.head_ratio", "vlm.vision_macs", "decoder.limits",
            "decoder.int4_group", "run.target", "decoder.max_new_tokens"]


def calibration_batches(vlm, tok, records, bank, seed: int):
    """VLMBatches of train records (every question type, in turn) for Taylor importance."""
    import random

    import torch

    from pipeline.prune_vlm import VLMBatch
    from pipeline.textdata import special_ids
    from pipeline.vlmdata import encode_vlm
    pad = special_ids(tok)["pad"]
    pool = list(records)
    random.Random(seed).shuffle(pool)
    out = []
    for b in range(CALIB_BATCHES):
        rows = pool[b * CALIB_BATCH:(b + 1) * CALIB_BATCH]
        if not rows:
            break
        n_img = max(len(r.images) for r in rows)
        x, y = encode_vlm(tok, rows, vlm.tokens_per_image, n_img)
        ids = torch.from_numpy(x[:, :y.shape[1]])
        index = [i for r in rows for i in r.images]
        out.append(VLMBatch(ids, torch.from_numpy(y), bank[index] if index else None,
                            (ids != pad).long()))
    return out


def prune(ctx: Context) -> Output:
    from pipeline.llm.prune import _by_ratio, limits_target
    from pipeline.prune_decoder import decoder_widths, legal_widths
    from pipeline.prune_vlm import prune_vlm
    from pipeline.vlm_train import image_bank, pixel_norm
    cfg, data, p = ctx.cfg, ctx.data, ctx.cfg.prune
    if p.target != "ratio":
        raise PipelineError(f"prune.target = {p.target!r}: a VLM prunes its decoder by ratio (prune.ratio, "
                            "prune.head_ratio) and its tower by vlm.vision_macs")
    vlm, tok = io.load_vlm(ctx.path("baseline", io.MODEL_DIR))
    target, group = limits_target(cfg), cfg.decoder.int4_group
    widths = None
    if p.ratio > 0 or p.head_ratio > 0:
        candidates = legal_widths(vlm.decoder, target, int4_group=group)
        if not candidates:
            raise PipelineError(f"prune: no decoder widths are legal for {target} with INT4 group {group} "
                                f"({decoder_widths(vlm.decoder)})")
        widths = _by_ratio(decoder_widths(vlm.decoder), candidates, p.ratio, p.head_ratio)
    train_bank = image_bank(data.data.train_images, *pixel_norm(vlm))
    batches = calibration_batches(vlm, tok, data.train, train_bank, cfg.run.seed)
    ctx.log(f"  pruning the tower to {cfg.vlm.vision_macs:.0%} of its MACs and the decoder to "
            f"{widths.config_dict() if widths else 'its widths'}")
    vlm, info = prune_vlm(vlm, vision_macs=cfg.vlm.vision_macs if cfg.vlm.vision_macs < 1 else None,
                          vision_ratio=0.0 if cfg.vlm.vision_macs >= 1 else None, decoder_widths=widths,
                          batches=batches, target=target, int4_group=group, seed=cfg.run.seed)
    io.save_vlm(vlm, tok, ctx.out / io.MODEL_DIR, io.read_recipe(ctx.path("baseline", io.MODEL_DIR)))
    metrics, answers = measure(ctx, vlm, tok)
    io.write_answers(ctx.out / io.ANSWERS, answers)
    record = info.to_json()
    record.pop("history", None)
    metrics = {"task": "vlm", **metrics, "pruned": record, "limits": target,
               "params": sum(p.numel() for p in vlm.parameters()),
               "params_by_part": {"vision+projector": info.vision_params_after, "decoder": info.decoder_params_after}}
    return Output(metrics=metrics, artifacts=(Artifact("pruned-torch", "torch", io.MODEL_DIR,
                                                       label="pruned VLM (torch)"),))


def measure(ctx: Context, vlm, tok):
    """(figures, greedy answers) of a torch VLM on the held-out records, against the baseline's next tokens."""
    import numpy as np

    from pipeline.vlm_train import image_bank, pixel_norm
    metrics, answers, _ = io.measure_torch(vlm, tok, ctx.data.test, image_bank(ctx.data.data.test_images,
                                                                               *pixel_norm(vlm)),
                                           np.load(ctx.path("baseline", io.TEST_NEXT)), ctx.cfg.decoder.max_new_tokens)
    return metrics, answers
