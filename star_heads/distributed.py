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

Every helper is a no-op (identity / 1 / 0) when torch.distributed is not initialised, so a loss built
with ``gather_distributed=True`` runs unchanged in one process (as lightly's do); a torch build without
torch.distributed is refused by :func:`check_gather` when such a loss is built or called.

Shape check, once per shape
---------------------------
``all_gather`` needs the same shape on every rank; a mismatch hangs or corrupts the collective. :func:`gather`
compares the ranks' shapes with one small collective (and a host read) the first time it sees a
``(shape, dtype, world size)`` and remembers the answer, so a training loop pays it once per batch shape,
not once per call. All ranks decide alike as long as their shapes change together (the usual case:
``DistributedSampler`` gives every rank equally many samples, so a smaller last batch is smaller everywhere);
a rank whose shape changes alone is not caught (as with lightly's and solo-learn's gathers, which do not
check at all). :func:`clear_shape_cache` forgets what was checked.

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

__all__ = ["all_reduce_sum", "check_gather", "clear_shape_cache", "gather", "is_distributed", "rank", "world_size"]

_checked_shapes: set[tuple] = set()  # (shape, dtype, world size, group) whose equality across ranks is known

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


def check_gather(value: object, name: str) -> bool:
    """Validates a ``gather`` / ``gather_distributed`` flag: a bool, and True only where torch.distributed exists.

    A Python-level check (no collective, no sync). Without an initialised process group a gathering loss is
    the local loss of one process, so a multi-GPU config also runs on one device.

    Raises:
        TypeError: ``value`` is not a bool.
        RuntimeError: ``value`` is True but this torch build has no torch.distributed.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    if value and not dist.is_available():
        raise RuntimeError(
            f"{name}=True needs torch.distributed, which this torch build does not have "
            f"(torch.distributed.is_available() is False); pass {name}=False"
        )
    return value


def clear_shape_cache() -> None:
    """Forgets which shapes :func:`gather` has checked (the next call of each shape checks again)."""
    _checked_shapes.clear()


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
    the same shape: checked with one small extra collective the first time a shape is seen
    (every rank raises together), then remembered ("Shape check, once per shape" above).

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
    key = (tuple(x.shape), x.dtype, world_size(), id(dist.group.WORLD))
    if key not in _checked_shapes:
        _check_same_shape(x)
        _checked_shapes.add(key)
    return _Gather.apply(x)


def _check_same_shape(x: Tensor) -> None:
    """One all_gather of the shapes (and one host read): raises on every rank if any rank's shape differs."""
    if x.ndim > 8:
        raise ValueError(f"gather supports tensors of at most 8 dimensions, got {x.ndim}")
    header = [x.ndim, *x.shape, *([0] * (8 - x.ndim))]
    shape = torch.tensor(header, dtype=torch.int64).to(x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    rows = torch.stack(shapes).cpu().tolist()  # the one host read
    if any(row != rows[0] for row in rows):
        got = [tuple(row[1 : 1 + row[0]]) for row in rows]
        raise ValueError(f"gather needs the same shape on every rank, got shapes by rank {got}")
