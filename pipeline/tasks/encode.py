"""An image encoder (a ViT tower feeding a projector): its projected tokens must stay close to the
unpruned model's, and its classification head is gated as a classifier's."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import gate as gates
from pipeline.errors import PipelineError
from pipeline.tasks.base import Figures
from pipeline.tasks.classify import Classify, ClassifyMetrics


def token_fidelity(tokens: np.ndarray, reference: np.ndarray) -> dict:
    """Cosine of each image's projected tokens (flattened) against the reference: mean and 1st percentile."""
    a = tokens.reshape(len(tokens), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return TokenFidelity(round(float(cos.mean()), 6), round(float(np.percentile(cos, 1)), 6)).to_json()


def token_term(student_out, teacher_out):
    """Mean over tokens of (1 - cosine) between the first outputs (the projected tokens)."""
    import torch.nn.functional as F
    s_tok, t_tok = student_out[0], teacher_out[0]
    if s_tok.shape != t_tok.shape:  # pruned embedding: compare what can be compared
        raise PipelineError(f"finetune.token_weight: student tokens {tuple(s_tok.shape)} and teacher tokens "
                            f"{tuple(t_tok.shape)} differ; token distillation needs the same token width")
    return (1.0 - F.cosine_similarity(s_tok.float(), t_tok.float(), dim=-1)).mean()


@dataclass(frozen=True)
class TokenFidelity(Figures):
    """Cosine of each image's projected tokens against a reference's: the mean and the 1st percentile."""
    token_cos_mean: float
    token_cos_p1: float


@dataclass(frozen=True)
class EncodeMetrics(ClassifyMetrics):
    token_cos_mean: float | None = None      # against the unpruned model's kept tokens
    token_cos_p1: float | None = None


class Encode(Classify):
    kind = "encode"
    figures = EncodeMetrics
    keeps = ("tokens",)
    token_distillation = True

    def claims(self, output_names):
        return "tokens" in output_names

    def metrics(self, outputs, labels, teacher=None):
        metrics = super().metrics(outputs, labels)
        if teacher is not None and "tokens" in outputs and "tokens" in teacher:
            metrics.update(token_fidelity(outputs["tokens"], teacher["tokens"]))
        return metrics

    def fidelity_vs_fp32(self, outputs, fp32):
        return {"token_cos_vs_fp32": token_fidelity(outputs["tokens"], fp32["tokens"])}

    def fidelity_checks(self, metrics, min_cosine):
        if "token_cos_vs_fp32" not in metrics:   # a stage that compared no tokens with an fp32 form
            return []
        vs_fp32 = TokenFidelity.from_json(metrics["token_cos_vs_fp32"])
        return [gates.limit_check("token_cos_mean_vs_fp32", vs_fp32.token_cos_mean, min_cosine, at_least=True)]

    def train_loss(self, student_out, labels, teacher_out, *, temperature, kd_weight, token_weight):
        loss = super().train_loss(student_out, labels, teacher_out, temperature=temperature, kd_weight=kd_weight,
                                  token_weight=token_weight)
        if token_weight <= 0 or not isinstance(teacher_out, (tuple, list)):
            return loss   # no teacher, or only its cached logits (it was given as logits alone): no tokens
        return loss + token_weight * token_term(student_out, teacher_out)

    def teacher_per_batch(self, *, kd_weight, token_weight):
        return token_weight > 0   # [N, tokens, width] for a whole training set is too big to keep
