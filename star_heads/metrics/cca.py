"""One-shot canonical correlation analysis between two views of the same samples.

Canonical correlations (Hotelling, 1936) between centred views X [n, p] and Y [n, q] are the
cosines of the principal angles between their column spaces (Björck & Golub, 1973):

    ρ = σ(Cxx^{-1/2} Cxy Cyy^{-1/2}) = σ(Uxᵀ Uy),   Ux, Uy orthonormal bases of the centred views

with the rank cut-off applied to each view. Everything runs detached, in float64, with autocast off,
on views pre-scaled by a power of two (exact, so any float64 magnitude works). Two routes:

* **Covariance route** (default, a fraction of the time of a QR + SVD of the data): one Gram
  matrix Zᵀ Z of Z = [X, Y], an eigendecomposition of each view's block, an SVD of the p×q whitened
  cross block (:mod:`star_heads.metrics.covariance`, shared with :class:`~star_heads.metrics.CCAMeter`).
* **QR/SVD route** (fallback): Xc = Q R, R = U_R S Vᵀ, Ux = Q U_R restricted to the kept directions.
  Used when the covariance route cannot guarantee ~1e-11 accuracy because it squares the condition
  number: a kept direction with λ < λ_max / 1e6 (singular value below 0.1 % of the largest), or a dropped
  one within a factor 100 of the cut-off (``SPREAD_LIMIT``, ``DROP_MARGIN`` in the covariance module).

Regularised CCA (``ridge > 0``) replaces Cxx by Cxx + ridge·(tr Cxx / p)·I, i.e. scales each whitened
direction by s/sqrt(s² + ridge·mean(s²)). Also SVCCA (Raghu et al., 2017) and PWCCA (Morcos et al., 2018).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from star_heads._precision import autocast_off
from star_heads.metrics.covariance import (
    gram,
    host_scale_exponent,
    magnitude,
    rounding_floor,
    shrink_factors,
    times_power_of_two,
    view_spectrum,
    whitened_correlations,
)
from star_heads.metrics.validation import (
    DEFAULT_RANK_TOL,
    CCASampleSizeWarning,
    check_cca_options,
    check_keep,
    check_sample_size,
    check_views,
)

__all__ = [
    "DEFAULT_RANK_TOL",
    "CCASampleSizeWarning",
    "canonical_correlations",
    "mean_canonical_correlation",
    "pwcca",
    "svcca",
]


def _prepare(view: torch.Tensor, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """float64 copy of ``view`` scaled by a power of two to max |x| < 1, then centred (written into ``out``).

    The same pass finds NaN/Inf (max |x| is not finite) and raises naming the view.
    """
    top = float(magnitude(view))
    if not math.isfinite(top):
        raise ValueError(f"{name} contains NaN or Inf values")
    scaled = times_power_of_two(view, -host_scale_exponent(top))  # exact: no overflow or underflow in the Gram matrix
    out = scaled if out is None else out.copy_(scaled)
    out.sub_(out.mean(dim=0, keepdim=True))
    return out.sub_(out.mean(dim=0, keepdim=True))  # again: removes the rounding of the first mean


def _prepare_pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Z = [Xc, Yc] [n, p + q], both views prepared by :func:`_prepare` in one buffer."""
    p = x.shape[1]
    z = torch.empty(x.shape[0], p + y.shape[1], dtype=torch.float64, device=x.device)
    _prepare(x, "x", z[:, :p])
    _prepare(y, "y", z[:, p:])
    return z


def _basis(xc: torch.Tensor, tol: float, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """QR/SVD route: (U_r [n, r], ridge shrinkage [r]) of a centred float64 view, rank cut-off applied."""
    q, u_r, shrink = _qr_svd(xc, tol, ridge)
    return q @ u_r, shrink


def _cross(xc: torch.Tensor, yc: torch.Tensor, tol: float, ridge: float):
    """QR/SVD route: (Ux, Uy, Fx Uxᵀ Uy Fy)."""
    ux, fx = _basis(xc, tol, ridge)
    uy, fy = _basis(yc, tol, ridge)
    return ux, uy, (fx[:, None] * (ux.T @ uy)) * fy[None, :]


def _qr_svd(xc: torch.Tensor, tol: float, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, U_R restricted to the kept directions, ridge shrinkage) of Xc = Q R, R = U_R S Vᵀ."""
    q, r = torch.linalg.qr(xc)
    u_r, s, _ = torch.linalg.svd(r)
    floor = rounding_floor(xc.shape[0]) ** 0.5
    rank = int(((s > tol * s[0]) & (s > floor)).sum())
    return q, u_r[:, :rank], shrink_factors(s, rank, ridge, xc.shape[1])


def _correlations(z: torch.Tensor, p: int, tol: float, ridge: float) -> torch.Tensor:
    g = gram(z)
    floor = rounding_floor(z.shape[0])
    sx, sy = view_spectrum(g[:p, :p], tol, floor), view_spectrum(g[p:, p:], tol, floor)
    if sx.trusted and sy.trusted:
        return whitened_correlations(g[:p, p:], sx.whitener(), sy.whitener(), sx.shrink(ridge), sy.shrink(ridge))
    # ill-conditioned: orthonormal bases of the data, Ux = Qx U_Rx, so Uxᵀ Uy = U_Rxᵀ (Qxᵀ Qy) U_Ry
    qx, ux, fx = _qr_svd(z[:, :p], tol, ridge)
    qy, uy, fy = _qr_svd(z[:, p:], tol, ridge)
    return whitened_correlations(gram(qx, qy), ux, uy, fx, fy)


def canonical_correlations(
    x: torch.Tensor, y: torch.Tensor, *, ridge: float = 0.0, rank_tol: float | None = None
) -> torch.Tensor:
    """Canonical correlations between two views, sorted descending, in [0, 1].

    ρ_i = σ_i(Uxᵀ Uy) (Hotelling, 1936; Björck & Golub, 1973), keeping in each centred view the
    directions with singular value s > rank_tol · s_max. Computed from the Gram matrix of the two
    views when that is accurate to ~1e-11, else from QR/SVD orthonormal bases (see the module docstring).

    Args:
        x: First view [n, p] (any float dtype, any device).
        y: Second view [n, q], same samples in the same order.
        ridge: Regularisation, relative to the mean variance: Cxx + ridge·(tr Cxx / p)·I. 0 = plain CCA.
        rank_tol: Relative singular-value cut-off; None = ``DEFAULT_RANK_TOL`` (1e-5).

    Returns:
        float64 tensor [k], k = min(rank_x, rank_y) (0 when a view is constant), on x's device.

    Raises:
        TypeError: Non-tensor or non-float input, non-numeric option.
        ValueError: Wrong rank, mismatched n, empty or non-finite input, n − 1 <= max(p, q), bad option.
    """
    x, y = check_views(x, y, finite=False)  # finiteness: checked by _prepare in the same pass as the scale
    ridge, tol = check_cca_options(ridge, rank_tol)
    check_sample_size(x.shape[0], x.shape[1], y.shape[1])
    with torch.no_grad(), autocast_off(x.device.type):
        return _correlations(_prepare_pair(x, y), x.shape[1], tol, ridge)


def mean_canonical_correlation(x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Plain mean of the min(rank_x, rank_y) canonical correlations (0-d float64 tensor).

    ρ̄ = (1/k) Σ_i ρ_i, the statistic by which STAR (arXiv 2510.27222) measures redundancy between
    invariant and equivariant embeddings. It is 0 when a view is constant (no shared linear
    information). Keyword arguments (``ridge``, ``rank_tol``) go to :func:`canonical_correlations`.
    """
    rho = canonical_correlations(x, y, **kwargs)
    return rho.mean().clamp_(0.0, 1.0) if rho.numel() else rho.new_zeros(())  # clamp: rounding of the mean


def _reduce_to_variance(xc: torch.Tensor, keep: float) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    var = s * s
    if var[0] <= rounding_floor(xc.shape[0]):  # constant view (to rounding)
        return xc[:, :0]
    frac = torch.cumsum(var, 0) / var.sum()
    r = min(int((frac < keep).sum()) + 1, s.numel())  # smallest r with cumulative variance >= keep
    return u[:, :r] * s[:r]


def svcca(x: torch.Tensor, y: torch.Tensor, keep: float = 0.99) -> torch.Tensor:
    """SVCCA similarity (Raghu et al., 2017): mean CCA after keeping ``keep`` of each view's variance.

    Each centred view is reduced to its top singular directions whose cumulative variance
    Σ s_i² / Σ s² first reaches ``keep``; the result is the plain mean canonical correlation of the
    reduced views. Returns a 0-d float64 tensor (1 − the value is anatome's ``svcca_distance``,
    which thresholds cumulative |s| instead of s²).
    """
    x, y = check_views(x, y, finite=False)
    keep = check_keep(keep)
    check_sample_size(x.shape[0], x.shape[1], y.shape[1])
    with torch.no_grad(), autocast_off(x.device.type):
        xr = _reduce_to_variance(_prepare(x, "x"), keep)
        yr = _reduce_to_variance(_prepare(y, "y"), keep)
        if xr.shape[1] == 0 or yr.shape[1] == 0:
            return xr.new_zeros(())
        _, _, t = _cross(xr, yr, DEFAULT_RANK_TOL, 0.0)
        rho = torch.linalg.svdvals(t).clamp_(0.0, 1.0) if min(t.shape) else t.new_zeros(0)
        return rho.mean().clamp_(0.0, 1.0) if rho.numel() else rho.new_zeros(())


def pwcca(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Projection-weighted CCA (Morcos et al., 2018, Eq. 2): Σ_i α_i ρ_i with α ∝ Σ_j |<h_i, x_j>|.

    h_i are the (unit-norm, orthogonal) canonical variates of the view with the smaller rank
    (x on ties, as google/svcca), x_j that view's centred columns; α is normalised to sum to 1.
    Returns a 0-d float64 tensor (1 − the value is anatome's ``pwcca_distance``).
    """
    x, y = check_views(x, y, finite=False)
    check_sample_size(x.shape[0], x.shape[1], y.shape[1])
    with torch.no_grad(), autocast_off(x.device.type):
        xc, yc = _prepare(x, "x"), _prepare(y, "y")
        ux, uy, t = _cross(xc, yc, DEFAULT_RANK_TOL, 0.0)
        if min(t.shape) == 0:
            return t.new_zeros(())
        a, rho, bh = torch.linalg.svd(t, full_matrices=False)
        variates, view = (ux @ a, xc) if ux.shape[1] <= uy.shape[1] else (uy @ bh.T, yc)
        alpha = (variates.T @ view).abs().sum(dim=1)
        alpha = alpha / alpha.sum()
        return (alpha * rho.clamp(0.0, 1.0)).sum().clamp_(0.0, 1.0)  # Σα = 1 up to rounding
