"""An image encoder (a ViT tower feeding a projector): its projected tokens must stay close to the
unpruned model's, and its classification head is gated as a classifier's."""
from __future__ import annotations

import numpy as np

from pipeline import gate as gates
from pipeline.tasks.classify import Classify


def token_fidelity(tokens: np.ndarray, reference: np.ndarray) -> dict:
    """Cosine of each image's projected tokens (flattened) against the reference: mean and 1st percentile."""
    a = tokens.reshape(len(tokens), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"token_cos_mean": round(float(cos.mean()), 6), "token_cos_p1": round(float(np.percentile(cos, 1)), 6)}


class Encode(Classify):
    kind = "encode"
    keeps = ("tokens",)

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
        if "token_cos_vs_fp32" not in metrics:
            return []
        return [gates.limit_check("token_cos_mean_vs_fp32", metrics["token_cos_vs_fp32"]["token_cos_mean"],
                                  min_cosine, at_least=True)]
