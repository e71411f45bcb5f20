"""Plain supervised training and evaluation of classifiers (the baseline stage uses them)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def logits_of(output):
    """Models may return logits or (tokens, logits): classification always reads the last."""
    return output[-1] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 1000, device="cpu") -> np.ndarray:
    model.eval().to(device)
    out = [logits_of(model(torch.from_numpy(x[i:i + batch_size]).to(device))).argmax(1).cpu().numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def top1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 in percent."""
    return float((pred == labels).mean() * 100.0)


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float,
                     batch_size: int, seed: int, device="cpu", progress=None) -> list[float]:
    """Adam + cross-entropy; returns the mean loss per epoch. ``progress(epoch, step, steps, loss)``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = (len(x) + batch_size - 1) // batch_size
    losses = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for step in range(steps):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(logits_of(model(xt[idx].to(device))), yt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            if progress:
                progress(epoch, step + 1, steps, loss.item())
        losses.append(total / steps)
    model.eval()
    return losses
