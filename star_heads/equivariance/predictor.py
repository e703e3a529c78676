"""Equivariant predictors: map the original image's embedding and a transformation to a view's.

Axis legend: ``B`` batch, ``D`` embedding width (``embed_dim``), ``P`` parameter / latent width
(``param_dim``), ``H`` hidden width of the STAR MLP.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from star_heads._checks import (
    check_batch_for_batch_norm,
    check_bool,
    check_choice,
    check_float_tensor,
    check_input_dtype,
    check_layer,
    check_positive_int,
)
from star_heads._precision import autocast_dtype
from star_heads._running_stats import guarded_batch_norm
from star_heads._value_checks import value_checks_enabled
from star_heads.expert_layers import is_batch_norm

__all__ = ["EquivariantPredictor"]

PredictorKind = Literal["star", "equimod", "hyper"]


def _check_norm(norm: nn.Module, norm_layer: object) -> nn.Module:
    """Refuses a batch/instance norm the predictor cannot apply to ``[B, width]`` features (the bank's list,
    :data:`~star_heads.expert_layers.BATCH_NORMS`; unlike the bank, any other norm module is accepted)."""
    if isinstance(norm, nn.modules.batchnorm._NormBase) and not is_batch_norm(norm):
        raise TypeError(
            f"norm_layer must normalise [B, width] features (nn.BatchNorm1d, nn.SyncBatchNorm, nn.LayerNorm, ...), "
            f"got {norm_layer!r}, which builds {type(norm).__name__}"
        )
    return norm


def _norm_without_affine(norm_layer: type[nn.Module], dim: int) -> nn.Module:
    """``norm_layer(dim)`` with its learnable affine switched off (BatchNorm / LayerNorm spellings)."""
    for kwargs in ({"affine": False}, {"elementwise_affine": False}):
        try:
            return norm_layer(dim, **kwargs)
        except TypeError:
            continue
    raise TypeError(f"norm_layer {norm_layer.__name__} accepts neither affine=False nor elementwise_affine=False")


class EquivariantPredictor(nn.Module):
    """Predicts a view's equivariant embedding from the original's and the transformation.

    ``kind="star"`` (STAR, arXiv 2510.27222: residual equivariant predictor)::

        ẑ = z0 + φ([z0 ; ψ(a)]),   ψ = Linear(P → D, bias),
        φ = Linear(2D → H, no bias) → norm → act → Linear(H → H, no bias) → norm → act → Linear(H → D, bias)

    with ``H = hidden_dim`` (512 in the paper: φ is 256 → 512 → 512 → 128 for D = 128).

    ``kind="equimod"`` (EquiMod, arXiv 2211.01244): no residual::

        ẑ = norm_noaffine(Linear(2D → D, no bias)([z0 ; norm(Linear(P → D, no bias)(a))]))

    (``hidden_dim`` and ``act_layer`` are unused there.)

    ``kind="hyper"`` (SIE, arXiv 2302.10283): a hypernetwork maps the transformation latent to
    the weights of a D×D linear map applied to ``z0``; SIE's linear hypernetwork, no bias::

        ẑ = W(a) z0,   W(a) = reshape(Linear(P → D·D, no bias)(a), [D, D])  (= sum_p a_p M_p)

    (``hidden_dim``, ``norm_layer`` and ``act_layer`` are unused there; ``mlp`` is absent.)

    The transformation ``a`` is whatever vector describes it: the standardised 11-D STAR
    augmentation parameters (see :class:`AugParamNormalizer`), EquiMod's 15/17-D encodings, or an
    external transformation latent as in SIE, e.g. a relative-rotation quaternion with
    ``param_dim=4``. Submodules: ``param_encoder`` (ψ / EquiMod's parameter projector) and
    ``mlp`` (φ / EquiMod's predictor layer); their weights keep PyTorch's default initialisation,
    as in the reference code.

    Args:
        embed_dim: Embedding width D.
        param_dim: Parameter / latent width P.
        kind: ``"star"``, ``"equimod"`` or ``"hyper"``.
        hidden_dim: Hidden width H of φ (``"star"`` only).
        norm_layer: Normalisation class for ``[B, width]`` features, called as ``norm_layer(width)``
            (``nn.BatchNorm1d``, ``nn.SyncBatchNorm``, ``nn.LayerNorm``; image or instance norms are refused).
        act_layer: Activation class, called as ``act_layer()``.
        check_finite: Check ``z0`` and ``params`` for NaN/Inf before they reach a layer; ValueError when
            found. One host-device sync per call, so off by default (:func:`star_heads.set_value_checks`
            turns it on everywhere). Without it a non-finite batch still never reaches the BatchNorm
            running statistics: they skip that batch, decided on the device (the output carries the NaN).

    Inputs must have the parameters' dtype, except under ``torch.autocast``.
    """

    def __init__(
        self,
        embed_dim: int = 128,
        param_dim: int = 11,
        *,
        kind: PredictorKind = "star",
        hidden_dim: int = 512,
        norm_layer: type[nn.Module] = nn.BatchNorm1d,
        act_layer: type[nn.Module] = nn.ReLU,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        self.check_finite = check_bool(check_finite, "check_finite")
        check_layer(norm_layer, "norm_layer", optional=False)
        check_layer(act_layer, "act_layer", optional=False)
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.param_dim = check_positive_int(param_dim, "param_dim")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        self.kind: PredictorKind = check_choice(kind, "kind", PredictorKind)
        d, h = embed_dim, hidden_dim
        if kind == "star":
            self.param_encoder = nn.Linear(param_dim, d, bias=True)
            self.mlp = nn.Sequential(
                nn.Linear(2 * d, h, bias=False),
                _check_norm(norm_layer(h), norm_layer),
                act_layer(),
                nn.Linear(h, h, bias=False),
                _check_norm(norm_layer(h), norm_layer),
                act_layer(),
                nn.Linear(h, d, bias=True),
            )
        elif kind == "equimod":
            encoder_norm = _check_norm(norm_layer(d), norm_layer)
            self.param_encoder = nn.Sequential(nn.Linear(param_dim, d, bias=False), encoder_norm)
            self.mlp = nn.Sequential(
                nn.Linear(2 * d, d, bias=False), _check_norm(_norm_without_affine(norm_layer, d), norm_layer)
            )
        else:
            self.param_encoder = nn.Linear(param_dim, d * d, bias=False)

    def forward(self, z0: Tensor, params: Tensor) -> Tensor:
        """Predicts ``[B, D]`` from the original embedding ``z0`` ``[B, D]`` and ``params`` ``[B, P]``.

        Raises:
            TypeError: non-float tensors, or ``z0`` of another dtype than the parameters outside autocast.
            ValueError: wrong shapes, a batch of one while a BatchNorm uses batch statistics, or
                (``check_finite``) NaN/Inf values.
        """
        z0 = check_float_tensor(z0, "z0", sizes=[None, self.embed_dim])
        params = check_float_tensor(params, "params", sizes=[None, self.param_dim])
        if params.shape[0] != z0.shape[0]:
            raise ValueError(
                f"params must have one row per z0 row: z0 has {z0.shape[0]} rows, params has {params.shape[0]}"
            )
        weight = next(self.parameters()).dtype
        autocast = autocast_dtype(z0.device.type) is not None
        check_input_dtype(z0, weight, "z0", "predictor")
        check_batch_for_batch_norm(z0, self, "z0")
        if value_checks_enabled(self.check_finite):  # after the shape checks, before any layer: one sync
            if not bool(torch.isfinite(z0).all() & torch.isfinite(params).all()):
                bad = "z0" if not bool(torch.isfinite(z0).all()) else "params"
                raise ValueError(f"{bad} contains NaN or Inf values (check_finite=True)")
        if autocast and z0.dtype != weight:  # autocast never casts float64: start from the parameters' dtype
            z0 = z0.to(weight)
        if self.kind == "hyper":
            weights = rearrange(self.param_encoder(params.to(z0.dtype)), "B (i j) -> B i j", i=self.embed_dim)
            return einsum(weights, z0.to(weights.dtype), "B i j, B j -> B i")
        encoded = _run(self.param_encoder, params.to(z0.dtype))  # [B, D]
        out = _run(self.mlp, torch.cat([z0, encoded], dim=1))  # [B, 2D] -> [B, D]
        return z0 + out if self.kind == "star" else out

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, embed_dim={self.embed_dim}, param_dim={self.param_dim}"


def _run(layers: nn.Module, h: Tensor) -> Tensor:
    """``layers(h)`` (one module or an ``nn.Sequential``), each BatchNorm through :func:`guarded_batch_norm`."""
    for layer in layers if isinstance(layers, nn.Sequential) else (layers,):
        h = guarded_batch_norm(layer, h)
    return h
