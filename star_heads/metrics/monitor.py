"""Training-loop helper: CCA(invariant, equivariant) every few steps, at negligible cost.

Each call adds one batch to float64 sufficient statistics (one (p+q)² GEMM); every ``every``
calls it computes a :class:`~star_heads.metrics.CCAResult` over the last ``window`` steps,
all-reducing across ranks first when torch.distributed is initialised.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from star_heads._checks import check_positive_int
from star_heads.metrics.meter import CCAMeter, CCAResult

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

    Example::

        monitor = CCAMonitor(every=100)
        for step, batch in enumerate(loader):
            z_inv, z_eq = head(h)            # embeddings of the same images
            ...
            result = monitor.update(z_inv, z_eq)
            if result is not None:
                print(step, result.mean, result.null_mean)
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
    ) -> None:
        self.every = check_positive_int(every, "every")
        window = self.every if window is None else check_positive_int(window, "window")
        if window % self.every:
            raise ValueError(f"window must be a multiple of every={self.every}, got {window}")
        self.window = window
        self.ridge = ridge
        self.null_baseline = null_baseline
        self.sync = sync
        self.log = log
        self.steps = 0
        self.last: CCAResult | None = None
        self._chunks: deque[CCAMeter] = deque(maxlen=window // self.every)
        self._current: CCAMeter | None = None
        self._null_cache: dict[tuple, float] = {}
        CCAMeter(1, ridge=ridge)  # validates ridge now rather than at the first step

    def reset(self) -> None:
        """Drops all statistics and the step counter (keeps ``last``)."""
        self.steps = 0
        self._chunks.clear()
        self._current = None

    def update(self, z_inv: torch.Tensor, z_eq: torch.Tensor) -> CCAResult | None:
        """Adds one step's embeddings ([B, p], [B, q], detached here); returns a result every ``every`` calls."""
        if self._current is None:
            if not isinstance(z_inv, torch.Tensor) or not isinstance(z_eq, torch.Tensor) or z_inv.ndim != 2 or z_eq.ndim != 2:
                CCAMeter(1).update(z_inv, z_eq)  # raises the descriptive type / shape error
            self._current = CCAMeter(
                z_inv.shape[1], z_eq.shape[1], ridge=self.ridge, null_baseline=False, check_finite=False
            )
        self._current.update(z_inv, z_eq)
        self.steps += 1
        if self.steps % self.every:
            return None
        self._chunks.append(self._current)
        self._current = None
        return self._compute()

    def _compute(self) -> CCAResult:
        first = self._chunks[0]
        total = CCAMeter(first.p, first.q, ridge=self.ridge, null_baseline=self.null_baseline)
        total._null_cache = self._null_cache  # the null depends only on (n, ranks): reuse it across windows
        for chunk in self._chunks:
            total.merge(chunk)
        if self.sync and dist.is_available() and dist.is_initialized():
            total.sync()
        result = total.compute()
        self.last = result
        if self.log is not None:
            self.log(self.steps, result)
        return result
