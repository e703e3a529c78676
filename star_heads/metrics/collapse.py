"""Collapse readouts of an embedding batch: the std of l2-normalised embeddings and the effective rank (RankMe).

Both sit next to CCA(inv, eq) and the routing statistics as per-task health checks of a STAR head
(arXiv 2510.27222, Sec. 4 reads redundancy between the tasks; these read collapse within one task):

* ``std``: the per-dimension standard deviation of ``z / ||z||``, averaged over dimensions (Chen & He, 2021,
  Sec. 4.1). A collapsed task gives 0; isotropic Gaussian embeddings give about ``1 / sqrt(D)``.
* ``rank``: RankMe (Garrido et al., 2023, Eq. 1): ``exp(-Σ_k p_k log p_k)`` with ``p_k = σ_k / ||σ||_1 + ε``,
  the singular values ``σ`` of the ``[B, D]`` batch. A rank-``k`` batch gives about ``k``; isotropic Gaussian
  embeddings with ``B >> D`` about ``D``.

Axis legend: ``B`` batch rows, ``D`` embedding width.

:func:`embedding_std` is elementwise work and reductions only (no host sync). :func:`effective_rank` runs an SVD,
which on CUDA synchronises with the host: compute it on logging steps (as
:class:`~star_heads.integrations.lightning.STARLoggingCallback` does). :meth:`CollapseStats.as_dict` converts to
floats (a sync), once, when logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from star_heads._checks import check_float, check_float_tensor
from star_heads._precision import autocast_off

__all__ = ["CollapseStats", "collapse_stats", "effective_rank", "embedding_std"]

RANKME_EPS = 1e-7  # Garrido et al. (2023), Eq. 1


def _rows(z: object, name: str) -> Tensor:
    x = check_float_tensor(z, name, ndim=2)
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be [B, D] with B >= 2 rows and D >= 1 columns, got shape {tuple(x.shape)}")
    return x.detach().float() if x.dtype in (torch.float16, torch.bfloat16) else x.detach()


def embedding_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the std (over the batch) of the l2-normalised rows of ``z [B, D]``.

    Returns:
        A 0-d tensor on ``z``'s device (float32 for half inputs, else ``z``'s dtype); no host sync.
    """
    x = _rows(z, "z")
    with autocast_off(x.device.type):
        unit = torch.nn.functional.normalize(x, dim=1)  # [B, D], zero rows stay zero
        return unit.std(dim=0).mean()


def effective_rank(z: Tensor, *, eps: float = RANKME_EPS) -> Tensor:
    """RankMe of ``z [B, D]`` (Garrido et al., 2023, Eq. 1): exp of the entropy of the l1-normalised singular values.

    Args:
        z: Embeddings ``[B, D]`` (not centred, as in the paper).
        eps: The ``ε`` added to each normalised singular value.

    Returns:
        A 0-d tensor in ``[~1, min(B, D)]`` (float32 for half inputs). The SVD syncs with the host on CUDA.
    """
    x = _rows(z, "z")
    eps = check_float(eps, "eps", minimum=0.0)
    with autocast_off(x.device.type):
        s = torch.linalg.svdvals(x)  # [min(B, D)]
        p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
        return torch.exp(-(p * torch.log(p)).sum())


@dataclass(frozen=True)
class CollapseStats:
    """Per-task collapse readouts, as 0-d tensors on the embeddings' device.

    Attributes:
        std: ``{task: embedding_std}``.
        rank: ``{task: effective_rank}``.
    """

    std: dict[str, Tensor]
    rank: dict[str, Tensor]

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{prefix + "<task>/std": float, prefix + "<task>/rank": float}`` for a logger (a host sync)."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        out: dict[str, float] = {}
        for task in self.std:
            out[f"{prefix}{task}/std"] = float(self.std[task])
            out[f"{prefix}{task}/rank"] = float(self.rank[task])
        return out


def collapse_stats(embeddings: Mapping[str, Tensor]) -> CollapseStats:
    """Both readouts for each task of ``{task: [B, D]}`` (e.g. a :class:`~star_heads.HeadOutput`).

    Raises:
        TypeError: ``embeddings`` is not a mapping of task names to float tensors.
        ValueError: it is empty, or a tensor is not ``[B >= 2, D >= 1]``.
    """
    if not isinstance(embeddings, Mapping):
        raise TypeError(f"embeddings must be a mapping {{task: Tensor [B, D]}}, got {type(embeddings).__name__}")
    if len(embeddings) == 0:
        raise ValueError("embeddings must hold at least one task, got an empty mapping")
    for task in embeddings:
        if not isinstance(task, str):
            raise TypeError(f"task names must be str, got {type(task).__name__} {task!r}")
        _rows(embeddings[task], f"embeddings[{task!r}]")
    return CollapseStats(
        std={t: embedding_std(z) for t, z in embeddings.items()},
        rank={t: effective_rank(z) for t, z in embeddings.items()},
    )
