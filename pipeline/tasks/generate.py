"""Generation (decoders): exact-match of greedy answers on held-out prompts, teacher-forced next-token agreement
with the unpruned model, and perplexity on the answers. The decoder stages (pipeline/llm/) measure these with
`pipeline.llm.evaluate`; this task says what the gates compare and which way a drop points.

Without answers in the data (a jsonl of prompts only), exact-match is measured against the unpruned model's own
greedy answers, so it still says how often a compressed model answers as the original did.
"""
from __future__ import annotations

import dataclasses

from pipeline import gate as gates
from pipeline.records import Check
from pipeline.tasks.base import Figures, Task


@dataclasses.dataclass(frozen=True)
class GenerateMetrics(Figures):
    """A decoder's figures on the held-out prompts (percent, percent, perplexity)."""
    exact_match: float
    next_token_agreement: float      # teacher-forced, on the answer positions; 100 for the unpruned model itself
    perplexity: float
    prompts: int


class Generate(Task):
    kind = "generate"
    metric = "exact_match"
    label, unit, drop_unit = "exact-match", " %", " pt"
    bounds, min_span = (0.0, 100.0), 2.0
    figures = GenerateMetrics
    engine_recipe = ("deploy/EDGE_LLM.md is the recipe: TensorRT Edge-LLM exports deploy/hf/ and builds the engine "
                     "on the Jetson")

    def claims(self, output_names):
        # A decoder exported with its cache: logits beside present.* outputs. (The decoder stages are chosen
        # from the config, before any model exists; this keeps `auto` from calling a decoder a classifier.)
        return "logits" in output_names and any(n.startswith("present.") for n in output_names)

    def metrics(self, outputs, labels, teacher=None):
        raise NotImplementedError("a decoder's metrics need generation: pipeline.llm.evaluate measures them")

    def agreement(self, outputs, reference):
        raise NotImplementedError("a decoder's agreement is teacher-forced: pipeline.llm.evaluate measures it")

    def baseline_check(self, metrics, floor):
        if floor is None:
            return None   # no floor: a pretrained model on the user's prompts may legitimately score low
        return gates.limit_check("exact_match", metrics["exact_match"], floor, at_least=True)

    def quality_checks(self, metrics: dict, reference: dict, *, min_agreement: float,
                       max_perplexity_ratio: float) -> list[Check]:
        """Beyond the exact-match drop: next-token agreement with the unpruned model, and perplexity at most
        ``max_perplexity_ratio`` times the reference's (0 or less: not checked)."""
        checks = [gates.limit_check("next_token_agreement", metrics["next_token_agreement"], min_agreement,
                                    at_least=True)]
        if max_perplexity_ratio > 0:
            limit = round(reference["perplexity"] * max_perplexity_ratio, 4)
            checks.append(gates.limit_check("perplexity", metrics["perplexity"], limit, at_least=False))
        return checks

    # ---- training: pipeline/train.py's loop over token rows (input_ids [N, T] right-padded, labels [N, T] with
    # -100 where nothing is trained). The teacher runs beside the student: [B, T, V] logits per row are too big
    # to keep for a whole run.
    def train_loss(self, student_out, labels, teacher_out, *, temperature, kd_weight, token_weight):
        from pipeline.lm_loss import lm_kd_loss, lm_loss
        if teacher_out is None or kd_weight == 0:
            return lm_loss(student_out.logits, labels)
        return lm_kd_loss(student_out.logits, teacher_out.logits, labels, temperature, kd_weight)

    def teacher_per_batch(self, *, kd_weight, token_weight):
        return True

    def teacher_cache(self, teacher_out):
        raise NotImplementedError("a decoder's teacher runs beside the student (teacher_per_batch)")

    def train_hits(self, student_out, labels):
        from pipeline.lm_loss import answer_positions
        logits, target = answer_positions(student_out.logits.detach(), labels)
        return int((logits.argmax(-1) == target).sum()), len(target)
