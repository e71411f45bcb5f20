"""The decoder's fine-tune stage: the pruned model distilled from the unpruned one over [B, T, V] (KL on the answer
positions plus the labels' cross-entropy: pipeline/tasks/generate.py, pipeline/train.py's loop), then judged like
the baseline: exact-match, next-token agreement with the unpruned model, perplexity."""
from __future__ import annotations

from pipeline import gate as gates
from pipeline.llm import lm
from pipeline.llm.stage_io import measure_torch
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.tasks import named

TRAIN_KEYS = ("finetune.epochs", "finetune.lr", "finetune.batch_size", "finetune.optimizer", "finetune.schedule",
              "finetune.kd_temperature", "finetune.kd_weight", "finetune.device")


def finetune_keys(cfg):
    return [*TRAIN_KEYS, "decoder.max_new_tokens", "decoder.eval_prompts"]


def finetune(ctx: Context) -> Output:
    from pipeline.train import train
    cfg, f = ctx.cfg, ctx.cfg.finetune
    student, tok = lm.load_model(ctx.path("prune", lm.MODEL_DIR))
    teacher, _ = lm.load_model(ctx.path("baseline", lm.MODEL_DIR))
    ids, labels = lm.token_rows(tok, ctx.data.train)
    ctx.log(f"  distilling the pruned decoder for {f.epochs} epochs on {len(ids)} prompts")
    info = train(student, teacher, ids, labels, epochs=f.epochs, lr=f.lr, batch_size=f.batch_size,
                 kd_temperature=f.kd_temperature, kd_weight=f.kd_weight, schedule=f.schedule, optimizer=f.optimizer,
                 seed=cfg.run.seed, device=f.device, progress="finetune", task=named("generate"))
    student.cpu().eval()
    lm.save_model(student, tok, ctx.out / lm.MODEL_DIR)
    pm = ctx.record("prune").metrics
    metrics = {"task": "generate", **measure_torch(ctx, student, tok), "epochs": f.epochs, "losses": info["losses"],
               "train_seconds": round(info["seconds"], 1), "widths": pm["widths"], "params": pm["params"],
               "weight_bytes": pm["weight_bytes"]}
    return Output(metrics=metrics, artifacts=(Artifact("pruned-torch", "torch", lm.MODEL_DIR,
                                                       label="fine-tuned (torch)"),))


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
