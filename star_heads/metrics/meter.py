"""Streaming, distributed CCA from float64 sufficient statistics.

Per update, one GEMM adds the batch's second moments to :class:`~star_heads.metrics.statistics.CCAStatistics`
(O((p + q)²) memory, no host sync). ``compute`` runs the covariance route of
:mod:`star_heads.metrics.covariance` — eigendecomposition whitening with the rank cut-off, SVD of the
p×q whitened cross-covariance — the same core, rank rule and ridge rule as the one-shot
:func:`~star_heads.metrics.canonical_correlations`. Having only second moments, the meter has no
QR/SVD fallback: for views whose kept directions span a variance ratio λ_max/λ_min = κ², its error is
about eps·κ² (≤ 1e-11 for κ² ≤ 1e4; at most ~1e-6 with the default rank_tol, which caps κ² at 1e10).

Sync semantics follow torchmetrics: ``sync()`` replaces the local statistics by those of all ranks
and keeps the local ones aside; ``unsync()`` restores them; ``update``/``merge``/``sync``/``state_dict`` on a
synced meter raise, so samples can never be counted twice. The merge rule (common exponent, common shift, then
sums) is :mod:`star_heads.metrics.statistics`'s, for the local ``merge`` and the all-reduce alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from star_heads._checks import check_bool, check_positive_int
from star_heads._precision import autocast_off
from star_heads.metrics.covariance import (
    magnitude,
    rounding_floor,
    times_power_of_two,
    view_spectrum,
    whitened_correlations,
)
from star_heads.metrics.null import null_mean_canonical_correlation
from star_heads.metrics.statistics import CCAStatistics
from star_heads.metrics.validation import check_cca_options, check_keep, check_sample_size, check_views

__all__ = ["CCAMeter", "CCAResult"]


@dataclass(frozen=True)
class CCAResult:
    """Result of :meth:`CCAMeter.compute` (and of :class:`~star_heads.metrics.CCAMonitor`).

    Attributes:
        mean: Plain mean of the canonical correlations (0.0 when a view has rank 0).
        correlations: float64 [min(rank_x, rank_y)], descending, in [0, 1].
        rank_x: Effective rank of x after the cut-off.
        rank_y: Effective rank of y.
        n: Number of samples.
        null_mean: Expected mean under a shuffled pairing (same n, ranks and ridge), or None.
        svcca: SVCCA (Raghu et al., 2017) of the same samples when requested, or None.
    """

    mean: float
    correlations: torch.Tensor
    rank_x: int
    rank_y: int
    n: int
    null_mean: float | None = None
    svcca: float | None = None

    @property
    def excess(self) -> float | None:
        """``mean − null_mean``: the part of the redundancy that is not small-sample bias."""
        return None if self.null_mean is None else self.mean - self.null_mean

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Every scalar readout as a flat ``{prefix + name: float}`` dict, for a logger.

        Names: ``mean``, ``null_mean``, ``excess``, ``rank_x``, ``rank_y``, ``n``, ``svcca`` (those
        that are None are left out, never NaN). Lightning's ``self.log_dict``, TensorBoard's
        ``add_scalars`` and W&B's ``log`` take it unchanged, e.g. ``result.as_dict("cca/")``.
        """
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        values = {"mean": self.mean, "null_mean": self.null_mean, "excess": self.excess, "rank_x": self.rank_x,
                  "rank_y": self.rank_y, "n": self.n, "svcca": self.svcca}
        return {prefix + k: float(v) for k, v in values.items() if v is not None}


class CCAMeter(nn.Module):
    """Accumulates two views batch by batch and computes their canonical correlations.

    An ``nn.Module`` whose statistics (:class:`~star_heads.metrics.statistics.CCAStatistics`, float64) are
    registered state, as in a torchmetrics ``Metric``: ``.to(device)`` moves them, ``state_dict`` /
    ``load_state_dict`` save and restore them (so a meter checkpoints with the model that holds it), a dtype
    cast leaves them float64. An empty meter moves to the device of the first batch it sees.

    Args:
        p: Width of view x.
        q: Width of view y (default p).
        ridge: Relative ridge, as in :func:`~star_heads.metrics.canonical_correlations`.
        null_baseline: Also report the shuffled-pairing null mean (cached by the null module).
        rank_tol: Relative singular-value cut-off (None = 1e-5).
        check_finite: Check every batch for NaN/Inf in ``update`` (a device sync). When False,
            non-finite values are detected in ``compute`` instead.
        svcca_keep: Also report SVCCA keeping this fraction of each view's variance (None = no).
        device: Where the statistics start (default: the CPU, until the first batch).

    ``merge`` is exact; ``sync`` all-reduces over torch.distributed (see the module docstring for its guard).
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
        svcca_keep: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.p = check_positive_int(p, "p")
        self.q = self.p if q is None else check_positive_int(q, "q")
        self.ridge, self.rank_tol = check_cca_options(ridge, rank_tol)
        self.svcca_keep = None if svcca_keep is None else check_keep(svcca_keep, "svcca_keep")
        self.null_baseline = check_bool(null_baseline, "null_baseline")
        self.check_finite = check_bool(check_finite, "check_finite")
        self.stats = CCAStatistics(self.p, self.q, device=device)
        self._local: CCAStatistics | None = None  # the rank's own statistics while synced
        self._synced = False

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forgets all samples and any sync (keeps the options and the device)."""
        self.stats.reset()
        self._local, self._synced = None, False

    @property
    def n(self) -> int:
        """Number of samples the statistics hold."""
        return self.stats.n

    @property
    def device(self) -> torch.device:
        return self.stats.device

    @property
    def synced(self) -> bool:
        """True between :meth:`sync` and :meth:`unsync`."""
        return self._synced

    def _check_not_synced(self, action: str) -> None:
        if self._synced:
            raise RuntimeError(
                f"cannot {action} a synced CCAMeter (it holds every rank's samples): call unsync() first"
            )

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self._check_not_synced("save")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Adds a batch: x [B, p], y [B, q] (same rows, any float dtype); detached, float64, no autocast."""
        x, y = check_views(x, y, finite=False)
        if x.shape[1] != self.p or y.shape[1] != self.q:
            raise ValueError(
                f"CCAMeter(p={self.p}, q={self.q}) got x {tuple(x.shape)} and y {tuple(y.shape)}: "
                f"expected x [n, {self.p}] and y [n, {self.q}]"
            )
        if self.n and x.device != self.device:
            raise ValueError(f"CCAMeter statistics are on {self.device}, got a batch on {x.device}")
        self._check_not_synced("update")
        with torch.no_grad(), autocast_off(x.device.type):
            tops = torch.stack([magnitude(x).to(torch.float64), magnitude(y).to(torch.float64)])
            if self.check_finite:  # one host sync; the magnitudes are needed for the scale anyway
                finite = torch.isfinite(tops).tolist()
                for name, ok in zip("xy", finite):
                    if not ok:
                        raise ValueError(f"{name} contains NaN or Inf values")
            if x.device != self.device:  # an empty meter follows its first batch
                self.stats = CCAStatistics(self.p, self.q, device=x.device)
            self.stats.update_(x.detach(), y.detach(), tops)

    def merge(self, other: CCAMeter) -> CCAMeter:
        """Adds ``other``'s samples to this meter (in place; returns self). Exact and associative.

        The meters must agree on the estimator (widths, ``ridge``, ``rank_tol``); the readouts (``null_baseline``,
        ``svcca_keep``) and ``check_finite`` are this meter's.

        Raises:
            TypeError: ``other`` is not a CCAMeter.
            ValueError: Different widths, ridge or rank_tol, or ``other is self`` (merge a ``copy.deepcopy`` to
                count twice).
            RuntimeError: Either meter is synced.
        """
        if not isinstance(other, CCAMeter):
            raise TypeError(f"can only merge a CCAMeter, got {type(other).__name__}")
        mine, theirs = self._estimator(), other._estimator()
        if mine != theirs:
            diff = ", ".join(f"{k}={theirs[k]!r} vs {v!r}" for k, v in mine.items() if theirs[k] != v)
            raise ValueError(
                f"cannot merge a CCAMeter with other options into this one ({diff}): their samples "
                "would be read with another estimator"
            )
        if other is self:
            raise ValueError(
                "cannot merge a CCAMeter into itself (it would count its samples twice); "
                "merge copy.deepcopy(meter) if that is what you want"
            )
        self._check_not_synced("merge into")
        other._check_not_synced("merge")
        with torch.no_grad():
            self.stats.add_(other.stats)
        return self

    def _estimator(self) -> dict[str, Any]:
        return {"p": self.p, "q": self.q, "ridge": self.ridge, "rank_tol": self.rank_tol}

    # ------------------------------------------------------------------ distributed
    def sync(self) -> CCAMeter:
        """Replaces the statistics by those of all torch.distributed ranks (returns self).

        Every rank must call it. The local statistics are kept aside until :meth:`unsync`; a synced
        meter refuses ``update``, ``merge``, a second ``sync`` and ``state_dict``, so no sample is counted
        twice. Without an initialised process group (or with one rank) the statistics stay as they are,
        but the guard applies all the same. Ranks whose meters have other widths raise ``ValueError``.
        """
        self._check_not_synced("sync")
        local = self.stats.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if self.n == 0 and dist.get_backend() == "nccl":
                self.stats = CCAStatistics(self.p, self.q, device=torch.device("cuda", torch.cuda.current_device()))
            with torch.no_grad():
                self.stats.all_reduce_()
        self._local, self._synced = local, True
        return self

    def unsync(self) -> CCAMeter:
        """Restores this rank's own statistics after :meth:`sync` (returns self)."""
        if not self._synced or self._local is None:
            raise RuntimeError("CCAMeter.unsync() called on a meter that is not synced")
        self.stats.load_(self._local)
        self._local, self._synced = None, False
        return self

    @contextmanager
    def sync_context(self) -> Iterator[CCAMeter]:
        """``with meter.sync_context(): result = meter.compute()`` — synced inside, local again after."""
        self.sync()
        try:
            yield self
        finally:
            self.unsync()

    # ------------------------------------------------------------------ results
    def covariance(self) -> torch.Tensor:
        """Centred covariance of [x, y], [(p + q), (p + q)] float64 (unbiased, divides by n − 1).

        In the input's units: entries overflow to inf for views beyond ~1e154 (the CCA itself does not).
        """
        if self.n < 2:
            raise ValueError(f"CCAMeter needs at least 2 samples to compute a covariance, has n={self.n}")
        st = self.stats
        e = st.columns(st.exponent)
        return times_power_of_two(st.centred_gram() / (st.n - 1), e[:, None] + e[None, :])

    def compute(self) -> CCAResult:
        """Canonical correlations of everything seen since the last reset (or merged / synced).

        Raises:
            ValueError: n − 1 <= max(p, q), or the accumulated data contained NaN/Inf.
        """
        check_sample_size(self.n, self.p, self.q)
        if not self.stats.is_finite():
            raise ValueError(
                f"CCAMeter statistics are not finite after n={self.n} samples: some batch contained NaN/Inf"
            )
        return _result(self.stats, self.ridge, self.rank_tol, self.svcca_keep, self.null_baseline)

    def extra_repr(self) -> str:
        return f"p={self.p}, q={self.q}, ridge={self.ridge}, n={self.n}" + (", synced" if self._synced else "")


def _result(
    st: CCAStatistics, ridge: float, rank_tol: float, svcca_keep: float | None, null_baseline: bool
) -> CCAResult:
    """The covariance route of :mod:`star_heads.metrics.covariance` on accumulated statistics."""
    p = st.p
    with torch.no_grad(), autocast_off(st.device.type):
        gram = st.centred_gram()
        floor = rounding_floor(st.n)
        sx = view_spectrum(gram[:p, :p], rank_tol, floor)
        sy = view_spectrum(gram[p:, p:], rank_tol, floor)
        fx, fy = sx.shrink(ridge), sy.shrink(ridge)
        rho = whitened_correlations(gram[:p, p:], sx.whitener(), sy.whitener(), fx, fy)
        svcca = None
        if svcca_keep is not None:
            rx = min(sx.rank, sx.variance_rank(svcca_keep))
            ry = min(sy.rank, sy.variance_rank(svcca_keep))
            sv = whitened_correlations(gram[:p, p:], sx.whitener(rx), sy.whitener(ry))
            svcca = min(float(sv.mean()), 1.0) if sv.numel() else 0.0
    mean = min(float(rho.mean()), 1.0) if rho.numel() else 0.0  # a mean of values <= 1 can round above 1
    null = null_mean_canonical_correlation(st.n, fx, fy) if null_baseline else None
    return CCAResult(mean=mean, correlations=rho, rank_x=sx.rank, rank_y=sy.rank, n=st.n, null_mean=null, svcca=svcca)

