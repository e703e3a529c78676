"""One-shot canonical correlation analysis between two views of the same samples.

Canonical correlations (Hotelling, 1936) between centred views X [n, p] and Y [n, q] are the
cosines of the principal angles between their column spaces:

    ρ = σ(Ux^T Uy),   Xc = Ux Sx Vx^T,  Yc = Uy Sy Vy^T   (thin SVDs, rank cut-off applied)

which equals σ(Cxx^{-1/2} Cxy Cyy^{-1/2}) without ever inverting a covariance. Everything runs
detached, in float64, with autocast off. Regularised CCA (``ridge > 0``) replaces Cxx by
Cxx + ridge·(tr Cxx / p)·I, i.e. scales each whitened direction by s/sqrt(s² + ridge·mean(s²)).

Also: SVCCA (Raghu et al., 2017: keep the top singular directions explaining ``keep`` of the
variance, then CCA) and PWCCA (Morcos et al., 2018: correlations weighted by how much of the
activations each canonical variate accounts for).
"""

from __future__ import annotations

import warnings

import torch

from star_heads._checks import check_float_tensor

__all__ = [
    "DEFAULT_RANK_TOL",
    "CCASampleSizeWarning",
    "canonical_correlations",
    "mean_canonical_correlation",
    "pwcca",
    "svcca",
]

DEFAULT_RANK_TOL = 1e-5
"""Relative rank cut-off: directions with singular value <= tol · s_max are dropped (variance 1e-10 of the top)."""


class CCASampleSizeWarning(UserWarning):
    """Fewer than 2(p + q) samples: canonical correlations are biased upward."""


def check_sample_size(n: int, p: int, q: int) -> None:
    """Raises if every correlation would be trivially 1 (n − 1 <= max(p, q)); warns if n < 2(p + q)."""
    if n - 1 <= max(p, q):
        raise ValueError(
            f"CCA needs n - 1 > max(p, q) samples: got n={n} for p={p}, q={q}, so every canonical "
            f"correlation would be trivially 1; need n >= {max(p, q) + 2} (and n >= {2 * (p + q)} "
            "for a low-bias estimate)"
        )
    if n < 2 * (p + q):
        warnings.warn(
            f"CCA with n={n} samples for p={p}, q={q} is biased upward; use n >= 2(p + q) = "
            f"{2 * (p + q)} (see docs/cca.md) and compare with the null baseline",
            CCASampleSizeWarning,
            stacklevel=3,
        )


def validate_pair(x: object, y: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks a pair of views [n, p], [n, q]: float, 2-D, same n, non-empty, finite."""
    x = check_float_tensor(x, "x", ndim=2)
    y = check_float_tensor(y, "y", ndim=2)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of samples (rows): got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.shape[1] == 0 or y.shape[1] == 0 or x.shape[0] == 0:
        raise ValueError(f"x and y must be non-empty: got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device: got {x.device} and {y.device}")
    check_float_tensor(x, "x", finite=True)
    check_float_tensor(y, "y", finite=True)
    return x, y


def _check_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _check_options(ridge: float, rank_tol: float | None) -> float:
    """Validates ``ridge`` (finite, >= 0) and ``rank_tol`` (in [0, 1)); returns the effective tolerance."""
    ridge = _check_number(ridge, "ridge")
    if not 0 <= ridge < float("inf"):
        raise ValueError(f"ridge must be a finite float >= 0, got {ridge!r}")
    tol = DEFAULT_RANK_TOL if rank_tol is None else _check_number(rank_tol, "rank_tol")
    if not 0 <= tol < 1:
        raise ValueError(f"rank_tol must be a float in [0, 1), got {rank_tol!r}")
    return tol


def _orthonormal_basis(x: torch.Tensor, tol: float, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred float64 view -> (U_r [n, r], s_r [r], shrink_r [r]) with the rank cut-off applied."""
    xc = x - x.mean(dim=0, keepdim=True)
    scale = xc.abs().amax()
    if scale > 0:  # guards float64 inputs near the over/underflow range; CCA is scale invariant
        xc = xc / scale
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    rank = int((s > tol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    shrink = shrink_factors(s, rank, ridge, x.shape[1])
    return u[:, :rank], s[:rank], shrink


def shrink_factors(s: torch.Tensor, rank: int, ridge: float, dim: int) -> torch.Tensor:
    """Ridge shrinkage s/sqrt(s² + ridge·Σs²/dim) of the kept directions (ones when ridge = 0)."""
    kept = s[:rank]
    if ridge == 0:
        return torch.ones_like(kept)
    mean_sq = (s * s).sum() / dim
    return kept / torch.sqrt(kept * kept + ridge * mean_sq)


def _float64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


def _cross(x: torch.Tensor, y: torch.Tensor, tol: float, ridge: float):
    ux, sx, fx = _orthonormal_basis(_float64(x), tol, ridge)
    uy, sy, fy = _orthonormal_basis(_float64(y), tol, ridge)
    t = (fx[:, None] * (ux.T @ uy)) * fy[None, :]
    return ux, uy, t


def canonical_correlations(
    x: torch.Tensor, y: torch.Tensor, *, ridge: float = 0.0, rank_tol: float | None = None
) -> torch.Tensor:
    """Canonical correlations between two views, sorted descending, in [0, 1].

    ρ_i = σ_i(Ux^T Uy) (Hotelling, 1936; Björck & Golub, 1973), where Ux, Uy are orthonormal bases
    of the centred views from a thin SVD, keeping directions with s > rank_tol · s_max.

    Args:
        x: First view [n, p] (any float dtype, any device).
        y: Second view [n, q], same samples in the same order.
        ridge: Regularisation, relative to the mean variance: Cxx + ridge·(tr Cxx / p)·I. 0 = plain CCA.
        rank_tol: Relative singular-value cut-off; None = ``DEFAULT_RANK_TOL`` (1e-5).

    Returns:
        float64 tensor [k], k = min(rank_x, rank_y) (0 when a view is constant), on x's device.

    Raises:
        TypeError: Non-tensor or non-float input.
        ValueError: Wrong rank, mismatched n, empty or non-finite input, n − 1 <= max(p, q).
    """
    x, y = validate_pair(x, y)
    tol = _check_options(ridge, rank_tol)
    check_sample_size(x.shape[0], x.shape[1], y.shape[1])
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        _, _, t = _cross(x, y, tol, ridge)
        if min(t.shape) == 0:
            return t.new_zeros(0)
        return torch.linalg.svdvals(t).clamp_(0.0, 1.0)


def mean_canonical_correlation(x: torch.Tensor, y: torch.Tensor, **kwargs: float | None) -> torch.Tensor:
    """Plain mean of the min(rank_x, rank_y) canonical correlations (0-d float64 tensor).

    ρ̄ = (1/k) Σ_i ρ_i, the statistic STAR reports as redundancy between invariant and equivariant
    embeddings. It is 0 when a view is constant (no shared linear information). Keyword arguments
    (``ridge``, ``rank_tol``) go to :func:`canonical_correlations`.
    """
    rho = canonical_correlations(x, y, **kwargs)
    return rho.mean() if rho.numel() else rho.new_zeros(())


def _reduce_to_variance(x: torch.Tensor, keep: float) -> torch.Tensor:
    xc = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    var = s * s
    if var.sum() == 0:
        return xc[:, :0]
    frac = torch.cumsum(var, 0) / var.sum()
    r = int((frac < keep).sum()) + 1  # smallest r with cumulative variance >= keep
    return u[:, :r] * s[:r]


def svcca(x: torch.Tensor, y: torch.Tensor, keep: float = 0.99) -> torch.Tensor:
    """SVCCA similarity (Raghu et al., 2017): mean CCA after keeping ``keep`` of each view's variance.

    Each centred view is reduced to its top singular directions whose cumulative variance
    Σ s_i² / Σ s² first reaches ``keep``; the result is the plain mean canonical correlation of the
    reduced views. Returns a 0-d float64 tensor (1 − the value is anatome's ``svcca_distance``,
    which thresholds cumulative |s| instead of s²).
    """
    x, y = validate_pair(x, y)
    if not 0 < _check_number(keep, "keep") <= 1:
        raise ValueError(f"keep must be a float in (0, 1], got {keep!r}")
    check_sample_size(x.shape[0], x.shape[1], y.shape[1])
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        xr = _reduce_to_variance(_float64(x), keep)
        yr = _reduce_to_variance(_float64(y), keep)
        if xr.shape[1] == 0 or yr.shape[1] == 0:
            return xr.new_zeros(())
        _, _, t = _cross(xr, yr, DEFAULT_RANK_TOL, 0.0)
        rho = torch.linalg.svdvals(t).clamp_(0.0, 1.0)
        return rho.mean() if rho.numel() else rho.new_zeros(())


def pwcca(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Projection-weighted CCA (Morcos et al., 2018, Eq. 2): Σ_i α_i ρ_i with α ∝ Σ_j |<h_i, x_j>|.

    h_i are the (unit-norm, orthogonal) canonical variates of the view with the smaller rank
    (x on ties, as google/svcca), x_j that view's centred columns; α is normalised to sum to 1.
    Returns a 0-d float64 tensor (1 − the value is anatome's ``pwcca_distance``).
    """
    x, y = validate_pair(x, y)
    check_sample_size(x.shape[0], x.shape[1], y.shape[1])
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        xd, yd = _float64(x), _float64(y)
        ux, uy, t = _cross(xd, yd, DEFAULT_RANK_TOL, 0.0)
        if min(t.shape) == 0:
            return t.new_zeros(())
        a, rho, bh = torch.linalg.svd(t, full_matrices=False)
        if ux.shape[1] <= uy.shape[1]:
            variates, view = ux @ a, xd
        else:
            variates, view = uy @ bh.T, yd
        view = view - view.mean(dim=0, keepdim=True)
        alpha = (variates.T @ view).abs().sum(dim=1)
        alpha = alpha / alpha.sum()
        return (alpha * rho.clamp(0.0, 1.0)).sum()
