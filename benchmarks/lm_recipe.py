"""Train the embedded default decoder from scratch on the synthetic number task and report held-out exact-match.

    python -m benchmarks.lm_recipe                     # the default recipe
    python -m benchmarks.lm_recipe --steps 600 --train-prompt --json out.json

AdamW (betas 0.9/0.95, weight decay on matrices only) with linear warmup then cosine decay to a tenth,
gradient clipping, fixed-size batches drawn in a seeded order, the loss on the answer only (training the
prompt too learnt slower). A learning rate much above the default stalls the 50 MB decoder on a plateau (it
gets the tens word, not the units) where a narrower model trains fine: lower it, not raise it, when a run
stalls. Exact-match (greedy, held-out prompts) is measured every ``--eval-every`` steps, so one run gives the curve of
exact-match against minutes. ``--minutes`` stops a run early at a time budget (the last point is reported).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from pipeline.lm_loss import exact_match_percent, generate_answers, lm_loss
from pipeline.models.decoder import DEFAULT, build_decoder, save_decoder, weight_bytes
from pipeline.textdata import SKILLS, build_tokenizer, encode, number_task, skill_of, special_ids


def lr_at(step: int, total: int, warmup: int, lr: float, floor: float = 0.1) -> float:
    """Linear warmup to ``lr``, then cosine down to ``floor * lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def evaluate(model, tok, test, max_new_tokens=4) -> tuple[float, dict]:
    """Exact-match on ``test``, overall and per skill."""
    preds = generate_answers(model, tok, [r["prompt"] for r in test], max_new_tokens=max_new_tokens)
    per = {}
    for skill in SKILLS:
        idx = [i for i, r in enumerate(test) if skill_of(r["prompt"]) == skill]
        per[skill] = round(exact_match_percent([preds[i] for i in idx], [test[i]["answer"] for i in idx]), 1)
    return exact_match_percent(preds, [r["answer"] for r in test]), per


def prune_check(model, tok, test, fractions=(0.25, 0.5, 0.75)) -> dict:
    """Exact-match after removing the weakest ``fraction`` of every layer's MLP channels (zeroing a channel's
    gate and up rows removes it exactly; weakest: smallest down-projection column norm), on copies of the
    model: whether the task notices a model pruned too far. No fine-tuning after the cut."""
    import copy
    out = {}
    for f in fractions:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for layer in m.model.layers:
                mlp = layer.mlp
                drop = mlp.down_proj.weight.norm(dim=0).argsort()[:int(f * mlp.down_proj.in_features)]
                mlp.gate_proj.weight[drop] = 0
                mlp.up_proj.weight[drop] = 0
        out[str(f)] = round(evaluate(m, tok, test)[0], 2)
    return out


def run(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train, test = number_task(seed=args.seed, n_train=args.steps * args.batch, n_test=args.n_test)
    tok = build_tokenizer([r["prompt"] + " " + r["answer"] for r in train])
    sizes = {k: getattr(args, k) for k in DEFAULT}
    model = build_decoder(tok.get_vocab_size(), special=special_ids(tok), seed=args.seed, **sizes)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    curve, t0, step = [], time.perf_counter(), 0
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        b = encode(tok, train[step * args.batch:(step + 1) * args.batch], train_prompt=args.train_prompt)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = lm_loss(logits, b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        minutes = (time.perf_counter() - t0) / 60
        last = step + 1 == args.steps or minutes >= args.minutes
        if (step + 1) % args.eval_every == 0 or last:
            em, per = evaluate(model, tok, test)
            curve.append({"step": step + 1, "minutes": round((time.perf_counter() - t0) / 60, 2),
                          "loss": round(float(loss), 4), "exact_match": round(em, 2), "per_skill": per})
            print(json.dumps(curve[-1]), flush=True)
        if last:
            break
    if args.save:
        save_decoder(model, tok, args.save)
    pruned = prune_check(model, tok, test) if args.prune_check else None
    return {"exact_match": curve[-1]["exact_match"], "mlp_pruned_exact_match": pruned,
            "minutes": curve[-1]["minutes"], "steps": step + 1,
            "params": sum(p.numel() for p in model.parameters()), "fp32_mb": round(weight_bytes(model) / 1e6, 2),
            "vocab": tok.get_vocab_size(), "n_test": len(test), "args": vars(args), "curve": curve,
            "load_average": os.getloadavg()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--train-prompt", action="store_true", help="train the prompt tokens too (default: answer only)")
    ap.add_argument("--minutes", type=float, default=10.0, help="stop at this time budget")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    # One thread: on a machine shared with other jobs two threads wait on each other (measured slower)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--save", help="write the trained model here (a Hugging Face folder)")
    ap.add_argument("--prune-check", action="store_true", help="then exact-match with MLP channels removed")
    for k, v in DEFAULT.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    args = ap.parse_args(argv)
    out = run(args)
    print(f"exact-match {out['exact_match']:.2f} % on {out['n_test']} held-out prompts after {out['steps']} steps, "
          f"{out['minutes']:.2f} min; {out['params']} params, {out['fp32_mb']} MB FP32; "
          f"load average {out['load_average'][0]:.2f}")
    if args.json:
        from edgerun.io import write_json
        write_json(args.json, out)


if __name__ == "__main__":
    main()
