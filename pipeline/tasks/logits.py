"""Training on logits, in torch: the loss and the figures of a model whose last output is [batch, classes].
They are Task's training defaults (pipeline/tasks/base.py) and so the classifier's; a module of their own,
as both base and classify use them, and torch is imported inside them: the stages and gates that only read
metrics import pipeline.tasks without it."""
from __future__ import annotations

import numpy as np


def last_output(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The output named "logits", else the last one (a model returning a tuple ends with its logits)."""
    return outputs.get("logits", list(outputs.values())[-1])


def infer_answers(doc: dict) -> tuple[np.ndarray, dict]:
    """What `edgerun infer --format json` answered (its runtime half for classes, edgerun/classify.py):
    the class per sample, and its figure on the bundle's labelled sample."""
    return np.array([row["class_index"] for row in doc["predictions"]]), {"sample_top1": doc["accuracy"]["top1_pct"]}


def logits_of(output):
    """Models may return logits or (tokens, logits): classification always reads the last."""
    return output[-1] if isinstance(output, (tuple, list)) else output


def importance_loss(output, labels):
    """Cross-entropy on the logits: what Taylor importance differentiates for a classifier."""
    import torch.nn.functional as F
    return F.cross_entropy(logits_of(output), labels)


def kd_loss(student_logits, teacher_logits, labels, temperature: float, weight: float):
    """Hinton distillation: weight·T²·KL(teacher/T ‖ student/T) + (1−weight)·CE."""
    import torch.nn.functional as F
    ce = F.cross_entropy(student_logits, labels)
    if teacher_logits is None or weight <= 0:
        return ce
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True)
    return weight * t * t * kl + (1.0 - weight) * ce


def evaluate_top1(model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000, device="cpu") -> float:
    """Top-1 in percent; leaves the model in the mode it found it in."""
    import torch
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out = logits_of(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])).to(device)))
            correct += int((out.argmax(1).cpu() == torch.from_numpy(np.asarray(y[i:i + batch_size]))).sum())
    model.train(was_training)
    return 100.0 * correct / max(1, len(x))
