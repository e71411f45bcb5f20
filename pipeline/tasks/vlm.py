"""Answering about images (VLMs): a decoder's figures, plus exact-match per question type.

A VLM is judged like a decoder (pipeline/tasks/generate.py: exact-match of greedy answers, teacher-forced
next-token agreement with the unpruned model, perplexity), and also per question type (``kind`` of each record:
what digit, two images, few-shot, text only...). A compression that keeps the overall figure but loses one
type — the few-shot prompts, say, which need three images read in order — must not pass: every type's drop is
gated, not only the mean.
"""
from __future__ import annotations

import dataclasses

from pipeline.records import Check
from pipeline.tasks.generate import Generate, GenerateMetrics


@dataclasses.dataclass(frozen=True)
class VLMMetrics(GenerateMetrics):
    """A VLM's figures on the held-out prompts; ``per_kind``: exact-match (%) per question type."""
    per_kind: dict | None = None
    counts: dict | None = None       # held-out prompts per question type


class VLMAnswer(Generate):
    kind = "vlm"
    figures = VLMMetrics
    token_distillation = True   # finetune.token_weight: the image tokens against the unpruned VLM's

    def train_loss(self, student_out, labels, teacher_out, *, temperature, kd_weight, token_weight):
        """The generate task's loss, plus ``token_weight`` x the mean (1 - cosine) of the projected image tokens
        against the teacher's: the answer logits alone give a pruned tower a weak signal (vila-mnist: tower at
        0.9 of its MACs, few-shot stayed 1.7 pt down after 400 distillation steps)."""
        loss = super().train_loss(student_out, labels, teacher_out, temperature=temperature, kd_weight=kd_weight,
                                  token_weight=token_weight)
        mine, theirs = (getattr(o, "image_tokens", None) for o in (student_out, teacher_out))
        if token_weight <= 0 or mine is None or theirs is None:
            return loss
        from pipeline.tasks.encode import token_term
        return loss + token_weight * token_term((mine,), (theirs,))

    def claims(self, output_names):
        return False   # chosen from the config (task.kind = "vlm" or a VLM's data), never from outputs

    def per_kind_checks(self, metrics: dict, reference: dict, max_drop: float) -> list[Check]:
        """Every question type's exact-match drop against the reference's, at most ``max_drop``."""
        mine, ref = metrics.get("per_kind") or {}, reference.get("per_kind") or {}
        missing = sorted(set(ref) - set(mine))
        if missing:   # a type the reference answered and this model was not asked: not a pass by omission
            from pipeline.errors import PipelineError
            raise PipelineError(f"vlm: no figures for question type(s) {', '.join(missing)}")
        return [self.drop_check(mine[k], ref[k], max_drop, label=k) for k in sorted(ref)]
