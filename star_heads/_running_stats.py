"""BatchNorm whose running statistics ignore a batch holding NaN or Inf, decided on the device (private).

One non-finite row in a training batch makes that batch's mean and variance non-finite, and
``nn.BatchNorm1d`` folds them into its running statistics for good: every later eval output is NaN. The
package's BatchNorms (every expert of :class:`~star_heads.ExpertBank`, :class:`~star_heads.EquivariantPredictor`)
run through :func:`guarded_batch_norm` instead: the module runs unchanged (its output still carries the
NaN, so the loss shows it), then its running mean, running variance and ``num_batches_tracked`` are put
back to their previous values where the update is not finite. The decision is a ``torch.where`` on the
device; nothing is read back to the host, so a training step stays free of synchronisations.

Each BatchNorm decides on its own input (a layer that saw a finite batch updates as usual). The guard
wraps the module call, so it holds for ``nn.BatchNorm1d`` and for ``nn.SyncBatchNorm`` (after
``nn.SyncBatchNorm.convert_sync_batchnorm``), whose statistics are the global batch's: every rank sees the
same non-finite statistics and skips the same update.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["guarded_batch_norm", "updates_running_stats"]


def updates_running_stats(norm: nn.Module) -> bool:
    """Whether calling ``norm`` now updates running statistics (a BatchNorm in training mode that tracks them)."""
    return (
        isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and norm.training
        and norm.track_running_stats
        and norm.running_mean is not None
    )


def guarded_batch_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, except that a batch with a non-finite value leaves the running statistics unchanged.

    A non-finite value anywhere in the batch makes its channel's batch mean non-finite, hence the updated
    running mean (``(1 - m)·old + m·mean``, for any momentum ``m``, or the cumulative average when it is
    None). The check reads the updated statistics (one small reduction per buffer), not the activations;
    a finite batch whose statistics overflow is skipped as well.

    Args:
        norm: Any module; only BatchNorms that update running statistics (:func:`updates_running_stats`)
            are guarded, the others are called as they are.
        x: The module's input.

    Returns:
        ``norm(x)``, unchanged (NaN in, NaN out).
    """
    if not updates_running_stats(norm):
        return norm(x)
    buffers = [b for b in (norm.running_mean, norm.running_var, norm.num_batches_tracked) if b is not None]
    with torch.no_grad():
        before = [b.clone() for b in buffers]
    y = norm(x)
    with torch.no_grad():
        finite = torch.isfinite(norm.running_mean).all()
        if norm.running_var is not None:
            finite = finite & torch.isfinite(norm.running_var).all()
        for buffer, old in zip(buffers, before):
            # through .data: autograd saved the running statistics for BatchNorm's backward (which does not
            # read them in training mode), and a write to the tensor itself would fail its version check
            buffer.data.copy_(torch.where(finite, buffer, old))
    return y
