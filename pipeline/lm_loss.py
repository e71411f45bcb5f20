"""The generate task's training and scoring pieces, on a causal LM's [B, T, V] logits.

Labels follow pipeline.textdata.encode: the input_ids with IGNORE (-100) where nothing is trained (the
prompt, padding). Position t's logits predict token t + 1, so every function shifts once: logits[:, :-1]
against labels[:, 1:]; "answer positions" are the shifted labels that are not IGNORE.
"""
from __future__ import annotations

from pipeline.textdata import IGNORE, special_ids


def answer_positions(logits, labels):
    """(logits [N, V], targets [N]) at the answer positions, flattened."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE
    return logits[keep], labels[keep]


def lm_loss(logits, labels):
    """Mean next-token cross-entropy over the answer positions."""
    import torch.nn.functional as F
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def lm_kd_loss(student_logits, teacher_logits, labels, temperature: float = 1.0, kd_weight: float = 0.5):
    """kd_weight * T^2 * KL(teacher/T || student/T) per answer position (the whole vocabulary) plus
    (1 - kd_weight) * lm_loss. The teacher's logits are taken as given (no gradient)."""
    import torch.nn.functional as F
    s, _ = answer_positions(student_logits.float(), labels)
    t, _ = answer_positions(teacher_logits.detach().float(), labels)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean")
    return kd_weight * temperature ** 2 * kl + (1 - kd_weight) * lm_loss(student_logits, labels)


def next_token_agreement(student_logits, teacher_logits, labels) -> float:
    """Percent of answer positions where the student's greedy next token is the teacher's (teacher-forced)."""
    s, _ = answer_positions(student_logits, labels)
    t, _ = answer_positions(teacher_logits, labels)
    return 100.0 * float((s.argmax(-1) == t.argmax(-1)).float().mean()) if len(s) else 0.0


def perplexity(logits, labels) -> float:
    """exp of lm_loss: the answer tokens' perplexity."""
    import math
    return math.exp(float(lm_loss(logits, labels)))


def generate_answers(model, tok, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 64) -> list[str]:
    """Greedy answers to ``prompts`` (each given as <s> prompt), decoded up to </s>.

    Batched with left padding and the attention mask (generate derives the positions from it), so a prompt's
    answer does not depend on what it is batched with; the model is left in the mode it was found in."""
    import torch
    sp = special_ids(tok)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            rows = [[sp["bos"]] + tok.encode(p, add_special_tokens=False).ids for p in prompts[i:i + batch_size]]
            width = max(map(len, rows))
            ids = torch.tensor([[sp["pad"]] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=sp["pad"], eos_token_id=sp["eos_ids"],
                                     bos_token_id=sp["bos"])
            for row in gen[:, width:].tolist():
                ends = [k for k, t in enumerate(row) if t in sp["eos_ids"]]
                row = row[:ends[0]] if ends else row
                out.append(tok.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def exact_match_percent(predictions: list[str], answers: list[str]) -> float:
    """Percent of predictions equal to their answer by edgerun.generate.exact_match (the runtime's own
    definition: surrounding whitespace stripped, case-sensitive)."""
    from edgerun.generate import exact_match
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return 100.0 * sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True)) / len(answers)
