"""The linear probe (examples/common/probe.py) against scikit-learn's LogisticRegression."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from common.probe import DEFAULT_GRID, fit_logistic, linear_probe, standardize  # noqa: E402

sklearn_lm = pytest.importorskip("sklearn.linear_model")


def _blobs(n: int, d: int, c: int, seed: int, noise: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    centers = g.normal(size=(c, d))
    y = g.integers(0, c, size=n)
    x = centers[y] + noise * g.normal(size=(n, d))
    return torch.from_numpy(x), torch.from_numpy(y)


def test_default_grid_is_the_protocol_grid():
    assert len(DEFAULT_GRID) == 45
    np.testing.assert_allclose(DEFAULT_GRID, np.logspace(-6, 5, 45))


@pytest.mark.parametrize("wd", [1e-3, 0.1])
def test_fit_logistic_matches_sklearn(wd):
    x, y = _blobs(300, 6, 4, seed=1)
    x = standardize(x)[0]
    w, b = fit_logistic(x, y, 4, wd, max_iter=1000, tol=1e-10)
    # sklearn minimises C·Σ CE + ½||W||²  ⇔  mean CE + ||W||² / (2 C n): wd = 1 / (2 C n).
    ref = sklearn_lm.LogisticRegression(C=1.0 / (2 * wd * len(y)), tol=1e-12, max_iter=10000).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(w.numpy(), ref.coef_, atol=2e-4, rtol=1e-3)
    probs = torch.softmax(x @ w.T + b, 1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(x.numpy()), atol=1e-4)


def test_linear_probe_picks_best_val_and_refits_on_train_plus_val():
    xa, ya = _blobs(700, 8, 3, seed=2, noise=1.5)  # one draw (shared centers), split three ways
    x, y, xt, yt = xa[:400], ya[:400], xa[400:600], ya[400:600]
    val = (xa[600:], ya[600:])
    grid = [1e-4, 1e-2, 1.0, 100.0]
    res = linear_probe(x, y, xt, yt, val=val, grid=grid, num_classes=3)
    assert res.grid == grid and len(res.val_accuracy) == 4
    # Independent check of the selection: sklearn fits on standardised train, scored on val.
    mean, std = x.mean(0), x.std(0)
    accs = []
    for wd in grid:
        ref = sklearn_lm.LogisticRegression(C=1.0 / (2 * wd * len(y)), tol=1e-10, max_iter=10000)
        ref.fit(((x - mean) / std).numpy(), y.numpy())
        accs.append(ref.score(((val[0] - mean) / std).numpy(), val[1].numpy()))
    np.testing.assert_allclose(res.val_accuracy, accs, atol=0.011)  # at most one val sample may flip
    assert res.best_wd == max(grid, key=lambda g: (res.val_accuracy[grid.index(g)], g))
    # The final classifier is refit on train + val with the chosen weight.
    allx, ally = torch.cat([x, val[0]]), torch.cat([y, val[1]])
    m2, s2 = allx.mean(0), allx.std(0)
    ref = sklearn_lm.LogisticRegression(C=1.0 / (2 * res.best_wd * len(ally)), tol=1e-10, max_iter=10000)
    ref.fit(((allx - m2) / s2).numpy(), ally.numpy())
    assert abs(res.accuracy - ref.score(((xt - m2) / s2).numpy(), yt.numpy())) <= 0.011
    assert res.accuracy > 0.6  # well above chance (1/3) on these blobs


def test_linear_probe_is_invariant_to_feature_scale():
    xa, ya = _blobs(300, 5, 3, seed=3)
    x, y, xt, yt = xa[:200], ya[:200], xa[200:], ya[200:]
    grid = [1e-3, 1e-1, 10.0]
    a = linear_probe(x, y, xt, yt, grid=grid, seed=0)
    b = linear_probe(1000 * x, y, 1000 * xt, yt, grid=grid, seed=0)
    assert a.best_wd == b.best_wd and a.accuracy == pytest.approx(b.accuracy)


def test_linear_probe_rejects_bad_input():
    x, y = _blobs(50, 4, 2, seed=0)
    with pytest.raises(ValueError, match="sample counts"):
        linear_probe(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="feature dims"):
        linear_probe(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="train_x must have 2 dimensions"):
        linear_probe(x[0], y, x, y)
    with pytest.raises(ValueError, match="grid"):
        linear_probe(x, y, x, y, grid=[])
    with pytest.raises(ValueError, match="wd must be >= 0"):
        fit_logistic(x, y, 2, -1.0)
