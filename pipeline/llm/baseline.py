"""The decoder's baseline stage: the embedded decoder trained from scratch on the run's prompts, or a Hugging Face
folder loaded as it is (`model.pretrained`), saved as the model folder every later stage starts from; its figures
on the held-out prompts, and what later gates compare with: its teacher-forced next tokens, and its own greedy
answers (the reference of exact-match when the data has no answers)."""
from __future__ import annotations

import numpy as np

from edgerun.io import write_json
from pipeline import gate as gates
from pipeline.llm import lm
from pipeline.llm.stage_io import ANSWERS
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.stage_io import np_write
from pipeline.tasks import named


def baseline_keys(cfg):
    keys = ["task.kind", "model.pretrained", "decoder.max_new_tokens", "decoder.eval_prompts"]
    if cfg.model.pretrained:
        return keys
    return [*keys, "model.name", "model.kwargs", "baseline.epochs", "baseline.lr", "baseline.batch_size",
            "baseline.schedule"]


def baseline(ctx: Context) -> Output:
    cfg, data = ctx.cfg, ctx.data
    if cfg.model.pretrained:
        from pipeline.data import resolve_root
        model, tok = lm.load_model(resolve_root(cfg.model.pretrained))
        trained = {"pretrained": cfg.model.pretrained}
    else:
        model, tok, trained = _train_from_scratch(ctx)
    folder, c = lm.save_model(model, tok, ctx.out / lm.MODEL_DIR), model.config
    ids, labels = lm.token_rows(tok, data.test)
    logits = lm.torch_logits(model, ids)
    teacher_next = lm.next_tokens(logits)
    np_write(ctx.out / lm.TEST_NEXT, np.save, teacher_next)
    answers = lm.torch_answers(model, tok, data.test, cfg.decoder.max_new_tokens)
    write_json(ctx.out / ANSWERS, answers)
    reference = None if data.has_answers else answers
    metrics = {"task": "generate", **lm.measure(logits, answers, data.test, labels, teacher_next, reference),
               "answers": "labels" if data.has_answers else "the unpruned model's greedy answers",
               "params": sum(p.numel() for p in model.parameters()), "weight_bytes": lm.weight_bytes(model),
               "size_bytes": sum(f.stat().st_size for f in folder.iterdir()), **trained,
               "config": {**lm.widths_of(model.config), "vocab_size": c.vocab_size, "model_type": c.model_type}}
    return Output(metrics=metrics, artifacts=(Artifact("baseline-torch", "torch", lm.MODEL_DIR,
                                                       label="baseline (torch)"),))


def _train_from_scratch(ctx: Context):
    from pipeline.models.decoder import build_decoder
    from pipeline.textdata import build_tokenizer
    from pipeline.train import train
    cfg, data = ctx.cfg, ctx.data
    tok = build_tokenizer([f"{r['prompt']} {r.get('answer', '')}" for r in data.train])
    model = build_decoder(tok.get_vocab_size(), special=lm.specials(tok), seed=cfg.run.seed, **cfg.model.kwargs)
    ids, labels = lm.token_rows(tok, data.train)
    b = cfg.baseline
    ctx.log(f"  training the decoder ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) for "
            f"{b.epochs} epochs on {len(ids)} prompts")
    info = train(model, None, ids, labels, epochs=b.epochs, lr=b.lr, batch_size=b.batch_size, seed=cfg.run.seed,
                 schedule=b.schedule, progress="baseline", task=named("generate"))
    return model, tok, {"epochs": b.epochs, "losses": info["losses"], "train_seconds": round(info["seconds"], 1)}


def baseline_gate(m, inputs, cfg):
    floor = cfg.baseline.min_top1 if cfg.baseline.min_top1 >= 0 else None   # the floor in the task's metric
    check = named(m["task"]).baseline_check(m, floor)
    return gates.gate(cfg.baseline.gate, check) if check is not None else None
