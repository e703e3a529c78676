"""Weighted kNN (examples/common/knn.py) against a per-query Python loop."""

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from common.knn import knn_accuracy, knn_predict  # noqa: E402


def _loop(bank, labels, queries, num_classes, k, t):
    preds = []
    for q in queries.tolist():
        sims = []
        qn = math.sqrt(sum(v * v for v in q))
        for row, lab in zip(bank.tolist(), labels.tolist()):
            rn = math.sqrt(sum(v * v for v in row))
            sims.append((sum(a * b for a, b in zip(q, row)) / (qn * rn), lab))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, lab in sims[:k]:
            votes[lab] += math.exp(s / t)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return preds


@given(n=st.integers(3, 30), m=st.integers(1, 10), d=st.integers(2, 6), c=st.integers(2, 5),
       k=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_knn_matches_loop(n, m, d, c, k, seed):
    g = torch.Generator().manual_seed(seed)
    bank, queries = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    pred = knn_predict(bank, labels, queries, c, k=k, temperature=0.5, chunk=4)
    assert pred.tolist() == _loop(bank, labels, queries, c, min(k, n), 0.5)


def test_knn_accuracy_on_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 5
    y = torch.arange(60) % 3
    x = centers[y] + 0.1 * torch.randn(60, 8, generator=g)
    assert knn_accuracy(x[:45], y[:45], x[45:], y[45:], 3, k=5) == 1.0
    assert knn_accuracy(x[:45], y[:45], x[45:], (y[45:] + 1) % 3, 3, k=5) == 0.0


def test_knn_rejects_bad_input():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="features"):
        knn_predict(x, y, torch.randn(3, 5), 2)
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(x, y[:5], x, 2)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(x, y, x, 2, temperature=0.0)
