"""Minimal torch.distributed helpers: rank queries and a gradient-correct all-gather.

Gradient convention of :func:`gather`
-------------------------------------
``y = gather(x)`` concatenates every rank's ``x`` along dim 0 (rank order). Its backward
*sums* the incoming gradient ``dL_r/dy`` over all ranks (``all_reduce``) and returns this
rank's slice, i.e. rank ``r`` receives ``sum_{r'} dL_{r'}/dx_r``: the gradient of every rank's
loss with respect to the rows that rank ``r`` owns.

Consequence (what the losses in :mod:`star_heads.losses` rely on): let every rank compute a
loss ``L_r`` that is the mean over its LOCAL anchors (with negatives / statistics taken from
the GATHERED global batch), all ranks holding equally many rows. Then

* ``mean_r L_r`` equals the single-process loss ``L`` on the concatenated batch, and
* the gradients that ``DistributedDataParallel`` produces (it *averages* parameter gradients
  over ranks) equal ``dL/dtheta`` of the single-process run on the full batch, because
  ``(1/W) sum_r sum_{r'} dL_{r'}/dtheta|_{rows of r} = (1/W) d(sum_{r'} L_{r'})/dtheta = dL/dtheta``.

A gather whose backward only returns the local slice of ``dL_r/dy`` (no sum; lightly's open
bug) drops the other ranks' contributions, so gradients through the gathered rows come out
``1/W`` too small. ``tests/test_distributed.py`` shows such a naive gather failing the check.

Every helper is a no-op (identity / 1 / 0) when torch.distributed is not initialised.

Process-group teardown
----------------------
``torch.distributed.nn.functional`` binds ``group=group.WORLD`` as a default argument of its
functions, so the default process group *at its first import* stays referenced for the life of the
interpreter. ``DistributedDataParallel`` imports that module lazily, i.e. usually after
``init_process_group``; ``destroy_process_group`` then cannot free the group, its gloo worker and
socket threads keep running, and the group is torn down during interpreter finalisation, racing the
peer ranks' exits (seen as ``terminate called without an active exception`` / SIGABRT of a worker).
Importing this module imports ``torch.distributed.nn.functional`` first, while no group exists, so
its defaults bind ``None`` and ``destroy_process_group`` really ends the group. Import star_heads
(or this module) before ``init_process_group``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum", "gather", "is_distributed", "rank", "world_size"]

if dist.is_available() and not dist.is_initialized():  # see "Process-group teardown" above
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except ImportError:  # pragma: no cover - builds without the module
        pass


def is_distributed() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(x: Tensor) -> Tensor:
    """Returns the sum of ``x`` over all ranks (a new tensor; no gradient; ``x`` untouched).

    Identity (a detached clone) when not distributed.
    """
    out = x.detach().clone().contiguous()
    if is_distributed() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _Gather(torch.autograd.Function):
    """all_gather along dim 0 whose backward all-reduces (sums) and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rows = x.shape[0]
        ctx.rank = dist.get_rank()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def gather(x: Tensor) -> Tensor:
    """Concatenates ``x`` from all ranks along dim 0, with gradients flowing back to each rank.

    See the module docstring for the exact gradient convention. All ranks must pass tensors of
    the same shape (checked with one small extra collective; every rank raises together).

    Args:
        x: Tensor ``[n, ...]``, the same shape on every rank.

    Returns:
        ``[world_size * n, ...]`` (rank 0's rows first); ``x`` itself when not distributed or
        with a single rank.

    Raises:
        ValueError: The ranks hold tensors of different shapes.
    """
    if not is_distributed() or world_size() == 1:
        return x
    if x.ndim > 8:
        raise ValueError(f"gather supports tensors of at most 8 dimensions, got {x.ndim}")
    shape = torch.tensor([x.ndim, *x.shape, *([0] * (8 - x.ndim))], dtype=torch.int64, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        got = [tuple(s[1 : 1 + int(s[0])].tolist()) for s in shapes]
        raise ValueError(f"gather needs the same shape on every rank, got shapes by rank {got}")
    return _Gather.apply(x)
