"""Training-loop helper: CCA(invariant, equivariant) every few steps, at negligible cost.

Each call adds one batch to float64 sufficient statistics on the batch's device (one (p+q)² GEMM, no
host sync); every ``every`` calls it computes a :class:`~star_heads.metrics.CCAResult` over the last
``window`` steps, all-reducing across ranks first when torch.distributed is initialised. A window
with too few samples for a meaningful CCA is never an error: the monitor keeps accumulating steps
until it has enough, and says so once (a :class:`~star_heads.metrics.CCASampleSizeWarning`).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from star_heads._checks import check_bool, check_positive_int
from star_heads.metrics.meter import CCAMeter, CCAResult
from star_heads.metrics.validation import (
    CCASampleSizeWarning,
    check_cca_options,
    check_keep,
    check_views,
    min_samples,
)

__all__ = ["CCAMonitor"]


class CCAMonitor:
    """Computes the redundancy CCA(z_inv, z_eq) from the embeddings a training loop already has.

    Args:
        every: Compute (and return) a result every ``every`` calls to :meth:`update`.
        window: Steps covered by a result; a multiple of ``every``. None = ``every`` (disjoint
            windows, statistics reset after each result).
        ridge: Relative ridge (see :func:`~star_heads.metrics.canonical_correlations`).
        null_baseline: Report the shuffled-pairing null mean next to the value.
        sync: All-reduce the window over torch.distributed ranks before computing (all ranks must
            call ``update`` the same number of times). No-op when not initialised.
        log: Optional callback ``log(step, result)`` called with each new result.
        min_samples: Samples a result needs (over all ranks); None = 2(p + q), the size below which
            CCA is strongly biased upward. Never less than max(p, q) + 2, below which every
            correlation is trivially 1. Windows with fewer samples are extended by further steps.
        svcca_keep: Also report SVCCA keeping this fraction of each view's variance (None = no).

    Example::

        monitor = CCAMonitor(every=100)
        for step, batch in enumerate(loader):
            z_inv, z_eq = head(h)            # embeddings of the same images
            ...
            result = monitor.update(z_inv, z_eq)
            if result is not None:
                logger.log_dict(result.as_dict("cca/"))   # mean, null_mean, excess, rank_x, rank_y, n
    """

    def __init__(
        self,
        every: int = 100,
        *,
        window: int | None = None,
        ridge: float = 0.0,
        null_baseline: bool = True,
        sync: bool = True,
        log: Callable[[int, CCAResult], None] | None = None,
        min_samples: int | None = None,
        svcca_keep: float | None = None,
    ) -> None:
        self.every = check_positive_int(every, "every")
        window = self.every if window is None else check_positive_int(window, "window")
        if window % self.every:
            raise ValueError(f"window must be a multiple of every={self.every}, got {window}")
        if log is not None and not callable(log):
            raise TypeError(f"log must be a callable log(step, result) or None, got {type(log).__name__}")
        self.window = window
        self.ridge, _ = check_cca_options(ridge, None)
        self.svcca_keep = None if svcca_keep is None else check_keep(svcca_keep, "svcca_keep")
        self.min_samples = None if min_samples is None else check_positive_int(min_samples, "min_samples")
        self.null_baseline = check_bool(null_baseline, "null_baseline")
        self.sync = check_bool(sync, "sync")
        self.log = log
        self.steps = 0
        self.last: CCAResult | None = None
        self._chunks: deque[CCAMeter] = deque()
        self._current: CCAMeter | None = None
        self._dims: tuple[int, int] | None = None
        self._warned = False

    def reset(self) -> None:
        """Drops all statistics and the step counter (keeps ``last``)."""
        self.steps = 0
        self._chunks.clear()
        self._current = None
        self._dims = None

    def needed_samples(self, p: int, q: int) -> int:
        """Samples a result needs for views of widths p, q (see ``min_samples``)."""
        wanted = 2 * (p + q) if self.min_samples is None else self.min_samples
        return max(wanted, min_samples(p, q))

    def update(self, z_inv: torch.Tensor, z_eq: torch.Tensor) -> CCAResult | None:
        """Adds one step's embeddings ([B, p], [B, q], detached here); returns a result every ``every`` calls.

        Returns None between results, and at a reporting step whose window (over all ranks) still
        has fewer than :meth:`needed_samples` samples: those steps stay in the next window.
        """
        x, y = check_views(z_inv, z_eq, finite=False)  # no host sync: NaN/Inf are reported by compute
        dims = (x.shape[1], y.shape[1])
        if self._dims is not None and dims != self._dims:
            p, q = self._dims
            raise ValueError(f"CCAMonitor got x {tuple(x.shape)} and y {tuple(y.shape)}: "
                             f"expected x [n, {p}] and y [n, {q}] as in earlier steps")
        if self._current is None:
            self._current = CCAMeter(*dims, ridge=self.ridge, null_baseline=False, check_finite=False)
        self._current.update(x, y)
        self._dims = dims
        self.steps += 1
        if self.steps % self.every:
            return None
        self._chunks.append(self._current)
        self._current = None
        return self._compute()

    def _distributed(self) -> bool:
        return self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _chunk_counts(self) -> list[int]:
        counts = [chunk.n for chunk in self._chunks]
        if self._distributed():  # the same decision on every rank: count over all of them
            total = torch.tensor(counts, dtype=torch.float64, device=self._chunks[-1].device)
            dist.all_reduce(total)
            counts = [int(c) for c in total.tolist()]
        return counts

    def _compute(self) -> CCAResult | None:
        p, q = self._dims
        need = self.needed_samples(p, q)
        counts = self._chunk_counts()
        while len(self._chunks) > self.window // self.every and sum(counts[1:]) >= need:
            self._chunks.popleft()  # slide, but never below the samples a result needs
            counts.pop(0)
        if sum(counts) < need:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"CCAMonitor: the last {len(counts) * self.every} steps hold n={sum(counts)} samples, but CCA of "
                    f"p={p}, q={q} needs n >= {need}; accumulating more steps until it has them (said once)",
                    CCASampleSizeWarning,
                    stacklevel=3,
                )
            return None
        total = CCAMeter(p, q, ridge=self.ridge, null_baseline=self.null_baseline, check_finite=False,
                         svcca_keep=self.svcca_keep)
        for chunk in self._chunks:
            total.merge(chunk)
        if self._distributed():
            total.sync()
        result = total.compute()
        self.last = result
        if self.log is not None:
            self.log(self.steps, result)
        return result
