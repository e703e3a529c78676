"""Sufficient statistics of two paired views: what :class:`~star_heads.metrics.CCAMeter` accumulates and syncs.

The state, registered as buffers (in the manner of torchmetrics' ``add_state``; each field says how parts combine):

======== ============ ==========================================================================
field    shape        meaning (combine)
======== ============ ==========================================================================
n        int          number of samples (sum; kept as a Python int, saved as the module's extra state)
exponent [2]          per-view power-of-two scales e_x, e_y: u = x · 2^-e_x, v = y · 2^-e_y (max)
shift    [p + q]      k, the first batch's mean of [u, v] (parts agree on a common one first)
total    [p + q]      Σ z over samples, z = [u, v] − k (sum, after re-expressing on the common
                      exponent and shift)
moment   [p+q, p+q]   Σ z zᵀ (sum, likewise)
======== ============ ==========================================================================

**The merge rule**, written once (:meth:`CCAStatistics.align_` and :meth:`CCAStatistics.add_aligned_`) and used
by both the local :meth:`~CCAStatistics.add_` and the distributed :meth:`~CCAStatistics.all_reduce_`: every part
is re-expressed, exactly, on the common exponent (the largest: powers of two <= 1) and a common shift, after which
n, total and moment simply add.

All float64 (``module.half()`` / ``.double()`` leave them float64; ``.to(device)`` moves them). The shift keeps
Σ (z − z̄)(z − z̄)ᵀ = moment − total totalᵀ / n accurate when means are large; the exponents keep every sum finite
over the whole float64 range, subnormals included. Every operation here runs on the statistics' device without a
host sync (``all_reduce_`` aside, which reads the shapes of all ranks once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from star_heads.metrics.covariance import EXPONENT_LIMIT, gram, magnitude, scale_exponent, scaled, times_power_of_two

__all__ = ["CCAStatistics"]

_STATE = ("exponent", "shift", "total", "moment")


class CCAStatistics(nn.Module):
    """Sums over samples of two views of widths p and q (see the module docstring for the fields).

    Args:
        p: Width of view x.
        q: Width of view y.
        device: Where the statistics live (float64 always).
    """

    exponent: torch.Tensor
    shift: torch.Tensor
    total: torch.Tensor
    moment: torch.Tensor

    def __init__(self, p: int, q: int, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.p, self.q, self.n = p, q, 0
        d = p + q
        f64: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.register_buffer("exponent", torch.full((2,), -float(EXPONENT_LIMIT), **f64))
        self.register_buffer("shift", torch.zeros(d, **f64))
        self.register_buffer("total", torch.zeros(d, **f64))
        self.register_buffer("moment", torch.zeros(d, d, **f64))

    @property
    def device(self) -> torch.device:
        return self.moment.device

    # ------------------------------------------------------------------ module state
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> CCAStatistics:
        """Moves with ``.to(device)`` / ``.cuda()``; stays float64 whatever dtype the module is cast to."""
        for name in _STATE:
            t = getattr(self, name)
            setattr(self, name, t.to(device=fn(t[:0]).device, dtype=torch.float64))
        return self

    def get_extra_state(self) -> dict[str, int]:
        return {"n": self.n, "p": self.p, "q": self.q}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or (state.get("p"), state.get("q")) != (self.p, self.q):
            widths = None if not isinstance(state, dict) else (state.get("p"), state.get("q"))
            raise ValueError(f"CCA statistics of widths (p, q) = {widths} cannot be loaded into ({self.p}, {self.q})")
        self.n = int(state["n"])

    def reset(self) -> None:
        """Statistics of no samples (in place, on the same device)."""
        self.n = 0
        self.exponent.fill_(-float(EXPONENT_LIMIT))
        for name in ("shift", "total", "moment"):
            getattr(self, name).zero_()

    def clone(self) -> CCAStatistics:
        """An independent copy on the same device."""
        out = CCAStatistics(self.p, self.q, device=self.device)
        out.load_(self)
        return out

    def load_(self, other: CCAStatistics) -> CCAStatistics:
        """Copies ``other``'s statistics into this one (same widths; any device)."""
        self.n = other.n
        for name in _STATE:
            setattr(self, name, getattr(other, name).to(self.device, copy=True))
        return self

    # ------------------------------------------------------------------ the merge rule
    def columns(self, per_view: torch.Tensor) -> torch.Tensor:
        """Expands a per-view [2] tensor to the p + q columns."""
        return torch.cat([per_view[:1].expand(self.p), per_view[1:].expand(self.q)])

    def rescale_(self, exponent: torch.Tensor) -> CCAStatistics:
        """Re-expresses the statistics in units of 2^``exponent`` (>= the current one; exact, in place)."""
        shift = self.columns(self.exponent - exponent)  # <= 0: multiplying by these powers of two is exact
        self.shift = times_power_of_two(self.shift, shift)
        self.total = times_power_of_two(self.total, shift)
        self.moment = times_power_of_two(self.moment, shift[:, None] + shift[None, :])
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

    def align_(self, exponent: torch.Tensor, shift: torch.Tensor) -> CCAStatistics:
        """The merge rule's first half: the common exponent (the largest of the parts), then the common shift."""
        return self.rescale_(exponent).recentre_(shift)

    def add_aligned_(self, n: int, total: torch.Tensor, moment: torch.Tensor) -> CCAStatistics:
        """The merge rule's second half: on a common exponent and shift, the sums add."""
        self.n += n
        self.total = self.total + total
        self.moment = self.moment + moment
        return self

    def add_(self, other: CCAStatistics) -> CCAStatistics:
        """Adds another set of statistics of the same widths (any exponent, shift or device; in place)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return self.load_(other)
        other = other.clone().to(self.device)
        exponent = torch.maximum(self.exponent, other.exponent)
        self.rescale_(exponent)
        other.align_(exponent, self.shift)
        return self.add_aligned_(other.n, other.total, other.moment)

    def all_reduce_(self, group: Any = None) -> CCAStatistics:
        """Replaces the statistics by the sum over all ranks of ``group`` (every rank must call it; in place).

        The ranks' widths are compared first (one small all_gather), so meters of different widths raise the same
        ``ValueError`` on every rank instead of aborting the collective.
        """
        widths = torch.tensor([self.p, self.q], dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(widths) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, widths, group=group)
        shapes = [tuple(int(v) for v in w.tolist()) for w in gathered]
        if len(set(shapes)) > 1:
            raise ValueError(f"CCA statistics differ in widths (p, q) across ranks: {shapes}; every rank must meter "
                             "views of the same widths")
        exponent = self.exponent.clone()
        dist.all_reduce(exponent, op=dist.ReduceOp.MAX, group=group)  # common exponent ...
        self.rescale_(exponent)
        has = float(self.n > 0)
        head = torch.cat([self.shift * has, self.shift.new_tensor([has, float(self.n)])])
        dist.all_reduce(head, group=group)  # ... and common shift: the mean of the shifts of the ranks with samples
        d = self.p + self.q
        self.recentre_(head[:d] / max(float(head[d]), 1.0))
        sums = torch.cat([self.total, self.moment.flatten()])
        dist.all_reduce(sums, group=group)
        self.n, self.total, self.moment = 0, self.total.new_zeros(d), self.moment.new_zeros(d, d)
        return self.add_aligned_(int(head[d + 1]), sums[:d], sums[d:].view(d, d))

    # ------------------------------------------------------------------ accumulate and read
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
        self.total = self.total + z.sum(dim=0)
        self.moment = self.moment + gram(z)
        self.n += x.shape[0]

    def centred_gram(self) -> torch.Tensor:
        """Σ (z − z̄)(z − z̄)ᵀ in scaled units, [(p + q), (p + q)] (CCA is invariant to the per-view scale)."""
        mean = self.total / max(self.n, 1)
        return self.moment - self.n * torch.outer(mean, mean)

    def is_finite(self) -> bool:
        """Whether every statistic is finite (a host sync)."""
        return bool(torch.isfinite(self.moment).all()) and bool(torch.isfinite(self.total).all())

    def extra_repr(self) -> str:
        return f"p={self.p}, q={self.q}, n={self.n}"
