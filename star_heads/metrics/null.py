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
"""

from __future__ import annotations

import math

import numpy as np
import torch

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
        shrink_x: Per-direction shrinkage of view x, length r_x (ones without ridge).
        shrink_y: Same for view y, length r_y.
        draws: Monte Carlo draws; None = enough that a·draws >= 2048 (at least 4).
        seed: Seed of the private numpy generator.

    Returns:
        The null mean (a Python float); 0.0 when a view has rank 0.
    """
    fx = shrink_x.detach().to("cpu", torch.float64)
    fy = shrink_y.detach().to("cpu", torch.float64)
    if fx.numel() < fy.numel():
        fx, fy = fy, fx  # b = len(fx) >= a = len(fy)
    b, a = fx.numel(), fy.numel()
    if a == 0:
        return 0.0
    m = n - 1
    if m - b < 1:
        raise ValueError(f"null baseline needs n - 1 > rank: got n={n}, rank={b}")
    draws = max(4, math.ceil(2048 / a)) if draws is None else draws
    rng = np.random.default_rng(seed)
    g1 = torch.from_numpy(rng.standard_normal((draws, b, a)))
    s = g1.transpose(1, 2) @ g1 + _wishart(a, m - b, draws, rng)
    evals, evecs = torch.linalg.eigh(s)
    inv_sqrt = (evecs * evals.clamp_min(1e-300).rsqrt()[:, None, :]) @ evecs.transpose(1, 2)
    block = fx[None, :, None] * (g1 @ inv_sqrt) * fy[None, None, :]
    rho = torch.linalg.svdvals(block).clamp(0.0, 1.0)
    return float(rho.mean())
