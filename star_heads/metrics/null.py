"""Null baseline for canonical correlations: what a shuffled pairing of the rows gives.

Shuffling the rows of Y destroys every true correlation but keeps n and both spectra; what is
left is the small-sample bias. For independent views (exactly when one view is Gaussian, and in
the large-n limit of a random permutation) the column space of the centred Y is a uniformly random
r_y-dimensional subspace of the m = n − 1 dimensional centred sample space, so

    Ux^T Uy  ~  the [r_x, r_y] block of a Haar-random m×m orthogonal matrix
             =  G1 (G1^T G1 + B)^{-1/2},   G1 ~ N(0, 1)^{b×a},  B ~ Wishart_a(I, m − b),

with a = min(r_x, r_y), b = max(r_x, r_y) (the Jacobi / MANOVA ensemble, Muirhead 1982, Thm 3.3.1).
B is drawn with the Bartlett decomposition, so one draw costs O(a²b), independent of n.
Ridge shrinkage factors are applied exactly as in the data path. The null mean is a Monte Carlo
average over ``draws`` draws with a fixed seed, so it is deterministic and identical on all ranks.
Without ridge it depends only on (n, r_x, r_y, draws, seed) and is cached here (an LRU of 256 entries),
so meters and monitors that report it every few steps pay for it once per distinct (n, ranks).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from star_heads._checks import check_int, check_positive_int

__all__ = ["null_mean_canonical_correlation"]


def _wishart(dim: int, dof: int, draws: int, rng: np.random.Generator) -> torch.Tensor:
    """[draws, dim, dim] samples of Wishart_dim(I, dof) (Bartlett decomposition when dof >= dim)."""
    if dof < dim:  # singular Wishart: build it from the (small) Gaussian factor directly
        g = torch.from_numpy(rng.standard_normal((draws, dof, dim)))
        return g.transpose(1, 2) @ g
    low = torch.from_numpy(rng.standard_normal((draws, dim, dim))).tril(-1)
    chi2 = rng.chisquare(np.arange(dof, dof - dim, -1, dtype=np.float64), size=(draws, dim))  # dof - i, i < dim
    low = low + torch.diag_embed(torch.from_numpy(np.sqrt(chi2)))
    return low @ low.transpose(1, 2)


def null_mean_canonical_correlation(
    n: int,
    shrink_x: torch.Tensor,
    shrink_y: torch.Tensor,
    *,
    draws: int | None = None,
    seed: int = 0,
) -> float:
    """Expected mean canonical correlation of independent views with the given sizes and ranks.

    Args:
        n: Number of samples (m = n − 1 degrees of freedom after centring).
        shrink_x: Per-direction shrinkage of view x, length r_x (ones without ridge), values in [0, 1].
        shrink_y: Same for view y, length r_y.
        draws: Monte Carlo draws (>= 1); None = enough that a·draws >= 2048 (at least 4).
        seed: Seed of the private numpy generator (an int >= 0).

    Returns:
        The null mean (a Python float in [0, 1]); 0.0 when a view has rank 0.

    Raises:
        TypeError: ``n``, ``draws`` or ``seed`` not an int; a shrinkage that is not a 1-D float tensor.
        ValueError: ``draws < 1``, ``seed < 0``, n − 1 <= max(r_x, r_y), shrinkage outside [0, 1].
    """
    n = check_positive_int(n, "n")
    seed = check_int(seed, "seed", minimum=0)
    if draws is not None:
        check_positive_int(draws, "draws")
    fx, fy = _shrinkage(shrink_x, "shrink_x"), _shrinkage(shrink_y, "shrink_y")
    if fx.numel() < fy.numel():
        fx, fy = fy, fx  # b = len(fx) >= a = len(fy)
    b, a = fx.numel(), fy.numel()
    if a == 0:
        return 0.0
    if n - 1 - b < 1:
        raise ValueError(f"null baseline needs n - 1 > rank: got n={n}, rank={b}")
    draws = max(4, math.ceil(2048 / a)) if draws is None else draws
    if bool((fx == 1).all()) and bool((fy == 1).all()):
        return _unit_null(n, b, a, draws, seed)  # no ridge: cached
    return _null(n, fx, fy, draws, seed)


def _shrinkage(f: object, name: str) -> torch.Tensor:
    if not isinstance(f, torch.Tensor) or not f.is_floating_point() or f.ndim != 1:
        got = (
            f"{type(f).__name__}" if not isinstance(f, torch.Tensor) else f"{f.dtype} tensor of shape {tuple(f.shape)}"
        )
        raise TypeError(f"{name} must be a 1-D float tensor, got {got}")
    f = f.detach().to("cpu", torch.float64)
    if not bool(((f >= 0) & (f <= 1)).all()):
        raise ValueError(
            f"{name} must hold shrinkage factors in [0, 1], got values in [{float(f.min())}, {float(f.max())}]"
        )
    return f


@lru_cache(maxsize=256)
def _unit_null(n: int, b: int, a: int, draws: int, seed: int) -> float:
    ones = torch.ones
    return _null(n, ones(b, dtype=torch.float64), ones(a, dtype=torch.float64), draws, seed)


def _null(n: int, fx: torch.Tensor, fy: torch.Tensor, draws: int, seed: int) -> float:
    b, a, m = fx.numel(), fy.numel(), n - 1
    rng = np.random.default_rng(seed)
    g1 = torch.from_numpy(rng.standard_normal((draws, b, a)))
    s = g1.transpose(1, 2) @ g1 + _wishart(a, m - b, draws, rng)
    evals, evecs = torch.linalg.eigh(s)
    inv_sqrt = (evecs * evals.clamp_min(1e-300).rsqrt()[:, None, :]) @ evecs.transpose(1, 2)
    block = fx[None, :, None] * (g1 @ inv_sqrt) * fy[None, None, :]
    rho = torch.linalg.svdvals(block).clamp(0.0, 1.0)
    return min(float(rho.mean()), 1.0)  # a mean of values <= 1 can round above 1
