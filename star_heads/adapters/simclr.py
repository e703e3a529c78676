"""SimCLR-style trainers: NT-Xent through a STAR head, plus STAR's equivariant term on joint calls."""

from __future__ import annotations

from typing import Any

from star_heads import distributed as _dist
from star_heads.adapters.base import JointAdapter, LossFn
from star_heads.losses import EquivariantNTXentLoss, NTXentLoss

__all__ = ["SimCLRAdapter", "EquiModAdapter"]


class SimCLRAdapter(JointAdapter):
    """SimCLR objective through a STAR head; the joint call adds the equivariant NT-Xent (STAR's objective).

    ``L_inv = NT-Xent(z_inv(x1), z_inv(x2))`` (2B anchors, cosine similarity, temperature 0.2 as in STAR;
    SimCLR/lightly use 0.5), ``L_eq = NT-Xent([z_eq(x1); z_eq(x2)], [ẑ_eq(x1); ẑ_eq(x2)])`` (4B − 2
    negatives per anchor), ``L = L_inv + λ·L_eq``.

    Args:
        input_dim: Backbone feature width (e.g. 512 for ResNet-18).
        temperature: Invariant NT-Xent temperature.
        eq_temperature: Equivariant NT-Xent temperature.
        gather: Gather negatives across torch.distributed ranks (gradients exact under DDP).
        loss: Replace the invariant loss by any ``(z0, z1) -> Tensor`` callable (e.g. lightly's NTXentLoss).
        eq_loss: Replace the equivariant loss.
        **kwargs: :class:`~star_heads.adapters.JointAdapter` options (``head``, ``num_experts``, ``lam``,
            ``predictor``, ``normalizer``, ``param_dim``, ``cca_every``, ...).
    """

    def __init__(
        self,
        input_dim: int,
        *,
        temperature: float = 0.2,
        eq_temperature: float = 0.2,
        gather: bool = False,
        loss: LossFn | None = None,
        eq_loss: LossFn | None = None,
        **kwargs: Any,
    ) -> None:
        gather = _dist.check_gather(gather, "gather")
        super().__init__(
            input_dim,
            loss=loss or NTXentLoss(temperature, gather_distributed=gather),
            eq_loss=eq_loss or EquivariantNTXentLoss(eq_temperature, gather_distributed=gather),
            **kwargs,
        )


class EquiModAdapter(SimCLRAdapter):
    """EquiMod-style trainers (NT-Xent for both tasks): the separate invariant/equivariant heads become one
    STAR head.

    Defaults to EquiMod's own predictor (``Linear(P → D)`` + BN parameter projector, one
    ``Linear(2D → D)`` + ``BN(affine=False)``, no residual) so an EquiMod trainer keeps its objective; pass
    ``predictor="star"`` for the STAR paper's residual predictor. EquiMod's parameter vector is 15-D on
    CIFAR10 and 17-D on ImageNet: set ``param_dim`` accordingly.
    """

    def __init__(self, input_dim: int, *, predictor: str | Any = "equimod", **kwargs: Any) -> None:
        super().__init__(input_dim, predictor=predictor, **kwargs)
