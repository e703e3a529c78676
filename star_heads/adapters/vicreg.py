"""VICReg-style trainers: VICReg for the invariant task and a VICReg-style equivariant term."""

from __future__ import annotations

from functools import partial
from typing import Any

from star_heads import distributed as _dist
from star_heads.adapters.base import JointAdapter, LossFn
from star_heads.losses import vicreg
from star_heads.losses.vicreg import _check_convention, _check_eps, _check_weight

__all__ = ["VICRegAdapter"]


class VICRegAdapter(JointAdapter):
    """VICReg through a STAR head.

    ``L_inv = λ·MSE(Z1, Z2) + μ·[v(Z1) + v(Z2)] + ν·[c(Z1) + c(Z2)]`` (VICReg; lightly's ½ on the variance
    term by default, ``variance_convention="solo"`` for solo-learn's), and on joint calls the same
    expression between the stacked equivariant targets ``[z_eq(x1); z_eq(x2)]`` and the predictions
    ``[ẑ_eq(x1); ẑ_eq(x2)]`` (MSE pulls predictions onto targets; variance / covariance keep both from
    collapsing). ``AdapterOutput.losses`` holds every term (``"inv/invariance"``, ``"eq/variance"``, ...).

    Args:
        input_dim: Backbone feature width.
        sim: λ (invariance weight).
        var: μ (variance weight).
        cov: ν (covariance weight).
        eps: Added to the variance before the square root.
        variance_convention: ``"lightly"`` (½, default) or ``"solo"``.
        gather: Compute variance / covariance on the batch gathered across ranks.
        loss: Replace the invariant loss by any ``(z0, z1)`` callable (e.g. lightly's VICRegLoss).
        eq_loss: Replace the equivariant loss.
        **kwargs: :class:`~star_heads.adapters.JointAdapter` options.
    """

    def __init__(
        self,
        input_dim: int,
        *,
        sim: float = 25.0,
        var: float = 25.0,
        cov: float = 1.0,
        eps: float = 1e-4,
        variance_convention: str = "lightly",
        gather: bool = False,
        loss: LossFn | None = None,
        eq_loss: LossFn | None = None,
        **kwargs: Any,
    ) -> None:
        sim, var, cov = _check_weight(sim, "sim"), _check_weight(var, "var"), _check_weight(cov, "cov")
        eps, variance_convention = _check_eps(eps), _check_convention(variance_convention)  # at construction
        gather = _dist.check_gather(gather, "gather")
        default = partial(
            vicreg, sim=sim, var=var, cov=cov, eps=eps, variance_convention=variance_convention, gather=gather
        )
        super().__init__(input_dim, loss=loss or default, eq_loss=eq_loss or default, **kwargs)
