"""solo-learn: swap a method's projector for a STAR head, and a mixin that trains STAR's equivariant branch.

Install: solo-learn's only PyPI release (1.0.2) pins torch 1.9, so ``pip install solo-learn`` does not resolve
beside a current torch. Install solo-learn from its source (``git clone`` the solo-learn repository,
``pip install -e .`` inside it, or put the checkout on ``PYTHONPATH``), then ``pip install star-heads``.

Usage::

    from solo.methods import BYOL
    from star_heads.integrations.solo_learn import replace_projector

    model = BYOL(cfg)
    replace_projector(model)   # before trainer.fit: solo builds the optimiser from learnable_params then

For methods with a momentum (teacher) projector (BYOL, MoCo v2+/v3, NNBYOL, ReSSL, All4One) the
``momentum_projector`` is replaced too, by an identical copy of the new head with gradients off, so solo's
``momentum_pairs`` and its momentum updater walk two identical architectures in lockstep.
:class:`STAREquivariantMixin` adds the equivariant objective (STAR, arXiv 2510.27222, Sec. 3) to any method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from star_heads.augment import PARAM_DIM, STARAugment
from star_heads.equivariance import AugParamNormalizer, EquivariantPredictor
from star_heads.integrations.swap import swap_projector
from star_heads.losses import EquivariantNTXentLoss

__all__ = ["replace_projector", "STAREquivariantMixin", "SOLO_INSTALL_HINT"]

SOLO_INSTALL_HINT = (
    "solo-learn is not importable. Its PyPI release (1.0.2) pins torch 1.9, so install it from source instead: "
    "clone the solo-learn repository and run `pip install -e .` in it (or put the checkout on PYTHONPATH)"
)


def _base_method() -> type:
    try:
        from solo.methods.base import BaseMethod
    except ImportError as err:
        raise ImportError(SOLO_INSTALL_HINT) from err
    return BaseMethod


def replace_projector(
    method: nn.Module, *, num_experts: int = 8, **kwargs: Any
) -> nn.Module:
    """Replaces ``method.projector`` of a solo-learn method by a STAR head of the same shape (and its
    ``momentum_projector``, if any, by a frozen copy of that head).

    Call it before ``trainer.fit``: solo-learn reads ``learnable_params`` when it builds the optimiser. The
    new head returns the invariant embedding from ``head(x)``, so the method's loss code is unchanged.

    Args:
        method: A solo-learn method (``solo.methods.base.BaseMethod``) with a ``projector``.
        num_experts: Experts of the STAR head.
        **kwargs: Passed to :func:`~star_heads.integrations.swap_projector` (head and layer options, e.g.
            ``drop_hidden_bias=True`` for the paper's bias-free hidden Linears where solo's projector has biases).

    Returns:
        The new online head.

    Raises:
        ImportError: solo-learn is not importable (the message says how to install it).
        TypeError: ``method`` is not a solo-learn method.
        AttributeError: the method has no ``projector`` (DINO's ``head``, MAE and the linear probe have none).
    """
    base = _base_method()
    if not isinstance(method, base):
        raise TypeError(f"method must be a solo-learn BaseMethod, got {type(method).__name__}")
    if not isinstance(getattr(method, "projector", None), nn.Module):
        raise AttributeError(f"{type(method).__name__} has no projector to replace")
    momentum = "momentum_projector" if isinstance(getattr(method, "momentum_projector", None), nn.Module) else None
    return swap_projector(
        method, "projector", momentum_attr=momentum, num_experts=num_experts, **kwargs
    )


class STAREquivariantMixin:
    """Trains STAR's equivariant branch inside any solo-learn method; put it first in the bases::

        class STARBYOL(STAREquivariantMixin, BYOL):
            pass

        model = STARBYOL(cfg, image_size=32)

    The data loader yields **un-augmented** images in [0, 1] as ``[indexes, images [B, 3, H, W], targets]``
    (e.g. solo's dataset with ``transform=ToTensor()``). Each step, :class:`~star_heads.STARAugment` draws two
    views and their 11-D parameters on the device; the views (normalised with ``mean``/``std``) go through the
    method's own ``training_step`` unchanged, which trains the invariant task through the STAR head. The mixin
    then adds ``λ·L_eq``: the head's ``"eq"`` embeddings of the two views are predicted from the original's
    (:class:`~star_heads.EquivariantPredictor` on the normalised parameters) with the equivariant NT-Xent.

    Args (keyword, after solo's ``cfg``):
        image_size: Side of the views (and of x0).
        num_experts: Experts of the STAR head (replaces ``projector``; see :func:`replace_projector`).
        lam: λ, weight of the equivariant loss.
        eq_loss: ``(targets, predictions) -> Tensor`` (default equivariant NT-Xent, τ = 0.2).
        mean, std: Per-channel normalisation of the views for the backbone (ImageNet's by default).
        augment_kwargs: :class:`~star_heads.AugmentConfig` overrides for the views.
    """

    def __init__(
        self,
        cfg: Any,
        *,
        image_size: int = 32,
        num_experts: int = 8,
        lam: float = 1.0,
        eq_loss: Any = None,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        augment_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(cfg)  # type: ignore[call-arg]
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"lam must be a float >= 0, got {lam!r}")
        head = replace_projector(self, num_experts=num_experts)  # type: ignore[arg-type]
        self.star_lam = float(lam)
        self.star_augment = STARAugment(image_size, **(augment_kwargs or {}))
        self.star_predictor = EquivariantPredictor(head.output_dim, PARAM_DIM)
        self.star_normalizer = AugParamNormalizer(PARAM_DIM)
        self.star_eq_loss = eq_loss or EquivariantNTXentLoss(0.2)
        self.register_buffer("star_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("star_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def learnable_params(self) -> list[dict[str, Any]]:
        """solo's parameter groups plus the equivariant predictor's."""
        return super().learnable_params + [{"name": "star_predictor", "params": self.star_predictor.parameters()}]  # type: ignore[misc]

    def _normalise_views(self, x: Tensor) -> Tensor:
        return (x - self.star_mean) / self.star_std

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        indexes, images, targets = batch
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise TypeError(
                "STAREquivariantMixin needs un-augmented images [B, 3, H, W] in [0, 1] as the batch's second item "
                f"(a dataset with transform=ToTensor()), got {type(images).__name__}"
                + (f" of shape {tuple(images.shape)}" if isinstance(images, Tensor) else "")
            )
        (x1, p1), (x2, p2) = self.star_augment(images), self.star_augment(images)
        x0 = self.star_augment.original(images)
        feats: list[Tensor] = []
        handle = self.projector.register_forward_pre_hook(lambda module, args: feats.append(args[0]))
        try:  # the method's own objective on the two views, through the STAR head's invariant task
            loss = super().training_step([indexes, [self._normalise_views(x1), self._normalise_views(x2)], targets], batch_idx)  # type: ignore[misc]
        finally:
            handle.remove()
        h1, h2 = feats[0], feats[1]  # the projector's first two calls are the two large crops, in order
        h0 = self.backbone(self._normalise_views(x0))
        z0, z1, z2 = (self.projector(h, task="eq") for h in (h0, h1, h2))
        a1, a2 = self.star_normalizer(torch.cat([p1, p2])).to(z0.dtype).chunk(2)
        predictions = torch.cat([self.star_predictor(z0, a1), self.star_predictor(z0, a2)])
        loss_eq = self.star_eq_loss(torch.cat([z1, z2]), predictions)
        self.log_dict({"train_star_eq_loss": loss_eq.detach()}, on_epoch=True, sync_dist=True)  # type: ignore[attr-defined]
        return loss + self.star_lam * loss_eq
