"""Linear probe on frozen features: full-batch L-BFGS, L2 weight chosen on a validation split.

The STAR / AugSelf transfer protocol: a multinomial logistic regression (one ``Linear``) fitted by
full-batch L-BFGS on the objective

    L(W, b) = (1/n) Σ_i CE(W x_i + b, y_i) + wd · ||W||_F²          (bias not penalised)

for each ``wd`` of a log-spaced grid (default ``logspace(-6, 5, 45)``); the ``wd`` with the best
validation accuracy is refitted on train + validation and scored once on the test split.

Features are standardised with the mean / std of the data the classifier is fitted on (train for
the grid search, train + val for the final fit); this only conditions L-BFGS better — the L2 weight
is chosen on validation data either way. Computations run in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_GRID", "ProbeResult", "fit_logistic", "linear_probe", "standardize"]

DEFAULT_GRID: tuple[float, ...] = tuple(float(v) for v in np.logspace(-6, 5, 45))


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        accuracy: Test accuracy of the classifier refitted on train + val with ``best_wd``.
        best_wd: The L2 weight chosen on the validation split.
        val_accuracy: Validation accuracy per grid value (same order as the grid).
        grid: The L2 weights tried.
    """

    accuracy: float
    best_wd: float
    val_accuracy: list[float] = field(default_factory=list)
    grid: list[float] = field(default_factory=list)


def standardize(fit: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Standardises ``fit`` and ``others`` with the per-feature mean / std of ``fit`` (std floor 1e-8)."""
    mean = fit.mean(0, keepdim=True)
    std = fit.std(0, keepdim=True).clamp_min(1e-8)
    return [(t - mean) / std for t in (fit, *others)]


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    wd: float,
    *,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 500,
    tol: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimises ``mean CE + wd·||W||²`` with full-batch L-BFGS (strong-Wolfe line search).

    Args:
        x: Features ``[n, d]`` (float64 recommended).
        y: Integer labels ``[n]`` in ``[0, num_classes)``.
        num_classes: Number of classes ``C``.
        wd: L2 weight on ``W`` (≥ 0).
        init: Optional warm start ``(W [C, d], b [C])``.
        max_iter: L-BFGS iterations.
        tol: Gradient / change tolerance.

    Returns:
        ``(W [C, d], b [C])``, detached.
    """
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x [n, d] and y [n], got {tuple(x.shape)} and {tuple(y.shape)}")
    if wd < 0:
        raise ValueError(f"wd must be >= 0, got {wd}")
    if init is None:
        w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
        b = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    else:
        w, b = (t.detach().clone().to(x) for t in init)
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=tol, tolerance_change=tol * 1e-3,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + wd * w.pow(2).sum()
        loss.backward()
        return loss

    # Nearly separable data drive the softmax into denormal floats, which are ~100x slower on x86
    # CPUs; flushing them to zero changes nothing measurable here (torch's default, off, is restored).
    # The problem is small and latency-bound: one CPU thread is faster than several (and far faster
    # on a busy machine, where intra-op threads wait on each other).
    flushed = torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    if x.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)
    return w.detach(), b.detach()


def _accuracy(x: torch.Tensor, y: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> float:
    w, b = wb
    return float(((x @ w.T + b).argmax(1) == y).double().mean())


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    val_fraction: float = 0.2,
    grid: tuple[float, ...] | list[float] = DEFAULT_GRID,
    num_classes: int | None = None,
    seed: int = 0,
    max_iter: int = 500,
) -> ProbeResult:
    """Runs the full protocol: grid search on a validation split, refit on train + val, test once.

    Args:
        train_x, train_y: Training features ``[n, d]`` and labels ``[n]``.
        test_x, test_y: Test features and labels.
        val: Explicit validation ``(x, y)``; otherwise a seeded ``val_fraction`` of train is held out.
        val_fraction: Fraction of train used for validation when ``val`` is None.
        grid: L2 weights to try. Searched from the largest down, each fit warm-started from the previous.
        num_classes: Number of classes (default: ``max label + 1`` over all splits).
        seed: Seed of the train / val split.
        max_iter: L-BFGS iterations per fit.
    """
    for name, t, dims in (("train_x", train_x, 2), ("train_y", train_y, 1), ("test_x", test_x, 2), ("test_y", test_y, 1)):
        if t.ndim != dims:
            raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ValueError(f"sample counts differ: train {train_x.shape[0]} vs {train_y.shape[0]}, test {test_x.shape[0]} vs {test_y.shape[0]}")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"feature dims differ: train {train_x.shape[1]} vs test {test_x.shape[1]}")
    if len(grid) == 0:
        raise ValueError("grid must hold at least one L2 weight")
    xs = [t.detach().double() for t in (train_x, test_x)]
    ys = [t.detach().long() for t in (train_y, test_y)]
    if val is None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n = xs[0].shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(val_fraction * n)))
        tr, va = perm[n_val:], perm[:n_val]
        fit_x, fit_y, val_x, val_y = xs[0][tr], ys[0][tr], xs[0][va], ys[0][va]
    else:
        fit_x, fit_y = xs[0], ys[0]
        val_x, val_y = val[0].detach().double(), val[1].detach().long()
    if num_classes is None:
        num_classes = int(max(int(t.max()) for t in (fit_y, val_y, ys[1]))) + 1

    fx, vx = standardize(fit_x, val_x)
    order = sorted(range(len(grid)), key=lambda i: -grid[i])
    val_acc = [0.0] * len(grid)
    wb = None
    for i in order:
        wb = fit_logistic(fx, fit_y, num_classes, float(grid[i]), init=wb, max_iter=max_iter)
        val_acc[i] = _accuracy(vx, val_y, wb)
    # Best validation accuracy; ties go to the larger L2 weight (the simpler model).
    best = max(range(len(grid)), key=lambda i: (val_acc[i], grid[i]))
    all_x, all_y = torch.cat([fit_x, val_x]), torch.cat([fit_y, val_y])
    ax, tx = standardize(all_x, xs[1])
    wb = fit_logistic(ax, all_y, num_classes, float(grid[best]), max_iter=max_iter)
    return ProbeResult(_accuracy(tx, ys[1], wb), float(grid[best]), val_acc, [float(g) for g in grid])
