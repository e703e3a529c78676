"""Sufficient statistics of two paired views: what :class:`~star_heads.metrics.CCAMeter` accumulates and syncs.

The declared state, in the manner of torchmetrics' ``add_state`` (each field says how ranks combine it):

======== ============ ==========================================================================
field    shape        meaning (combine across ranks)
======== ============ ==========================================================================
n        int          number of samples (sum)
exponent [2]          per-view power-of-two scales e_x, e_y: u = x · 2^-e_x, v = y · 2^-e_y (max)
shift    [p + q]      k, the first batch's mean of [u, v] (ranks agree on a common one first)
total    [p + q]      Σ z over samples, z = [u, v] − k (sum, after re-expressing on the common
                      exponent and shift)
moment   [p+q, p+q]   Σ z zᵀ (sum, likewise)
======== ============ ==========================================================================

All float64. The shift keeps Σ (z − z̄)(z − z̄)ᵀ = moment − total totalᵀ / n accurate when means are
large; the exponents keep every sum finite over the whole float64 range (an exponent only grows,
and the statistics are re-scaled by an exact power of two when it does). Every operation here runs
on the statistics' device without a host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from star_heads.metrics.covariance import gram, magnitude, power_of_two, scale_exponent, scaled

__all__ = ["CCAStatistics"]

_UNSET = -1000.0  # exponent of a view that has only seen zeros (see covariance.scale_exponent)


@dataclass
class CCAStatistics:
    """Sums over samples of two views, p + q columns in all (see the module docstring for the fields)."""

    p: int
    n: int
    exponent: torch.Tensor
    shift: torch.Tensor
    total: torch.Tensor
    moment: torch.Tensor

    @classmethod
    def empty(cls, p: int, q: int, device: torch.device | str) -> CCAStatistics:
        """Statistics of no samples on ``device``."""
        d = p + q
        zeros = torch.zeros(d, dtype=torch.float64, device=device)
        exponent = torch.full((2,), _UNSET, dtype=torch.float64, device=device)
        return cls(p, 0, exponent, zeros, zeros.clone(), zeros.new_zeros(d, d))

    @property
    def device(self) -> torch.device:
        return self.moment.device

    def columns(self, per_view: torch.Tensor) -> torch.Tensor:
        """Expands a per-view [2] tensor to the p + q columns."""
        q = self.shift.numel() - self.p
        return torch.cat([per_view[:1].expand(self.p), per_view[1:].expand(q)])

    def rescale_(self, exponent: torch.Tensor) -> CCAStatistics:
        """Re-expresses the statistics in units of 2^``exponent`` (>= the current one; exact, in place)."""
        factor = self.columns(power_of_two(self.exponent - exponent))  # powers of two <= 1: exact
        self.shift = self.shift * factor
        self.total = self.total * factor
        self.moment = self.moment * factor[:, None] * factor[None, :]
        self.exponent = exponent.clone()
        return self

    def recentre_(self, shift: torch.Tensor) -> CCAStatistics:
        """Re-expresses total and moment around ``shift`` (exact algebra: z' = z + (k − k'), in place)."""
        d = self.shift - shift
        s = self.total
        self.moment = self.moment + torch.outer(s, d) + torch.outer(d, s) + self.n * torch.outer(d, d)
        self.total = s + self.n * d
        self.shift = shift.clone()
        return self

    def update_(self, x: torch.Tensor, y: torch.Tensor, tops: torch.Tensor | None = None) -> None:
        """Adds a batch x [B, p], y [B, q] (detached); ``tops`` = [max|x|, max|y|] if already known."""
        if tops is None:
            tops = torch.stack([magnitude(x), magnitude(y)])
        exponent = torch.maximum(self.exponent, scale_exponent(tops))
        self.rescale_(exponent)
        z = torch.cat([scaled(x, exponent[0]), scaled(y, exponent[1])], dim=1)
        if self.n == 0:
            self.shift = z.mean(dim=0)
        z.sub_(self.shift)
        self.total += z.sum(dim=0)
        self.moment += gram(z)
        self.n += x.shape[0]

    def add_(self, other: CCAStatistics) -> CCAStatistics:
        """Adds another set of statistics of the same widths (any exponent, shift or device; in place)."""
        if other.n == 0:
            return self
        other = other.to(self.device)
        if self.n == 0:
            self.n, self.exponent, self.shift, self.total, self.moment = (
                other.n, other.exponent, other.shift, other.total, other.moment)
            return self
        exponent = torch.maximum(self.exponent, other.exponent)
        self.rescale_(exponent)
        other.rescale_(exponent).recentre_(self.shift)
        self.total = self.total + other.total
        self.moment = self.moment + other.moment
        self.n += other.n
        return self

    def to(self, device: torch.device | str) -> CCAStatistics:
        """A copy on ``device``."""
        return CCAStatistics(self.p, self.n, *(t.to(device, copy=True) for t in
                                                (self.exponent, self.shift, self.total, self.moment)))

    def centred_gram(self) -> torch.Tensor:
        """Σ (z − z̄)(z − z̄)ᵀ in scaled units, [(p + q), (p + q)] (CCA is invariant to the per-view scale)."""
        mean = self.total / max(self.n, 1)
        return self.moment - self.n * torch.outer(mean, mean)

    def is_finite(self) -> bool:
        """Whether every statistic is finite (a host sync)."""
        return bool(torch.isfinite(self.moment).all()) and bool(torch.isfinite(self.total).all())
