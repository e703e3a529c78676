"""solo-learn's augmentation config (``cfg.augmentations``) mapped onto :class:`~star_heads.STARAugment`.

solo's yaml lists pipelines, each ``num_crops`` views of ``crop_size`` pixels (``solo.data.pretrain_dataloader.
build_transform_pipeline``); pipelines at the first pipeline's ``crop_size`` are the large (global) crops, the others
small (local) crops. STAR draws the same views on the device and returns each view's parameters (arXiv 2510.27222,
Sec. 3: the equivariant objective predicts a view's embedding from the original's and the view's parameters):

=============================  ==============================================================================
solo key                       STAR
=============================  ==============================================================================
``crop_size``                  view size (large crops), ``local_size`` (small crops)
``rrc.crop_min/max_scale``     ``AugmentConfig.scale`` (large crops), ``local_scale`` (small crops)
``color_jitter.*``             ``jitter_p`` (``prob``), ``brightness``, ``contrast``, ``saturation``, ``hue``
``grayscale.prob``             ``grayscale_p``
``gaussian_blur.prob``         ``blur_p`` (sigma in [0.1, 2.0], as solo's ``GaussianBlur``)
``solarization.prob``          ``solarize_p`` (threshold 0.5, as PIL's default 128)
``horizontal_flip.prob``       ``flip_p``
``num_crops``                  one view per crop; each large crop keeps its own pipeline (BYOL's asymmetry)
``mean`` / ``std``, dataset    the normalisation solo's pipeline would apply (read from solo's own transform)
``rrc.enabled: False``         refused: STAR's parameters encode a random crop box
``equalization.prob > 0``      refused: STAR's parameter vector has no equalization entry
=============================  ==============================================================================

Like solo's torchvision pipeline, only ``prob`` switches an op on (an op's ``enabled`` key is ignored, as there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SoloRecipe", "recipe_from_cfg"]


@dataclass(frozen=True)
class SoloRecipe:
    """What STAR draws for one solo config.

    Attributes:
        view_configs: One :class:`~star_heads.AugmentConfig` keyword dict per large crop, in solo's crop order.
        size: Large-crop side.
        num_local_crops: Small crops per image (0 without multi-crop).
        local_size: Small-crop side (None without multi-crop).
        local_scale: Small-crop area range (None without multi-crop).
        local_config: :class:`~star_heads.AugmentConfig` keywords of the small crops' photometric ops.
        mean, std: Per-channel normalisation of every view, as solo's pipeline applies it.
    """

    view_configs: tuple[dict[str, Any], ...]
    size: int
    num_local_crops: int = 0
    local_size: int | None = None
    local_scale: tuple[float, float] | None = None
    local_config: dict[str, Any] | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _get(node: Any, path: str, default: Any) -> Any:
    for key in path.split("."):
        if node is None:
            return default
        node = node.get(key) if hasattr(node, "get") else getattr(node, key, None)
    return default if node is None else node


def _photometric(aug: Any, where: str) -> dict[str, Any]:
    """AugmentConfig keywords of one solo pipeline, except the crop (refusing what STAR cannot draw)."""
    if float(_get(aug, "equalization.prob", 0.0)) > 0:
        raise ValueError(
            f"{where}.equalization.prob = {_get(aug, 'equalization.prob', 0.0)}: STAR's augmentation parameter vector "
            "has no equalization entry, so its equivariance targets cannot describe it; set equalization.prob=0"
        )
    jitter_p = float(_get(aug, "color_jitter.prob", 0.0))
    out: dict[str, Any] = {
        "flip_p": float(_get(aug, "horizontal_flip.prob", 0.0)),
        "jitter_p": jitter_p,
        "grayscale_p": float(_get(aug, "grayscale.prob", 0.0)),
        "blur_p": float(_get(aug, "gaussian_blur.prob", 0.0)),
        "blur_sigma": (0.1, 2.0),
        "solarize_p": float(_get(aug, "solarization.prob", 0.0)),
    }
    for key in ("brightness", "contrast", "saturation", "hue"):
        out[key] = float(_get(aug, f"color_jitter.{key}", 0.0)) if jitter_p > 0 else 0.0
    return out


def _scale(aug: Any, where: str) -> tuple[float, float]:
    if not bool(_get(aug, "rrc.enabled", True)):
        raise ValueError(
            f"{where}.rrc.enabled = False (a plain resize): STAR's parameter vector encodes a random crop box; "
            "enable rrc (crop_min_scale = crop_max_scale = 1.0 keeps nearly the whole image)"
        )
    return float(_get(aug, "rrc.crop_min_scale", 0.08)), float(_get(aug, "rrc.crop_max_scale", 1.0))


def _normalisation(dataset: str, aug: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std solo's own pipeline normalises with (its per-dataset table, else the pipeline's keys)."""
    from solo.data.pretrain_dataloader import build_transform_pipeline
    from torchvision import transforms

    pipeline = build_transform_pipeline(dataset, aug)
    (norm,) = [t for t in pipeline.transforms if isinstance(t, transforms.Normalize)]
    return tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std)


def recipe_from_cfg(cfg: Any) -> SoloRecipe:
    """Reads ``cfg.augmentations`` and ``cfg.data.dataset`` of a solo config (after ``parse_cfg`` or not).

    Raises:
        ValueError: no augmentations, fewer than two large crops, small crops of several sizes or with other
            photometric settings than STAR can draw, ``rrc.enabled = False`` or equalization (each named).
    """
    augs = list(_get(cfg, "augmentations", None) or [])
    if not augs:
        raise ValueError("cfg.augmentations is missing or empty: the STAR recipe is read from solo's augmentation yaml")
    dataset = str(_get(cfg, "data.dataset", "custom"))
    size = int(augs[0].crop_size)
    views: list[dict[str, Any]] = []
    local: list[tuple[int, Any, int]] = []
    for i, aug in enumerate(augs):
        where = f"augmentations[{i}]"
        n = int(_get(aug, "num_crops", 1))
        if int(aug.crop_size) == size:
            view = {**_photometric(aug, where), "scale": _scale(aug, where), "output_size": size}
            views += [view] * n
        elif n > 0:
            local.append((i, aug, n))
    if len(views) < 2:
        raise ValueError(
            f"STAR needs at least 2 large crops (the views whose parameters the equivariant objective predicts), "
            f"got {len(views)} at crop_size {size}"
        )
    mean, std = _normalisation(dataset, augs[0])
    if not local:
        return SoloRecipe(tuple(views), size, mean=mean, std=std)  # type: ignore[arg-type]
    sizes = {int(aug.crop_size) for _, aug, _ in local}
    if len(sizes) > 1:
        raise ValueError(f"small crops of one size are supported, got crop sizes {sorted(sizes)}")
    i, aug, _ = local[0]
    scales = {_scale(a, f"augmentations[{j}]") for j, a, _ in local}
    photometric = [_photometric(a, f"augmentations[{j}]") for j, a, _ in local]
    if len(scales) > 1 or any(p != photometric[0] for p in photometric):
        raise ValueError("all small-crop pipelines must share one recipe (scale and photometric ops)")
    return SoloRecipe(
        tuple(views),
        size,
        num_local_crops=sum(n for _, _, n in local),
        local_size=sizes.pop(),
        local_scale=scales.pop(),
        local_config=photometric[0],
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
    )
