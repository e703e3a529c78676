"""``STAREquivariantMixin``: STAR's equivariant branch inside any solo-learn method (arXiv 2510.27222, Sec. 3)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from star_heads._checks import check_positive_int
from star_heads.integrations.solo_learn._swap import replace_projector
from star_heads.integrations.solo_learn.recipe import SoloRecipe, _get, recipe_from_cfg

__all__ = ["STAREquivariantMixin", "build_augment"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_augment(recipe: SoloRecipe) -> nn.Module:
    """The :class:`~star_heads.STARAugment` drawing ``recipe``'s views: one config per large crop (asymmetric
    recipes kept) and, for multi-crop recipes, the small crops."""
    from star_heads.augment import AugmentConfig, STARAugment

    views = [AugmentConfig(**v) for v in recipe.view_configs]
    if not recipe.num_local_crops:
        return STARAugment(recipe.size, views[0], view_configs=views)
    local = AugmentConfig(**{**recipe.local_config, "output_size": recipe.local_size})  # type: ignore[dict-item]
    return STARAugment(
        recipe.size,
        views[0],
        view_configs=views,
        num_local_crops=recipe.num_local_crops,
        local_size=recipe.local_size,
        local_scale=recipe.local_scale or (0.05, 0.14),
        local_config=local,
    )


def _check_lam(lam: object) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite float >= 0, got {lam!r}")
    return float(lam)


def _check_channels(value: object, name: str, *, positive: bool) -> tuple[float, float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a sequence of 3 floats (one per RGB channel), got {type(value).__name__}")
    values: tuple = tuple(value)  # type: ignore[arg-type]
    if len(values) != 3:
        raise ValueError(f"{name} must hold 3 values (one per RGB channel), got {len(values)}: {values!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must hold finite floats, got {values!r}")
    if positive and not all(v > 0 for v in values):
        raise ValueError(f"{name} must be > 0 per channel (the views are divided by it), got {values!r}")
    return values  # type: ignore[return-value]


class _BothTasksOnce:
    """Inside the method's own step, each plain ``projector(feats)`` call runs the expert bank once for both
    tasks (``task=None``): solo receives the invariant embedding, the equivariant one is kept in :attr:`eq`."""

    def __init__(self, head: nn.Module) -> None:
        self.head, self.eq, self._rewritten = head, [], []  # type: ignore[var-annotated]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plain = len(args) == 1 and not kwargs
        self._rewritten.append(plain)
        return (args, {"task": None}) if plain else None

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._rewritten.pop():
            return None
        self.eq.append(output["eq"])
        return output["inv"]

    def __enter__(self) -> _BothTasksOnce:
        self._handles = [
            self.head.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.head.register_forward_hook(self._post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


class STAREquivariantMixin:
    """Trains STAR's equivariant branch inside any solo-learn method; put it first in the bases::

        class STARBYOL(STAREquivariantMixin, BYOL):
            pass

        model = STARBYOL(cfg)           # cfg: solo's config, with its `augmentations` (its yaml)

    The data loader yields **un-augmented** images in [0, 1] as ``[indexes, images [B, 3, H, W], targets]`` (what
    :mod:`star_heads.integrations.solo_learn.pretrain` builds from solo's dataset). Each step,
    :class:`~star_heads.STARAugment` draws on the device the crops solo's yaml describes (see
    :mod:`~star_heads.integrations.solo_learn.recipe`: crop size, scale, each large crop's own photometric ops,
    solarization, small crops) with their parameters; the crops, normalised as solo would, go through the
    method's own ``training_step`` unchanged, which trains the invariant task through the STAR head over every
    crop. The head runs its expert bank once per crop for both tasks. The mixin then adds ``λ·L_eq``: the head's
    ``"eq"`` embeddings of the large crops are predicted from the original image's
    (:class:`~star_heads.EquivariantPredictor` on the normalised parameters) with the equivariant NT-Xent.

    Options come from ``cfg.star`` (``num_experts``, ``lam``, ``temperature``) or the keywords below (which win).

    Args (keyword, after solo's ``cfg``):
        image_size: View side when ``cfg`` has no ``augmentations`` (then STAR's own recipe draws two views);
            with ``augmentations`` it must be None or equal their large ``crop_size``.
        num_experts: Experts of the STAR head (replaces ``projector``; see :func:`replace_projector`), default 8.
        lam: λ, weight of the equivariant loss (finite, >= 0), default 1.
        eq_loss: ``(targets, predictions) -> Tensor`` (default equivariant NT-Xent, τ = ``cfg.star.temperature``
            or 0.2).
        mean, std: Per-channel normalisation of the views (default: what solo's pipeline applies for the
            dataset, ImageNet's without ``augmentations``).
        augment_kwargs: :class:`~star_heads.AugmentConfig` overrides, only without ``augmentations``.

    Raises:
        ValueError: a bad ``lam`` / ``mean`` / ``std``, a yaml recipe STAR cannot draw (named), or a crop count
            that disagrees with ``cfg.data``.
    """

    def __init__(
        self,
        cfg: Any,
        *,
        image_size: int | None = None,
        num_experts: int | None = None,
        lam: float | None = None,
        eq_loss: Any = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        augment_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from star_heads.augment import STARAugment
        from star_heads.equivariance import AugParamNormalizer, EquivariantPredictor
        from star_heads.losses import EquivariantNTXentLoss

        # every check before any state changes
        lam = _check_lam(_get(cfg, "star.lam", 1.0) if lam is None else lam)
        num_experts = check_positive_int(_get(cfg, "star.num_experts", 8) if num_experts is None else num_experts,
                                         "num_experts")
        temperature = float(_get(cfg, "star.temperature", 0.2))
        recipe = recipe_from_cfg(cfg) if _get(cfg, "augmentations", None) else None
        if recipe is not None:
            if image_size is not None and image_size != recipe.size:
                raise ValueError(f"image_size={image_size} disagrees with the config's crop_size {recipe.size}")
            if augment_kwargs:
                raise ValueError("augment_kwargs apply only without cfg.augmentations; edit the yaml's recipe instead")
            augment = build_augment(recipe)
            num_global, num_local = len(recipe.view_configs), recipe.num_local_crops
        elif image_size is None:
            raise ValueError(
                "cfg has no augmentations (solo's yaml recipe): pass image_size= for STAR's own two-view recipe"
            )
        else:
            augment = STARAugment(image_size, **(augment_kwargs or {}))
            num_global, num_local = augment.num_views, 0
        want = (int(_get(cfg, "data.num_large_crops", num_global)), int(_get(cfg, "data.num_small_crops", num_local)))
        if want != (num_global, num_local):
            raise ValueError(
                f"cfg.data asks for {want[0]} large + {want[1]} small crops, the augmentations draw {num_global} + "
                f"{num_local}"
            )
        default_mean, default_std = (recipe.mean, recipe.std) if recipe is not None else (IMAGENET_MEAN, IMAGENET_STD)
        mean = _check_channels(default_mean if mean is None else mean, "mean", positive=False)
        std = _check_channels(default_std if std is None else std, "std", positive=True)

        super().__init__(cfg)  # type: ignore[call-arg]
        head = replace_projector(self, num_experts=num_experts)  # type: ignore[arg-type]
        self.star_lam = lam
        self.star_augment = augment
        # 12-D parameters when the recipe solarizes
        self.star_predictor = EquivariantPredictor(int(head.output_dim), int(augment.param_dim))
        self.star_normalizer = AugParamNormalizer.for_augment(augment)
        self.star_eq_loss = eq_loss or EquivariantNTXentLoss(temperature)
        self.register_buffer("star_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("star_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def learnable_params(self) -> list[dict[str, Any]]:
        """solo's parameter groups plus the equivariant predictor's."""
        return super().learnable_params + [{"name": "star_predictor", "params": self.star_predictor.parameters()}]  # type: ignore[misc]

    def _normalise_views(self, x: Tensor) -> Tensor:
        return (x - self.star_mean) / self.star_std

    def _draw(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``(large crops, their parameters, small crops)``, each a list over crops, drawn in one call."""
        mc = self.star_augment.multi_crop(images)
        return list(mc.global_views), list(mc.global_params), list(mc.local_views)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        indexes, images, targets = batch
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise TypeError(
                "STAREquivariantMixin needs un-augmented images [B, 3, H, W] in [0, 1] as the batch's second item "
                f"(a dataset with transform=ToTensor()), got {type(images).__name__}"
                + (f" of shape {tuple(images.shape)}" if isinstance(images, Tensor) else "")
            )
        views, params, local = self._draw(images)
        x0 = self.star_augment.original(images)
        crops = [self._normalise_views(v) for v in views + local]
        with _BothTasksOnce(self.projector) as captured:  # the method's own objective over every crop
            out = super().training_step([indexes, crops, targets], batch_idx)  # type: ignore[misc]
        if len(captured.eq) < len(views):
            raise RuntimeError(
                f"{type(self).__name__}: the method called its projector {len(captured.eq)} times, expected one call "
                f"per large crop ({len(views)})"
            )
        z_views = captured.eq[: len(views)]  # solo projects the large crops first, in order
        z0 = self.projector(self.backbone(self._normalise_views(x0)), task="eq")
        a = self.star_normalizer(torch.cat(params)).to(z0.dtype).chunk(len(views))
        predictions = torch.cat([self.star_predictor(z0, ai) for ai in a])
        loss_eq = self.star_eq_loss(torch.cat(z_views), predictions)
        self.log_dict({"train_star_eq_loss": loss_eq.detach()}, on_epoch=True, sync_dist=True)  # type: ignore[attr-defined]
        if isinstance(out, dict):
            out["loss"] = out["loss"] + self.star_lam * loss_eq
            return out
        return out + self.star_lam * loss_eq
