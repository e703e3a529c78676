"""VICReg loss (Bardes et al., ICLR 2022) with its three terms returned separately."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from star_heads import distributed as _dist
from star_heads._checks import check_float_tensor

__all__ = ["VICRegLoss", "VICRegOutput", "vicreg"]

VarianceConvention = Literal["lightly", "solo"]


@dataclass(frozen=True)
class VICRegOutput:
    """Result of :func:`vicreg`.

    Attributes:
        loss: ``sim * invariance + var * variance + cov * covariance`` (the total to minimise).
        invariance: ``MSE(Z, Z')`` (unweighted).
        variance: ``½[v(Z) + v(Z')]`` ("lightly") or ``v(Z) + v(Z')`` ("solo"), unweighted.
        covariance: ``c(Z) + c(Z')`` (unweighted).
    """

    loss: Tensor
    invariance: Tensor
    variance: Tensor
    covariance: Tensor

    def terms(self) -> dict[str, Tensor]:
        """The named unweighted terms ``{"invariance", "variance", "covariance"}`` (Tensors, graph kept)."""
        return {"invariance": self.invariance, "variance": self.variance, "covariance": self.covariance}

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{prefix + "loss": float, prefix + "invariance": float, ...}``: Python floats for a logger."""
        out = {"loss": self.loss, **self.terms()}
        return {f"{prefix}{k}": float(v.detach()) for k, v in out.items()}


def _variance_term(z: Tensor, eps: float) -> Tensor:
    """``v(Z) = mean_j ReLU(1 - sqrt(Var(Z_j) + eps))`` with the unbiased (n - 1) variance."""
    std = torch.sqrt(z.var(dim=0, unbiased=True) + eps)
    return F.relu(1.0 - std).mean()


def _covariance_term(z: Tensor) -> Tensor:
    """``c(Z) = (1/d) sum_{i != j} Cov(Z)_ij^2`` with the unbiased covariance."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)  # [d, d]
    off_diagonal = ~torch.eye(d, dtype=torch.bool, device=z.device)
    return cov.pow(2).masked_select(off_diagonal).sum() / d


def _check_weight(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return float(value)


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a float > 0 (sqrt(Var + eps) needs it for finite gradients), got {eps!r}")
    return float(eps)


def _check_convention(convention: object) -> VarianceConvention:
    if convention not in ("lightly", "solo"):
        raise ValueError(f"variance_convention must be 'lightly' or 'solo', got {convention!r}")
    return convention  # type: ignore[return-value]


def vicreg(
    z1: Tensor,
    z2: Tensor,
    sim: float = 25.0,
    var: float = 25.0,
    cov: float = 1.0,
    eps: float = 1e-4,
    *,
    variance_convention: VarianceConvention = "lightly",
    gather: bool = False,
) -> VICRegOutput:
    """VICReg loss with its invariance, variance and covariance terms.

    VICReg (Bardes et al. 2022, arXiv 2105.04906, Eqs. 1-6):
    ``l = λ·MSE(Z, Z') + μ·[v(Z) + v(Z')] + ν·[c(Z) + c(Z')]`` with
    ``v(Z) = mean_j ReLU(1 - sqrt(Var(Z_j) + eps))`` and ``c(Z) = (1/d) sum_{i≠j} Cov(Z)_ij^2``
    (unbiased variance / covariance over the batch).

    Variance convention: ``"lightly"`` (default) multiplies the variance term by ½, as the
    authors' released code (facebookresearch/vicreg) and lightly's ``VICRegLoss`` do;
    ``"solo"`` omits the ½, as solo-learn's ``vicreg_loss_func`` and the formula above do.

    Numerics: computed in float32 (float64 inputs stay float64) with autocast disabled, so bf16
    autocast does not reach the statistics; ``eps > 0`` keeps values and gradients finite on
    collapsed (constant) embeddings.

    Distributed (``gather=True``, equal batch sizes on all ranks): the invariance term is the MSE
    over this rank's pairs; the variance and covariance terms are computed on the gathered global
    batch (as lightly and solo-learn do), identically on every rank. Hence the mean over ranks of
    ``loss`` (and of each term) equals the single-process value on the concatenated batch, and
    DDP-averaged gradients equal the single-process gradients (see :mod:`star_heads.distributed`).

    Args:
        z1, z2: Embeddings of the two views ``[B, D]``.
        sim, var, cov: Weights λ, μ, ν.
        eps: Added to the variance under the square root (> 0).
        variance_convention: ``"lightly"`` (with ½) or ``"solo"`` (without).
        gather: Compute variance and covariance on the batch of all ranks.

    Returns:
        :class:`VICRegOutput` with ``.loss`` and the three unweighted terms.

    Raises:
        ValueError: Shapes differ, the (global) batch has fewer than 2 rows, ``eps <= 0``, or an
            unknown convention.
        TypeError: Non-float inputs.
    """
    sim, var, cov = _check_weight(sim, "sim"), _check_weight(var, "var"), _check_weight(cov, "cov")
    eps = _check_eps(eps)
    convention = _check_convention(variance_convention)
    if not isinstance(gather, bool):
        raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
    z1 = check_float_tensor(z1, "z1", ndim=2)
    z2 = check_float_tensor(z2, "z2", ndim=2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape [batch, dim], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    rows = z1.shape[0] * (_dist.world_size() if gather else 1)
    if z1.shape[0] < 1 or rows < 2:
        raise ValueError(
            f"vicreg needs a batch of at least 2 rows for the variance (global batch when gather=True), got {rows}"
        )
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a, b = z1.to(dtype), z2.to(dtype)
        invariance = F.mse_loss(a, b)
        if gather:
            d = a.shape[1]
            both = _dist.gather(torch.cat([a, b], dim=1))  # one collective: [N, 2D]
            a, b = both[:, :d], both[:, d:]
        variance = _variance_term(a, eps) + _variance_term(b, eps)
        if convention == "lightly":
            variance = 0.5 * variance
        covariance = _covariance_term(a) + _covariance_term(b)
        loss = sim * invariance + var * variance + cov * covariance
    return VICRegOutput(loss=loss, invariance=invariance, variance=variance, covariance=covariance)


class VICRegLoss(nn.Module):
    """Module form of :func:`vicreg`; a drop-in for ``lightly.loss.VICRegLoss``.

    Same positional order, defaults and value as lightly (``lambda_param, mu_param, nu_param,
    gather_distributed, eps``); ``forward(z0, z1)`` returns the total loss as a Tensor, or the
    :class:`VICRegOutput` with ``return_terms=True``.

    Args:
        lambda_param: Invariance weight λ.
        mu_param: Variance weight μ.
        nu_param: Covariance weight ν.
        gather_distributed: Variance / covariance over all ranks.
        eps: Added under the square root of the variance.
        variance_convention: ``"lightly"`` (½ on the variance term, default) or ``"solo"``.
        return_terms: Return :class:`VICRegOutput` instead of a Tensor.
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        gather_distributed: bool = False,
        eps: float = 1e-4,
        *,
        variance_convention: VarianceConvention = "lightly",
        return_terms: bool = False,
    ) -> None:
        super().__init__()
        self.lambda_param = _check_weight(lambda_param, "lambda_param")
        self.mu_param = _check_weight(mu_param, "mu_param")
        self.nu_param = _check_weight(nu_param, "nu_param")
        if not isinstance(gather_distributed, bool):
            raise TypeError(f"gather_distributed must be a bool, got {type(gather_distributed).__name__}")
        self.gather_distributed = gather_distributed
        self.eps = _check_eps(eps)
        self.variance_convention = _check_convention(variance_convention)
        self.return_terms = bool(return_terms)

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor | VICRegOutput:
        out = vicreg(
            z0,
            z1,
            self.lambda_param,
            self.mu_param,
            self.nu_param,
            self.eps,
            variance_convention=self.variance_convention,
            gather=self.gather_distributed,
        )
        return out if self.return_terms else out.loss

    def extra_repr(self) -> str:
        return (
            f"lambda_param={self.lambda_param}, mu_param={self.mu_param}, nu_param={self.nu_param}, "
            f"eps={self.eps}, gather_distributed={self.gather_distributed}, "
            f"variance_convention={self.variance_convention!r}"
        )
