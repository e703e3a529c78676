"""VICReg loss (Bardes et al., ICLR 2022) with its three terms returned separately."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from star_heads import distributed as _dist
from star_heads._checks import check_bool, check_choice, check_float, check_float_tensor, check_positive_float
from star_heads._precision import autocast_off
from star_heads.losses._numerics import off_diagonal_square_mean

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
        """``{prefix + "loss": float, prefix + "invariance": float, ...}``: Python floats for a logger (a host sync)."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__} {prefix!r}")
        out = {"loss": self.loss, **self.terms()}
        return {f"{prefix}{k}": float(v.detach()) for k, v in out.items()}


def _variance_term(z: Tensor, eps: float) -> Tensor:
    """``v(Z) = mean_j ReLU(1 - sqrt(Var(Z_j) + eps))`` with the unbiased (n - 1) variance."""
    std = torch.sqrt(z.var(dim=0, unbiased=True) + eps)
    return F.relu(1.0 - std).mean()


def _covariance_term(z: Tensor) -> Tensor:
    """``c(Z) = (1/d) sum_{i != j} Cov(Z)_ij^2`` with the unbiased covariance (overflow-safe, sync-free)."""
    return off_diagonal_square_mean(z)


def _check_weight(value: object, name: str) -> float:
    return check_float(value, name, minimum=0.0)


def _check_eps(eps: object) -> float:
    """``eps > 0``: with 0 the gradient of sqrt(Var + eps) is infinite on a collapsed dimension."""
    return check_positive_float(eps, "eps")


def _check_convention(convention: object) -> VarianceConvention:
    return check_choice(convention, "variance_convention", VarianceConvention)


def _check_embeddings(z: object, name: str) -> Tensor:
    """A ``[batch, dim]`` float tensor; a 3-D or 4-D input is named as VICRegL's local features."""
    if isinstance(z, Tensor) and z.ndim in (3, 4):
        raise ValueError(
            f"{name} must be [batch, dim] embeddings, got {z.ndim} dimensions with shape {tuple(z.shape)}: "
            "per-location features ([batch, locations, dim] or [batch, H, W, dim]) are VICRegL's input; use "
            "lightly.loss.VICRegLLoss "
            "for them, or pool them to [batch, dim]"
        )
    z = check_float_tensor(z, name, ndim=2)
    if z.shape[1] < 1:
        raise ValueError(f"{name} must have at least one embedding dimension, got shape {tuple(z.shape)}")
    return z


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
    collapsed (constant) embeddings. The covariance term is computed on embeddings divided by
    their largest centred entry and scaled back at the end, so it is finite whenever its value
    fits the result dtype (the naive ``Cov²`` overflows float32 at entries of about 1e19).
    No host sync: the diagonal is removed with a fixed-shape mask.

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
        ValueError: Shapes differ, the (global) batch has fewer than 2 rows, zero-width embeddings,
            3-D / 4-D (VICRegL-style per-location) inputs, ``eps <= 0``, or an unknown convention.
        TypeError: Non-float inputs, or an argument of the wrong type (``eps="a"``, ``gather=1``).
        RuntimeError: ``gather=True`` in a torch build without torch.distributed.
    """
    sim, var, cov = _check_weight(sim, "sim"), _check_weight(var, "var"), _check_weight(cov, "cov")
    eps = _check_eps(eps)
    convention = _check_convention(variance_convention)
    gather = _dist.check_gather(gather, "gather")
    z1 = _check_embeddings(z1, "z1")
    z2 = _check_embeddings(z2, "z2")
    if z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same shape [batch, dim], got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    rows = z1.shape[0] * (_dist.world_size() if gather else 1)
    if z1.shape[0] < 1 or rows < 2:
        raise ValueError(
            f"vicreg needs a batch of at least 2 rows for the variance (global batch when gather=True), got {rows}"
        )
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with autocast_off(z1.device.type):
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
        self.gather_distributed = _dist.check_gather(gather_distributed, "gather_distributed")
        self.eps = _check_eps(eps)
        self.variance_convention = _check_convention(variance_convention)
        self.return_terms = check_bool(return_terms, "return_terms")

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
