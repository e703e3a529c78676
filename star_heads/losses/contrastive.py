"""NT-Xent (SimCLR) and the STAR/EquiMod equivariant NT-Xent, optionally across ranks.

Axis legend: ``n`` rows on this rank, ``N = world_size * n`` rows after gathering, ``d`` embedding
width, ``q`` anchors (queries) on this rank, ``k = 2N`` keys (candidates) across all ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from star_heads import distributed as _dist
from star_heads._checks import check_choice, check_float_tensor, check_positive_float
from star_heads._precision import autocast_off

__all__ = ["EquivariantNTXentLoss", "NTXentLoss", "equivariant_nt_xent", "nt_xent"]

Anchors = Literal["both", "first"]


def _check_temperature(temperature: object) -> float:
    return check_positive_float(temperature, "temperature")


def _check_pair(a: object, b: object, names: tuple[str, str], gather: bool) -> tuple[Tensor, Tensor]:
    """Two ``[rows, dim]`` float tensors of one shape, with at least one negative per anchor (shapes only)."""
    a = check_float_tensor(a, names[0], ndim=2)
    b = check_float_tensor(b, names[1], ndim=2)
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape [batch, dim], "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] < 1:
        raise ValueError(f"{names[0]} must hold at least one row, got shape {tuple(a.shape)}")
    if a.shape[1] < 1:
        raise ValueError(f"{names[0]} must have at least one embedding dimension, got shape {tuple(a.shape)}")
    rows = a.shape[0] * (_dist.world_size() if gather else 1)
    if rows < 2:
        raise ValueError(
            f"{names[0]} must hold at least 2 rows (global rows with gather=True): with one pair every anchor "
            f"has only its positive and no negative, so the loss is a constant; got shape {tuple(a.shape)}"
        )
    return a, b


def _pair_contrastive(a: Tensor, b: Tensor, temperature: float, gather: bool, anchors: Anchors) -> Tensor:
    """Mean over anchors of -log softmax of the positive among all other rows of [A; B] (all ranks).

    Row i of ``a`` and row i of ``b`` are positives of each other; every other row of the
    (gathered) stack ``[A; B]`` is a negative. Anchors are the local rows of A and B
    (``anchors="both"``) or of A only (``"first"``). Computed in float32 (or float64 if
    given) with autocast disabled.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    with autocast_off(a.device.type):
        qa = F.normalize(a.to(dtype), dim=1)  # [n, d]
        qb = F.normalize(b.to(dtype), dim=1)  # [n, d]
        n = qa.shape[0]
        if gather:
            d = qa.shape[1]
            gathered = _dist.gather(torch.cat([qa, qb], dim=1))  # one collective: [N, 2d]
            ka, kb, offset = gathered[:, :d], gathered[:, d:], _dist.rank() * n
        else:
            ka, kb, offset = qa, qb, 0
        big_n = ka.shape[0]
        keys = torch.cat([ka, kb], dim=0)  # [2N, d]
        local = torch.arange(n, device=a.device) + offset  # global index of local row i in A
        if anchors == "both":
            queries = torch.cat([qa, qb], dim=0)  # [2n, d]
            self_idx = torch.cat([local, local + big_n])
            pos_idx = torch.cat([local + big_n, local])
        else:
            queries, self_idx, pos_idx = qa, local, local + big_n
        logits = queries @ keys.T / temperature  # [q, 2N]
        is_self = self_idx[:, None] == torch.arange(2 * big_n, device=a.device)  # [q, 2N]; no value check, no sync
        logits = logits.masked_fill(is_self, float("-inf"))
        return F.cross_entropy(logits, pos_idx)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2, *, gather: bool = False) -> Tensor:
    """SimCLR NT-Xent loss with cosine similarity, both directions (2B anchors).

    SimCLR (Chen et al. 2020, arXiv 2002.05709, Eq. 1): for the 2B rows ``z = [z1; z2]``,
    ``l_i = -log( exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau) )`` where ``j`` is
    the other view of the same image, ``sim`` is the cosine similarity, and the loss is the mean
    of ``l_i`` over all 2B anchors (each with 2B - 2 negatives).

    With ``gather=True`` (torch.distributed initialised, equal batch sizes on all ranks) the
    anchors are this rank's ``2n`` rows and the candidates ``k`` are the rows of all ranks, so
    the mean over ranks of the returned loss equals the single-process loss on the concatenated
    batch, and DDP-averaged gradients equal the single-process gradients (see
    :mod:`star_heads.distributed`).

    Args:
        z1: Embeddings of the first view ``[B, D]``.
        z2: Embeddings of the second view ``[B, D]``; row i is the positive of ``z1`` row i.
        temperature: ``tau > 0``.
        gather: Take negatives from all ranks.

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).

    Raises:
        ValueError: Shapes differ, zero-width embeddings, or fewer than 2 (global) rows: one pair has no
            negative, so the loss would be a constant.
        TypeError: Non-float inputs, a non-number temperature, a non-bool ``gather``.
        RuntimeError: ``gather=True`` in a torch build without torch.distributed.
    """
    temperature = _check_temperature(temperature)
    gather = _dist.check_gather(gather, "gather")
    z1, z2 = _check_pair(z1, z2, ("z1", "z2"), gather)
    return _pair_contrastive(z1, z2, temperature, gather, "both")


def equivariant_nt_xent(
    targets: Tensor,
    predictions: Tensor,
    temperature: float = 0.2,
    *,
    gather: bool = False,
    anchors: Anchors = "both",
) -> Tensor:
    """STAR / EquiMod equivariant NT-Xent between targets A and predictions P.

    STAR (arXiv 2510.27222, Sec. 3; EquiMod, arXiv 2211.01244): ``L_eq = NT-Xent(A, P)`` with
    ``A = [z_eq(x1); z_eq(x2)]`` and
    ``P = [ẑ_eq(x1); ẑ_eq(x2)]`` (``M = 2B`` rows each): the positive of row i of A is row i of
    P; the negatives are all other rows of A and P, ``2M - 2 = 4B - 2`` per anchor. NT-Xent is
    symmetric, so by default (``anchors="both"``, as in the reference code, which runs its
    NT-Xent on the concatenation) every row of A *and* of P is an anchor (2M = 4B anchors; P row
    i's positive is A row i), which makes this exactly ``nt_xent(targets, predictions)``.
    ``anchors="first"`` keeps only the target rows as anchors (M anchors, same 4B - 2 negatives).

    Args:
        targets: ``A`` ``[M, D]`` (e.g. the two views stacked, M = 2B).
        predictions: ``P`` ``[M, D]``; row i predicts targets row i.
        temperature: ``tau > 0``.
        gather: Take negatives from all ranks (same guarantees as :func:`nt_xent`).
        anchors: ``"both"`` (default) or ``"first"`` (targets only).

    Returns:
        Scalar loss.

    Raises:
        ValueError / TypeError / RuntimeError: as :func:`nt_xent`; ``anchors`` not one of the choices.
    """
    temperature = _check_temperature(temperature)
    check_choice(anchors, "anchors", Anchors)
    gather = _dist.check_gather(gather, "gather")
    targets, predictions = _check_pair(targets, predictions, ("targets", "predictions"), gather)
    return _pair_contrastive(targets, predictions, temperature, gather, anchors)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`: ``lightly.loss.NTXentLoss``'s signature, defaults and ``forward(out0, out1)``.

    Same positional order and defaults as lightly (``temperature=0.5, memory_bank_size=0,
    gather_distributed=False``), so code written for lightly means the same here. The memory bank (MoCo
    negatives) is not implemented: any ``memory_bank_size`` other than ``0`` (or a tuple starting with 0)
    raises NotImplementedError instead of being ignored; keep lightly's loss for a memory bank (any
    ``(z0, z1) -> Tensor`` loss plugs into the adapters). STAR itself uses ``temperature=0.2``
    (:class:`~star_heads.SimCLRAdapter` sets it).

    Args:
        temperature: ``tau > 0`` (lightly's default 0.5).
        memory_bank_size: Must be 0 (disabled), as an int or a ``(0, dim)`` tuple.
        gather_distributed: Take negatives from all ranks (gradients exact under DDP).

    Raises:
        NotImplementedError: a non-zero memory bank size.
        TypeError / ValueError: a temperature that is not a positive number.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: int | Sequence[int] = 0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        _check_no_memory_bank(memory_bank_size)
        self.gather_distributed = _dist.check_gather(gather_distributed, "gather_distributed")

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return nt_xent(out0, out1, self.temperature, gather=self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


def _check_no_memory_bank(size: object) -> None:
    entries = (size,) if isinstance(size, int) and not isinstance(size, bool) else size
    if not isinstance(entries, (tuple, list)) or not all(
        isinstance(e, int) and not isinstance(e, bool) for e in entries
    ):
        raise TypeError(f"memory_bank_size must be an int or a sequence of ints (lightly's form), got {size!r}")
    if len(entries) == 0 or entries[0] != 0:
        raise NotImplementedError(
            f"memory_bank_size={size!r}: star_heads.NTXentLoss has no memory bank (only 0 is supported); "
            "use lightly.loss.NTXentLoss(memory_bank_size=...) for MoCo-style negatives"
        )


class EquivariantNTXentLoss(nn.Module):
    """Module form of :func:`equivariant_nt_xent`; ``forward(targets, predictions)``.

    Args:
        temperature: ``tau > 0`` (STAR default 0.2).
        gather_distributed: Take negatives from all ranks.
        anchors: ``"both"`` (default) or ``"first"``.
    """

    def __init__(
        self, temperature: float = 0.2, gather_distributed: bool = False, *, anchors: Anchors = "both"
    ) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.anchors: Anchors = check_choice(anchors, "anchors", Anchors)
        self.gather_distributed = _dist.check_gather(gather_distributed, "gather_distributed")

    def forward(self, targets: Tensor, predictions: Tensor) -> Tensor:
        return equivariant_nt_xent(
            targets, predictions, self.temperature, gather=self.gather_distributed, anchors=self.anchors
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}, anchors={self.anchors!r}"
