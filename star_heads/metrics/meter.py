"""Streaming, distributed CCA from float64 sufficient statistics.

Per update, with z = [x − kx, y − ky] ([B, p+q], float64, k a fixed shift = the first batch's mean):
n += B,  s += Σ_rows z,  M += z^T z  (one GEMM gives Σxx^T, Σyy^T and Σxy^T). The shift keeps the
centred covariance C = (M − s s^T / n) / (n − 1) accurate when means are large; all statistics
are sums, so merging two meters or all-reducing across ranks is exact. Memory is O((p + q)²).

From C: Cxx = Vx Λx Vx^T (eigh), keep λ_i > rank_tol² · λ_max, and the correlations are
σ(Fx Λx^{-1/2} Vx^T Cxy Vy Λy^{-1/2} Fy) — the same quantity as the one-shot SVD path
(:func:`star_heads.metrics.canonical_correlations`), with the same rank and ridge rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from star_heads._checks import check_float_tensor, check_positive_int
from star_heads.metrics.cca import _check_options, check_sample_size, shrink_factors, validate_pair
from star_heads.metrics.null import null_mean_canonical_correlation

__all__ = ["CCAMeter", "CCAResult"]


@dataclass(frozen=True)
class CCAResult:
    """Result of :meth:`CCAMeter.compute`.

    Attributes:
        mean: Plain mean of the canonical correlations (0.0 when a view has rank 0).
        correlations: float64 [min(rank_x, rank_y)], descending, in [0, 1].
        rank_x: Effective rank of x after the cut-off.
        rank_y: Effective rank of y.
        n: Number of samples.
        null_mean: Expected mean under a shuffled pairing (same n, ranks and ridge), or None.
    """

    mean: float
    correlations: torch.Tensor
    rank_x: int
    rank_y: int
    n: int
    null_mean: float | None = None

    @property
    def excess(self) -> float | None:
        """``mean − null_mean``: the part of the redundancy that is not small-sample bias."""
        return None if self.null_mean is None else self.mean - self.null_mean


class CCAMeter:
    """Accumulates two views batch by batch and computes their canonical correlations.

    Args:
        p: Width of view x.
        q: Width of view y (default p).
        ridge: Relative ridge, as in :func:`~star_heads.metrics.canonical_correlations`.
        null_baseline: Also report the shuffled-pairing null mean (cached per n, ranks).
        rank_tol: Relative singular-value cut-off (None = 1e-5).
        check_finite: Check every batch for NaN/Inf in ``update`` (a device sync). When False,
            non-finite values are detected in ``compute`` instead.

    Statistics live on the device of the first batch, in float64. Picklable; ``merge`` and
    ``sync`` (all_reduce over torch.distributed) are exact.
    """

    def __init__(
        self,
        p: int,
        q: int | None = None,
        *,
        ridge: float = 0.0,
        null_baseline: bool = True,
        rank_tol: float | None = None,
        check_finite: bool = True,
    ) -> None:
        self.p = check_positive_int(p, "p")
        self.q = self.p if q is None else check_positive_int(q, "q")
        self.rank_tol = _check_options(ridge, rank_tol)
        self.ridge = float(ridge)
        self.null_baseline = bool(null_baseline)
        self.check_finite = bool(check_finite)
        self._null_cache: dict[tuple, float] = {}
        self.reset()

    def reset(self) -> None:
        """Forgets all samples (keeps the device and the options)."""
        self.n = 0
        self.shift: torch.Tensor | None = None  # [p + q]
        self.sum: torch.Tensor | None = None  # [p + q]
        self.moment: torch.Tensor | None = None  # [p + q, p + q]

    @property
    def device(self) -> torch.device | None:
        return None if self.moment is None else self.moment.device

    def _allocate(self, shift: torch.Tensor) -> None:
        d = self.p + self.q
        self.shift = shift
        self.sum = shift.new_zeros(d)
        self.moment = shift.new_zeros(d, d)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Adds a batch: x [B, p], y [B, q] (same rows, any float dtype); detached, float64, no autocast."""
        if self.check_finite:
            x, y = validate_pair(x, y)
        else:
            check_float_tensor(x, "x", ndim=2)
            check_float_tensor(y, "y", ndim=2)
            if x.shape[0] != y.shape[0] or x.shape[0] == 0 or x.device != y.device:
                validate_pair(x, y)  # raises the descriptive error
        if x.shape[1] != self.p or y.shape[1] != self.q:
            raise ValueError(
                f"CCAMeter(p={self.p}, q={self.q}) got x {tuple(x.shape)} and y {tuple(y.shape)}: "
                f"expected x [n, {self.p}] and y [n, {self.q}]"
            )
        if self.moment is not None and x.device != self.moment.device:
            raise ValueError(f"CCAMeter statistics are on {self.moment.device}, got a batch on {x.device}")
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            z = torch.cat([x.detach().to(torch.float64), y.detach().to(torch.float64)], dim=1)
            if self.moment is None:
                self._allocate(z.mean(dim=0))
            z = z - self.shift
            self.sum += z.sum(dim=0)
            self.moment.addmm_(z.T, z)
            self.n += x.shape[0]

    def _check_compatible(self, other: CCAMeter) -> None:
        if not isinstance(other, CCAMeter):
            raise TypeError(f"can only merge a CCAMeter, got {type(other).__name__}")
        if (other.p, other.q) != (self.p, self.q):
            raise ValueError(f"cannot merge CCAMeter(p={other.p}, q={other.q}) into CCAMeter(p={self.p}, q={self.q})")

    def _shifted(self, new_shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, moment) re-expressed around ``new_shift`` (exact algebra: z' = z + (k − k'))."""
        d = self.shift.to(new_shift.device) - new_shift
        s, m = self.sum.to(new_shift.device), self.moment.to(new_shift.device)
        moment = m + torch.outer(s, d) + torch.outer(d, s) + self.n * torch.outer(d, d)
        return s + self.n * d, moment

    def merge(self, other: CCAMeter) -> CCAMeter:
        """Adds ``other``'s samples to this meter (in place; returns self)."""
        self._check_compatible(other)
        if other.n == 0:
            return self
        if self.n == 0:
            self._allocate(other.shift.clone().to(self.device or other.device))
        s, m = other._shifted(self.shift)
        self.sum += s
        self.moment += m
        self.n += other.n
        return self

    def sync(self) -> CCAMeter:
        """All-reduces the statistics over torch.distributed ranks (no-op when not initialised).

        Every rank must call it; afterwards every rank holds the statistics of all samples.
        Ranks re-centre on a common shift first, so the sums are exact. Syncing twice counts
        the samples twice: to keep accumulating locally, sync a copy
        (``copy.deepcopy(meter).sync().compute()``), as :class:`~star_heads.metrics.CCAMonitor` does.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        device = self.device or (torch.device("cuda", torch.cuda.current_device())
                                 if dist.get_backend() == "nccl" else torch.device("cpu"))
        d = self.p + self.q
        if self.moment is None:
            self._allocate(torch.zeros(d, dtype=torch.float64, device=device))
        head = torch.cat([self.shift * (self.n > 0), torch.tensor([float(self.n > 0), float(self.n)],
                                                                   dtype=torch.float64, device=device)])
        dist.all_reduce(head)
        ranks_with_data, total = head[d].item(), int(head[d + 1].item())
        common = head[:d] / max(ranks_with_data, 1.0)
        s, m = self._shifted(common)
        dist.all_reduce(s)
        dist.all_reduce(m)
        self.shift, self.sum, self.moment, self.n = common, s, m, total
        return self

    def covariance(self) -> torch.Tensor:
        """Centred covariance of [x, y], [(p + q), (p + q)] float64 (unbiased, divides by n − 1)."""
        if self.n < 2:
            raise ValueError(f"CCAMeter needs at least 2 samples to compute a covariance, has n={self.n}")
        mean = self.sum / self.n
        return (self.moment - self.n * torch.outer(mean, mean)) / (self.n - 1)

    def compute(self) -> CCAResult:
        """Canonical correlations of everything seen since the last reset (or merged / synced).

        Raises:
            ValueError: n − 1 <= max(p, q), or the accumulated data contained NaN/Inf.
        """
        check_sample_size(self.n, self.p, self.q)
        if not (bool(torch.isfinite(self.moment).all()) and bool(torch.isfinite(self.sum).all())):
            raise ValueError(
                f"CCAMeter statistics are not finite after n={self.n} samples: some batch contained NaN/Inf "
                "(or values beyond ±1e150)"
            )
        with torch.no_grad():
            cov = self.covariance()
            p = self.p
            wx, fx = self._whitener(cov[:p, :p])
            wy, fy = self._whitener(cov[p:, p:])
            t = (wx.T @ cov[:p, p:] @ wy) * fx[:, None] * fy[None, :]
            rho = torch.linalg.svdvals(t).clamp_(0.0, 1.0) if min(t.shape) else t.new_zeros(0)
        mean = float(rho.mean()) if rho.numel() else 0.0
        null = self._null(fx, fy) if self.null_baseline else None
        return CCAResult(mean=mean, correlations=rho, rank_x=wx.shape[1], rank_y=wy.shape[1], n=self.n, null_mean=null)

    def _whitener(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V_r Λ_r^{-1/2}, ridge shrinkage) of one view's covariance, rank cut-off applied."""
        evals, evecs = torch.linalg.eigh(c)
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        sv = evals.sqrt()  # proportional to the singular values of the centred view
        rank = int((sv > self.rank_tol * sv[0]).sum()) if sv[0] > 0 else 0
        return evecs[:, :rank] * evals[:rank].rsqrt(), shrink_factors(sv, rank, self.ridge, c.shape[0])

    def _null(self, fx: torch.Tensor, fy: torch.Tensor) -> float:
        key = (self.n, fx.numel(), fy.numel()) if self.ridge == 0 else None
        if key is not None and key in self._null_cache:
            return self._null_cache[key]
        value = null_mean_canonical_correlation(self.n, fx, fy)
        if key is not None:
            self._null_cache[key] = value
        return value

    def __repr__(self) -> str:
        return f"CCAMeter(p={self.p}, q={self.q}, ridge={self.ridge}, n={self.n}, device={self.device})"
