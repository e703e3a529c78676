"""Canonical correlations from second moments: the core shared by the one-shot functions and the meter.

With G = Zᵀ Z for the centred views Z = [X, Y] (float64), each view's block is diagonalised,
Gxx = Vx Λx Vxᵀ, directions with sqrt(λ_i) <= rank_tol · sqrt(λ_max) are dropped (the same cut-off
as on the singular values of the data), and the canonical correlations are the singular values of
the p×q whitened cross-product (Hotelling, 1936):

    ρ = σ(Fx Λx^{-1/2} Vxᵀ Gxy Vy Λy^{-1/2} Fy)      F = ridge shrinkage, identity when ridge = 0

Forming G squares the condition number, so the error of ρ grows like eps · λ_max / λ_min of the
kept directions. :func:`view_spectrum` says when that is below ~1e-11 (``trusted``); the one-shot
functions fall back to orthonormal bases of the data otherwise. Views are pre-scaled by a power of
two (exact) so that G neither overflows nor underflows anywhere in the float64 range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from star_heads._checks import check_choice

__all__ = [
    "SPREAD_LIMIT",
    "ViewSpectrum",
    "gram",
    "EXPONENT_LIMIT",
    "GramBackend",
    "host_scale_exponent",
    "magnitude",
    "rounding_floor",
    "scale_exponent",
    "scaled",
    "times_power_of_two",
    "shrink_factors",
    "view_spectrum",
    "whitened_correlations",
]

SPREAD_LIMIT = 1e6
"""Largest λ_max / λ_min among kept directions for which the covariance route is trusted (tests: within 1e-10 of a
QR oracle)."""

DROP_MARGIN = 1e-2
"""Dropped directions must lie a factor 100 below the cut-off (λ <= 1e-2 · rank_tol² · λ_max) to be trusted."""

EPS = float(torch.finfo(torch.float64).eps)

GramBackend = Literal["auto", "numpy", "torch"]


def rounding_floor(n: int) -> float:
    """Squared singular value below which a direction of a pre-scaled (max |x| < 1), centred view of n
    samples is rounding, not data: (4 · eps)² · n. A constant column whose mean is not exactly
    representable leaves such a residue; with it, the view has rank 0 as it should."""
    return (4 * EPS) ** 2 * n


EXPONENT_LIMIT = 1100
"""Scale exponents are clamped to ±1100, which covers every finite float64 (subnormals reach 2^-1074); an all-zero
view gets −1100. Scaled maxima then lie in [0.5, 1) for any finite nonzero input."""


def magnitude(x: torch.Tensor) -> torch.Tensor:
    """0-d max |x| (NaN if x has a NaN, inf if it has an inf) in one pass, without a host sync."""
    low, high = torch.aminmax(x.detach())
    return torch.maximum(-low, high)


def scale_exponent(top: torch.Tensor) -> torch.Tensor:
    """float64 e (same shape as ``top``) with top · 2^-e in [0.5, 1); −1100 where top = 0.

    ``top`` is a magnitude max |x| (:func:`magnitude`); computed on its device without a host sync.
    """
    top = top.to(torch.float64)
    _, exponent = torch.frexp(top)
    exponent = torch.where(top > 0, exponent.to(torch.float64), torch.full_like(top, -EXPONENT_LIMIT))
    return exponent.clamp(-EXPONENT_LIMIT, EXPONENT_LIMIT)


def host_scale_exponent(top: float) -> int:
    """Host-side twin of :func:`scale_exponent` for a finite Python float (0 for top = 0: nothing to scale)."""
    if top == 0:
        return 0
    return min(max(math.frexp(top)[1], -EXPONENT_LIMIT), EXPONENT_LIMIT)


def times_power_of_two(x: torch.Tensor, exponent: torch.Tensor | int) -> torch.Tensor:
    """x · 2^exponent in float64, exact wherever the result is representable (integral ``exponent``).

    Two half-steps, because 2^exponent alone overflows or underflows for |exponent| > 1023 while the product
    (a subnormal input brought to [0.5, 1), say) does not. No host sync for a tensor ``exponent``.
    """
    x = x.detach().to(torch.float64)
    e = torch.as_tensor(exponent, dtype=torch.float64, device=x.device)
    half = torch.trunc(e / 2)
    return x * torch.exp2(half) * torch.exp2(e - half)


def scaled(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """x · 2^-exponent in float64: exact (a power of two), so CCA is unchanged and G cannot overflow."""
    return times_power_of_two(x, -exponent)


def gram(z: torch.Tensor, w: torch.Tensor | None = None, *, backend: GramBackend = "auto") -> torch.Tensor:
    """Zᵀ Z (or Zᵀ W) of float64 [n, d] matrices.

    ``backend="auto"`` uses numpy's BLAS on the CPU, whose ``a.T @ a`` is a symmetric rank-k update (half the
    flops of the general product torch would run) and whose general product was ~2x torch's MKL on the AMD CPU
    this was tuned on, and torch elsewhere; ``"numpy"`` (CPU tensors only) and ``"torch"`` force one branch, so
    both are tested on the CPU.
    """
    check_choice(backend, "backend", GramBackend)
    if backend == "numpy" or (backend == "auto" and z.device.type == "cpu"):
        zn = z.contiguous().numpy()
        wn = zn if w is None else w.contiguous().numpy()
        with np.errstate(all="ignore"):  # NaN/Inf (an unchecked meter batch) propagate, as in torch
            return torch.from_numpy(zn.T @ wn)
    return z.T @ (z if w is None else w)


def shrink_factors(s: torch.Tensor, rank: int, ridge: float, dim: int) -> torch.Tensor:
    """Ridge shrinkage s/sqrt(s² + ridge·Σs²/dim) of the ``rank`` kept directions (ones when ridge = 0).

    ``s`` are the view's singular values (descending, all of them: the ridge is relative to the mean
    variance tr C / dim).
    """
    kept = s[:rank]
    if ridge == 0:
        return torch.ones_like(kept)
    mean_sq = (s * s).sum() / dim
    return kept / torch.sqrt(kept * kept + ridge * mean_sq)


@dataclass(frozen=True)
class ViewSpectrum:
    """Eigendecomposition of one view's Gram block, descending, with the rank cut-off applied.

    Attributes:
        values: Eigenvalues λ (clamped at 0), descending [d].
        vectors: Matching eigenvectors as columns [d, d].
        rank: Number of kept directions (sqrt(λ_i) > rank_tol · sqrt(λ_max)).
        trusted: Every eigenvalue is either kept with λ >= λ_max / SPREAD_LIMIT or clearly below the
            cut-off (λ <= DROP_MARGIN · rank_tol² · λ_max): the covariance route is then accurate to
            ~1e-11 and makes the same rank decision as an SVD of the data.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    rank: int
    trusted: bool

    def whitener(self, rank: int | None = None) -> torch.Tensor:
        """V_r Λ_r^{-1/2} [d, r] for the top ``rank`` directions (default: all kept)."""
        r = self.rank if rank is None else rank
        return self.vectors[:, :r] * self.values[:r].rsqrt()

    def shrink(self, ridge: float) -> torch.Tensor:
        """Ridge shrinkage of the kept directions (see :func:`shrink_factors`)."""
        return shrink_factors(self.values.sqrt(), self.rank, ridge, self.values.numel())

    def variance_rank(self, keep: float) -> int:
        """Smallest r whose top directions explain at least ``keep`` of the variance (SVCCA, Raghu et al., 2017)."""
        total = self.values.sum()
        if total <= 0:
            return 0
        frac = torch.cumsum(self.values, 0) / total
        return min(int((frac < keep).sum()) + 1, self.values.numel())


def view_spectrum(gram: torch.Tensor, rank_tol: float, floor: float = 0.0) -> ViewSpectrum:
    """Spectrum of one view's pre-scaled, centred Gram block [d, d] (float64), rank cut-off applied.

    Directions with λ <= ``floor`` (:func:`rounding_floor`) are dropped whatever ``rank_tol``.
    """
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    top = float(values[0])
    if top <= floor:
        return ViewSpectrum(values, vectors, 0, True)
    rank = int(((values.sqrt() > rank_tol * top**0.5) & (values > floor)).sum())
    kept_ok = float(values[rank - 1]) >= top / SPREAD_LIMIT
    dropped_ok = rank == values.numel() or float(values[rank]) <= max(DROP_MARGIN * rank_tol**2 * top, floor)
    return ViewSpectrum(values, vectors, rank, kept_ok and dropped_ok)


def whitened_correlations(
    cross: torch.Tensor,
    wx: torch.Tensor,
    wy: torch.Tensor,
    fx: torch.Tensor | None = None,
    fy: torch.Tensor | None = None,
) -> torch.Tensor:
    """σ(Fx Wxᵀ Gxy Wy Fy) clamped to [0, 1], descending; empty when a whitener has no columns."""
    if wx.shape[1] == 0 or wy.shape[1] == 0:
        return cross.new_zeros(0)
    t = wx.T @ cross @ wy
    if fx is not None and fy is not None:
        t = t * fx[:, None] * fy[None, :]
    rho: torch.Tensor = torch.linalg.svdvals(t).clamp_(0.0, 1.0)
    return rho
