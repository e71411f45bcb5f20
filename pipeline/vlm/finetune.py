"""The VLM's fine-tune stage: the pruned VLM distilled end to end from the unpruned one on the answer logits
(KL over [B, T, V] on the answer positions plus the labels' cross-entropy: the generate task's loss through
pipeline/train.py's one loop, both VLMs behind vlm_train.VLMView), on step 3's instruction mix; then judged
per question type against the unpruned VLM."""
from __future__ import annotations

from pipeline import gate as gates
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.tasks import named
from pipeline.vlm import io
from pipeline.vlm.prune import measure


def finetune_keys(cfg):
    return ["finetune.lr", "finetune.batch_size", "finetune.kd_weight", "finetune.kd_temperature", "finetune.schedule",
            "finetune.token_weight", "vlm.step3_mix", "vlm.distil_steps", "decoder.max_new_tokens"]


def finetune(ctx: Context) -> Output:
    from pipeline.vlm_train import StepSpec, image_bank, pixel_norm, train_step
    cfg, f, data = ctx.cfg, ctx.cfg.finetune, ctx.data
    student, tok = io.load_vlm(ctx.path("prune", io.MODEL_DIR))
    teacher, _ = io.load_vlm(ctx.path("baseline", io.MODEL_DIR))
    teacher.requires_grad_(False)
    spec = StepSpec("distil", dict(cfg.vlm.step3_mix), frozen=(), steps=cfg.vlm.distil_steps, lr=f.lr,
                    batch_size=f.batch_size, schedule=f.schedule)
    ctx.log(f"  distilling the pruned VLM for {spec.steps} steps of {spec.batch_size} on {dict(spec.mix)}")
    bank = image_bank(data.data.train_images, *pixel_norm(student))
    max_images = max((len(r.images) for r in data.train + data.test), default=0)
    info = train_step(student, tok, data.train, bank, spec, max_images=max_images, teacher=teacher,
                      kd_weight=f.kd_weight, kd_temperature=f.kd_temperature, token_weight=f.token_weight,
                      seed=cfg.run.seed, progress="distil")
    student.eval()
    io.save_vlm(student, tok, ctx.out / io.MODEL_DIR, io.read_recipe(ctx.path("prune", io.MODEL_DIR)))
    metrics, answers = measure(ctx, student, tok)
    io.write_answers(ctx.out / io.ANSWERS, answers)
    pm = ctx.record("prune").metrics
    metrics = {"task": "vlm", **metrics, "steps": spec.steps, "losses": info["losses"],
               "train_seconds": round(info["seconds"], 1), "pruned": pm["pruned"], "params": pm["params"],
               "params_by_part": pm["params_by_part"]}
    return Output(metrics=metrics, artifacts=(Artifact("pruned-torch", "torch", io.MODEL_DIR,
                                                       label="fine-tuned VLM (torch)"),))


def quality_gate(section: str, parent: str):
    """A VLM stage's gate: exact-match drop against ``parent`` at most ``section.max_drop`` overall AND for every
    question type; next-token agreement with the unpruned VLM at least decoder.min_agreement."""
    def check(m, inputs, cfg):
        s, d, task = getattr(cfg, section), cfg.decoder, named(m["task"])
        ref = inputs[parent].metrics
        return gates.gate(s.gate, task.drop_check(m[task.metric], ref[task.metric], s.max_drop),
                          *task.per_kind_checks(m, ref, s.max_drop),
                          *task.quality_checks(m, inputs["baseline"].metrics, min_agreement=d.min_agreement,
                                               max_perplexity_ratio=d.max_perplexity_ratio))
    return check
