"""The VLM's baseline stage: VILA's recipe on the run's records (pipeline/vlm_train.py) — the tower pre-trained
on MNIST classes and the decoder on text (the stand-ins for VILA's pretrained CLIP and LLM), then step 1 (the
projector alone, on captions), step 2 (interleaved image-text pre-training, the decoder unfrozen) and step 3 (the
instruction mix with text-only data blended in). Saved as the VLM folder every later stage starts from, with its
figures per question type and what later gates compare with (its teacher-forced next tokens)."""
from __future__ import annotations

import numpy as np

from pipeline import gate as gates
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.stage_io import np_write
from pipeline.tasks import named
from pipeline.vlm import io

RECIPE = ("tower", "tower_factory", "tower_weights", "projector", "projector_weights", "train_counts",
          "tower_epochs", "text_steps", "text_lr", "batch_size",
          *(f"step{i}_{k}" for i in (1, 2, 3) for k in ("mix", "frozen", "steps", "lr")))


def baseline_keys(cfg):
    model = [] if cfg.model.pretrained else ["model.name", "model.kwargs"]   # your folder: its own widths
    return ["task.kind", "model.pretrained", *model, "decoder.max_new_tokens", *(f"vlm.{k}" for k in RECIPE)]


def steps_of(cfg) -> list:
    """The config's three steps as vlm_train.StepSpecs."""
    from pipeline.vlm_train import StepSpec
    v, names = cfg.vlm, ("1-projector", "2-interleaved", "3-instructions")
    return [StepSpec(names[i - 1], dict(getattr(v, f"step{i}_mix")), frozen=tuple(getattr(v, f"step{i}_frozen")),
                     steps=getattr(v, f"step{i}_steps"), lr=getattr(v, f"step{i}_lr"), batch_size=v.batch_size)
            for i in (1, 2, 3) if getattr(v, f"step{i}_steps") > 0]


def baseline(ctx: Context) -> Output:
    from pipeline.llm import lm
    from pipeline.vlm import byo
    from pipeline.vlm_train import image_bank, pixel_norm, pretrain_decoder, pretrain_tower, tower_top1, train_vila
    from pipeline.vlmdata import IMAGE_ID, build_vlm_tokenizer
    cfg, data, v = ctx.cfg, ctx.data, ctx.cfg.vlm
    # Your decoder folder brings its tokenizer (with <image>); the embedded decoder's is made from the records.
    tok = None if cfg.model.pretrained else build_vlm_tokenizer(data.train)
    vlm, tok, recipe = byo.build(cfg, tok, IMAGE_ID)
    loaded = {part: key for part, key in (("decoder", cfg.model.pretrained), ("tower", v.tower_factory),
                                          ("tower_weights", v.tower_weights),
                                          ("projector_weights", v.projector_weights)) if key}
    trained = {}
    classes = data.mnist_classes()
    if v.tower_epochs > 0:   # config_check refuses tower_epochs for data without MNIST's classes
        ctx.log(f"  pre-training the vision tower on MNIST classes for {v.tower_epochs} epochs")
        info = pretrain_tower(vlm.vision, *classes[0], epochs=v.tower_epochs, seed=cfg.run.seed, progress="tower")
        trained["tower"] = {"seconds": round(info["seconds"], 1), "top1": round(tower_top1(vlm.vision, *classes[1]), 2)}
    if v.text_steps > 0:
        ctx.log(f"  pre-training the decoder on text for {v.text_steps} steps")
        info = pretrain_decoder(vlm, tok, data.data, steps=v.text_steps, lr=v.text_lr, batch_size=v.batch_size,
                                seed=cfg.run.seed, progress="text")
        trained["text"] = {"seconds": round(info["seconds"], 1), "loss": round(info["losses"][-1], 4)}
    steps = []
    for res in train_vila(vlm, tok, data.data, steps_of(cfg), seed=cfg.run.seed, progress="vila",
                          log=lambda r: ctx.log(f"  step {r.name}: {r.seconds:.0f} s, loss {r.final_loss:.4f}")):
        steps.append({"name": res.name, "seconds": round(res.seconds, 1), "loss": round(res.final_loss, 4)})
    folder = io.save_vlm(vlm, tok, ctx.out / io.MODEL_DIR, recipe)
    metrics, answers, own_next = io.measure_torch(vlm, tok, data.test, image_bank(data.data.test_images,
                                                                                  *pixel_norm(vlm)),
                                                  None, cfg.decoder.max_new_tokens)
    np_write(ctx.out / io.TEST_NEXT, np.save, own_next)
    io.write_answers(ctx.out / io.ANSWERS, answers)
    params = {part: sum(p.numel() for p in getattr(vlm, part).parameters()) for part in ("vision", "projector",
                                                                                         "decoder")}
    metrics = {"task": "vlm", **metrics, "pretrain": trained, "loaded": loaded, "steps": steps,
               "params": sum(params.values()), "params_by_part": params,
               "size_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
               "decoder_config": lm.widths_of(vlm.decoder.config), "tower": recipe["tower"]}
    return Output(metrics=metrics, artifacts=(Artifact("baseline-torch", "torch", io.MODEL_DIR,
                                                       label="baseline VLM (torch)"),))


def baseline_gate(m, inputs, cfg):
    floor = cfg.baseline.min_top1 if cfg.baseline.min_top1 >= 0 else None
    check = named(m["task"]).baseline_check(m, floor)
    return gates.gate(cfg.baseline.gate, check) if check is not None else None
