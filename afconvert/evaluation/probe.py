"""Linear probe: how much a frozen model's features know about a labelled task.

Multinomial logistic regression on the features standardised with the training set's mean and standard
deviation, an L2 penalty of 1 / (2C) on the weights (none on the intercepts), fitted to convergence by L-BFGS
in float64: the same problem as scikit-learn's ``LogisticRegression()`` defaults (C = 1). Returns the top-1
accuracy on the test features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear_probe"]


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 c: float = 1.0, max_iter: int = 1000) -> float:
    """Top-1 accuracy (0..1) on ``test`` (M, D) of a logistic regression fitted on ``train`` (N, D) with its
    integer ``train_labels`` (N,); ``test_labels`` (M,)."""
    train, test = train.double().flatten(1), test.double().flatten(1)
    mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-12)
    train, test = (train - mean) / std, (test - mean) / std
    k = int(max(train_labels.max(), test_labels.max())) + 1
    w = torch.zeros(train.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = c * F.cross_entropy(train @ w + b, train_labels, reduction="sum") + 0.5 * w.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float(((test @ w + b).argmax(1) == test_labels).double().mean())
