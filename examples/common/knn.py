"""Weighted k-nearest-neighbour accuracy on backbone features (the usual SSL monitor).

Cosine similarity, the ``k`` most similar training samples vote with weight ``exp(sim / T)``
(Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", eq. 8;
k = 20, T = 0.07 as in solo-learn / InstDisc).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_accuracy", "knn_predict"]


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels ``[m]`` for ``test_features [m, d]`` from a labelled bank ``[n, d]``.

    Score of class c for query q: Σ_{j ∈ top-k(q)} exp(cos(q, x_j) / T) · [y_j = c]; argmax wins
    (ties to the lowest class index).
    """
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"expected features [n, d] and [m, d], got {tuple(train_features.shape)} and {tuple(test_features.shape)}"
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must have shape [{train_features.shape[0]}], got {tuple(train_labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    preds = []
    for q in F.normalize(test_features.float(), dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    **kwargs: float,
) -> float:
    """Fraction of test samples whose :func:`knn_predict` label equals ``test_labels``."""
    pred = knn_predict(train_features, train_labels, test_features, num_classes, **kwargs)
    return float((pred == test_labels.to(pred.device).long()).float().mean())
